//! `vitdet-ir`: the typed, static-shape dataflow graph every vitdet pass rewrites and every
//! runtime executes.
//!
//! * [`Graph`] is a petgraph `StableGraph` of [`Node`]s (one [`Op`] each, with the scope of the
//!   module it came from, e.g. `backbone.net.blocks.3.attn`) joined by [`Edge`]s that say which
//!   producer output feeds which consumer input.
//! * Every value has a [`TensorType`] with static dims. Types are inferred when a node is added,
//!   and [`Graph::verify`] re-checks the whole graph after a pass.
//! * Each op lives in one module under [`ops`]: its semantics (doc comment), its type rule and
//!   its cost ([`OpRule`]). Runtimes and passes find their kernels and rules by [`Op::name`].
//! * Graphs serialize to JSON with serde, print one line per node ([`Graph::dump`]) and export
//!   Graphviz dot ([`Graph::to_dot`]).

mod artifact;
mod error;
mod graph;
mod liveness;
pub mod ops;
mod print;
mod types;
mod verify;

pub use artifact::{Artifact, ARTIFACT_FORMAT};
pub use error::IrError;
pub use graph::{Edge, Graph, NamedValue, Node, Value};
pub use liveness::Liveness;
pub use ops::{Cost, IntRange, Op, OpRule};
pub use types::{DType, TensorType};

pub use petgraph::stable_graph::NodeIndex;
