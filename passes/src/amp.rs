//! Mixed precision: the forward graph rewritten as PyTorch's autocast runs it, before autodiff.
//!
//! Every node falls in one of three classes, by op name:
//!
//! * **low precision** ([`LOW_PRECISION_OPS`]: matmul, linear, convolutions, fused attention):
//!   every floating-point input is cast to the low dtype (`bf16` or `f16`) and the op runs
//!   there. Parameters stay `f32` (the master weights the optimizer updates); the cast sits
//!   between the parameter and its use, as autocast casts weights on the fly.
//! * **float32** ([`F32_OPS`]: norms, softmax, losses, reductions, box/target/RoI ops): every
//!   low-precision input is cast back to `f32` (autocast's "fp32 list").
//! * **promote** (everything else: element-wise, activations, shape ops, pooling, resize): when
//!   its floating-point inputs mix dtypes they are all cast to `f32` (the widest, as autocast
//!   promotes `add(half, float)`), otherwise the op keeps their dtype.
//!
//! One cast per (value, dtype) is shared by all uses, as autocast caches weight casts within a
//! forward. Graph outputs keep their original dtype (losses are `f32`). Autodiff then derives
//! the backward through the casts (a cast's gradient is the cast back), so gradients of the
//! `f32` parameters are `f32` and the backward's matmuls run in the low dtype like the forward's.
//!
//! Loss scaling (for `f16`) is the runtime's job: it multiplies the loss gradient and unscales
//! the parameter gradients, which does not change the graph's memory or cost.

use std::collections::HashMap;

use vitdet_ir::ops::Cast;
use vitdet_ir::{DType, Graph, IrError, NodeIndex, Op, Value};

use crate::dce::{copy_node, copy_outputs};

/// Ops that run in the low dtype.
pub const LOW_PRECISION_OPS: &[&str] = &["linear", "matmul", "conv2d", "conv_transpose2d", "window_attention"];

/// Ops that run in `f32` whatever their inputs.
pub const F32_OPS: &[&str] = &[
    "layer_norm",
    "group_norm",
    "batch_norm",
    "batch_norm_train",
    "softmax",
    "reduce_sum",
    "rel_pos_bias",
    "anchors",
    "box_decode",
    "clip_boxes",
    "top_k",
    "nms",
    "roi_align",
    "paste_masks",
    "anchor_targets",
    "proposal_targets",
    "mask_targets",
    "sigmoid_bce_loss",
    "smooth_l1_loss",
    "softmax_cross_entropy_loss",
];

/// The precision a graph is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    /// Autocast to `bf16`.
    Bf16,
    /// Autocast to `f16` (train with dynamic loss scaling).
    F16,
}

