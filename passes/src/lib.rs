//! `vitdet-passes`: analyses and rewrites over `vitdet-ir` graphs.
//!
//! Rewrites, each graph in, graph out, in the order `vitdet compile --mode train` runs them:
//! windowed-attention fusion ([`fusion`]), mixed precision ([`amp`]), autodiff ([`autodiff`]),
//! activation checkpointing ([`checkpoint`]); then the analyses: the execution schedule
//! ([`schedule()`]), liveness, the static memory plan ([`memory`]: arena offsets, workspace,
//! breakdown), the cost summary ([`cost`]) and the predicted step time ([`timing`]).
//! [`dce`] removes what a rewrite leaves unused; [`index_ranges`] marks the gathers whose
//! indices are in range by construction, last.

pub mod amp;
pub mod autodiff;
pub mod checkpoint;
pub mod cost;
pub mod dce;
pub mod fusion;
pub mod index_ranges;
pub mod liveness;
pub mod memory;
pub mod schedule;
pub mod timing;

pub use amp::{autocast, fold_parameter_casts, AmpError, Precision};
pub use autodiff::{differentiate, AutodiffError, Differentiated};
pub use checkpoint::{
    apply_checkpointing, BudgetError, Chain, CheckpointError, CheckpointPolicy, Checkpointed, FrontierPoint, Policy,
    Solution, Stage, StageOption,
};
pub use cost::{params_by_scope, CostSummary};
pub use dce::eliminate_dead_code;
pub use fusion::{fuse_attention, Fused, FusedBlock, FusionError, FusionReport, UnmatchedAttention};
pub use index_ranges::prove_index_ranges;
pub use liveness::{liveness, Liveness};
pub use memory::{plan_memory, MemoryBreakdown, MemoryPlan, PlanError};
pub use schedule::{schedule, RECOMPUTE_SCOPE};
