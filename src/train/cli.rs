//! The `vitdet train` command line: options, a progress bar, and the summary.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{MetricsLine, Progress, StepOptions, TrainOptions};
use crate::compile::{parse_bytes, CheckpointChoice};
use vitdet_models::{ModelConfig, TrainingConfig};

/// `vitdet train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Preset or JSON/TOML config (its detector's class count is taken from the dataset).
    #[arg(long, default_value = "vitdet-tiny")]
    pub model: String,
    /// COCO-layout dataset: annotations/instances_train.json and train/ (`vitdet data synth`
    /// writes one).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Starting weights (safetensors with every parameter of the model); default: seeded init.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Run directory: train.json, metrics.jsonl, checkpoint.safetensors.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its checkpoint (with the options it was started with).
    #[arg(long)]
    pub resume: bool,
    /// Total iterations (with --resume: extend the run to this many).
    #[arg(long)]
    pub iters: Option<u64>,
    /// Stop this invocation after this many iterations (with a checkpoint); --resume continues
    /// the run exactly.
    #[arg(long)]
    pub stop_at: Option<u64>,
    /// Images per iteration.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Learning rate of the heads (the trunk's blocks get layer-wise decayed rates).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// Layer-wise lr decay (default: the paper's 0.7 / 0.8 / 0.9 for B / L / H depths).
    #[arg(long)]
    pub lr_decay: Option<f64>,
    /// Linear warmup iterations (default: 250, or the whole run if shorter).
    #[arg(long)]
    pub warmup: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every N iterations (and at the end).
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: u64,
    /// Ground-truth instances per image the graph has room for.
    #[arg(long, default_value_t = 16)]
    pub max_instances: usize,
    /// Large-scale jitter's scale range `MIN,MAX` (detectron2 ViTDet: 0.1,2.0).
    #[arg(long, value_delimiter = ',', default_values_t = [0.1, 2.0])]
    pub scale_range: Vec<f64>,
    /// RoIs sampled per image for the box and mask heads (detectron2: 512).
    #[arg(long, default_value_t = 512)]
    pub roi_batch: usize,
    /// Precision: f32, or autocast to bf16 / f16 (f16 with dynamic loss scaling).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Activation checkpointing: none, blocks (every block), global (the global blocks) or auto
    /// (the cheapest recomputation that fits --budget). Default: auto with --budget, else none.
    #[arg(long, value_enum)]
    pub checkpoint: Option<CheckpointChoice>,
    /// Memory budget of the training step, e.g. 16GiB or 800MB.
    #[arg(long)]
    pub budget: Option<String>,
    /// Keep the unfused attention subgraph.
    #[arg(long)]
    pub no_fuse: bool,
    /// Where parameters, optimizer state and the step run: cpu, cuda or cuda:N (also with
    /// --resume; the other options above come from the run's train.json then).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl TrainArgs {
    pub fn options(&self) -> Result<TrainOptions> {
        let Some(data) = self.data.clone() else {
            bail!("--data is required to start a run (only --resume reads it from the run)");
        };
        let [lo, hi] = self.scale_range[..] else {
            bail!("--scale-range takes two numbers MIN,MAX, found {:?}", self.scale_range);
        };
        Ok(TrainOptions {
            model: ModelConfig::load(&self.model)?,
            data,
            weights: self.weights.clone(),
            iterations: self.iters.unwrap_or(1000),
            batch_size: self.batch,
            base_lr: self.lr,
            weight_decay: self.weight_decay,
            lr_decay: self.lr_decay,
            warmup_iters: self.warmup.unwrap_or(250.min(self.iters.unwrap_or(1000))),
            seed: self.seed,
            checkpoint_period: self.checkpoint_every,
            max_instances: self.max_instances,
            scale_range: [lo, hi],
            heads: TrainingConfig {
                roi_batch_size_per_image: self.roi_batch,
                ..TrainingConfig::default()
            },
            step: StepOptions {
                dtype: self.dtype.clone(),
                fuse_attention: !self.no_fuse,
                checkpoint: self.checkpoint,
                budget_bytes: self
                    .budget
                    .as_deref()
                    .map(parse_bytes)
                    .transpose()
                    .context("--budget")?,
            },
        })
    }
}

