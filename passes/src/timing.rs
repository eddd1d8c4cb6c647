//! Step time predicted from the cost model: a per-node roofline over a device profile.
//!
//! Each computing node takes `ideal / efficiency + launch`, where
//! * `ideal = max(flops / compute rate, bytes / memory rate)` at the datasheet peaks;
//! * `flops` are the node's plain floating-point operations (`Cost::flops`);
//! * the compute rate is the device's matmul peak for contractions (matmul, linear, convolutions
//!   and their gradient ops, fused attention) in the node's output dtype, its vector peak for
//!   everything else;
//! * `bytes` are the node's inputs plus outputs (parameters included); a node the runtime runs
//!   as a view of its input (a contiguous reshape, a slice, inference drop path, ... as the
//!   memory planner's storage rules say) moves nothing and launches nothing;
//! * `efficiency` is [`DeviceProfile::compute_efficiency`] or [`DeviceProfile::memory_efficiency`]
//!   (whichever side bounds `ideal`), or, in a calibrated profile ([`DeviceProfile::calibrated`]),
//!   what the runtime's own kernel for that op reached when timed alone on the device;
//! * `launch` is a fixed per-kernel overhead (eager frameworks pay ~10 us of dispatch per op).
//!
//! The sum over nodes is the step time of a device that runs one kernel at a time, which is what
//! a CUDA stream does. The datasheet profiles' efficiencies and launch cost are stated
//! assumptions, not fits: real kernels fall well short of the peaks, so those profiles give a
//! lower bound. A calibrated profile replaces the assumed efficiencies with measured ones: each
//! timed op call (a row of `vitdet bench --ops`) gives the efficiency of its op at its size, and a
//! node takes the efficiency of the same op and precision interpolated in `ln(ideal)` between
//! the rows that bracket it (the nearest row's beyond them). An op that was not timed takes the
//! rows of its kind: the GEMM-like ops' ([`GEMM_LIKE`]) for a contraction, the row-wise
//! memory-bound ops' ([`ROW_WISE`]) for anything else.
//!
//! Times carry over to another GPU of the same architecture ([`DeviceProfile::calibrated_on`]):
//! a call keeps the time it spent beyond its roofline where it was timed (latency, occupancy,
//! the kernel's own inefficiency), and its roofline is recomputed at this profile's peaks.
//! Between an H200 and an H100 (the same SMs, 0.7x the bandwidth) that slows a memory-bound call
//! by its traffic's extra time: by the bandwidths' ratio at full efficiency, by little where the
//! kernel was far from its roofline. A call that ran above its roofline (data served from cache
//! rather than memory) is charged the whole extra traffic time, which overstates its slowdown.

use std::collections::BTreeMap;

use serde::Serialize;
use vitdet_ir::{DType, Graph, NodeIndex};

/// What a device can do, for [`predict_step_time`].
#[derive(Clone, Debug, Serialize)]
pub struct DeviceProfile {
    pub name: String,
    /// The chip's architecture (`hopper`, `ampere`, `volta`; `cpu`): measured efficiencies carry
    /// over between profiles of one architecture only.
    pub architecture: String,
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
    /// Measured efficiencies, which take the place of the two assumed ones where they apply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
}

/// One op call timed alone on a device: the input of [`DeviceProfile::calibrated`].
#[derive(Clone, Debug)]
pub struct MeasuredOp {
    /// The IR op's name (`linear`, `window_attention_grad`, ...).
    pub op: String,
    /// The element type the op computed in.
    pub dtype: DType,
    pub flops: u64,
    /// Its inputs' and outputs' bytes.
    pub bytes: u64,
    /// Median time of a call.
    pub seconds: f64,
}

/// The efficiencies a device's kernels reached, from timed op calls.
#[derive(Clone, Debug, Serialize)]
pub struct Calibration {
    /// Where the times come from (file names).
    pub source: String,
    /// The profile of the GPU they were timed on (this profile's own name, or another of its
    /// architecture's).
    pub timed_on: String,
    /// Sorted by op, precision, then `ideal_seconds`.
    pub ops: Vec<CalibratedOp>,
    /// Timed calls left out, and why: those no longer than the launch cost, and those that,
    /// carried to a faster GPU, would take no time.
    pub skipped: Vec<String>,
}

