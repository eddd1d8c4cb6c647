//! From a model name or config file to a verified, scheduled graph and its report.

use std::time::Instant;

use anyhow::{Context, Result};
use vitdet_ir::{Artifact, Graph, NodeIndex};
use vitdet_models::{build_backbone, ModelConfig};
use vitdet_passes::{liveness, schedule};

use crate::report::CompileReport;

/// What to compile.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// Preset name (`vitdet-b`, ...) or path to a JSON/TOML config.
    pub model: String,
    /// Overrides the config's input side in pixels.
    pub image_size: Option<usize>,
}

/// A compiled inference graph with its execution order.
pub struct Compiled {
    pub config: ModelConfig,
    pub graph: Graph,
    pub order: Vec<NodeIndex>,
    pub report: CompileReport,
}

pub fn load_config(opts: &CompileOptions) -> Result<ModelConfig> {
    let mut config = ModelConfig::load(&opts.model)?;
    if let Some(size) = opts.image_size {
        config.image_size = size;
        config.validate().with_context(|| format!("--image-size {size}"))?;
    }
    Ok(config)
}

pub fn compile(opts: &CompileOptions) -> Result<Compiled> {
    let start = Instant::now();
    let config = load_config(opts)?;
    let graph = build_backbone(&config)?;
    graph.verify().context("verifying the built graph")?;
    let order = schedule(&graph)?;
    let live = liveness(&graph, &order)?;
    let report = CompileReport::new(&opts.model, &config, &graph, &live, start.elapsed().as_secs_f64());
    Ok(Compiled {
        config,
        graph,
        order,
        report,
    })
}

impl Compiled {
    /// The artifact `--emit` writes: graph, schedule, and the config and report as metadata.
    pub fn artifact(&self) -> Result<Artifact> {
        let metadata = serde_json::json!({ "model": self.config, "report": self.report });
        Ok(Artifact::new("infer", self.graph.clone(), self.order.clone(), metadata))
    }
}
