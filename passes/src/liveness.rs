//! The planned peak of live bytes over an execution order, with the step that reaches it
//! and the whole profile. The accounting is `vitdet_ir::Liveness`, the same one the runtime
//! measures with, so planned and measured peaks agree exactly.

use serde::Serialize;
use vitdet_ir::{Graph, IrError, NodeIndex};

#[derive(Clone, Debug, Serialize)]
pub struct Liveness {
    /// Peak of live activation bytes (graph inputs and computed values).
    pub peak_bytes: usize,
    /// The node whose step reached the peak.
    pub peak_node: Option<usize>,
    /// Bytes of parameters and buffers, resident throughout.
    pub param_bytes: usize,
    /// Live bytes after each step, in order.
    pub profile: Vec<usize>,
}

pub fn liveness(graph: &Graph, order: &[NodeIndex]) -> Result<Liveness, IrError> {
    let mut walk = vitdet_ir::Liveness::new(graph, order);
    let mut out = Liveness {
        peak_bytes: 0,
        peak_node: None,
        param_bytes: graph.param_bytes(),
        profile: Vec::with_capacity(order.len()),
    };
    for &idx in order {
        if graph.graph.node_weight(idx).is_none() {
            return Err(IrError::Graph(format!("order names missing node %{}", idx.index())));
        }
        walk.step(idx);
        if walk.peak_bytes() > out.peak_bytes {
            out.peak_bytes = walk.peak_bytes();
            out.peak_node = Some(idx.index());
        }
        out.profile.push(walk.live_bytes());
    }
    Ok(out)
}