/// One timed call as the model sees it.
#[derive(Clone, Debug, Serialize)]
pub struct CalibratedOp {
    pub op: String,
    /// f16/bf16 (the matmul rate is the tensor cores').
    pub low_precision: bool,
    /// The roofline time at this profile's datasheet peaks.
    pub ideal_seconds: f64,
    /// Where it was timed ([`Calibration::timed_on`]).
    pub measured_seconds: f64,
    /// `ideal / kernel`: this profile's roofline over the call's kernel time here, which is
    /// `measured - launch` where it was timed on this profile's GPU, and its carried time
    /// ([`DeviceProfile::calibrated_on`]) where on another. With it, the model gives the call
    /// that kernel time.
    pub efficiency: f64,
}

/// Ops whose timed rows stand for the contractions that were not timed (batched matmuls,
/// other convolution shapes): plain GEMMs and convolutions.
pub const GEMM_LIKE: &[&str] = &["linear", "matmul", "conv2d"];

/// Ops whose timed rows stand for the other ops that were not timed (element-wise, casts,
/// reductions, gathers): kernels that read and write each element about once.
pub const ROW_WISE: &[&str] = &["softmax", "layer_norm"];

const T: f64 = 1e12;
const G: f64 = 1e9;

impl DeviceProfile {
    /// The datasheet profiles: `v100-32gb` (the paper's GPU), `a100-80gb`, `h100-80gb`,
    /// `h200-141gb`, each with 60% compute and 75% bandwidth efficiency and 10 us per kernel.
    pub fn named(name: &str) -> Result<DeviceProfile, String> {
        let gpu = |name: &str, arch: &str, f32: f64, low: f64, bf16: bool, bw: f64, mem_gib: u64| DeviceProfile {
            name: name.to_string(),
            architecture: arch.to_string(),
            matmul_f32: f32,
            matmul_low: low,
            bf16,
            vector: f32,
            bandwidth: bw,
            memory_bytes: Some(mem_gib << 30),
            compute_efficiency: 0.6,
            memory_efficiency: 0.75,
            launch_seconds: 10e-6,
            calibration: None,
        };
        match name {
            "v100-32gb" | "v100" => Ok(gpu("v100-32gb", "volta", 15.7 * T, 125.0 * T, false, 900.0 * G, 32)),
            "a100-80gb" | "a100" => Ok(gpu("a100-80gb", "ampere", 19.5 * T, 312.0 * T, true, 2039.0 * G, 80)),
            "h100-80gb" | "h100" => Ok(gpu("h100-80gb", "hopper", 67.0 * T, 989.0 * T, true, 3350.0 * G, 80)),
            "h200-141gb" | "h200" => Ok(gpu("h200-141gb", "hopper", 67.0 * T, 989.0 * T, true, 4800.0 * G, 140)),
            other => Err(format!(
                "unknown device profile `{other}` (expected v100-32gb, a100-80gb, h100-80gb, h200-141gb, or cpu with --measure)"
            )),
        }
    }

    /// This profile with the efficiencies of `measured` calls timed on its own device (see the
    /// module doc): [`DeviceProfile::calibrated_on`] itself.
    pub fn calibrated(self, source: &str, measured: &[MeasuredOp]) -> Result<DeviceProfile, String> {
        let own = self.clone();
        self.calibrated_on(&own, source, measured)
    }

