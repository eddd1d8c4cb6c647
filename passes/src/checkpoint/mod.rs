//! Activation checkpointing on the training graph: which forward values the backward keeps
//! and which it recomputes, so that the planned peak fits a budget at the least recompute.
//!
//! * [`chain`]: the abstract solver, an exact dynamic program over a chain of stages with
//!   several options each (keep everything, ..., keep only the input);
//! * [`graph`]: the training graph as such a chain: its transformer blocks, what each
//!   block's backward reads, and the options of keeping less of it;
//! * `rewrite`: the graph with the chosen recomputation cloned in (scheduled late by
//!   [`crate::schedule()`]);
//! * [`apply`]: the entry points, [`apply_checkpointing`] and [`frontier`], which solve on
//!   the model and check the answer with the memory planner.

pub mod apply;
pub mod chain;
pub mod graph;
mod rewrite;

pub use apply::{apply_checkpointing, frontier, CheckpointError, CheckpointPolicy, Checkpointed, FrontierPoint};
pub use chain::{evaluate, min_peak, solve, BudgetError, Chain, Policy, Solution, Stage, StageOption};
pub use graph::{block_scope, find_blocks, Block, BlockOption, ChainMap};
