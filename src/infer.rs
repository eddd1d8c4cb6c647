//! Running a compiled backbone on an image.

use std::fmt::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use vitdet_passes::Precision;
use vitdet_runtime::{preprocess_image, CandleDType, Device, ParamStore, Program, Tensor};

use crate::compile::{compile_with, inference_lowering, CompileOptions, Target};
use crate::report::{bytes, slowest_first};
use crate::rss::RssProbe;

#[derive(Clone, Debug)]
pub struct InferOptions {
    pub model: String,
    pub weights: Option<PathBuf>,
    pub image: PathBuf,
    pub dump: Option<PathBuf>,
    pub seed: u64,
    /// Runs to time; the summary reports the median.
    pub repeat: usize,
    pub device: Device,
    /// f32, or autocast to bf16 / f16 with the attention fused (weights converted on load).
    pub precision: Precision,
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(text: &str) -> Result<Device> {
    let cuda = |ordinal: usize| {
        Device::new_cuda(ordinal).with_context(|| {
            format!(
                "device `{text}`: CUDA is unavailable (this binary needs `--features cuda` and a GPU with its driver)"
            )
        })
    };
    match text {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match text.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n),
            _ => anyhow::bail!("unknown device `{text}`: expected cpu, cuda or cuda:N"),
        },
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct OutputSummary {
    pub name: String,
    pub shape: Vec<usize>,
    pub mean: f64,
    pub abs_max: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct InferSummary {
    pub model: String,
    /// The precision it ran in (f32, bf16, f16).
    pub dtype: &'static str,
    pub image: String,
    pub original_hw: (usize, usize),
    pub resized_hw: (usize, usize),
    /// The weights file, or `random init (seed N)`.
    pub weights: String,
    pub outputs: Vec<OutputSummary>,
    /// Median wall time of one forward pass.
    pub run_seconds: f64,
    pub runs: usize,
    /// Peak growth of the process's resident set during the runs (Linux only).
    pub peak_rss_growth_bytes: Option<u64>,
    pub measured_peak_activation_bytes: usize,
    pub planned_peak_activation_bytes: usize,
    pub param_bytes: usize,
    /// Seconds per op name in the last run, slowest first.
    pub op_seconds: Vec<(String, f64)>,
    /// The same seconds per scope (two components: `backbone.net`, ...), slowest first.
    pub scope_seconds: Vec<(String, f64)>,
}

pub struct InferResult {
    pub outputs: Vec<(String, Tensor)>,
    pub summary: InferSummary,
}

pub fn infer(opts: &InferOptions) -> Result<InferResult> {
    let compiled = compile_with(
        &CompileOptions {
            model: opts.model.clone(),
            image_size: None,
            attention: None,
            target: Target::Backbone,
        },
        inference_lowering(opts.precision),
    )?;
    let device = opts.device.clone();
    let (params, weights) = load_params(opts.weights.as_deref(), &compiled.graph, opts.seed, &device)?;
    let pre = preprocess_image(&opts.image, compiled.config.image_size, &device)?;
    let probe = RssProbe::start();
    let mut times = Vec::new();
    let mut out = None;
    let program = Program::new(&compiled.graph, &compiled.order)?;
    for _ in 0..opts.repeat.max(1) {
        drop(out.take());
        let start = Instant::now();
        out = Some(program.run(&params, &[("image", pre.image.clone())], &device)?);
        times.push(start.elapsed().as_secs_f64());
    }
    let peak_rss_growth_bytes = probe.peak_growth();
    let out = out.expect("at least one run");
    times.sort_by(f64::total_cmp);
    let run_seconds = times[times.len() / 2];
    let mut outputs = Vec::new();
    for (name, t) in &out.outputs {
        let flat = t.flatten_all()?.to_dtype(CandleDType::F64)?;
        outputs.push(OutputSummary {
            name: name.clone(),
            shape: t.dims().to_vec(),
            mean: flat.mean_all()?.to_scalar::<f64>()?,
            abs_max: flat.abs()?.max(0)?.to_scalar::<f64>()?,
        });
    }
    if let Some(path) = &opts.dump {
        // f32 whatever the precision it ran in, so that dumps compare directly.
        let f32_outputs = out
            .outputs
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.to_dtype(CandleDType::F32)?)))
            .collect::<Result<Vec<_>>>()?;
        ParamStore::from_tensors(f32_outputs)
            .save_safetensors(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let summary = InferSummary {
        model: opts.model.clone(),
        dtype: opts.precision.name(),
        image: opts.image.display().to_string(),
        original_hw: pre.original_hw,
        resized_hw: pre.resized_hw,
        weights,
        outputs,
        run_seconds,
        runs: times.len(),
        peak_rss_growth_bytes,
        measured_peak_activation_bytes: out.peak_live_bytes,
        planned_peak_activation_bytes: compiled.report.peak_activation_bytes,
        param_bytes: out.param_bytes,
        op_seconds: slowest_first(&out.op_seconds),
        scope_seconds: slowest_first(&out.scope_seconds),
    };
    Ok(InferResult {
        outputs: out.outputs,
        summary,
    })
}

/// The graph's parameters from `weights` (keys of modules the graph does not build are
/// skipped, and the user told so) or, without a file, a seeded random init (and the user told
/// so); also a label for reports.
pub fn load_params(
    weights: Option<&std::path::Path>,
    graph: &vitdet_ir::Graph,
    seed: u64,
    device: &Device,
) -> Result<(ParamStore, String)> {
    match weights {
        Some(path) => {
            let store = ParamStore::load_safetensors(path, graph, device)?;
            let skipped = store.skipped_keys();
            if !skipped.is_empty() {
                let mut modules: Vec<&str> = skipped.iter().filter_map(|k| k.split('.').next()).collect();
                modules.dedup();
                eprintln!(
                    "note: skipped {} keys of modules this model does not build ({})",
                    skipped.len(),
                    modules.join(", ")
                );
            }
            Ok((store, path.display().to_string()))
        }
        None => {
            eprintln!("note: no --weights given; using a seeded random init (seed {seed})");
            Ok((
                ParamStore::init_random(graph, seed, device)?,
                format!("random init (seed {seed})"),
            ))
        }
    }
}

impl InferSummary {
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "model    {} ({})  weights: {}", self.model, self.dtype, self.weights);
        let _ = writeln!(
            s,
            "image    {} ({}x{} -> {}x{})",
            self.image, self.original_hw.1, self.original_hw.0, self.resized_hw.1, self.resized_hw.0
        );
        for o in &self.outputs {
            let _ = writeln!(
                s,
                "{:<4} {:?}  mean {:+.5}  |max| {:.5}",
                o.name, o.shape, o.mean, o.abs_max
            );
        }
        let _ = writeln!(s, "ran in {:.3} s (median of {})", self.run_seconds, self.runs);
        if let Some(g) = self.peak_rss_growth_bytes {
            let _ = writeln!(s, "rss      peak growth {} during the runs", bytes(g as usize));
        }
        let ops: Vec<String> = self
            .op_seconds
            .iter()
            .take(8)
            .map(|(k, v)| format!("{k} {v:.2}s"))
            .collect();
        let _ = writeln!(s, "time by op: {}", ops.join(", "));
        let _ = writeln!(
            s,
            "memory   measured peak {} live activations (planned {}), {} parameters",
            bytes(self.measured_peak_activation_bytes),
            bytes(self.planned_peak_activation_bytes),
            bytes(self.param_bytes)
        );
        s
    }
}
