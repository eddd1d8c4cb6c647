use thiserror::Error;

/// Everything that can be wrong with a graph. Messages name the node, its op and its scope so
/// a user can find the offending module.
#[derive(Debug, Error)]
pub enum IrError {
    #[error("node %{node} ({op}) in `{scope}`: {message}")]
    Type {
        node: usize,
        op: String,
        scope: String,
        message: String,
    },
    #[error("node %{node} ({op}) in `{scope}`: {message}")]
    Structure {
        node: usize,
        op: String,
        scope: String,
        message: String,
    },
    #[error("graph has a cycle through node %{node}")]
    Cycle { node: usize },
    #[error("graph: {0}")]
    Graph(String),
    #[error("graph JSON: {0}")]
    Json(#[from] serde_json::Error),
}
