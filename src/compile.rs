//! From a model name or config file to a verified, scheduled graph and its report.

use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use vitdet_ir::{Graph, NodeIndex};
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

/// The artifact written by `--emit`: the graph plus how it is meant to run.
#[derive(Serialize)]
pub struct Artifact<'a> {
    pub format: &'static str,
    pub model: &'a ModelConfig,
    pub mode: &'static str,
    pub schedule: Vec<usize>,
    pub graph: &'a Graph,
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
    pub fn artifact(&self) -> Artifact<'_> {
        Artifact {
            format: "vitdet-artifact/1",
            model: &self.config,
            mode: "infer",
            schedule: self.order.iter().map(|i| i.index()).collect(),
            graph: &self.graph,
        }
    }
}
