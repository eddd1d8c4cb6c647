//! Dead-code elimination by rebuilding: the result holds the graph's sources (every input and
//! parameter, used or not: callers supply them by name) and every node some output depends
//! on, added in the input graph's topological order. Rebuilding rather than deleting in place
//! keeps node indices dense and in program order, which later passes rely on (a
//! `StableGraph` would hand freed low indices to nodes added afterwards, e.g. by autodiff).

use std::collections::{HashMap, HashSet};

use vitdet_ir::{Graph, IrError, NodeIndex, Value};

/// `graph` without the computations no output depends on.
pub fn eliminate_dead_code(graph: &Graph) -> Result<Graph, IrError> {
    let order = graph.topo_order()?;
    let mut live: HashSet<NodeIndex> = graph.outputs.iter().map(|o| o.value.node).collect();
    for &n in order.iter().rev() {
        if live.contains(&n) {
            live.extend(graph.inputs_of(n).into_iter().map(|v| v.node));
        }
    }
    let mut out = Graph::new();
    let mut map: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    for &n in &order {
        let node = graph.node(n);
        if !live.contains(&n) && !node.op.is_source() {
            continue;
        }
        map.insert(n, copy_node(&mut out, graph, n, &map)?);
    }
    copy_outputs(&mut out, graph, &map);
    Ok(out)
}

/// Adds node `n` of `graph` to `out`, its inputs renamed through `map` (old node -> new node):
/// the step of every pass that rebuilds a graph.
pub(crate) fn copy_node(
    out: &mut Graph,
    graph: &Graph,
    n: NodeIndex,
    map: &HashMap<NodeIndex, NodeIndex>,
) -> Result<NodeIndex, IrError> {
    let node = graph.node(n);
    let inputs: Vec<Value> = graph
        .inputs_of(n)
        .into_iter()
        .map(|v| Value {
            node: map[&v.node],
            output: v.output,
        })
        .collect();
    out.add_node(node.op.clone(), &node.scope, &inputs)
}

/// Sets `graph`'s named outputs on `out`, renamed through `map`.
pub(crate) fn copy_outputs(out: &mut Graph, graph: &Graph, map: &HashMap<NodeIndex, NodeIndex>) {
    for o in &graph.outputs {
        let value = Value {
            node: map[&o.value.node],
            output: o.value.output,
        };
        out.set_output(&o.name, value);
    }
}
