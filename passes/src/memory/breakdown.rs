//! What the memory of a step is made of.
//!
//! Parameters and optimizer state are resident outside the arena. The arena itself is split at
//! its peak step ([`MemoryPlan::peak_step`], where the most aligned buffer bytes are live) by
//! what each live buffer holds:
//!
//! * `saved_activations`: buffers written by forward nodes (scope not under
//!   [`crate::autodiff::BACKWARD_SCOPE`]) that some backward node reads (through the value or a
//!   view of it): what the forward pass keeps for the backward pass;
//! * `gradients_at_peak`: buffers of `grad/<parameter>` graph outputs already computed;
//! * `workspace`: kernel scratch of the node running at that step;
//! * `transient_activations`: every other live buffer;
//! * `fragmentation`: arena bytes no buffer uses at that step (placement gaps, alignment).
//!
//! These five sum to `arena`. `gradients` is the size of all parameter gradients: they are
//! graph outputs, so they live in the arena until the step ends; the ones computed after the
//! peak step reuse arena bytes that activations freed and are not part of the peak's split.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use vitdet_ir::ops::Op;
use vitdet_ir::{Graph, NodeIndex, Value};

use super::{BufferKind, MemoryPlan};
use crate::autodiff::{BACKWARD_SCOPE, GRAD_PREFIX};

/// Bytes of one training (or inference) step by role. See the module doc for the definitions;
/// `saved_activations + gradients_at_peak + transient_activations + workspace + fragmentation
/// == arena`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemoryBreakdown {
    /// Parameters and buffers (resident outside the arena).
    pub parameters: u64,
    /// All `grad/<parameter>` outputs (in the arena, to the end of the step).
    pub gradients: u64,
    /// Optimizer state as given by the caller (outside the arena).
    pub optimizer_state: u64,
    /// Forward buffers the backward reads, live at the peak step.
    pub saved_activations: u64,
    /// Other activation buffers live at the peak step.
    pub transient_activations: u64,
    /// Kernel workspace at the peak step.
    pub workspace: u64,
    /// Gradient buffers live at the peak step.
    pub gradients_at_peak: u64,
    /// Arena bytes unused at the peak step.
    pub fragmentation: u64,
    /// The planned arena.
    pub arena: u64,
    /// The step of the order the arena is split at.
    pub peak_step: usize,
}

impl MemoryBreakdown {
    /// Everything resident during the step: parameters, optimizer state and the arena.
    pub fn total(&self) -> u64 {
        self.parameters + self.optimizer_state + self.arena
    }
}

impl MemoryPlan {
    /// The breakdown of this plan of `graph` run in `order` (the order it was planned for).
    /// `optimizer_state_bytes` is what the optimizer keeps per step (AdamW: two f32 moments per
    /// trainable parameter; 0 for inference).
    pub fn breakdown(&self, graph: &Graph, order: &[NodeIndex], optimizer_state_bytes: u64) -> MemoryBreakdown {
        let backward = |n: NodeIndex| graph.node(n).scope.starts_with(BACKWARD_SCOPE);
        // Roots (of values or views) that a backward node reads.
        let root = |v: Value| self.aliases.get(&v).copied().unwrap_or(v);
        let mut read_by_backward: HashSet<Value> = HashSet::new();
        for &n in order.iter().filter(|&&n| backward(n)) {
            read_by_backward.extend(graph.inputs_of(n).into_iter().map(root));
        }
        let gradient_roots: HashMap<Value, ()> = graph
            .outputs
            .iter()
            .filter(|o| o.name.starts_with(GRAD_PREFIX))
            .map(|o| (root(o.value), ()))
            .collect();
        let gradients = graph
            .outputs
            .iter()
            .filter(|o| o.name.starts_with(GRAD_PREFIX))
            .map(|o| graph.value_type(o.value).size_in_bytes() as u64)
            .sum();

        let peak_step = self.peak_step();
        let mut out = MemoryBreakdown {
            parameters: graph
                .graph
                .node_weights()
                .filter(|n| matches!(n.op, Op::Parameter(_)))
                .map(|n| n.outputs[0].size_in_bytes() as u64)
                .sum(),
            gradients,
            optimizer_state: optimizer_state_bytes,
            arena: self.arena_bytes as u64,
            peak_step,
            ..Default::default()
        };
        let mut used = 0u64;
        for b in self
            .buffers
            .iter()
            .filter(|b| b.first <= peak_step && peak_step <= b.last)
        {
            let size = b.size as u64;
            used += size;
            let slot = match b.kind {
                BufferKind::Workspace => &mut out.workspace,
                BufferKind::Value if gradient_roots.contains_key(&b.value) => &mut out.gradients_at_peak,
                BufferKind::Value if !backward(b.value.node) && read_by_backward.contains(&b.value) => {
                    &mut out.saved_activations
                }
                BufferKind::Value => &mut out.transient_activations,
            };
            *slot += size;
        }
        out.fragmentation = out.arena - used;
        out
    }
}