    /// This profile with the efficiencies of `measured` calls timed on the device of `timed_on`
    /// (this profile, or another GPU of its architecture). A call's kernel time here is its
    /// measured time less `timed_on`'s launch cost, plus the change of its roofline
    /// (`max(flops / rate, bytes / bandwidth)`) from `timed_on`'s peaks to this profile's: the
    /// time it spent beyond the roofline stays. Its efficiency is this profile's roofline over
    /// that time, so this profile predicts the call at it. A call that took no longer than the
    /// launch cost fits no efficiency and is left out (named in [`Calibration::skipped`]).
    /// Errors on profiles of two architectures, a dtype either profile has no rate for, a time
    /// that is not positive and finite, or no call left to calibrate with.
    pub fn calibrated_on(
        mut self,
        timed_on: &DeviceProfile,
        source: &str,
        measured: &[MeasuredOp],
    ) -> Result<DeviceProfile, String> {
        if timed_on.architecture != self.architecture {
            return Err(format!(
                "{source}: times from {} ({}) cannot calibrate {} ({}): kernels on another \
                 architecture reach other fractions of its peaks",
                timed_on.name, timed_on.architecture, self.name, self.architecture
            ));
        }
        let mut ops = Vec::with_capacity(measured.len());
        let mut skipped = Vec::new();
        for m in measured {
            let low = timed_on
                .check_dtype(m.dtype)
                .and_then(|low| self.check_dtype(m.dtype).map(|_| low))
                .map_err(|e| format!("{source}: its {} rows cannot calibrate this profile: {e}", m.op))?;
            if !(m.seconds.is_finite() && m.seconds > 0.0) {
                return Err(format!("{source}: {} ({:?}) has time {} s", m.op, m.dtype, m.seconds));
            }
            let (flops, bytes) = (m.flops as f64, m.bytes as f64);
            let (ideal_there, ideal) = (
                timed_on.ideal_seconds(&m.op, low, flops, bytes),
                self.ideal_seconds(&m.op, low, flops, bytes),
            );
            // What the call took beyond its roofline there (latency, occupancy, its own
            // inefficiency) stays; only the roofline changes with the peaks.
            let kernel = m.seconds - timed_on.launch_seconds + (ideal - ideal_there);
            // The model adds the launch cost to every kernel, so a call that took no longer
            // cannot be reproduced; its op keeps its kind's or the assumed efficiency. So does
            // one that, carried to a faster GPU, would take no time: it ran above its datasheet
            // roofline where it was timed (data served from cache).
            let why = if m.seconds <= timed_on.launch_seconds {
                Some(format!(
                    "within the {:.1} us launch cost",
                    timed_on.launch_seconds * 1e6
                ))
            } else if kernel <= 0.0 || ideal <= 0.0 {
                Some(format!(
                    "above its roofline on {}, no time left on {}",
                    timed_on.name, self.name
                ))
            } else {
                None
            };
            if let Some(why) = why {
                skipped.push(format!("{} ({:?}): {:.1} us, {why}", m.op, m.dtype, m.seconds * 1e6));
                continue;
            }
            ops.push(CalibratedOp {
                op: m.op.clone(),
                low_precision: low,
                ideal_seconds: ideal,
                measured_seconds: m.seconds,
                efficiency: ideal / kernel,
            });
        }
        if ops.is_empty() {
            let why = if skipped.is_empty() {
                String::new()
            } else {
                format!(" (skipped: {})", skipped.join("; "))
            };
            return Err(format!("{source}: no timed op to calibrate {} with{why}", self.name));
        }
        ops.sort_by(|a, b| {
            (&a.op, a.low_precision)
                .cmp(&(&b.op, b.low_precision))
                .then(a.ideal_seconds.total_cmp(&b.ideal_seconds))
        });
        self.name = if timed_on.name == self.name {
            format!("{}, calibrated", self.name)
        } else {
            format!("{}, calibrated on {}", self.name, timed_on.name)
        };
        self.calibration = Some(Calibration {
            source: source.to_string(),
            timed_on: timed_on.name.clone(),
            ops,
            skipped,
        });
        Ok(self)
    }

    /// Whether `dtype` computes at the low-precision matmul rate; errors where the device has
    /// no rate for it.
    fn check_dtype(&self, dtype: DType) -> Result<bool, String> {
        if dtype == DType::BF16 && !self.bf16 {
            return Err(format!("{} has no bf16 matmul rate; use f16 or f32", self.name));
        }
        Ok(matches!(dtype, DType::BF16 | DType::F16))
    }

    /// The compute and memory times at the datasheet peaks.
    fn ideal_parts(&self, op: &str, low: bool, flops: f64, bytes: f64) -> (f64, f64) {
        let rate = match (CONTRACTIONS.contains(&op), low) {
            (true, true) => self.matmul_low,
            (true, false) => self.matmul_f32,
            (false, _) => self.vector,
        };
        (flops / rate, bytes / self.bandwidth)
    }

    /// `max(flops / rate, bytes / bandwidth)` at the datasheet peaks.
    fn ideal_seconds(&self, op: &str, low: bool, flops: f64, bytes: f64) -> f64 {
        let (compute, memory) = self.ideal_parts(op, low, flops, bytes);
        compute.max(memory)
    }

    /// A node's kernel time (launch excluded), whether compute bounds it, and whether it took
    /// the assumed efficiencies: `ideal` over the measured efficiency where the profile is
    /// calibrated for the op or its kind, else each side at its assumed efficiency.
    fn kernel_seconds(&self, op: &str, low: bool, flops: f64, bytes: f64) -> (f64, bool, bool) {
        let (compute, memory) = self.ideal_parts(op, low, flops, bytes);
        let ideal = compute.max(memory);
        match self.measured_efficiency(op, low, ideal) {
            Some(e) => (ideal / e, compute >= memory, false),
            None => {
                let (c, m) = (compute / self.compute_efficiency, memory / self.memory_efficiency);
                (c.max(m), c >= m, true)
            }
        }
    }

