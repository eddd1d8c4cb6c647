//! Reverse-mode automatic differentiation over the IR.
//!
//! [`differentiate`] takes a forward graph with a scalar loss output and returns one graph
//! holding the forward nodes (unchanged, same indices) followed by the backward nodes, with an
//! output `grad/<parameter name>` for every trainable parameter the loss depends on. Later
//! passes (checkpointing, memory planning) therefore see the whole training step at once.
//!
//! The backward graph is built by visiting the forward nodes in reverse program order. Each
//! node that lies on a path from a trainable parameter to the loss receives the sum of the
//! gradients flowing into its outputs and emits, through its op's vector-Jacobian product rule
//! (`rules`, found from the op's name), the gradients of the inputs that need one. Inputs that
//! do not depend on a trainable parameter (the image, targets, indices) get no gradient and no
//! nodes are emitted for them. Ops that are not differentiable (anchor generation, top-k
//! selection, NMS, target assignment) stop the gradient, as detectron2 detaches proposals.
//!
//! The backward starts from `d loss / d loss = 1`. [`differentiate_with`] can start it from a
//! graph input instead ([`LossSeed::Input`]): with the loss scale of mixed-precision training
//! there, every backward value is the plain gradient times the scale, as
//! `GradScaler.scale(loss).backward()` computes it.

mod ctx;
mod rules;

use std::collections::{HashMap, HashSet};

use vitdet_ir::ops::{Affine, Binary, BinaryKind, Cast, Input, Reshape};
use vitdet_ir::{DType, Graph, IrError, NodeIndex, Op, TensorType, Value};

pub use ctx::Ctx;

/// Prefix of the graph outputs that carry parameter gradients: `grad/<parameter name>`.
pub const GRAD_PREFIX: &str = "grad/";

/// Scope given to backward nodes: `backward/<forward scope>`.
pub const BACKWARD_SCOPE: &str = "backward/";

/// Why a graph could not be differentiated.
#[derive(Debug, thiserror::Error)]
pub enum AutodiffError {
    #[error("the graph has no output named `{0}` to differentiate")]
    UnknownLoss(String),
    #[error("loss `{name}` must be a floating-point scalar, found {ty}")]
    NotScalar { name: String, ty: String },
    #[error("loss seed input `{name}` must be a floating-point scalar ([] or [1]), found {ty}")]
    BadSeed { name: String, ty: String },
    #[error("node %{node} ({op}) in `{scope}`: {message}")]
    Rule {
        node: usize,
        op: String,
        scope: String,
        message: String,
    },
    #[error(transparent)]
    Ir(#[from] IrError),
}

/// The result of [`differentiate`].
#[derive(Clone, Debug)]
pub struct Differentiated {
    /// Forward and backward nodes; outputs: the forward outputs, then one gradient per entry of
    /// `gradients`.
    pub graph: Graph,
    /// The differentiated output.
    pub loss: String,
    /// `(parameter name, output name)` for every trainable parameter the loss depends on, in
    /// the forward graph's parameter order.
    pub gradients: Vec<(String, String)>,
    /// Trainable parameters the loss does not depend on (they get no gradient).
    pub unreached: Vec<String>,
    /// Number of nodes of the forward graph; backward nodes are those added after them.
    pub forward_nodes: usize,
}

/// Where the backward starts: the gradient fed to the loss.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LossSeed {
    /// The constant 1: plain gradients.
    #[default]
    One,
    /// The graph input of this name, a floating-point scalar (shape `[]`, `[1]` or the loss's),
    /// cast to the loss's dtype and reshaped to its shape: every gradient is the plain one times
    /// its value (the loss scale). When the forward graph has no input of that name, one is
    /// added: f32, the loss's shape.
    Input(String),
}

/// Options of [`differentiate_with`].
#[derive(Clone, Debug, Default)]
pub struct DifferentiateOptions {
    pub seed: LossSeed,
}

/// Differentiates `forward`'s output `loss` with respect to every trainable parameter.
pub fn differentiate(forward: &Graph, loss: &str) -> Result<Differentiated, AutodiffError> {
    differentiate_with(forward, loss, &DifferentiateOptions::default())
}

