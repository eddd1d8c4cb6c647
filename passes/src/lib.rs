//! `vitdet-passes`: analyses and rewrites over `vitdet-ir` graphs.
//!
//! Today: the execution schedule, liveness (peak live bytes over that schedule) and the cost
//! summary behind `vitdet compile`'s report. Later passes (fusion, autodiff, checkpointing,
//! memory planning) are graph-in, graph-out functions living beside these.

pub mod autodiff;
pub mod cost;
pub mod liveness;
pub mod schedule;

pub use autodiff::{differentiate, AutodiffError, Differentiated};
pub use cost::{params_by_scope, CostSummary};
pub use liveness::{liveness, Liveness};
pub use schedule::schedule;
