//! `vitdet train`: compiles the training step once with [`crate::compile::compile_train`]
//! (training forward graph, attention fusion, autocast to `--dtype`, autodiff, activation
//! checkpointing under `--budget`, schedule) and runs it on `--device` over augmented batches
//! with AdamW, the warmup + cosine schedule, metrics and atomic checkpoints.
//!
//! Float16 trains as detectron2's AMPTrainer with `torch.cuda.amp.GradScaler`: the scaler's
//! scale is the graph's loss seed, the gradients are unscaled in f32 before AdamW, and a step
//! whose gradients hold an inf or NaN is skipped (the scale backs off; the learning-rate
//! schedule still advances). bfloat16 needs no scaling. A non-finite *loss* stops any run: the
//! forward does not depend on the scale, so backing off cannot cure it.
//!
//! A run directory holds:
//! * `train.json`: the options the run was started with (a resumed run reads them back, so a
//!   resume cannot silently change the experiment);
//! * `metrics.jsonl`: one JSON object per iteration (loss terms, sampled anchors and RoIs,
//!   learning rate, timing);
//! * `checkpoint.safetensors`: parameters, optimizer state (and the loss scaler's, for float16)
//!   and the iteration reached, replaced atomically every `checkpoint_period` iterations and at
//!   the end. It is also a weights file for `vitdet infer --weights`.
//!
//! Determinism: iteration `i` draws its images, its augmentation and the graph's `seed` input
//! (drop path, anchor and RoI sampling) from counter-based streams keyed by `(seed, i, slot)`,
//! and every kernel is deterministic, so a resumed run (on the same device) reproduces the
//! uninterrupted run's losses bit for bit. The device is not part of the run's options: a run
//! may be resumed on another one.

pub mod cli;
pub mod metrics;
mod step;
pub mod validate;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use vitdet_models::{ModelConfig, TrainingConfig};
use vitdet_passes::Precision;
use vitdet_runtime::checkpoint::{self, CheckpointMeta};
use vitdet_runtime::optim::grad_scaler::{GradScaler, GradScalerConfig};
use vitdet_runtime::optim::{AdamW, AdamWConfig, GroupConfig, ParamGroups, ParamInfo, WarmupCosine};
use vitdet_runtime::Device;
use vitdet_runtime::ParamStore;

use crate::compile::CheckpointChoice;
use crate::data::{CocoDataset, LsjConfig, TrainLoader};
use crate::report::{add_times, slowest_first};
pub use metrics::MetricsLine;
pub use step::{StepResult, TrainStep};

/// File names inside a run directory.
pub const OPTIONS_FILE: &str = "train.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// Everything that defines a training run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainOptions {
    /// The model; its detector's class count is set from the dataset.
    pub model: ModelConfig,
    /// COCO-layout dataset root: `annotations/instances_train.json` and `train/`.
    pub data: PathBuf,
    /// Starting weights (every parameter of the model), or `None` for the seeded initialization.
    pub weights: Option<PathBuf>,
    pub iterations: u64,
    /// Images per iteration (their gradients are averaged).
    pub batch_size: usize,
    pub base_lr: f64,
    pub weight_decay: f64,
    /// Layer-wise learning-rate decay (`None`: the paper's rate for the trunk depth).
    pub lr_decay: Option<f64>,
    pub warmup_iters: u64,
    pub seed: u64,
    pub checkpoint_period: u64,
    /// Ground-truth instances per image the graph takes (more are dropped and counted).
    pub max_instances: usize,
    /// Large-scale jitter's range of scale factors (detectron2 ViTDet: 0.1 to 2.0).
    pub scale_range: [f64; 2],
    /// Training settings of the RPN and RoI heads (detectron2's by default).
    pub heads: TrainingConfig,
    /// How the step is compiled (runs written before these options existed: the defaults).
    #[serde(default)]
    pub step: StepOptions,
}

/// How the training step is compiled: `--dtype`, `--no-fuse`, `--checkpoint`, `--budget`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct StepOptions {
    /// `f32`, or autocast to `bf16` or `f16` (f16 trains with dynamic loss scaling).
    pub dtype: String,
    /// Replace each windowed-attention subgraph with the fused op.
    pub fuse_attention: bool,
    /// Activation checkpointing (`None`: `auto` with a budget, else none).
    pub checkpoint: Option<CheckpointChoice>,
    /// Memory budget of the step in bytes (`--checkpoint auto` fits it).
    pub budget_bytes: Option<u64>,
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions {
            dtype: Precision::F32.name().to_string(),
            fuse_attention: true,
            checkpoint: None,
            budget_bytes: None,
        }
    }
}

