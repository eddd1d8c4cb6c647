use thiserror::Error;
use vitdet_ir::IrError;

/// Everything that can go wrong describing or building a model.
#[derive(Debug, Error)]
pub enum ModelError {
    /// `ModelConfig::preset` / `ModelConfig::load` got a name that is not a preset (and, for
    /// `load`, not a `.json` / `.toml` path either).
    #[error("unknown model `{name}`: expected a preset ({}) or a path to a .json/.toml config", .valid.join(", "))]
    UnknownPreset { name: String, valid: Vec<&'static str> },
    /// A config file could not be read.
    #[error("cannot read model config `{path}`: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A config file could not be parsed (syntax, unknown field, wrong type).
    #[error("invalid model config `{path}`: {message}")]
    Parse { path: String, message: String },
    /// A config that parses but describes no valid model.
    #[error("invalid model config: {0}")]
    Invalid(String),
    /// The graph builder hit a type error (a bug, or a config `validate` does not catch).
    #[error("building the model graph: {0}")]
    Ir(#[from] IrError),
}
