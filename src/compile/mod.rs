//! From a model name or config file to a verified, scheduled graph and its report.

use std::time::Instant;

use anyhow::{Context, Result};
use vitdet_ir::{Artifact, Graph, NodeIndex};
use vitdet_models::{build_backbone, build_detector_for_image, ModelConfig};
use vitdet_passes::{liveness, schedule, Precision};

use crate::report::{CompileReport, InferenceLowering, TrainReport};

mod train;
pub use train::{
    compile_train, parse_bytes, CheckpointChoice, StepMemory, TrainOptions, TrainStep, LOSS, LOSS_SCALE_INPUT,
};

/// What to compile.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// Preset name (`vitdet-b`, ...) or path to a JSON/TOML config.
    pub model: String,
    /// Overrides the config's input side in pixels.
    pub image_size: Option<usize>,
    /// Overrides the config's attention strategy.
    pub attention: Option<vitdet_models::AttentionStrategy>,
    pub target: Target,
}

/// Which graph to build.
#[derive(Clone, Debug)]
pub enum Target {
    /// Backbone and feature pyramid: outputs `p2`..`p6`.
    Backbone,
    /// The whole Mask R-CNN at test time; `image_hw` is the resized image inside the padded
    /// square input (detections are clipped to it), `None` for the full square.
    Detector { image_hw: Option<[usize; 2]> },
    /// One training step: the training forward graph (targets and losses), attention fusion,
    /// mixed precision, its gradients by autodiff, activation checkpointing (see `train`).
    Train(TrainOptions),
}

/// A compiled inference graph with its execution order.
pub struct Compiled {
    pub config: ModelConfig,
    pub graph: Graph,
    pub order: Vec<NodeIndex>,
    pub report: CompileReport,
}

/// A preset or config file with the command line's `--image-size` and `--attention` applied.
pub fn load_config(
    model: &str,
    image_size: Option<usize>,
    attention: Option<vitdet_models::AttentionStrategy>,
) -> Result<ModelConfig> {
    let mut config = ModelConfig::load(model)?;
    if let Some(size) = image_size {
        config.image_size = size;
        config.validate().with_context(|| format!("--image-size {size}"))?;
    }
    if let Some(a) = attention {
        config.attention = a;
        config.validate().context("--attention")?;
    }
    Ok(config)
}

pub fn compile(opts: &CompileOptions) -> Result<Compiled> {
    compile_with(opts, None)
}

/// [`compile`], with an inference graph lowered to `(precision, fuse attention)` by
/// [`lower_inference`] (training steps take theirs from [`TrainOptions`]).
pub fn compile_with(opts: &CompileOptions, lowering: Option<(Precision, bool)>) -> Result<Compiled> {
    let config = load_config(&opts.model, opts.image_size, opts.attention)?;
    compile_config_with(&opts.model, config, opts.target.clone(), lowering)
}

/// Compiles an already loaded config (`name` labels the report).
pub fn compile_config(name: &str, config: ModelConfig, target: Target) -> Result<Compiled> {
    compile_config_with(name, config, target, None)
}

/// The precision a `--dtype` flag names (f32, bf16, f16), or an error naming the flag.
pub fn parse_dtype_flag(text: &str) -> Result<Precision> {
    Precision::parse(text).map_err(|e| anyhow::anyhow!("--dtype: {e}"))
}

/// How inference runs at `precision`: the attention fused, autocast to bf16 / f16 (the
/// `lowering` argument of [`compile_with`]). In f32 the fused graph gives the built one's
/// outputs bit for bit (the fused CPU kernel does the same arithmetic in the same order) while
/// never holding a `[heads, N, N]` score matrix: 1.5 GiB less for `vitdet-b`'s global blocks.
pub fn inference_lowering(precision: Precision) -> Option<(Precision, bool)> {
    Some((precision, true))
}

/// [`compile_config`] with an inference graph lowered as [`compile_with`] does.
pub fn compile_config_with(
    name: &str,
    config: ModelConfig,
    target: Target,
    lowering: Option<(Precision, bool)>,
) -> Result<Compiled> {
    let start = Instant::now();
    if lowering.is_some() && matches!(target, Target::Train(_)) {
        anyhow::bail!("a training step takes its precision and fusion from its TrainOptions");
    }
    let graph = match target {
        Target::Backbone => build_backbone(&config)?,
        Target::Detector { image_hw } => {
            build_detector_for_image(&config, image_hw.unwrap_or([config.image_size, config.image_size]))?
        }
        Target::Train(opts) => return compile_train_step(name, config, &opts, start),
    };
    graph.verify().context("verifying the built graph")?;
    let (graph, lowered) = match lowering {
        Some((precision, fuse)) => {
            let (graph, fused_attention) = lower_inference(&graph, precision, fuse)?;
            let lowered = InferenceLowering {
                dtype: precision.name(),
                fused_attention,
            };
            (graph, Some(lowered))
        }
        None => (graph, None),
    };
    let (graph, _) = vitdet_passes::prove_index_ranges(&graph)?;
    let order = schedule(&graph)?;
    let live = liveness(&graph, &order)?;
    let plan = vitdet_passes::plan_memory(&graph, &order)?;
    let mut report = CompileReport::new(
        name,
        "infer",
        &config,
        &graph,
        &live,
        &plan,
        start.elapsed().as_secs_f64(),
    );
    report.lowering = lowered;
    Ok(Compiled {
        config,
        graph,
        order,
        report,
    })
}

/// An inference graph as it runs in mixed precision: the attention regions fused (when `fuse`),
/// the graph autocast to `precision`, and the weights the low-precision ops take stored in that
/// precision (their parameters change dtype: convert f32 weights with `ParamStore::cast_to`).
/// Returns the graph and the number of fused regions.
pub fn lower_inference(graph: &Graph, precision: Precision, fuse: bool) -> Result<(Graph, usize)> {
    let (graph, fused) = if fuse {
        let f = vitdet_passes::fuse_attention(graph).context("attention fusion")?;
        (f.graph, f.report.fused)
    } else {
        (graph.clone(), 0)
    };
    let graph = vitdet_passes::autocast(&graph, precision)?;
    // Inference keeps no f32 master weights: the low-precision ops' weights are stored cast.
    let graph = vitdet_passes::fold_parameter_casts(&graph).context("folding the weight casts")?;
    graph.verify().context("verifying the lowered inference graph")?;
    Ok((graph, fused))
}

/// [`Target::Train`]: the training step and its report.
fn compile_train_step(name: &str, config: ModelConfig, opts: &TrainOptions, start: Instant) -> Result<Compiled> {
    let step = compile_train(config, opts)?;
    step.graph.verify().context("verifying the compiled training graph")?;
    let live = liveness(&step.graph, &step.order)?;
    let mut report = CompileReport::new(
        name,
        "train",
        &step.config,
        &step.graph,
        &live,
        &step.plan,
        start.elapsed().as_secs_f64(),
    );
    report.peak_memory_bytes = step.peak_memory_bytes as usize;
    report.train = Some(TrainReport::new(&step));
    Ok(Compiled {
        config: step.config,
        graph: step.graph,
        order: step.order,
        report,
    })
}

impl Compiled {
    /// The artifact `--emit` writes: graph, schedule, and the config and report as metadata.
    pub fn artifact(&self) -> Result<Artifact> {
        let metadata = serde_json::json!({ "model": self.config, "report": self.report });
        Ok(Artifact::new(
            self.report.mode,
            self.graph.clone(),
            self.order.clone(),
            metadata,
        ))
    }
}