impl StepOptions {
    pub fn precision(&self) -> Result<Precision> {
        crate::compile::parse_dtype_flag(&self.dtype)
    }
}

impl TrainOptions {
    pub fn validate(&self) -> Result<()> {
        if self.iterations == 0 {
            bail!("--iters must be at least 1");
        }
        if self.batch_size == 0 {
            bail!("--batch must be at least 1");
        }
        if self.checkpoint_period == 0 {
            bail!("--checkpoint-every must be at least 1");
        }
        if self.max_instances == 0 {
            bail!("--max-instances must be at least 1");
        }
        if self.warmup_iters > self.iterations {
            bail!(
                "--warmup ({}) is longer than the run ({} iterations)",
                self.warmup_iters,
                self.iterations
            );
        }
        let [lo, hi] = self.scale_range;
        if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
            bail!("--scale-range {lo},{hi}: need 0 < min <= max");
        }
        self.step.precision()?;
        self.model.validate().context("model configuration")?;
        Ok(())
    }

    fn group_config(&self) -> GroupConfig {
        let mut g = GroupConfig::paper(self.model.depth);
        g.base_lr = self.base_lr;
        g.weight_decay = self.weight_decay;
        if let Some(rate) = self.lr_decay {
            g.lr_decay_rate = rate;
        }
        g
    }

    /// The training annotations and images of `data`.
    pub fn train_split(&self) -> (PathBuf, PathBuf) {
        (
            self.data.join("annotations").join("instances_train.json"),
            self.data.join("train"),
        )
    }
}

/// What [`train`] reports when it finishes.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Iteration the run started at (0, or the checkpoint's when resumed).
    pub start_iteration: u64,
    /// Iterations completed when this invocation ended.
    pub iterations: u64,
    pub last: Option<MetricsLine>,
    pub seconds: f64,
    pub checkpoint: PathBuf,
    /// Kernel time per op name over the whole run, slowest first.
    pub op_seconds: Vec<(String, f64)>,
    /// The same time per scope (two components: `backbone.net`, ...), slowest first.
    pub scope_seconds: Vec<(String, f64)>,
    /// Float16: the loss scale at the end and the optimizer steps this invocation skipped.
    pub loss_scale: Option<f32>,
    pub skipped_steps: u64,
}

/// How [`train`] reports progress.
pub trait Progress {
    fn start(&mut self, _start: u64, _total: u64) {}
    fn iteration(&mut self, _line: &MetricsLine) {}
    fn message(&mut self, _text: &str) {}
    fn finish(&mut self) {}
}

/// No progress output.
pub struct Quiet;
impl Progress for Quiet {}

