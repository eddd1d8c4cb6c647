//! Measuring a compiled training step on a device (the CPU, or a GPU with the `cuda` build),
//! and the CPU's own device profile.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use vitdet_passes::timing::{predict_step_time, DeviceProfile};
use vitdet_passes::Precision;
use vitdet_runtime::{CandleDType, Device, ParamStore, Program, Tensor};

use crate::bench::arena_at_rows;
use crate::compile::TrainStep;

/// What running a configuration measured.
#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    /// Median wall time of a step (`batch` per-image passes).
    pub step_seconds: f64,
    /// The prediction for the same step on the measured device's profile (the calibrated CPU
    /// profile, or the study's `--profile` on a GPU).
    pub predicted_seconds: f64,
    /// On the CPU, the heap high-water mark of a pass above its start (the counting allocator;
    /// `None` when the allocator is not installed in this binary); on a GPU, the device memory
    /// pool's high-water mark above its start.
    pub measured_arena_bytes: Option<u64>,
    /// The compiled step's arena, dynamic rows at their bound.
    pub planned_arena_bytes: u64,
    /// The rows the step's dynamic values held (the mask head's foreground RoIs), if it has any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamic_rows: Option<usize>,
    /// The arena planned for the step at those rows (`Graph::with_rows`, same order), which
    /// the measurement compares with; `planned_arena_bytes` without dynamic rows.
    pub planned_arena_bytes_at_rows: u64,
    /// `measured / planned at rows - 1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arena_error: Option<f64>,
    /// The ops with the most kernel time per step, seconds.
    pub top_ops: Vec<(String, f64)>,
}

/// Runs `step` on `device` once to warm up and `steps` more times on synthetic inputs (random
/// image, two ground-truth boxes with their masks); `profile` predicts the same step there.
pub fn measure(step: &TrainStep, profile: &DeviceProfile, steps: usize, device: &Device) -> Result<Measured> {
    if device.is_cpu() && step.precision != Precision::F32 {
        bail!(
            "--measure: the CPU runtime runs f32 graphs; this configuration is {} (measure with --dtype f32)",
            step.precision.name()
        );
    }
    let params = ParamStore::init_random(&step.graph, 0, device)?;
    let inputs = crate::bench::step::step_inputs(&step.graph, step.config.image_size)?;
    let named: Vec<(&str, Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let mut times = Vec::new();
    let mut peak = None;
    let mut rows = None;
    let mut op_seconds: std::collections::BTreeMap<String, f64> = Default::default();
    let program = Program::new(&step.graph, &step.order)?;
    for i in 0..=steps.max(1) {
        let start = Instant::now();
        for _ in 0..step.batch {
            let out = program
                .run(&params, &named, device)
                .context("running the training step")?;
            if i > 0 {
                for (op, t) in &out.op_seconds {
                    *op_seconds.entry(op.clone()).or_default() += t / steps.max(1) as f64;
                }
            }
            rows = rows.max(out.dynamic_rows);
            // Not the warm-up's: the first products on each thread allocate the gemm crate's
            // cache-sized slabs, which live as long as the process (as the rayon pool).
            if i > 0 {
                if let Some(p) = out.device_peak_bytes.or(out.measured_peak_bytes) {
                    peak = Some(peak.unwrap_or(0).max(p as u64));
                }
            }
        }
        // Kernels on a GPU run asynchronously: the step ends when the device is idle.
        device.synchronize()?;
        if i > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let mut top_ops: Vec<(String, f64)> = op_seconds.into_iter().collect();
    top_ops.sort_by(|a, b| b.1.total_cmp(&a.1));
    top_ops.truncate(6);
    let planned = step.plan.arena_bytes as u64;
    let planned_at_rows = arena_at_rows(&step.graph, &step.order, rows, step.plan.arena_bytes)? as u64;
    let predicted = predict_step_time(&step.graph, &step.order, profile).map_err(anyhow::Error::msg)?;
    Ok(Measured {
        step_seconds: times[times.len() / 2],
        predicted_seconds: predicted.seconds * step.batch as f64,
        measured_arena_bytes: peak,
        planned_arena_bytes: planned,
        dynamic_rows: rows,
        planned_arena_bytes_at_rows: planned_at_rows,
        arena_error: peak.map(|p| p as f64 / planned_at_rows as f64 - 1.0),
        top_ops,
    })
}

/// The CPU's profile, measured: f32 matmul rate (1024^3), copy bandwidth (64 MiB) and per-op
/// overhead (a tiny op), on the threads this process uses.
pub fn calibrate_cpu() -> Result<DeviceProfile> {
    let dev = Device::Cpu;
    let best = |f: &dyn Fn() -> Result<()>, reps: usize| -> Result<f64> {
        f()?;
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = Instant::now();
            f()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let n = 1024;
    let a = Tensor::randn(0f32, 1f32, (n, n), &dev)?;
    let matmul = best(&|| a.matmul(&a).map(drop).map_err(Into::into), 3)?;
    let big = Tensor::zeros(16 << 20, CandleDType::F32, &dev)?;
    // y = x * 1 + 1: reads and writes 64 MiB each.
    let copy = best(&|| big.affine(1.0, 1.0).map(drop).map_err(Into::into), 3)?;
    let small = Tensor::zeros(16, CandleDType::F32, &dev)?;
    let launch = best(&|| small.affine(1.0, 1.0).map(drop).map_err(Into::into), 50)?;
    let matmul_rate = 2.0 * (n * n * n) as f64 / matmul;
    Ok(DeviceProfile {
        name: format!("cpu ({} threads, measured)", crate::bench::kernel_threads()),
        architecture: "cpu".to_string(),
        matmul_f32: matmul_rate,
        matmul_low: matmul_rate,
        bf16: false,
        // Element-wise work on a CPU is bound by memory traffic long before arithmetic.
        vector: matmul_rate / 4.0,
        bandwidth: 2.0 * (64u64 << 20) as f64 / copy,
        memory_bytes: None,
        compute_efficiency: 1.0,
        memory_efficiency: 1.0,
        launch_seconds: launch,
        calibration: None,
    })
}
