//! The cost model's summary of a graph: parameters, FLOPs and activations.
//!
//! Definitions (see `vitdet_ir::Cost` for the per-op rules):
//! * `params`: elements of trainable parameters (buffers such as BatchNorm running statistics
//!   are not parameters, as in PyTorch's `parameters()`).
//! * `flops`: multiply-adds in fvcore's convention, the unit of the paper's Table 5.
//! * `flops_plain`: floating-point operations, 2 per multiply-add plus elementwise work.
//! * `activations`: fvcore's count, output elements of conv/linear/matmul nodes.

use std::collections::BTreeMap;

use serde::Serialize;
use vitdet_ir::Graph;

#[derive(Clone, Debug, Serialize)]
pub struct CostSummary {
    pub params: u64,
    pub flops: u64,
    pub flops_plain: u64,
    pub activations: u64,
    /// fvcore-convention FLOPs per scope prefix of depth 1 and 2.
    pub flops_by_scope: BTreeMap<String, u64>,
    /// Node count per op name.
    pub ops: BTreeMap<String, usize>,
}

impl CostSummary {
    pub fn of(graph: &Graph) -> CostSummary {
        let mut flops_by_scope = BTreeMap::new();
        let mut ops = BTreeMap::new();
        let mut total = vitdet_ir::Cost::default();
        for idx in graph.graph.node_indices() {
            let node = graph.node(idx);
            *ops.entry(node.op.name().to_string()).or_insert(0) += 1;
            let c = graph.node_cost(idx);
            total = total + c;
            if c.macs > 0 {
                for prefix in prefixes(&node.scope, 2) {
                    *flops_by_scope.entry(prefix).or_insert(0) += c.macs;
                }
            }
        }
        CostSummary {
            params: graph.param_count(),
            flops: total.macs,
            flops_plain: total.flops,
            activations: total.activations,
            flops_by_scope,
            ops,
        }
    }
}

/// Trainable parameter elements per name prefix of depth 1 and 2 (`backbone`,
/// `backbone.net`, ...); names are state-dict keys, so these are detectron2's module totals.
pub fn params_by_scope(graph: &Graph) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (_, p) in graph.parameters().filter(|(_, p)| p.trainable) {
        let module = p.name.rsplit_once('.').map_or("", |(m, _)| m);
        for prefix in prefixes(module, 2) {
            *out.entry(prefix).or_insert(0) += p.ty.numel() as u64;
        }
    }
    out
}

/// `a.b.c` -> [`a`, `a.b`] (up to `depth` components; empty scopes give nothing).
fn prefixes(scope: &str, depth: usize) -> Vec<String> {
    let parts: Vec<&str> = scope.split('.').filter(|p| !p.is_empty()).collect();
    (1..=depth.min(parts.len())).map(|d| parts[..d].join(".")).collect()
}
