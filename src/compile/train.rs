//! The training-step pipeline: build the training forward graph, fuse attention, autocast,
//! differentiate, checkpoint under a budget, schedule and plan memory. `vitdet compile --mode
//! train`, `vitdet study` and `vitdet train` (which runs the result) all build their step here.
//!
//! With [`TrainOptions::loss_scale_input`] the backward is seeded from an f32 scalar graph input
//! [`LOSS_SCALE_INPUT`] instead of 1, so every gradient comes out multiplied by it: dynamic loss
//! scaling for float16 (`vitdet train` feeds its `GradScaler`'s scale there every step).
//!
//! The memory of a step is everything resident while it runs:
//! * parameters and buffers (f32 master weights);
//! * AdamW state: two f32 moments per trainable parameter;
//! * with `--batch N > 1`, one f32 gradient accumulator per trainable parameter: a batch runs as
//!   N per-image passes of this graph whose gradients are summed (as `vitdet train --batch`), so
//!   activation memory is that of one image and time and FLOPs are N times one pass;
//! * the planned arena of the step graph: saved and transient activations, workspace and the
//!   gradients themselves (graph outputs, live until the optimizer reads them).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use vitdet_ir::{Graph, NodeIndex};
use vitdet_models::{build_detector_training_with, AttentionStrategy, ModelConfig, TrainingConfig};
use vitdet_passes::autodiff::{differentiate_with, DifferentiateOptions, LossSeed};
use vitdet_passes::checkpoint::{apply_checkpointing, CheckpointPolicy};
use vitdet_passes::memory::MemoryBreakdown;
use vitdet_passes::{autocast, fuse_attention, FusionReport, MemoryPlan, Precision};

/// The differentiated output: the sum of the loss terms.
pub const LOSS: &str = "loss";
/// The graph input seeding the backward with [`TrainOptions::loss_scale_input`].
pub const LOSS_SCALE_INPUT: &str = "loss_scale";

/// How to compile a training step.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Room for this many ground-truth instances per image.
    pub max_instances: usize,
    /// Overrides the config's attention strategy.
    pub attention: Option<AttentionStrategy>,
    /// Run the windowed-attention fusion pass.
    pub fuse_attention: bool,
    /// `None`: `auto` when a budget is given, else no checkpointing.
    pub checkpoint: Option<CheckpointChoice>,
    /// Memory budget for the whole step, in bytes.
    pub budget_bytes: Option<u64>,
    /// Images per optimizer step (gradient accumulation over per-image passes).
    pub batch: usize,
    pub precision: Precision,
    /// Training settings of the RPN and RoI heads.
    pub heads: TrainingConfig,
    /// Seed the backward from the f32 scalar input [`LOSS_SCALE_INPUT`] (loss scaling).
    pub loss_scale_input: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            max_instances: 16,
            attention: None,
            fuse_attention: true,
            checkpoint: None,
            budget_bytes: None,
            batch: 1,
            precision: Precision::F32,
            heads: TrainingConfig::default(),
            loss_scale_input: false,
        }
    }
}

/// `--checkpoint`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointChoice {
    /// Keep every activation.
    None,
    /// Recompute every transformer block from its input.
    Blocks,
    /// Recompute the global-attention blocks from their input.
    Global,
    /// The cheapest recomputation that fits `--budget`.
    Auto,
}

impl CheckpointChoice {
    pub fn name(self) -> &'static str {
        match self {
            CheckpointChoice::None => "none",
            CheckpointChoice::Blocks => "blocks",
            CheckpointChoice::Global => "global",
            CheckpointChoice::Auto => "auto",
        }
    }
}

/// The memory of one training step, in bytes (see the module doc).
#[derive(Clone, Debug, Serialize)]
pub struct StepMemory {
    #[serde(flatten)]
    pub breakdown: MemoryBreakdown,
    /// Gradient accumulator for `--batch > 1`.
    pub accumulation: u64,
}

/// A compiled training step.
pub struct TrainStep {
    pub config: ModelConfig,
    pub graph: Graph,
    pub order: Vec<NodeIndex>,
    pub plan: MemoryPlan,
    pub memory: StepMemory,
    /// Everything resident at the step's peak: parameters + optimizer state + accumulator +
    /// the planned arena.
    pub peak_memory_bytes: u64,
    pub checkpoint: CheckpointChoice,
    /// Scopes with recomputed activations.
    pub checkpointed: Vec<String>,
    pub recompute_flops: u64,
    /// Forward values still live when the backward starts (what the forward keeps for it).
    pub saved_activation_bytes: u64,
    /// Attention regions replaced by the fused op.
    pub fused_attention: usize,
    /// Training activation memory the fusion saves, summed over the fused blocks.
    pub fusion_saved_bytes: u64,
    /// What the fusion pass fused (per block) and left alone; `None` with `--no-fuse`.
    pub fusion: Option<FusionReport>,
    pub precision: Precision,
    pub batch: usize,
    /// `(parameter, gradient output)` for every trainable parameter the loss depends on.
    pub gradients: Vec<(String, String)>,
    /// Trainable parameters the loss does not depend on.
    pub unreached: Vec<String>,
    /// Whether the graph takes [`LOSS_SCALE_INPUT`].
    pub loss_scale_input: bool,
}

