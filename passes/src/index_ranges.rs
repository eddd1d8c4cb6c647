//! Index range analysis: which gathers, scatters and cross-entropies can skip their run-time
//! range check.
//!
//! `index_select`, `gather_rows`, their backward ops and the cross-entropy (its labels) check
//! every index before they use it. On the CPU the check is a loop over the indices; on a GPU it
//! copies them to the host and waits for the device, which stalls the detector's proposal and
//! RoI stages between small kernels. Most indices are in range by construction: top-k
//! positions, NMS survivors, iotas, sampled classes, and selections and reshapes of those. A
//! forward pass over the graph bounds every integer value with each op's
//! [`vitdet_ir::OpRule::value_ranges`], and marks the ops whose indices provably lie within
//! their axis (`indices_in_range`, `labels_in_range`); on a GPU their kernels then skip the
//! check. The CPU kernels keep checking (it costs no wait there), so a wrong proof shows as an
//! error in the CPU tests instead of an out-of-bounds access.

use std::collections::HashMap;

use vitdet_ir::{Graph, IntRange, IrError, Op, Value};

/// `graph` with every index op whose indices are proven in range marked so; the number marked.
pub fn prove_index_ranges(graph: &Graph) -> Result<(Graph, usize), IrError> {
    let mut out = graph.clone();
    let mut ranges: HashMap<Value, IntRange> = HashMap::new();
    let mut proven = 0;
    for n in graph.topo_order()? {
        let inputs = graph.inputs_of(n);
        let known: Vec<Option<IntRange>> = inputs.iter().map(|v| ranges.get(v).copied()).collect();
        let types: Vec<_> = inputs.iter().map(|&v| graph.value_type(v)).collect();
        let op = &graph.node(n).op;
        for (output, r) in op.rule().value_ranges(&known, &types).into_iter().enumerate() {
            if let Some(r) = r {
                ranges.insert(Value { node: n, output }, r);
            }
        }
        // The indices and the size of the axis they index.
        let (indices, size) = match op {
            Op::IndexSelect(o) => (known[1], types[0].shape[o.axis]),
            Op::GatherRows(_) => (known[1], types[0].shape[1]),
            Op::IndexSelectGrad(o) => (known[0], o.size),
            Op::GatherRowsGrad(o) => (known[0], o.rows),
            // Labels index the classes (the logits' columns).
            Op::SoftmaxCrossEntropyLoss(_) | Op::SoftmaxCrossEntropyLossGrad(_) => (known[1], types[0].shape[1]),
            _ => continue,
        };
        if !indices.is_some_and(|r| r.within(size)) {
            continue;
        }
        match &mut out.graph[n].op {
            Op::IndexSelect(o) => o.indices_in_range = true,
            Op::GatherRows(o) => o.indices_in_range = true,
            Op::IndexSelectGrad(o) => o.indices_in_range = true,
            Op::GatherRowsGrad(o) => o.indices_in_range = true,
            Op::SoftmaxCrossEntropyLoss(o) => o.labels_in_range = true,
            Op::SoftmaxCrossEntropyLossGrad(o) => o.labels_in_range = true,
            _ => unreachable!("matched above"),
        }
        proven += 1;
    }
    Ok((out, proven))
}
