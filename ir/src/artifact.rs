//! The compiled artifact: what the compiler writes and an embedded runtime loads.

use serde::{Deserialize, Serialize};

use crate::error::IrError;
use crate::graph::Graph;
use crate::NodeIndex;

/// Format tag written into every artifact.
pub const ARTIFACT_FORMAT: &str = "vitdet-artifact/1";

/// A verified graph, the order to execute it in, and free-form metadata (the model config,
/// the compiler's report). Stored as readable JSON next to a weights file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Artifact {
    pub format: String,
    /// `infer` (later also `train`).
    pub mode: String,
    /// Execution order: every node, inputs before users.
    pub schedule: Vec<NodeIndex>,
    pub graph: Graph,
    #[serde(default)]
    pub metadata: serde_json::Value,
}

impl Artifact {
    pub fn new(mode: &str, graph: Graph, schedule: Vec<NodeIndex>, metadata: serde_json::Value) -> Self {
        Artifact {
            format: ARTIFACT_FORMAT.to_string(),
            mode: mode.to_string(),
            schedule,
            graph,
            metadata,
        }
    }

    pub fn to_json(&self) -> Result<String, IrError> {
        Ok(serde_json::to_string(self)?)
    }

    /// Parses and checks an artifact: known format, verified graph, and a schedule that lists
    /// every node once with inputs before users.
    pub fn from_json(text: &str) -> Result<Self, IrError> {
        let a: Artifact = serde_json::from_str(text)?;
        if a.format != ARTIFACT_FORMAT {
            return Err(IrError::Graph(format!(
                "artifact format `{}`, expected `{ARTIFACT_FORMAT}`",
                a.format
            )));
        }
        a.graph.verify()?;
        a.check_schedule()?;
        Ok(a)
    }

    fn check_schedule(&self) -> Result<(), IrError> {
        let g = &self.graph;
        let mut position = std::collections::HashMap::new();
        for (k, &n) in self.schedule.iter().enumerate() {
            if g.graph.node_weight(n).is_none() {
                return Err(IrError::Graph(format!("schedule names missing node %{}", n.index())));
            }
            if position.insert(n, k).is_some() {
                return Err(IrError::Graph(format!("schedule lists node %{} twice", n.index())));
            }
        }
        if position.len() != g.graph.node_count() {
            return Err(IrError::Graph(format!(
                "schedule covers {} of {} nodes",
                position.len(),
                g.graph.node_count()
            )));
        }
        for &n in &self.schedule {
            for v in g.inputs_of(n) {
                if position[&v.node] > position[&n] {
                    return Err(IrError::Graph(format!(
                        "schedule runs node %{} before its input %{}",
                        n.index(),
                        v.node.index()
                    )));
                }
            }
        }
        Ok(())
    }
}