impl Precision {
    pub fn parse(s: &str) -> Result<Precision, String> {
        match s {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "f16" | "fp16" | "float16" => Ok(Precision::F16),
            other => Err(format!("unknown dtype `{other}` (expected f32, bf16 or f16)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    fn low_dtype(self) -> Option<DType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(DType::BF16),
            Precision::F16 => Some(DType::F16),
        }
    }
}

/// Why a graph could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub enum AmpError {
    #[error("mixed precision: node %{node} ({op}) in `{scope}` rejects its {dtype} inputs: {source}")]
    Rejected {
        node: usize,
        op: String,
        scope: String,
        dtype: &'static str,
        #[source]
        source: Box<IrError>,
    },
    #[error(transparent)]
    Ir(#[from] IrError),
}

/// `graph` as autocast to `precision` runs it (a copy of the graph for `F32`). Node scopes are
/// kept; inserted casts take the scope of the node that needs them.
pub fn autocast(graph: &Graph, precision: Precision) -> Result<Graph, AmpError> {
    let Some(low) = precision.low_dtype() else {
        return Ok(graph.clone());
    };
    let order = graph.topo_order()?;
    let mut out = Graph::new();
    let mut map: HashMap<Value, Value> = HashMap::new();
    let mut casts: HashMap<(Value, DType), Value> = HashMap::new();

    for &n in &order {
        let node = graph.node(n);
        let inputs: Vec<Value> = graph.inputs_of(n).iter().map(|v| map[v]).collect();
        let name = node.op.name();
        let target = if LOW_PRECISION_OPS.contains(&name) {
            Some(low)
        } else if F32_OPS.contains(&name) {
            Some(DType::F32)
        } else {
            let floats: Vec<DType> = inputs
                .iter()
                .map(|&v| out.value_type(v).dtype)
                .filter(|d| d.is_float())
                .collect();
            let mixed = floats.windows(2).any(|w| w[0] != w[1]);
            mixed.then_some(DType::F32)
        };
        let inputs = match target {
            Some(dtype) => inputs
                .into_iter()
                .map(|v| cast_to(&mut out, &mut casts, v, dtype, &node.scope))
                .collect::<Result<Vec<_>, _>>()?,
            None => inputs,
        };
        let id = out
            .add_node(node.op.clone(), &node.scope, &inputs)
            .map_err(|source| AmpError::Rejected {
                node: n.index(),
                op: name.to_string(),
                scope: node.scope.clone(),
                dtype: precision.name(),
                source: Box::new(source),
            })?;
        for i in 0..node.outputs.len() {
            map.insert(Value { node: n, output: i }, Value { node: id, output: i });
        }
    }
    for o in &graph.outputs {
        let want = graph.value_type(o.value).dtype;
        let v = cast_to(&mut out, &mut casts, map[&o.value], want, "")?;
        out.set_output(&o.name, v);
    }
    Ok(out)
}

/// `v` in `dtype`: itself when it already is or is not floating point, else one shared cast.
fn cast_to(
    g: &mut Graph,
    casts: &mut HashMap<(Value, DType), Value>,
    v: Value,
    dtype: DType,
    scope: &str,
) -> Result<Value, IrError> {
    let have = g.value_type(v).dtype;
    if have == dtype || !have.is_float() {
        return Ok(v);
    }
    if let Some(&c) = casts.get(&(v, dtype)) {
        return Ok(c);
    }
    let c = g.add(Cast { dtype }, scope, &[v])?;
    casts.insert((v, dtype), c);
    Ok(c)
}

/// Nodes of `graph` that compute in the low dtype (for reports).
pub fn low_precision_nodes(graph: &Graph) -> Vec<NodeIndex> {
    graph
        .graph
        .node_indices()
        .filter(|&n| {
            let node = graph.node(n);
            !node.op.is_source() && node.outputs.iter().any(|t| matches!(t.dtype, DType::BF16 | DType::F16))
        })
        .collect()
}

/// For inference: every parameter whose uses all cast it to one dtype (the weights autocast
/// feeds the low-precision ops) becomes a parameter of that dtype, and those casts go. The
/// weights are then converted once, when they are loaded (`ParamStore::cast_to`), instead of
/// on every run, and only the low-precision copy is kept. Training graphs keep their `f32`
/// master weights: the optimizer updates those.
pub fn fold_parameter_casts(graph: &Graph) -> Result<Graph, IrError> {
    let order = graph.topo_order()?;
    // Per parameter: `Some(dtype)` while every use seen casts it to `dtype`.
    let mut casts_to: HashMap<NodeIndex, Option<DType>> = HashMap::new();
    for &n in &order {
        for v in graph.inputs_of(n) {
            if !matches!(graph.node(v.node).op, Op::Parameter(_)) {
                continue;
            }
            let to = match &graph.node(n).op {
                Op::Cast(c) => Some(c.dtype),
                _ => None,
            };
            let agreed = casts_to.entry(v.node).or_insert(to);
            if *agreed != to {
                *agreed = None;
            }
        }
    }
    for o in &graph.outputs {
        casts_to.insert(o.value.node, None);
    }
    let folded = |n: NodeIndex| casts_to.get(&n).copied().flatten();
    let mut out = Graph::new();
    let mut map: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    for &n in &order {
        let node = graph.node(n);
        let inputs = graph.inputs_of(n);
        match &node.op {
            Op::Parameter(p) => {
                if let Some(dtype) = folded(n) {
                    let mut p = p.clone();
                    p.ty.dtype = dtype;
                    map.insert(n, out.add_node(Op::Parameter(p), &node.scope, &[])?);
                    continue;
                }
            }
            Op::Cast(_) if folded(inputs[0].node).is_some() => {
                map.insert(n, map[&inputs[0].node]);
                continue;
            }
            _ => {}
        }
        map.insert(n, copy_node(&mut out, graph, n, &map)?);
    }
    copy_outputs(&mut out, graph, &map);
    Ok(out)
}
