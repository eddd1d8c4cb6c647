//! `vitdet bench`: its arguments, and the report it prints or writes.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use vitdet_ir::DType;
use vitdet_passes::Precision;

use super::ops::{self, OpCase, OpResult};
use super::step::{self, StepMode, StepOptions, StepResult};
use super::{with_conv_engine, ConvEngine};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum BenchFormat {
    Text,
    Json,
}

/// Time the runtime's kernels (`--ops`: ViTDet-B's hot ops one by one) or one end-to-end step
/// (`--model`) on the CPU or a CUDA device.
#[derive(clap::Args, Clone)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["ops", "model"])))]
pub struct BenchArgs {
    /// Where to run: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The per-op table: linear, fused window and global attention (forward and backward),
    /// softmax, layer norm, convolutions, transposed convolution, top-k at ViTDet-B/1024 shapes.
    #[arg(long)]
    pub ops: bool,
    /// With --ops: print the op list (shapes, attributes, inputs) and run nothing.
    #[arg(long, conflicts_with = "model")]
    pub list: bool,
    /// With --ops: only the ops whose names contain one of these (comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with = "model")]
    pub only: Vec<String>,
    /// Divide every size of the op table by this (1: the real shapes).
    #[arg(long, default_value_t = 1, conflicts_with = "model")]
    pub scale: usize,
    /// The op table at 1/8 of every size (--scale 8): seconds on a CPU.
    #[arg(long, conflicts_with_all = ["model", "scale"])]
    pub small: bool,
    /// End-to-end step of this preset or config file.
    #[arg(long, conflicts_with = "ops")]
    pub model: Option<String>,
    /// Input side in pixels of the end-to-end step (default: the config's).
    #[arg(long, conflicts_with = "ops")]
    pub image_size: Option<usize>,
    /// End-to-end step: inference, or a training step (forward, losses and gradients).
    #[arg(long, value_enum, default_value = "infer", conflicts_with = "ops")]
    pub mode: StepMode,
    /// End-to-end step: after the timed runs, one more waiting for the device after every op,
    /// to report each op kind's device time beside its host (dispatch) time.
    #[arg(long, conflicts_with = "ops")]
    pub profile: bool,
    /// Keep the unfused attention subgraph in the end-to-end step.
    #[arg(long, conflicts_with = "ops")]
    pub no_fuse: bool,
    /// Element type of the op table's inputs, or the end-to-end step's autocast precision.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed runs before them.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// What runs convolutions on CUDA: cuDNN where it loads (auto), cuDNN, or the runtime's
    /// im2col kernel + cuBLAS.
    #[arg(long, value_enum, default_value = "auto")]
    pub conv_engine: ConvEngine,
    #[arg(long, value_enum, default_value = "text")]
    pub format: BenchFormat,
    /// Write the report (in --format) to this file, atomically; the text table still goes to
    /// standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `--ops` as JSON.
#[derive(Serialize)]
struct OpsReport {
    device: String,
    /// The GPU's name, where the device is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    gpu: Option<String>,
    /// CPU kernel threads (CPU runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    threads: Option<usize>,
    dtype: DType,
    /// What ran the convolutions (`--conv-engine`).
    conv_engine: String,
    scale: usize,
    warmup: usize,
    iters: usize,
    ops: Vec<OpResult>,
}

/// `--ops --list` as JSON.
#[derive(Serialize)]
struct OpList {
    dtype: DType,
    scale: usize,
    ops: Vec<OpCase>,
}

/// The end-to-end step as JSON.
#[derive(Serialize)]
struct StepReport {
    device: String,
    /// The GPU's name, where the device is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    gpu: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    threads: Option<usize>,
    /// What ran the convolutions (`--conv-engine`).
    conv_engine: String,
    #[serde(flatten)]
    step: StepResult,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let precision = crate::compile::parse_dtype_flag(&args.dtype)?;
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    if args.ops {
        let scale = if args.small { 8 } else { args.scale };
        let mut cases = ops::cases(scale, op_dtype(precision))?;
        if !args.only.is_empty() {
            cases.retain(|c| args.only.iter().any(|o| c.name.contains(o.as_str())));
            if cases.is_empty() {
                bail!("--only {}: no op of the table matches", args.only.join(","));
            }
        }
        if args.list {
            let text = ops::list_text(&cases);
            let list = OpList {
                dtype: op_dtype(precision),
                scale,
                ops: cases,
            };
            return emit(&args, &text, &list);
        }
        let device = open_device(&args.device)?;
        let (results, conv_engine) = with_conv_engine(args.conv_engine, &device, || {
            Ok(ops::run(cases, &device, args.warmup, args.iters, &|name| {
                eprintln!("timing {name}")
            }))
        })?;
        eprintln!("convolutions: {conv_engine}");
        let failed: Vec<&str> = results
            .iter()
            .filter(|r| r.error.is_some())
            .map(|r| r.case.name)
            .collect();
        let report = OpsReport {
            device: args.device.clone(),
            gpu: vitdet_runtime::cuda::gpu_name(&device),
            threads: device.is_cpu().then(super::kernel_threads),
            dtype: op_dtype(precision),
            conv_engine,
            scale,
            warmup: args.warmup,
            iters: args.iters,
            ops: results,
        };
        emit(&args, &ops::results_text(&report.ops), &report)?;
        if !failed.is_empty() {
            bail!(
                "{} of {} ops failed: {}",
                failed.len(),
                report.ops.len(),
                failed.join(", ")
            );
        }
        return Ok(());
    }
    let Some(model) = args.model.clone() else {
        bail!("vitdet bench needs --ops or --model");
    };
    let device = open_device(&args.device)?;
    let opts = StepOptions {
        model,
        image_size: args.image_size,
        mode: args.mode,
        precision,
        fuse_attention: !args.no_fuse,
        warmup: args.warmup,
        iters: args.iters,
        profile: args.profile,
    };
    eprintln!("compiling and timing {} {}", opts.model, opts.mode.name());
    let (step, conv_engine) = with_conv_engine(args.conv_engine, &device, || step::run(&opts, &device))?;
    eprintln!("convolutions: {conv_engine}");
    let text = step.to_text();
    let report = StepReport {
        device: args.device.clone(),
        gpu: vitdet_runtime::cuda::gpu_name(&device),
        threads: device.is_cpu().then(super::kernel_threads),
        conv_engine,
        step,
    };
    emit(&args, &text, &report)
}

/// The op table's element type for `--dtype`.
fn op_dtype(p: Precision) -> DType {
    match p {
        Precision::F32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::F16 => DType::F16,
    }
}

fn open_device(text: &str) -> Result<vitdet_runtime::Device> {
    let device = crate::infer::parse_device(text)?;
    super::timer::prepare(&device)?;
    Ok(device)
}

/// Prints the report in `--format`, or writes it to `--out` and prints the text.
fn emit(args: &BenchArgs, text: &str, report: &impl Serialize) -> Result<()> {
    let rendered = match args.format {
        BenchFormat::Text => text.to_string(),
        BenchFormat::Json => serde_json::to_string_pretty(report)? + "\n",
    };
    match &args.out {
        Some(path) => {
            vitdet_runtime::write_atomic(path, rendered.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            print!("{text}");
        }
        None => print!("{rendered}"),
    }
    Ok(())
}
