//! What a VJP rule sees: the forward node's inputs and outputs, which inputs need a gradient,
//! and helpers that emit backward nodes into the graph under construction.

use vitdet_ir::ops::{DynamicPrefix, Expand, ReduceSum, Reshape};
use vitdet_ir::{Graph, Node, NodeIndex, Op, TensorType, Value};

/// The context of one VJP rule application.
pub struct Ctx<'g> {
    graph: &'g mut Graph,
    scope: String,
    node: NodeIndex,
    inputs: Vec<Value>,
    needs: Vec<bool>,
}

impl<'g> Ctx<'g> {
    pub(crate) fn new(
        graph: &'g mut Graph,
        scope: String,
        node: NodeIndex,
        inputs: Vec<Value>,
        needs: Vec<bool>,
    ) -> Self {
        Ctx {
            graph,
            scope,
            node,
            inputs,
            needs,
        }
    }

    /// The forward node being differentiated.
    pub fn node(&self) -> &Node {
        self.graph.node(self.node)
    }

    /// The forward op.
    pub fn op(&self) -> &Op {
        &self.graph.node(self.node).op
    }

    /// Forward input `i`.
    pub fn input(&self, i: usize) -> Value {
        self.inputs[i]
    }

    /// Number of forward inputs.
    pub fn num_inputs(&self) -> usize {
        self.inputs.len()
    }

    /// Forward output `i`.
    pub fn output(&self, i: usize) -> Value {
        Value {
            node: self.node,
            output: i,
        }
    }

    /// Whether input `i` needs a gradient (rules may skip the work for the others).
    pub fn needs(&self, i: usize) -> bool {
        self.needs[i]
    }

    /// The type of a value.
    pub fn ty(&self, v: Value) -> TensorType {
        self.graph.value_type(v).clone()
    }

    /// The shape of a value.
    pub fn shape(&self, v: Value) -> Vec<usize> {
        self.graph.value_type(v).shape.clone()
    }

    /// A `dynamic_prefix` of the graph with bound `bound`, and the count it reads: it gives any
    /// dynamic value of that bound its rows.
    pub fn dynamic_prefix(&self, bound: usize) -> Option<(DynamicPrefix, Value)> {
        self.graph
            .graph
            .node_indices()
            .find_map(|n| match &self.graph.node(n).op {
                Op::DynamicPrefix(p) if p.bound == bound => Some((p.clone(), self.graph.inputs_of(n)[1])),
                _ => None,
            })
    }

    /// Emits a one-output backward node.
    pub fn emit(&mut self, op: impl Into<Op>, inputs: &[Value]) -> Result<Value, String> {
        self.graph.add(op, &self.scope, inputs).map_err(|e| e.to_string())
    }

    /// Emits a multi-output backward node; returns its outputs.
    pub fn emit_multi(&mut self, op: impl Into<Op>, inputs: &[Value]) -> Result<Vec<Value>, String> {
        let n = self
            .graph
            .add_node(op, &self.scope, inputs)
            .map_err(|e| e.to_string())?;
        let count = self.graph.node(n).outputs.len();
        Ok((0..count).map(|output| Value { node: n, output }).collect())
    }

    /// `g` reshaped to `shape` (no node when it already has it).
    pub fn reshape(&mut self, g: Value, shape: Vec<usize>) -> Result<Value, String> {
        if self.shape(g) == shape {
            return Ok(g);
        }
        self.emit(Reshape { shape }, &[g])
    }

    /// The adjoint of NumPy broadcasting: `g` (of a broadcast result's shape) summed down to
    /// `shape`, over the leading axes `shape` lacks and the axes where `shape` has size 1.
    pub fn sum_to(&mut self, g: Value, shape: &[usize]) -> Result<Value, String> {
        let gs = self.shape(g);
        if gs == shape {
            return Ok(g);
        }
        if shape.len() > gs.len() {
            return Err(format!("cannot sum {gs:?} down to {shape:?}"));
        }
        let lead = gs.len() - shape.len();
        let axes: Vec<usize> = (0..gs.len())
            .filter(|&d| d < lead || (shape[d - lead] == 1 && gs[d] != 1))
            .collect();
        let summed = if axes.is_empty() {
            g
        } else {
            self.emit(ReduceSum { axes, keepdim: true }, &[g])?
        };
        self.reshape(summed, shape.to_vec())
    }

    /// `g` broadcast to `shape` (no node when it already has it).
    pub fn expand(&mut self, g: Value, shape: Vec<usize>) -> Result<Value, String> {
        if self.shape(g) == shape {
            return Ok(g);
        }
        self.emit(Expand { shape }, &[g])
    }
}
