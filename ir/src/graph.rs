use std::collections::HashMap;

use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use petgraph::Direction;
use serde::{Deserialize, Serialize};

use crate::error::IrError;
use crate::ops::{Cost, Op, Parameter};
use crate::types::TensorType;

/// One operation, the scope of the module that emitted it, and its inferred output types.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub scope: String,
    pub outputs: Vec<TensorType>,
}

/// Producer output `output` feeds consumer input `input`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    pub output: usize,
    pub input: usize,
}

/// One output of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Value {
    pub node: NodeIndex,
    pub output: usize,
}

impl From<NodeIndex> for Value {
    fn from(node: NodeIndex) -> Value {
        Value { node, output: 0 }
    }
}

/// A named graph output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedValue {
    pub name: String,
    pub value: Value,
}

/// A typed, static-shape dataflow graph.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Graph {
    pub graph: StableGraph<Node, Edge>,
    pub outputs: Vec<NamedValue>,
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node, inferring its output types; the error names the node, scope and mismatch.
    pub fn add_node(&mut self, op: impl Into<Op>, scope: &str, inputs: &[Value]) -> Result<NodeIndex, IrError> {
        let op = op.into();
        let outputs = self.infer_node(&op, scope, inputs, self.graph.node_count())?;
        let idx = self.graph.add_node(Node {
            op,
            scope: scope.to_string(),
            outputs,
        });
        for (i, v) in inputs.iter().enumerate() {
            self.graph.add_edge(
                v.node,
                idx,
                Edge {
                    output: v.output,
                    input: i,
                },
            );
        }
        Ok(idx)
    }

    /// Adds a single-output node and returns its value.
    pub fn add(&mut self, op: impl Into<Op>, scope: &str, inputs: &[Value]) -> Result<Value, IrError> {
        let idx = self.add_node(op, scope, inputs)?;
        Ok(Value::from(idx))
    }

    pub(crate) fn infer_node(
        &self,
        op: &Op,
        scope: &str,
        inputs: &[Value],
        id: usize,
    ) -> Result<Vec<TensorType>, IrError> {
        let err = |message: String| IrError::Type {
            node: id,
            op: op.name().to_string(),
            scope: scope.to_string(),
            message,
        };
        let (lo, hi) = op.rule().arity();
        if inputs.len() < lo || inputs.len() > hi {
            return Err(err(format!("takes {lo}..={hi} inputs, given {}", inputs.len())));
        }
        let mut types = Vec::with_capacity(inputs.len());
        for (i, v) in inputs.iter().enumerate() {
            let t = self
                .graph
                .node_weight(v.node)
                .and_then(|n| n.outputs.get(v.output))
                .ok_or_else(|| {
                    err(format!(
                        "input {i} refers to missing value %{}:{}",
                        v.node.index(),
                        v.output
                    ))
                })?;
            types.push(t);
        }
        let mut outputs = op.rule().infer(&types).map_err(err)?;
        op.rule().rows().apply(op.name(), &types, &mut outputs).map_err(err)?;
        Ok(outputs)
    }

    /// A copy whose dynamic rows are bounded by `rows`: each `DynamicPrefix` bound lowered to
    /// at most `rows` and every type re-inferred. This is the graph as it runs when its count
    /// gives `rows` rows, for planning the memory of a run whose row count is known.
    pub fn with_rows(&self, rows: usize) -> Result<Graph, IrError> {
        let mut g = self.clone();
        for i in g.topo_order()? {
            if let Op::DynamicPrefix(p) = &mut g.graph[i].op {
                p.bound = p.bound.min(rows);
            }
            let inputs = g.inputs_of(i);
            let node = &g.graph[i];
            let outputs = g.infer_node(&node.op, &node.scope, &inputs, i.index())?;
            g.graph[i].outputs = outputs;
        }
        Ok(g)
    }

    /// Declares `value` a graph output named `name`.
    pub fn set_output(&mut self, name: &str, value: Value) {
        self.outputs.push(NamedValue {
            name: name.to_string(),
            value,
        });
    }

    pub fn node(&self, idx: NodeIndex) -> &Node {
        &self.graph[idx]
    }

    pub fn value_type(&self, v: Value) -> &TensorType {
        &self.graph[v.node].outputs[v.output]
    }

    /// The values feeding `idx`, in input order.
    pub fn inputs_of(&self, idx: NodeIndex) -> Vec<Value> {
        let mut ins: Vec<(usize, Value)> = self
            .graph
            .edges_directed(idx, Direction::Incoming)
            .map(|e| {
                (
                    e.weight().input,
                    Value {
                        node: e.source(),
                        output: e.weight().output,
                    },
                )
            })
            .collect();
        ins.sort_by_key(|(i, _)| *i);
        ins.into_iter().map(|(_, v)| v).collect()
    }

    /// Number of consumers of every value (graph outputs count as consumers).
    pub fn use_counts(&self) -> HashMap<Value, usize> {
        let mut uses = HashMap::new();
        for e in (&self.graph).edge_references() {
            *uses
                .entry(Value {
                    node: e.source(),
                    output: e.weight().output,
                })
                .or_insert(0) += 1;
        }
        for o in &self.outputs {
            *uses.entry(o.value).or_insert(0) += 1;
        }
        uses
    }

    /// A topological order that follows construction order where dependencies allow (Kahn's
    /// algorithm taking the lowest ready node index first): builders add nodes in program
    /// order, so this is the order a framework would run them in.
    pub fn topo_order(&self) -> Result<Vec<NodeIndex>, IrError> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let mut indegree: HashMap<NodeIndex, usize> = HashMap::new();
        let mut ready = BinaryHeap::new();
        for idx in self.graph.node_indices() {
            let d = self.graph.edges_directed(idx, Direction::Incoming).count();
            if d == 0 {
                ready.push(Reverse(idx));
            }
            indegree.insert(idx, d);
        }
        let mut order = Vec::with_capacity(indegree.len());
        while let Some(Reverse(idx)) = ready.pop() {
            order.push(idx);
            for e in self.graph.edges_directed(idx, Direction::Outgoing) {
                let d = indegree.get_mut(&e.target()).expect("edge target is a node");
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse(e.target()));
                }
            }
        }
        if order.len() != indegree.len() {
            let stuck = indegree
                .iter()
                .filter(|(_, &d)| d > 0)
                .map(|(i, _)| i.index())
                .min()
                .unwrap_or(0);
            return Err(IrError::Cycle { node: stuck });
        }
        Ok(order)
    }

    /// Graph inputs as (node, name, type).
    pub fn inputs(&self) -> impl Iterator<Item = (NodeIndex, &str, &TensorType)> {
        self.graph.node_indices().filter_map(move |i| match &self.graph[i].op {
            Op::Input(inp) => Some((i, inp.name.as_str(), &inp.ty)),
            _ => None,
        })
    }

    /// Parameters and buffers as (node, declaration).
    pub fn parameters(&self) -> impl Iterator<Item = (NodeIndex, &Parameter)> {
        self.graph.node_indices().filter_map(move |i| match &self.graph[i].op {
            Op::Parameter(p) => Some((i, p)),
            _ => None,
        })
    }

    /// Bytes of all parameters and buffers.
    pub fn param_bytes(&self) -> usize {
        self.parameters().map(|(_, p)| p.ty.size_in_bytes()).sum()
    }

    /// Number of trainable parameter elements.
    pub fn param_count(&self) -> u64 {
        self.parameters()
            .filter(|(_, p)| p.trainable)
            .map(|(_, p)| p.ty.numel() as u64)
            .sum()
    }

    /// Cost of one node.
    pub fn node_cost(&self, idx: NodeIndex) -> Cost {
        let ins = self.inputs_of(idx);
        let types: Vec<&TensorType> = ins.iter().map(|v| self.value_type(*v)).collect();
        let node = &self.graph[idx];
        node.op.rule().cost(&types, &node.outputs)
    }

    /// Total cost of the graph.
    pub fn cost(&self) -> Cost {
        self.graph.node_indices().map(|i| self.node_cost(i)).sum()
    }

    /// Replaces every use of `old` (edges and graph outputs) with `new`.
    pub fn replace_uses(&mut self, old: Value, new: Value) {
        let users: Vec<_> = self
            .graph
            .edges_directed(old.node, Direction::Outgoing)
            .filter(|e| e.weight().output == old.output)
            .map(|e| (e.id(), e.target(), e.weight().input))
            .collect();
        for (id, target, input) in users {
            self.graph.remove_edge(id);
            self.graph.add_edge(
                new.node,
                target,
                Edge {
                    output: new.output,
                    input,
                },
            );
        }
        for o in &mut self.outputs {
            if o.value == old {
                o.value = new;
            }
        }
    }

    pub fn to_json(&self) -> Result<String, IrError> {
        Ok(serde_json::to_string(self)?)
    }

    pub fn from_json(text: &str) -> Result<Self, IrError> {
        Ok(serde_json::from_str(text)?)
    }
}
