//! Step time predicted from the cost model: a per-node roofline over a device profile.
//!
//! Each computing node takes `max(flops / compute rate, bytes / memory rate) + launch`, where
//! * `flops` are the node's plain floating-point operations (`Cost::flops`);
//! * the compute rate is the device's matmul peak for contractions (matmul, linear, convolutions
//!   and their gradient ops, fused attention) in the node's output dtype, its vector peak for
//!   everything else, times [`DeviceProfile::compute_efficiency`];
//! * `bytes` are the node's inputs plus outputs (parameters included; a reshape moves nothing,
//!   it is a view), over the memory bandwidth times [`DeviceProfile::memory_efficiency`];
//! * `launch` is a fixed per-kernel overhead (eager frameworks pay ~10 us of dispatch per op).
//!
//! The sum over nodes is the step time of a device that runs one kernel at a time, which is what
//! a CUDA stream does. The efficiencies and launch cost are stated assumptions, not fits: the
//! datasheet peaks are never reached by real kernels and the study reports the prediction beside
//! measurements wherever it can measure.

use serde::Serialize;
use vitdet_ir::{DType, Graph, NodeIndex};

/// What a device can do, for [`predict_step_time`].
#[derive(Clone, Debug, Serialize)]
pub struct DeviceProfile {
    pub name: String,
    /// Matmul peak in f32 (FLOP/s, 2 per multiply-add).
    pub matmul_f32: f64,
    /// Matmul peak in f16/bf16 (tensor cores).
    pub matmul_low: f64,
    /// Whether the low-precision peak applies to bf16 (V100 has f16 tensor cores only).
    pub bf16: bool,
    /// Element-wise peak (FLOP/s).
    pub vector: f64,
    /// Memory bandwidth (bytes/s).
    pub bandwidth: f64,
    /// Device memory (bytes), for reporting out-of-memory configurations.
    pub memory_bytes: Option<u64>,
    pub compute_efficiency: f64,
    pub memory_efficiency: f64,
    /// Fixed cost per kernel (seconds).
    pub launch_seconds: f64,
}

const T: f64 = 1e12;
const G: f64 = 1e9;

impl DeviceProfile {
    /// The datasheet profiles: `v100-32gb` (the paper's GPU), `a100-80gb`, `h100-80gb`, each
    /// with 60% compute and 75% bandwidth efficiency and 10 us per kernel.
    pub fn named(name: &str) -> Result<DeviceProfile, String> {
        let gpu = |name: &str, f32: f64, low: f64, bf16: bool, bw: f64, mem_gib: u64| DeviceProfile {
            name: name.to_string(),
            matmul_f32: f32,
            matmul_low: low,
            bf16,
            vector: f32,
            bandwidth: bw,
            memory_bytes: Some(mem_gib << 30),
            compute_efficiency: 0.6,
            memory_efficiency: 0.75,
            launch_seconds: 10e-6,
        };
        match name {
            "v100-32gb" | "v100" => Ok(gpu("v100-32gb", 15.7 * T, 125.0 * T, false, 900.0 * G, 32)),
            "a100-80gb" | "a100" => Ok(gpu("a100-80gb", 19.5 * T, 312.0 * T, true, 2039.0 * G, 80)),
            "h100-80gb" | "h100" => Ok(gpu("h100-80gb", 67.0 * T, 989.0 * T, true, 3350.0 * G, 80)),
            other => Err(format!(
                "unknown device profile `{other}` (expected v100-32gb, a100-80gb, h100-80gb, or cpu with --measure)"
            )),
        }
    }
}

/// A predicted step time and its parts.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct TimeEstimate {
    pub seconds: f64,
    /// Time of nodes bound by compute.
    pub compute_seconds: f64,
    /// Time of nodes bound by memory traffic.
    pub memory_seconds: f64,
    /// Launch overhead.
    pub launch_seconds: f64,
    pub kernels: usize,
}

/// Ops timed at the matmul peak.
const CONTRACTIONS: &[&str] = &[
    "linear",
    "matmul",
    "conv2d",
    "conv2d_grad_weight",
    "conv_transpose2d",
    "window_attention",
    "window_attention_grad",
];

/// Ops that move no data (views).
const VIEWS: &[&str] = &["reshape"];

/// The predicted time of running `nodes` of `graph` once each on `device` (see the module doc).
/// Errors when the graph computes in bf16 and the device has no bf16 rate.
pub fn predict_step_time(graph: &Graph, nodes: &[NodeIndex], device: &DeviceProfile) -> Result<TimeEstimate, String> {
    let mut est = TimeEstimate::default();
    for &n in nodes {
        let node = graph.node(n);
        let name = node.op.name();
        if node.op.is_source() || VIEWS.contains(&name) {
            continue;
        }
        let dtype = node.outputs.first().map_or(DType::F32, |t| t.dtype);
        if dtype == DType::BF16 && !device.bf16 {
            return Err(format!("{} has no bf16 matmul rate; use f16 or f32", device.name));
        }
        let low = matches!(dtype, DType::BF16 | DType::F16);
        let rate = if CONTRACTIONS.contains(&name) {
            if low {
                device.matmul_low
            } else {
                device.matmul_f32
            }
        } else {
            device.vector
        };
        let flops = graph.node_cost(n).flops as f64;
        let bytes: usize = graph
            .inputs_of(n)
            .iter()
            .map(|&v| graph.value_type(v).size_in_bytes())
            .chain(node.outputs.iter().map(|t| t.size_in_bytes()))
            .sum();
        let compute = flops / (rate * device.compute_efficiency);
        let memory = bytes as f64 / (device.bandwidth * device.memory_efficiency);
        if compute >= memory {
            est.compute_seconds += compute;
        } else {
            est.memory_seconds += memory;
        }
        est.launch_seconds += device.launch_seconds;
        est.kernels += 1;
    }
    est.seconds = est.compute_seconds + est.memory_seconds + est.launch_seconds;
    Ok(est)
}
