//! Execution order.

use vitdet_ir::{Graph, IrError, NodeIndex};

/// The order in which the runtime executes `graph` and in which liveness is computed: a
/// topological order (deterministic for a given graph).
pub fn schedule(graph: &Graph) -> Result<Vec<NodeIndex>, IrError> {
    graph.topo_order()
}
