//! `vitdet-passes`: analyses and rewrites over `vitdet-ir` graphs.
//!
//! Today: the execution schedule, liveness (peak live bytes over that schedule), the static
//! memory plan (arena offsets) and the cost summary behind `vitdet compile`'s report. Later
//! passes (fusion, checkpointing, in-place reuse) are graph-in, graph-out functions living beside these.

pub mod amp;
pub mod autodiff;
pub mod checkpoint;
pub mod cost;
pub mod dce;
pub mod fusion;
pub mod liveness;
pub mod memory;
pub mod schedule;
pub mod timing;

pub use amp::{autocast, AmpError, Precision};
pub use autodiff::{differentiate, AutodiffError, Differentiated};
pub use checkpoint::{
    apply_checkpointing, BudgetError, Chain, CheckpointError, CheckpointPolicy, Checkpointed, FrontierPoint, Policy,
    Solution, Stage, StageOption,
};
pub use cost::{params_by_scope, CostSummary};
pub use dce::eliminate_dead_code;
pub use fusion::{fuse_attention, Fused, FusedBlock, FusionError, FusionReport, UnmatchedAttention};
pub use liveness::{liveness, Liveness};
pub use memory::{plan_memory, MemoryBreakdown, MemoryPlan, PlanError};
pub use schedule::{schedule, RECOMPUTE_SCOPE};