    /// The efficiency the calibration gives a node of `op` at `ideal` seconds: the same op's
    /// rows, else its kind's; `None` where it has neither.
    fn measured_efficiency(&self, op: &str, low: bool, ideal: f64) -> Option<f64> {
        let cal = self.calibration.as_ref()?;
        let rows = |accept: &dyn Fn(&str) -> bool| -> Vec<&CalibratedOp> {
            cal.ops
                .iter()
                .filter(|r| r.low_precision == low && accept(&r.op))
                .collect()
        };
        let mut near = rows(&|o| o == op);
        if near.is_empty() {
            let kind = if CONTRACTIONS.contains(&op) {
                GEMM_LIKE
            } else {
                ROW_WISE
            };
            near = rows(&|o| kind.contains(&o));
            near.sort_by(|a, b| a.ideal_seconds.total_cmp(&b.ideal_seconds));
        }
        interpolate_log(&near, ideal)
    }
}

/// The efficiency at `ideal` between the rows (sorted by `ideal_seconds`) that bracket it,
/// linear in `ln(ideal)`; the nearest row's outside them; `None` without rows.
fn interpolate_log(rows: &[&CalibratedOp], ideal: f64) -> Option<f64> {
    let (first, last) = (rows.first()?, rows.last()?);
    if ideal <= first.ideal_seconds {
        return Some(first.efficiency);
    }
    if ideal >= last.ideal_seconds {
        return Some(last.efficiency);
    }
    let i = rows.partition_point(|r| r.ideal_seconds <= ideal);
    let (a, b) = (rows[i - 1], rows[i]);
    let t = (ideal / a.ideal_seconds).ln() / (b.ideal_seconds / a.ideal_seconds).ln();
    Some(a.efficiency + t * (b.efficiency - a.efficiency))
}

/// A predicted step time and its parts.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TimeEstimate {
    pub seconds: f64,
    /// Time of nodes bound by compute.
    pub compute_seconds: f64,
    /// Time of nodes bound by memory traffic.
    pub memory_seconds: f64,
    /// Launch overhead.
    pub launch_seconds: f64,
    pub kernels: usize,
    /// Kernel time of the nodes at the assumed efficiencies (all of it without a calibration;
    /// with one, the ops whose precision and kind it has no timed call of).
    pub assumed_seconds: f64,
    /// The same time by op name: where it goes.
    pub by_op: BTreeMap<String, OpTime>,
}

/// The predicted time of one op name's nodes.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct OpTime {
    pub kernels: usize,
    pub seconds: f64,
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

