//! Rewriting the training graph for a chosen policy: for every block off option 0, clone the
//! forward nodes that rematerialize its dropped saved values (scoped
//! [`RECOMPUTE_SCOPE`]`<original scope>`, reading the kept values), and make the backward read
//! the clones. The forward keeps its own nodes, whose outputs then die during the forward.
//! [`crate::schedule`] runs the clones late, when the backward first needs them.

use std::collections::HashMap;

use vitdet_ir::{Edge, Graph, IrError, Value};

use super::graph::{is_backward, ChainMap};
use crate::schedule::RECOMPUTE_SCOPE;

/// `g` with block `b` rematerializing according to `choices[b]`; also returns the flops of the
/// cloned nodes.
pub(crate) fn rewrite(g: &Graph, map: &ChainMap, choices: &[usize]) -> Result<(Graph, u64), IrError> {
    let mut out = g.clone();
    let mut remap: HashMap<Value, Value> = HashMap::new();
    let mut flops = 0;
    for (b, &choice) in choices.iter().enumerate() {
        if choice == 0 {
            continue;
        }
        let r = map.recompute(g, b, choice);
        let mut clone_of: HashMap<Value, Value> = HashMap::new();
        for &n in &r.nodes {
            let node = g.node(n);
            let inputs: Vec<Value> = g
                .inputs_of(n)
                .into_iter()
                .map(|v| clone_of.get(&v).copied().unwrap_or(v))
                .collect();
            let scope = format!("{RECOMPUTE_SCOPE}{}", node.scope);
            let c = out.add_node(node.op.clone(), &scope, &inputs)?;
            flops += out.node_cost(c).flops;
            for output in 0..node.outputs.len() {
                clone_of.insert(Value { node: n, output }, Value { node: c, output });
            }
        }
        for t in r.targets {
            remap.insert(t, clone_of[&t]);
        }
    }
    // Backward readers of a rematerialized value read its clone instead.
    let moved: Vec<_> = out
        .graph
        .edge_indices()
        .filter_map(|e| {
            let (src, dst) = out.graph.edge_endpoints(e)?;
            let w = out.graph[e];
            let clone = remap.get(&Value {
                node: src,
                output: w.output,
            })?;
            is_backward(&out, dst).then_some((e, *clone, dst, w.input))
        })
        .collect();
    for (e, clone, dst, input) in moved {
        out.graph.remove_edge(e);
        out.graph.add_edge(
            clone.node,
            dst,
            Edge {
                output: clone.output,
                input,
            },
        );
    }
    Ok((out, flops))
}