/// Starts a run in `out` (which must not hold a run already). Nothing is written before the
/// dataset, the model and the starting weights have been checked.
///
/// `stop_at` ends this invocation after that many iterations (with a checkpoint), leaving a run
/// that `--resume` continues exactly as if it had not stopped. Parameters, optimizer state and
/// the step's inputs live on `device`.
pub fn train(
    options: TrainOptions,
    out: &Path,
    stop_at: Option<u64>,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<TrainSummary> {
    options.validate()?;
    if out.join(OPTIONS_FILE).exists() {
        bail!(
            "{} already holds a training run; pass --resume to continue it or choose another --out",
            out.display()
        );
    }
    run(options, out, false, stop_at, device, progress)
}

/// Continues the run in `out` from its checkpoint, with the options it was started with;
/// `iterations` may extend it.
pub fn resume(
    out: &Path,
    iterations: Option<u64>,
    stop_at: Option<u64>,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<TrainSummary> {
    let path = out.join(OPTIONS_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} is not a training run (cannot read {})",
            out.display(),
            path.display()
        )
    })?;
    let mut options: TrainOptions =
        serde_json::from_str(&text).with_context(|| format!("malformed {}", path.display()))?;
    if let Some(n) = iterations {
        if n != options.iterations {
            options.iterations = n;
            options.validate()?;
            let text = serde_json::to_string_pretty(&options)?;
            vitdet_runtime::write_atomic(&path, text.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    run(options, out, true, stop_at, device, progress)
}

fn run(
    mut options: TrainOptions,
    out: &Path,
    resuming: bool,
    stop_at: Option<u64>,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<TrainSummary> {
    let (annotations, images) = options.train_split();
    let dataset = CocoDataset::load(&annotations, &images)?;
    options.model.detector.num_classes = dataset.num_classes();
    let lsj = LsjConfig {
        min_scale: options.scale_range[0],
        max_scale: options.scale_range[1],
        ..LsjConfig::vitdet(options.model.image_size)
    };
    let loader = TrainLoader::new(dataset, lsj, options.batch_size, options.seed)?;
    let report = loader.report();
    if report.skipped_images > 0 || report.crowd_annotations > 0 {
        progress.message(&format!(
            "training on {} of {} images ({} without a non-crowd instance skipped, {} crowd annotations ignored)",
            report.used, report.images, report.skipped_images, report.crowd_annotations
        ));
    }

    let compile_start = Instant::now();
    let step = TrainStep::compile(
        &options.model,
        options.max_instances,
        &options.heads,
        options.batch_size,
        &options.step,
    )?;
    progress.message(&describe_step(&step, device, compile_start.elapsed().as_secs_f64()));

    let groups = ParamGroups::new(&ParamInfo::from_graph(step.graph()), options.group_config())?;
    let schedule = WarmupCosine::new(options.iterations, options.warmup_iters)?;
    let checkpoint_path = out.join(CHECKPOINT_FILE);
    let metrics_path = out.join(METRICS_FILE);

    // Float16: detectron2's AMPTrainer scaler (torch's defaults).
    let mut scaler = match step.takes_loss_scale() {
        true => Some(GradScaler::new(GradScalerConfig::default())?),
        false => None,
    };
    let (mut params, mut optimizer, start) = if resuming {
        let ck = checkpoint::load(&checkpoint_path, device)
            .with_context(|| format!("cannot resume {}: no usable checkpoint", out.display()))?;
        ck.check(step.graph())
            .with_context(|| format!("{} does not fit the model of this run", checkpoint_path.display()))?;
        if ck.meta.seed != options.seed {
            bail!(
                "{} was written with seed {}, the run's options say {}",
                checkpoint_path.display(),
                ck.meta.seed,
                options.seed
            );
        }
        if ck.meta.iteration >= options.iterations {
            bail!(
                "{} already completed {} of {} iterations; pass --iters to extend the run",
                out.display(),
                ck.meta.iteration,
                options.iterations
            );
        }
        match (&mut scaler, ck.meta.grad_scaler) {
            (Some(s), Some(state)) => {
                *s = GradScaler::from_state(state)
                    .with_context(|| format!("{}: loss-scaler state", checkpoint_path.display()))?
            }
            (None, None) => {}
            (Some(_), None) => bail!(
                "{} has no loss-scaler state, but the run trains in f16",
                checkpoint_path.display()
            ),
            (None, Some(_)) => bail!(
                "{} holds loss-scaler state, but the run trains in {}",
                checkpoint_path.display(),
                options.step.dtype
            ),
        }
        metrics::truncate_after(&metrics_path, ck.meta.iteration)?;
        (ck.params, ck.optimizer, ck.meta.iteration)
    } else {
        let params = match &options.weights {
            Some(w) => ParamStore::load_safetensors(w, step.graph(), device)
                .with_context(|| format!("cannot load --weights {}", w.display()))?,
            None => ParamStore::init_random(step.graph(), options.seed, device)?,
        };
        (params, AdamW::new(AdamWConfig::default())?, 0)
    };
    if !resuming {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create run directory {}", out.display()))?;
        let text = serde_json::to_string_pretty(&options)?;
        vitdet_runtime::write_atomic(out.join(OPTIONS_FILE), text.as_bytes())
            .with_context(|| format!("cannot write {}", out.join(OPTIONS_FILE).display()))?;
    }
    let model_config = serde_json::to_value(&options.model)?;
    let mut metrics = metrics::Writer::append(&metrics_path)?;

    let started = Instant::now();
    progress.start(start, options.iterations);
    let mut last = None;
    let mut skipped_steps = 0;
    let mut op_seconds: std::collections::BTreeMap<String, f64> = Default::default();
    let mut scope_seconds: std::collections::BTreeMap<String, f64> = Default::default();
    let end = stop_at.map_or(options.iterations, |n| n.min(options.iterations));
    if end <= start {
        bail!("--stop-at {end} is not after the checkpoint's iteration {start}");
    }
    let program = step.program()?;
    for iteration in start..end {
        let t0 = Instant::now();
        let batch = loader.samples(iteration)?;
        let result = step.run_batch(
            &program,
            &params,
            &batch,
            options.seed,
            iteration,
            options.max_instances,
            scaler.as_ref().map(GradScaler::scale),
            device,
        )?;
        let stop = |progress: &mut dyn Progress, bad: String| {
            progress.finish();
            let kept = if checkpoint_path.exists() {
                format!("the last good checkpoint is {}", checkpoint_path.display())
            } else {
                "no checkpoint was written yet".to_string()
            };
            anyhow::anyhow!("iteration {}: {bad}; stopping ({kept})", iteration + 1)
        };
        if let Some(bad) = result.non_finite_loss() {
            return Err(stop(progress, bad));
        }
        add_times(&mut op_seconds, &result.op_seconds);
        add_times(&mut scope_seconds, &result.scope_seconds);
        let multiplier = schedule.multiplier(iteration)?;
        let (loss_scale, skipped) = match &mut scaler {
            None => {
                if let Some(bad) = result.non_finite_gradients()? {
                    return Err(stop(progress, bad));
                }
                optimizer.step_groups(&mut params, &result.gradients, &groups, multiplier)?;
                (None, false)
            }
            Some(s) => {
                let done = s.step(&result.gradients, |g| {
                    optimizer.step_groups(&mut params, g, &groups, multiplier)
                })?;
                (Some(done.scale as f64), done.skipped)
            }
        };
        skipped_steps += u64::from(skipped);
        // Running statistics come from the forward, which the loss scale does not touch: kept
        // on a skipped step too, as in PyTorch.
        for (name, value) in &result.buffer_updates {
            params.insert(name.clone(), value.clone());
        }
        let line = MetricsLine {
            iteration: iteration + 1,
            losses: result.losses.clone(),
            samples: result.sample_stats.clone(),
            lr: options.base_lr * multiplier,
            seconds: t0.elapsed().as_secs_f64(),
            truncated_instances: result.truncated,
            loss_scale,
            skipped,
        };
        metrics.write(&line)?;
        progress.iteration(&line);
        if (iteration + 1) % options.checkpoint_period == 0 || iteration + 1 == end {
            if let Some(name) = first_non_finite(&params)? {
                progress.finish();
                bail!(
                    "iteration {}: the update made parameter `{name}` non-finite; stopping without \
                     overwriting the last good checkpoint ({})",
                    iteration + 1,
                    checkpoint_path.display()
                );
            }
            let meta = CheckpointMeta {
                iteration: iteration + 1,
                seed: options.seed,
                model_config: model_config.clone(),
                grad_scaler: scaler.as_ref().map(GradScaler::state),
            };
            checkpoint::save(&checkpoint_path, &params, &optimizer, &meta)?;
        }
        last = Some(line);
    }
    progress.finish();
    let (op_seconds, scope_seconds) = (slowest_first(&op_seconds), slowest_first(&scope_seconds));
    Ok(TrainSummary {
        start_iteration: start,
        iterations: end,
        last,
        seconds: started.elapsed().as_secs_f64(),
        checkpoint: checkpoint_path,
        op_seconds,
        scope_seconds,
        loss_scale: scaler.as_ref().map(GradScaler::scale),
        skipped_steps,
    })
}

/// `compiled the training step (f16 on cuda:0, ...): N forward + M backward nodes, ...`.
fn describe_step(step: &TrainStep, device: &Device, seconds: f64) -> String {
    let c = step.compiled();
    let nodes = step.node_counts();
    let recompute = match nodes.recompute {
        0 => String::new(),
        n => format!(" + {n} recompute"),
    };
    let device = match device {
        Device::Cpu => "cpu".to_string(),
        d => format!("{:?}", d.location()),
    };
    format!(
        "compiled the training step ({} on {device}, {} fused attention blocks, checkpoint {}): \
         {} forward + {} backward{recompute} nodes, {} trainable tensors, planned peak {}, {:.1} ms",
        c.precision.name(),
        c.fused_attention,
        c.checkpoint.name(),
        nodes.forward,
        nodes.backward,
        step.gradients().len(),
        crate::report::bytes(c.peak_memory_bytes as usize),
        seconds * 1e3
    )
}

/// The first parameter holding a NaN or infinity, if any.
fn first_non_finite(params: &ParamStore) -> Result<Option<String>> {
    let tensors: Vec<(String, vitdet_runtime::Tensor)> =
        params.iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
    Ok(vitdet_runtime::optim::non_finite_gradients(&tensors)?
        .into_iter()
        .next())
}