pub fn compile_train(mut config: ModelConfig, opts: &TrainOptions) -> Result<TrainStep> {
    if opts.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if let Some(a) = opts.attention {
        config.attention = a;
        config.validate().context("--attention")?;
    }
    let s = config.image_size;
    let mut forward = build_detector_training_with(&config, [s, s], opts.max_instances, &opts.heads)
        .context("building the training graph")?;
    let (mut fused_attention, mut fusion_saved_bytes, mut fusion) = (0, 0, None);
    if opts.fuse_attention {
        let fused = fuse_attention(&forward).context("attention fusion")?;
        fused_attention = fused.report.fused;
        fusion_saved_bytes = fused.report.blocks.iter().map(|b| b.saved_activation_bytes).sum();
        fusion = Some(fused.report);
        forward = fused.graph;
    }
    let forward = autocast(&forward, opts.precision)?;
    let seed = match opts.loss_scale_input {
        true => LossSeed::Input(LOSS_SCALE_INPUT.to_string()),
        false => LossSeed::One,
    };
    let diff = differentiate_with(&forward, LOSS, &DifferentiateOptions { seed })
        .context("differentiating the training graph")?;
    let graph = diff.graph;

    let trainable: u64 = graph
        .parameters()
        .filter(|(_, p)| p.trainable)
        .map(|(_, p)| p.ty.numel() as u64)
        .sum();
    let optimizer_state = 2 * 4 * trainable;
    let accumulation = if opts.batch > 1 { 4 * trainable } else { 0 };
    let base = graph.param_bytes() as u64 + optimizer_state + accumulation;

    let choice = match (opts.checkpoint, opts.budget_bytes) {
        (Some(c), _) => c,
        (None, Some(_)) => CheckpointChoice::Auto,
        (None, None) => CheckpointChoice::None,
    };
    let policy = match choice {
        CheckpointChoice::None => CheckpointPolicy::None,
        CheckpointChoice::Blocks => CheckpointPolicy::Blocks,
        CheckpointChoice::Global => {
            let scopes: Vec<String> = config
                .global_block_indices()
                .into_iter()
                .map(|i| format!("backbone.net.blocks.{i}"))
                .collect();
            if scopes.is_empty() {
                bail!(
                    "--checkpoint global: the model has no global-attention blocks (attention {:?})",
                    config.attention
                );
            }
            CheckpointPolicy::Scopes(scopes)
        }
        CheckpointChoice::Auto => match opts.budget_bytes {
            Some(budget_bytes) => CheckpointPolicy::Auto { budget_bytes },
            None => bail!("--checkpoint auto needs --budget (e.g. --budget 16GiB)"),
        },
    };
    let mut ck = apply_checkpointing(&graph, &policy, base)?;
    // Marks attributes only: the order and the plan stay valid.
    ck.graph = vitdet_passes::prove_index_ranges(&ck.graph)?.0;
    let breakdown = ck.plan.breakdown(&ck.graph, &ck.order, optimizer_state);
    let peak_memory_bytes = base + ck.plan.arena_bytes as u64;
    if let (Some(budget), false) = (opts.budget_bytes, choice == CheckpointChoice::Auto) {
        if peak_memory_bytes > budget {
            bail!(
                "--checkpoint {} plans {} for the step, above the budget {} (use --checkpoint auto to fit it)",
                choice.name(),
                crate::report::bytes(peak_memory_bytes as usize),
                crate::report::bytes(budget as usize)
            );
        }
    }
    Ok(TrainStep {
        config,
        graph: ck.graph,
        order: ck.order,
        plan: ck.plan,
        memory: StepMemory {
            breakdown,
            accumulation,
        },
        peak_memory_bytes,
        checkpoint: choice,
        checkpointed: ck.checkpointed,
        recompute_flops: ck.recompute_flops,
        saved_activation_bytes: ck.saved_activation_bytes,
        fused_attention,
        fusion_saved_bytes,
        fusion,
        precision: opts.precision,
        batch: opts.batch,
        gradients: diff.gradients,
        unreached: diff.unreached,
        loss_scale_input: opts.loss_scale_input,
    })
}

/// `16GiB`, `1.5 GB`, `800MiB`, `123456` (bytes) -> bytes. Binary (`KiB`, `MiB`, `GiB`, `TiB`)
/// and decimal (`kB`, `MB`, `GB`, `TB`) units.
pub fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .with_context(|| format!("`{text}` is not a size (e.g. 16GiB, 800MB, 123456)"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        "tib" | "t" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => bail!("`{text}`: unknown unit `{other}` (use B, KiB, MiB, GiB, TiB, kB, MB, GB or TB)"),
    };
    let bytes = value * scale;
    if !(bytes.is_finite() && bytes >= 1.0) {
        bail!("`{text}` is not a positive size");
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(parse_bytes("16GiB").unwrap(), 16 << 30);
        assert_eq!(parse_bytes("1.5 GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("800MiB").unwrap(), 800 << 20);
        assert_eq!(parse_bytes("123").unwrap(), 123);
        for bad in ["", "GiB", "16XB", "-3GiB", "0"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }
}
