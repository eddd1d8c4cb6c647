//! The runtime's error type.

use std::path::PathBuf;

use thiserror::Error;

/// Shows at most the first 10 names of a list, then how many more there are.
pub(crate) fn list_names(names: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut text = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(", ... ({} more)", names.len() - SHOWN));
    }
    text
}

fn key_mismatch(missing: &[String], unexpected: &[String]) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "{} parameter(s) missing: {}",
            missing.len(),
            list_names(missing)
        ));
    }
    if !unexpected.is_empty() {
        parts.push(format!(
            "{} unexpected key(s): {}",
            unexpected.len(),
            list_names(unexpected)
        ));
    }
    parts.join("; ")
}

/// Everything that can go wrong while loading parameters, preprocessing images or executing a
/// graph. Messages name the offending input, parameter, file or node (with its op and scope).
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// The graph failed verification or has a cycle.
    #[error("invalid graph: {0}")]
    Graph(#[from] vitdet_ir::IrError),

    /// An explicit execution order is not usable for this graph.
    #[error("invalid execution order: {0}")]
    Order(String),

    /// A graph input was not fed.
    #[error("missing graph input `{name}` (expected {expected})")]
    MissingInput { name: String, expected: String },

    /// A fed input does not exist in the graph (or was fed twice).
    #[error("unexpected input `{name}`: {reason}")]
    UnexpectedInput { name: String, reason: String },

    /// A fed input has the wrong shape or dtype.
    #[error("input `{name}`: expected {expected}, found {found}")]
    InputMismatch {
        name: String,
        expected: String,
        found: String,
    },

    /// The runtime has no kernel for this op (or these attributes / dtypes).
    #[error("node %{node} ({op}) in `{scope}`: the runtime cannot execute it: {reason}")]
    Unsupported {
        node: usize,
        op: String,
        scope: String,
        reason: String,
    },

    /// A kernel failed, or produced a value whose type differs from the graph's.
    #[error("node %{node} ({op}) in `{scope}`: {message}")]
    Kernel {
        node: usize,
        op: String,
        scope: String,
        message: String,
    },

    /// A weights file could not be read or parsed.
    #[error("cannot read weights file `{path}`: {message}")]
    WeightsFile { path: PathBuf, message: String },

    /// A weights file could not be written.
    #[error("cannot write weights file `{path}`: {message}")]
    WeightsWrite { path: PathBuf, message: String },

    /// Parameters the graph declares but the weights (or the store) lack.
    #[error("{count} parameter(s) missing from {source_name}: {}", list_names(.names))]
    MissingParameters {
        source_name: String,
        count: usize,
        names: Vec<String>,
    },

    /// A weights file whose keys differ from the graph's parameter names: both lists at once,
    /// so one run shows everything to fix.
    #[error("weights in {source_name} do not match the model: {}", key_mismatch(.missing, .unexpected))]
    KeyMismatch {
        source_name: String,
        missing: Vec<String>,
        unexpected: Vec<String>,
    },

    /// A parameter has the wrong shape.
    #[error("parameter `{name}`: expected shape {expected:?}, found {found:?}")]
    ParameterShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A parameter has a dtype that cannot be converted to the graph's.
    #[error("parameter `{name}`: expected dtype {expected}, found {found}")]
    ParameterDtype {
        name: String,
        expected: String,
        found: String,
    },

    /// A parameter's `Init` cannot produce its dtype (e.g. a random integer tensor).
    #[error("parameter `{name}`: cannot initialize: {message}")]
    ParameterInit { name: String, message: String },

    /// An image could not be read or decoded.
    #[error("cannot read image `{path}`: {message}")]
    Image { path: PathBuf, message: String },

    /// A preprocessing argument is invalid (e.g. size 0).
    #[error("preprocess: {0}")]
    Preprocess(String),

    /// The device's memory pool could not be configured or read.
    #[error("device memory pool: {0}")]
    DeviceMemory(String),

    /// The device's event clock could not be recorded or read (`Program::run_device_timed`).
    #[error("device clock: {0}")]
    DeviceClock(String),

    /// A tensor operation outside any node failed (loading, preprocessing, initialization).
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}
