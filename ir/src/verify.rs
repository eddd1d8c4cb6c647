use std::collections::HashSet;

use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::error::IrError;
use crate::graph::{Graph, Value};
use crate::ops::Op;
use crate::NodeIndex;

impl Graph {
    /// Checks the whole graph: acyclic; every node's inputs present exactly once each, in
    /// range of their producers' outputs and of the op's arity; types re-inferred and equal to
    /// the stored ones; input, parameter and output names unique; outputs refer to real values.
    pub fn verify(&self) -> Result<(), IrError> {
        let order = self.topo_order()?;
        for idx in order {
            let node = &self.graph[idx];
            let structure = |message: String| IrError::Structure {
                node: idx.index(),
                op: node.op.name().to_string(),
                scope: node.scope.clone(),
                message,
            };
            let mut slots: Vec<Option<Value>> = Vec::new();
            for e in self.graph.edges_directed(idx, Direction::Incoming) {
                let w = e.weight();
                if w.input >= slots.len() {
                    slots.resize(w.input + 1, None);
                }
                if slots[w.input].is_some() {
                    return Err(structure(format!("input {} is connected twice", w.input)));
                }
                if w.output >= self.graph[e.source()].outputs.len() {
                    return Err(structure(format!(
                        "input {} reads missing output {} of %{}",
                        w.input,
                        w.output,
                        e.source().index()
                    )));
                }
                slots[w.input] = Some(Value {
                    node: e.source(),
                    output: w.output,
                });
            }
            let inputs: Vec<Value> = slots
                .iter()
                .enumerate()
                .map(|(i, s)| s.ok_or_else(|| structure(format!("input {i} is not connected"))))
                .collect::<Result<_, _>>()?;
            let inferred = self.infer_node(&node.op, &node.scope, &inputs, idx.index())?;
            if inferred != node.outputs {
                let show = |ts: &[crate::TensorType]| ts.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ");
                return Err(structure(format!(
                    "stored type {} but inferred {}",
                    show(&node.outputs),
                    show(&inferred)
                )));
            }
        }
        let mut names = HashSet::new();
        for i in self.graph.node_indices() {
            let name = match &self.graph[i].op {
                Op::Input(x) => &x.name,
                Op::Parameter(p) => &p.name,
                _ => continue,
            };
            if !names.insert(name.as_str()) {
                return Err(IrError::Graph(format!(
                    "input/parameter name `{name}` is declared twice"
                )));
            }
        }
        let mut outs = HashSet::new();
        for o in &self.outputs {
            if !outs.insert(o.name.as_str()) {
                return Err(IrError::Graph(format!("output `{}` is declared twice", o.name)));
            }
            let ok = self
                .graph
                .node_weight(o.value.node)
                .is_some_and(|n| o.value.output < n.outputs.len());
            if !ok {
                return Err(IrError::Graph(format!(
                    "output `{}` refers to missing value %{}:{}",
                    o.name,
                    o.value.node.index(),
                    o.value.output
                )));
            }
            if self.value_type(o.value).dynamic_rows {
                return Err(IrError::Graph(format!(
                    "output `{}` has a dynamic row count; graph outputs must be static",
                    o.name
                )));
            }
        }
        self.verify_one_row_count()
    }

    /// Dynamic values of one bound must hold the same rows at run time, so every
    /// `DynamicPrefix` must read the same count and raise it to the same `min_rows`.
    fn verify_one_row_count(&self) -> Result<(), IrError> {
        let mut first: Option<(NodeIndex, Value, usize)> = None;
        for i in self.graph.node_indices() {
            let Op::DynamicPrefix(p) = &self.graph[i].op else {
                continue;
            };
            let c = self.inputs_of(i)[1];
            let Some((f, seen, min_rows)) = first else {
                first = Some((i, c, p.min_rows));
                continue;
            };
            if seen != c {
                return Err(IrError::Graph(format!(
                    "dynamic_prefix nodes %{} and %{} read different counts (%{}:{} and %{}:{}); \
                     a graph's dynamic rows share one count",
                    f.index(),
                    i.index(),
                    seen.node.index(),
                    seen.output,
                    c.node.index(),
                    c.output
                )));
            }
            if p.min_rows != min_rows {
                return Err(IrError::Graph(format!(
                    "dynamic_prefix nodes %{} and %{} raise their count to different min_rows ({min_rows} and {}); \
                     a graph's dynamic rows share one count",
                    f.index(),
                    i.index(),
                    p.min_rows
                )));
            }
        }
        Ok(())
    }
}