/// A progress bar on stderr: iteration, loss terms, lr, it/s and ETA. Hidden when stderr is not
/// a terminal (metrics.jsonl has everything).
pub struct Bar(Option<ProgressBar>);

impl Bar {
    pub fn new() -> Self {
        Bar(None)
    }
}

impl Default for Bar {
    fn default() -> Self {
        Self::new()
    }
}

/// `loss 1.234 (rpn_cls 0.1, ...)`, then the loss scale of a float16 run (and a skipped step).
pub fn describe_losses(line: &MetricsLine) -> String {
    let total = line.losses.get("loss").copied().unwrap_or(f64::NAN);
    let terms: Vec<String> = line
        .losses
        .iter()
        .filter(|(k, _)| k.as_str() != "loss")
        .map(|(k, v)| format!("{} {v:.3}", k.trim_start_matches("loss_")))
        .collect();
    let mut text = format!("loss {total:.3} ({})", terms.join(", "));
    if let Some(scale) = line.loss_scale {
        text.push_str(&format!(", scale {scale}"));
    }
    if line.skipped {
        text.push_str(" (step skipped: inf/NaN gradients)");
    }
    text
}

impl Progress for Bar {
    fn start(&mut self, start: u64, total: u64) {
        let bar = ProgressBar::new(total);
        bar.set_position(start);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} it, {per_sec}, eta {eta} {msg}")
                .expect("valid template"),
        );
        if !std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        self.0 = Some(bar);
    }
    fn iteration(&mut self, line: &MetricsLine) {
        if let Some(bar) = &self.0 {
            bar.set_position(line.iteration);
            bar.set_message(format!("{}, lr {:.2e}", describe_losses(line), line.lr));
        }
    }
    fn message(&mut self, text: &str) {
        match &self.0 {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }
    fn finish(&mut self) {
        if let Some(bar) = self.0.take() {
            bar.finish_and_clear();
        }
    }
}

/// Runs `vitdet train`.
pub fn run(args: TrainArgs) -> Result<()> {
    let mut bar = Bar::new();
    let device = crate::infer::parse_device(&args.device)?;
    let summary = if args.resume {
        super::resume(&args.out, args.iters, args.stop_at, &device, &mut bar)?
    } else {
        super::train(args.options()?, &args.out, args.stop_at, &device, &mut bar)?
    };
    let done = summary.iterations - summary.start_iteration;
    println!(
        "trained iterations {}..{} in {:.1} s ({:.2} it/s); checkpoint {}",
        summary.start_iteration + 1,
        summary.iterations,
        summary.seconds,
        done as f64 / summary.seconds.max(1e-9),
        summary.checkpoint.display()
    );
    if let Some(last) = &summary.last {
        println!("last iteration: {}", describe_losses(last));
    }
    if let Some(scale) = summary.loss_scale {
        println!(
            "f16 loss scale {scale} at the end, {} optimizer steps skipped for inf/NaN gradients",
            summary.skipped_steps
        );
    }
    let kernels: f64 = summary.op_seconds.iter().map(|(_, t)| t).sum();
    let top = |times: &[(String, f64)]| -> String {
        let shares: Vec<String> = times
            .iter()
            .take(6)
            .map(|(name, t)| format!("{name} {:.0}%", 100.0 * t / kernels.max(1e-12)))
            .collect();
        shares.join(", ")
    };
    println!("kernel time {kernels:.1} s: {}", top(&summary.op_seconds));
    println!("by scope: {}", top(&summary.scope_seconds));
    Ok(())
}