/// [`differentiate`] with the backward seeded as `options` say.
pub fn differentiate_with(
    forward: &Graph,
    loss: &str,
    options: &DifferentiateOptions,
) -> Result<Differentiated, AutodiffError> {
    forward.verify()?;
    let loss_value = forward
        .outputs
        .iter()
        .find(|o| o.name == loss)
        .map(|o| o.value)
        .ok_or_else(|| AutodiffError::UnknownLoss(loss.to_string()))?;
    let loss_ty = forward.value_type(loss_value);
    if !loss_ty.dtype.is_float() || loss_ty.numel() != 1 {
        return Err(AutodiffError::NotScalar {
            name: loss.to_string(),
            ty: loss_ty.to_string(),
        });
    }

    let order = forward.topo_order()?;
    let on_path = nodes_on_gradient_path(forward, &order, loss_value.node);

    let mut graph = forward.clone();
    let forward_nodes = graph.graph.node_count();
    // Gradient contributions per forward value, summed when the value's node is visited.
    let mut pending: HashMap<Value, Vec<Value>> = HashMap::new();
    let seed_scope = format!("{BACKWARD_SCOPE}{}", forward.node(loss_value.node).scope);
    let seed = match &options.seed {
        // d loss / d loss = 1, built from the loss itself so it needs no constant op.
        LossSeed::One => graph.add(Affine { mul: 0.0, add: 1.0 }, &seed_scope, &[loss_value])?,
        LossSeed::Input(name) => seed_input(&mut graph, name, loss_ty, &seed_scope)?,
    };
    pending.entry(loss_value).or_default().push(seed);

    let mut param_grads: HashMap<NodeIndex, Value> = HashMap::new();
    for &n in order.iter().rev() {
        if !on_path.contains(&n) {
            continue;
        }
        let node = forward.node(n);
        let scope = format!("{BACKWARD_SCOPE}{}", node.scope);
        let mut dys = Vec::with_capacity(node.outputs.len());
        for output in 0..node.outputs.len() {
            let parts = pending.remove(&Value { node: n, output }).unwrap_or_default();
            dys.push(sum_all(&mut graph, &scope, parts)?);
        }
        if dys.iter().all(Option::is_none) {
            continue;
        }
        if let Op::Parameter(_) = node.op {
            param_grads.insert(n, dys[0].expect("parameters have one output"));
            continue;
        }
        let inputs = forward.inputs_of(n);
        let needs: Vec<bool> = inputs.iter().map(|v| on_path.contains(&v.node)).collect();
        if !needs.iter().any(|&b| b) {
            continue;
        }
        let mut ctx = Ctx::new(&mut graph, scope, n, inputs.clone(), needs.clone());
        let grads = rules::vjp(&mut ctx, &dys).map_err(|message| AutodiffError::Rule {
            node: n.index(),
            op: node.op.name().to_string(),
            scope: node.scope.clone(),
            message,
        })?;
        for ((v, g), need) in inputs.iter().zip(grads).zip(needs) {
            if let (Some(g), true) = (g, need) {
                pending.entry(*v).or_default().push(g);
            }
        }
    }

    let mut gradients = Vec::new();
    let mut unreached = Vec::new();
    for (idx, p) in forward.parameters() {
        if !p.trainable {
            continue;
        }
        match param_grads.get(&idx) {
            Some(&g) => {
                let name = format!("{GRAD_PREFIX}{}", p.name);
                graph.set_output(&name, g);
                gradients.push((p.name.clone(), name));
            }
            None => unreached.push(p.name.clone()),
        }
    }
    graph.verify()?;
    Ok(Differentiated {
        graph,
        loss: loss.to_string(),
        gradients,
        unreached,
        forward_nodes,
    })
}

/// The input `name` (added when missing) as a value of the loss's type.
fn seed_input(g: &mut Graph, name: &str, loss_ty: &TensorType, scope: &str) -> Result<Value, AutodiffError> {
    let existing = g
        .inputs()
        .find(|(_, n, _)| *n == name)
        .map(|(idx, _, ty)| (Value::from(idx), ty.clone()));
    let (mut v, ty) = match existing {
        Some((v, ty)) => {
            if !ty.dtype.is_float() || ty.numel() != 1 {
                return Err(AutodiffError::BadSeed {
                    name: name.to_string(),
                    ty: ty.to_string(),
                });
            }
            (v, ty)
        }
        None => {
            let ty = TensorType::new(DType::F32, loss_ty.shape.clone());
            let input = Input {
                name: name.to_string(),
                ty: ty.clone(),
            };
            (g.add(input, scope, &[])?, ty)
        }
    };
    if ty.dtype != loss_ty.dtype {
        v = g.add(Cast { dtype: loss_ty.dtype }, scope, &[v])?;
    }
    if ty.shape != loss_ty.shape {
        v = g.add(
            Reshape {
                shape: loss_ty.shape.clone(),
            },
            scope,
            &[v],
        )?;
    }
    Ok(v)
}

/// Nodes that depend on a trainable parameter and that the loss depends on: exactly the nodes
/// gradients flow through.
fn nodes_on_gradient_path(g: &Graph, order: &[NodeIndex], loss: NodeIndex) -> HashSet<NodeIndex> {
    let mut from_params = HashSet::new();
    for &n in order {
        let node = g.node(n);
        let depends = match &node.op {
            Op::Parameter(p) => p.trainable,
            op => rules::differentiable(op) && g.inputs_of(n).iter().any(|v| from_params.contains(&v.node)),
        };
        if depends {
            from_params.insert(n);
        }
    }
    let mut to_loss = HashSet::from([loss]);
    for &n in order.iter().rev() {
        if to_loss.contains(&n) {
            for v in g.inputs_of(n) {
                to_loss.insert(v.node);
            }
        }
    }
    from_params.intersection(&to_loss).copied().collect()
}

/// The sum of gradient contributions, or `None` when there are none.
fn sum_all(g: &mut Graph, scope: &str, parts: Vec<Value>) -> Result<Option<Value>, IrError> {
    let mut parts = parts.into_iter();
    let Some(mut acc) = parts.next() else {
        return Ok(None);
    };
    for p in parts {
        acc = g.add(Binary { kind: BinaryKind::Add }, scope, &[acc, p])?;
    }
    Ok(Some(acc))
}
