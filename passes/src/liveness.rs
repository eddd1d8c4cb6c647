//! Liveness over an execution order, and the peak of live bytes it implies.
//!
//! The accounting matches the runtime's measurement exactly, so planned and measured peaks can
//! be compared: a value is live from the step that produces it (graph inputs included) until
//! the step of its last consumer; graph outputs stay live to the end; parameters are resident
//! for the whole run and are counted separately. The peak is sampled after each step's outputs
//! exist and before its inputs are released; outputs nobody reads are released right after.

use std::collections::HashMap;

use serde::Serialize;
use vitdet_ir::{Graph, IrError, NodeIndex, Op, Value};

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
    let mut remaining = graph.use_counts();
    let mut live = 0usize;
    let mut out = Liveness {
        peak_bytes: 0,
        peak_node: None,
        param_bytes: 0,
        profile: Vec::with_capacity(order.len()),
    };
    for &idx in order {
        let node = graph.node(idx);
        if let Op::Parameter(p) = &node.op {
            out.param_bytes += p.ty.size_in_bytes();
            out.profile.push(live);
            continue;
        }
        live += node.outputs.iter().map(|t| t.size_in_bytes()).sum::<usize>();
        if live > out.peak_bytes {
            out.peak_bytes = live;
            out.peak_node = Some(idx.index());
        }
        for v in graph.inputs_of(idx) {
            release(graph, &mut remaining, v, &mut live)?;
        }
        for (k, t) in node.outputs.iter().enumerate() {
            if remaining.get(&Value { node: idx, output: k }).copied().unwrap_or(0) == 0 {
                live -= t.size_in_bytes();
            }
        }
        out.profile.push(live);
    }
    Ok(out)
}

fn release(graph: &Graph, remaining: &mut HashMap<Value, usize>, v: Value, live: &mut usize) -> Result<(), IrError> {
    if matches!(graph.node(v.node).op, Op::Parameter(_)) {
        return Ok(());
    }
    let n = remaining
        .get_mut(&v)
        .ok_or_else(|| IrError::Graph(format!("value %{}:{} is read but has no recorded uses", v.node.index(), v.output)))?;
    *n -= 1;
    if *n == 0 {
        *live -= graph.value_type(v).size_in_bytes();
    }
    Ok(())
}
