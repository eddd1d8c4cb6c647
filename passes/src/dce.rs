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
        let inputs: Vec<Value> = graph
            .inputs_of(n)
            .into_iter()
            .map(|v| Value {
                node: map[&v.node],
                output: v.output,
            })
            .collect();
        let m = out.add_node(node.op.clone(), &node.scope, &inputs)?;
        map.insert(n, m);
    }
    for o in &graph.outputs {
        let value = Value {
            node: map[&o.value.node],
            output: o.value.output,
        };
        out.set_output(&o.name, value);
    }
    Ok(out)
}
