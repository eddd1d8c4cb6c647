//! Benchmarks.
//!
//! * `vitdet compile --bench` ([`benchmark`]): run a compiled graph once on random weights and a
//!   random input to measure its speed (frames per second) and peak live memory on a device.
//! * `vitdet bench` ([`cli`]): the per-op table of ViTDet-B's hot ops ([`ops`]) and the
//!   end-to-end inference or training step ([`step`]), timed with device synchronization
//!   ([`timer`]) on the CPU or a CUDA device.

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use vitdet_ir::{Graph, NodeIndex};
use vitdet_runtime::{Device, ParamStore, Program, Tensor};

use crate::compile::Compiled;

pub mod cli;
pub mod ops;
pub mod step;
pub mod timer;

#[derive(Clone, Debug, Serialize)]
pub struct Benchmark {
    pub device: String,
    pub threads: usize,
    /// Wall time of one forward pass (after one warm-up pass).
    pub seconds: f64,
    pub fps: f64,
    pub measured_peak_activation_bytes: usize,
    /// Heap high-water mark of the run above its start (the counting allocator, when the binary
    /// installs it), to compare with the planned arena at the run's rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_heap_peak_bytes: Option<usize>,
    /// The rows the run's dynamic values held (the mask head's detections), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamic_rows: Option<usize>,
    /// The arena planned at those rows (`Graph::with_rows`); the compiled arena without them.
    pub planned_arena_bytes_at_rows: usize,
}

/// Which implementation runs convolutions on CUDA (`--conv-engine`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvEngine {
    /// cuDNN where it loads, else the im2col kernel + cuBLAS.
    #[default]
    Auto,
    /// cuDNN (an error where it does not load).
    Cudnn,
    /// The runtime's im2col kernel + cuBLAS GEMM.
    Im2col,
}

/// Runs `f` with convolutions on `engine`, and says which implementation they ran on.
pub fn with_conv_engine<R>(engine: ConvEngine, device: &Device, f: impl FnOnce() -> Result<R>) -> Result<(R, String)> {
    if device.is_cpu() {
        if engine != ConvEngine::Auto {
            anyhow::bail!(
                "--conv-engine {} picks a CUDA implementation; this run is on the CPU",
                format!("{engine:?}").to_lowercase()
            );
        }
        return Ok((f()?, "cpu".to_string()));
    }
    #[cfg(feature = "cuda")]
    {
        use vitdet_runtime::cuda::cudnn;
        let (engine, name) = match (engine, cudnn::status()) {
            (ConvEngine::Im2col, _) => (cudnn::ConvEngine::Im2Col, "im2col + cuBLAS".to_string()),
            (_, Ok(version)) => (cudnn::ConvEngine::Cudnn, version),
            (ConvEngine::Cudnn, Err(why)) => anyhow::bail!("--conv-engine cudnn: {why}"),
            (ConvEngine::Auto, Err(why)) => (cudnn::ConvEngine::Im2Col, format!("im2col + cuBLAS ({why})")),
        };
        Ok((cudnn::with_engine(engine, f)?, name))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = engine;
        anyhow::bail!("this build has no CUDA runtime (build with --features cuda)")
    }
}

/// Threads the CPU kernels run on: `RAYON_NUM_THREADS`, else every core.
pub fn kernel_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The arena planned for `graph` in `order` at the rows a run's dynamic values held
/// (`Graph::with_rows`): what that run's measured peak compares with. `bound_arena`, the plan at
/// the bound, when the run had no dynamic rows.
pub fn arena_at_rows(graph: &Graph, order: &[NodeIndex], rows: Option<usize>, bound_arena: usize) -> Result<usize> {
    Ok(match rows {
        Some(r) => vitdet_passes::plan_memory(&graph.with_rows(r)?, order)?.arena_bytes,
        None => bound_arena,
    })
}

pub fn benchmark(compiled: &Compiled, device: &Device) -> Result<Benchmark> {
    let params = ParamStore::init_random(&compiled.graph, 0, device)?;
    let mut inputs = Vec::new();
    for (_, name, ty) in compiled.graph.inputs() {
        inputs.push((name, Tensor::randn(0f32, 1.0, ty.shape.as_slice(), device)?));
    }
    let inputs: Vec<(&str, Tensor)> = inputs.into_iter().collect();
    let program = Program::new(&compiled.graph, &compiled.order)?;
    program.run(&params, &inputs, device)?;
    let start = Instant::now();
    let out = program.run(&params, &inputs, device)?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(Benchmark {
        device: format!("{device:?}"),
        threads: kernel_threads(),
        seconds,
        fps: 1.0 / seconds,
        measured_peak_activation_bytes: out.peak_live_bytes,
        measured_heap_peak_bytes: out.measured_peak_bytes,
        dynamic_rows: out.dynamic_rows,
        planned_arena_bytes_at_rows: arena_at_rows(
            &compiled.graph,
            &compiled.order,
            out.dynamic_rows,
            compiled.report.arena_bytes,
        )?,
    })
}