/// The predicted time of running `nodes` of `graph` once each on `device` (see the module doc).
/// Errors when the graph computes in bf16 and the device has no bf16 rate.
pub fn predict_step_time(graph: &Graph, nodes: &[NodeIndex], device: &DeviceProfile) -> Result<TimeEstimate, String> {
    let mut est = TimeEstimate::default();
    let views = crate::memory::view_nodes(graph, nodes);
    for &n in nodes {
        let node = graph.node(n);
        let name = node.op.name();
        if node.op.is_source() || views.contains(&n) {
            continue;
        }
        let low = device.check_dtype(node.outputs.first().map_or(DType::F32, |t| t.dtype))?;
        let flops = graph.node_cost(n).flops as f64;
        let bytes: usize = graph
            .inputs_of(n)
            .iter()
            .map(|&v| graph.value_type(v).size_in_bytes())
            .chain(node.outputs.iter().map(|t| t.size_in_bytes()))
            .sum();
        let (seconds, compute_bound, assumed) = device.kernel_seconds(name, low, flops, bytes as f64);
        if assumed {
            est.assumed_seconds += seconds;
        }
        if compute_bound {
            est.compute_seconds += seconds;
        } else {
            est.memory_seconds += seconds;
        }
        est.launch_seconds += device.launch_seconds;
        est.kernels += 1;
        let op = est.by_op.entry(name.to_string()).or_default();
        op.kernels += 1;
        op.seconds += seconds + device.launch_seconds;
    }
    est.seconds = est.compute_seconds + est.memory_seconds + est.launch_seconds;
    Ok(est)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timed(op: &str, dtype: DType, flops: u64, bytes: u64, seconds: f64) -> MeasuredOp {
        MeasuredOp {
            op: op.to_string(),
            dtype,
            flops,
            bytes,
            seconds,
        }
    }

    fn h200(measured: &[MeasuredOp]) -> DeviceProfile {
        DeviceProfile::named("h200-141gb")
            .unwrap()
            .calibrated("test", measured)
            .unwrap()
    }

    /// A node's whole time, launch included.
    fn seconds(p: &DeviceProfile, op: &str, low: bool, flops: u64, bytes: u64) -> f64 {
        p.kernel_seconds(op, low, flops as f64, bytes as f64).0 + p.launch_seconds
    }

    /// Whether a node took the assumed efficiencies.
    fn assumed(p: &DeviceProfile, op: &str, low: bool, flops: u64, bytes: u64) -> bool {
        p.kernel_seconds(op, low, flops as f64, bytes as f64).2
    }

    fn close(a: f64, b: f64) -> bool {
        (a / b - 1.0).abs() < 1e-12
    }

    #[test]
    fn a_timed_call_is_predicted_at_its_measured_time() {
        let (flops, bytes) = (14_504_951_808, 28_709_376); // ViT-B's qkv projection
        let p = h200(&[timed("linear", DType::BF16, flops, bytes, 38e-6)]);
        assert!(close(seconds(&p, "linear", true, flops, bytes), 38e-6));
        // Twice the work at the same efficiency: twice the kernel time.
        let twice = seconds(&p, "linear", true, 2 * flops, 2 * bytes);
        assert!(close(twice - p.launch_seconds, 2.0 * (38e-6 - p.launch_seconds)));
    }

    #[test]
    fn efficiencies_interpolate_in_log_ideal_time_and_hold_beyond_the_rows() {
        let gflop = 1_000_000_000;
        let p = h200(&[
            timed("conv2d", DType::BF16, gflop, 1, 1e-3),
            timed("conv2d", DType::BF16, 100 * gflop, 1, 2e-3),
        ]);
        let eff = |flops: u64| {
            let ideal = flops as f64 / p.matmul_low;
            ideal / p.kernel_seconds("conv2d", true, flops as f64, 1.0).0
        };
        let rows = &p.calibration.as_ref().unwrap().ops;
        let (e0, e1) = (rows[0].efficiency, rows[1].efficiency);
        assert!(e1 > e0);
        // 10 GFLOP sits halfway between 1 and 100 in ln.
        assert!(close(eff(10 * gflop), (e0 + e1) / 2.0));
        assert!(close(eff(gflop / 10), e0));
        assert!(close(eff(1000 * gflop), e1));
    }

    #[test]
    fn untimed_ops_take_their_kinds_rows_and_precisions_stay_apart() {
        let (flops, bytes) = (14_504_951_808, 28_709_376);
        let p = h200(&[
            timed("linear", DType::BF16, flops, bytes, 38e-6),
            timed("layer_norm", DType::BF16, 31_000_000, 12_600_000, 31e-6),
        ]);
        // A batched matmul of the same size takes the linear row's efficiency.
        assert!(close(seconds(&p, "matmul", true, flops, bytes), 38e-6));
        // An element-wise op takes the row-wise rows'.
        let cast = seconds(&p, "cast", true, 0, 12_600_000);
        assert!(close(cast, 31e-6), "{cast}");
        // No f32 rows: f32 nodes keep the assumed efficiencies.
        let assumed = DeviceProfile::named("h200-141gb").unwrap();
        for op in ["matmul", "cast", "linear"] {
            assert!(close(
                seconds(&p, op, false, flops, bytes),
                seconds(&assumed, op, false, flops, bytes)
            ));
        }
        // Nor does an op whose kind has no rows: a transposed convolution with only row-wise
        // rows timed.
        let rowwise = h200(&[timed("layer_norm", DType::BF16, 31_000_000, 12_600_000, 31e-6)]);
        assert!(close(
            seconds(&rowwise, "conv_transpose2d", true, flops, bytes),
            seconds(&assumed, "conv_transpose2d", true, flops, bytes)
        ));
    }

    #[test]
    fn calls_within_the_launch_cost_are_skipped_and_named() {
        let p = DeviceProfile::named("h200-141gb").unwrap();
        let fast = timed("permute", DType::BF16, 0, 30_000_000, p.launch_seconds / 2.0);
        let slow = timed("linear", DType::BF16, 14_504_951_808, 28_709_376, 38e-6);
        let cal = p.clone().calibrated("f.json", &[fast.clone(), slow]).unwrap();
        let c = cal.calibration.as_ref().unwrap();
        assert_eq!(c.ops.len(), 1);
        assert!(
            c.skipped.len() == 1 && c.skipped[0].contains("permute"),
            "{:?}",
            c.skipped
        );
        // The skipped op keeps its kind's (row-wise: none here) or the assumed efficiency.
        assert!(assumed(&cal, "permute", true, 0, 30_000_000));
        assert!(!assumed(&cal, "matmul", true, 1 << 30, 1 << 20));
        // Nothing left to calibrate with: an error naming the file and what was skipped.
        let err = p.clone().calibrated("f.json", &[fast]).unwrap_err();
        assert!(err.contains("f.json") && err.contains("permute"), "{err}");
    }

    #[test]
    fn times_from_an_h200_carry_to_an_h100_with_the_rooflines_change() {
        let h100 = DeviceProfile::named("h100-80gb").unwrap();
        let h200 = DeviceProfile::named("h200-141gb").unwrap();
        let (norm_bytes, copy_bytes) = (12_600_000u64, 400_000_000u64);
        // A copy at the H200's full bandwidth, a norm far below it, a compute-bound GEMM.
        let copy_s = h200.launch_seconds + copy_bytes as f64 / h200.bandwidth;
        let calls = [
            timed("linear", DType::BF16, 14_504_951_808, 28_709_376, 38e-6),
            timed("layer_norm", DType::BF16, 31_000_000, norm_bytes, 31e-6),
            timed("permute", DType::BF16, 0, copy_bytes, copy_s),
        ];
        let there = h200.clone().calibrated("f.json", &calls).unwrap();
        let here = h100.clone().calibrated_on(&h200, "f.json", &calls).unwrap();
        assert_eq!(here.name, "h100-80gb, calibrated on h200-141gb");
        assert_eq!(here.calibration.as_ref().unwrap().timed_on, "h200-141gb");
        let kernel = |p: &DeviceProfile, m: &MeasuredOp| seconds(p, &m.op, true, m.flops, m.bytes) - p.launch_seconds;
        let extra = |bytes: u64| bytes as f64 * (1.0 / h100.bandwidth - 1.0 / h200.bandwidth);
        // The GEMM's roofline is its compute, the same on both: its time stays.
        assert!(close(kernel(&here, &calls[0]), kernel(&there, &calls[0])));
        // The norm gains its traffic's extra time only: far less than the bandwidths' ratio.
        let norm = kernel(&here, &calls[1]);
        assert!(close(norm, kernel(&there, &calls[1]) + extra(norm_bytes)));
        assert!(norm < 1.1 * kernel(&there, &calls[1]));
        // The copy ran at the roofline: it slows by the whole ratio.
        assert!(close(
            kernel(&here, &calls[2]),
            kernel(&there, &calls[2]) * h200.bandwidth / h100.bandwidth
        ));
        // Calibrating on itself is the plain calibration.
        let own = h200.clone().calibrated_on(&h200, "f.json", &calls).unwrap();
        assert_eq!(own.name, there.name);
        assert!(close(kernel(&own, &calls[1]), kernel(&there, &calls[1])));
        // Another architecture's times are refused, naming both.
        let err = DeviceProfile::named("a100-80gb")
            .unwrap()
            .calibrated_on(&h200, "f.json", &calls)
            .unwrap_err();
        assert!(
            err.contains("a100-80gb") && err.contains("hopper") && err.contains("ampere"),
            "{err}"
        );
    }

    #[test]
    fn calibration_rejects_what_no_efficiency_fits() {
        let p = DeviceProfile::named("h200-141gb").unwrap();
        assert!(p.clone().calibrated("f.json", &[]).unwrap_err().contains("no timed op"));
        let err = p
            .clone()
            .calibrated("f.json", &[timed("linear", DType::BF16, 1000, 1000, f64::NAN)])
            .unwrap_err();
        assert!(err.contains("f.json") && err.contains("NaN"), "{err}");
        let v100 = DeviceProfile::named("v100-32gb").unwrap();
        let err = v100
            .calibrated("f.json", &[timed("linear", DType::BF16, 1000, 1000, 1e-3)])
            .unwrap_err();
        assert!(err.contains("f.json") && err.contains("bf16"), "{err}");
    }
}
