//! `vitdet`: the compiler driver and facade over the workspace crates.
//!
//! * [`compile`] builds a model's graph from a preset or config, verifies it, schedules it and
//!   summarizes its cost and memory ([`report`]).
//! * [`infer`] runs a compiled backbone on an image with the `vitdet-runtime` executor.
//!
//! The crates are re-exported for applications that want one dependency.

pub mod bench;
pub mod coco;
pub mod compile;
pub mod data;
pub mod demo;
pub mod detect;
pub mod detections;
pub mod eval;
pub mod infer;
pub mod mask;
pub mod precompile;
pub mod report;
pub mod rss;
pub mod study;
pub mod train;

pub use vitdet_ir as ir;
pub use vitdet_models as models;
pub use vitdet_passes as passes;
pub use vitdet_runtime as runtime;
