//! The `vitdet compile` report, as JSON and as text.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;
use vitdet_ir::{Graph, NodeIndex};
use vitdet_models::ModelConfig;
use vitdet_passes::timing::{predict_step_time, DeviceProfile, TimeEstimate};
use vitdet_passes::{params_by_scope, CostSummary, Liveness};

#[derive(Clone, Debug, Serialize)]
pub struct CompileReport {
    pub model: String,
    pub mode: &'static str,
    pub image_size: usize,
    pub nodes: usize,
    /// Trainable parameters per name prefix of depth 1 and 2.
    pub params_by_scope: BTreeMap<String, u64>,
    /// params, flops (fvcore multiply-adds), flops_plain, activations, flops_by_scope, ops.
    #[serde(flatten)]
    pub cost: CostSummary,
    /// Parameters and buffers, resident throughout.
    pub param_bytes: usize,
    /// Peak of live activation bytes over the execution order.
    pub peak_activation_bytes: usize,
    /// `param_bytes + peak_activation_bytes`.
    pub peak_memory_bytes: usize,
    /// Size of the one arena holding every activation, as the memory planner packs it (at
    /// least `peak_activation_bytes`, the max-live lower bound).
    pub arena_bytes: usize,
    /// The planner's lower bound for the arena: the most bytes its buffers and kernel
    /// workspace hold at one step of the order (the arena exceeds it only by placement gaps).
    pub lower_bound_bytes: usize,
    pub compile_seconds: f64,
    /// Training-step decisions and memory (`--mode train`); `peak_memory_bytes` is then the
    /// whole step: parameters + optimizer state + gradient accumulator + `arena_bytes`.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub train: Option<TrainReport>,
    /// How an inference graph was lowered (fused attention, autocast); `None` for the graph as
    /// built (`--dtype f32 --no-fuse`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub lowering: Option<InferenceLowering>,
    /// Predicted with `--profile`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_time: Option<PredictedTime>,
    /// Measured with `--bench`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub benchmark: Option<crate::bench::Benchmark>,
}

/// The graph's time on a device profile (`vitdet_passes::timing`).
#[derive(Clone, Debug, Serialize)]
pub struct PredictedTime {
    pub profile: String,
    /// Whether the profile's efficiencies were measured (`--calibration`) rather than assumed.
    pub calibrated: bool,
    /// One pass (inference), or one optimizer step of `batch` passes (training).
    pub seconds: f64,
    /// One pass, by part and by op.
    pub pass: TimeEstimate,
}

impl PredictedTime {
    /// The prediction for running `order` of `graph` `passes` times on `profile`.
    pub fn new(graph: &Graph, order: &[NodeIndex], passes: usize, profile: &DeviceProfile) -> Result<Self, String> {
        let pass = predict_step_time(graph, order, profile)?;
        Ok(PredictedTime {
            profile: profile.name.clone(),
            calibrated: profile.calibration.is_some(),
            seconds: pass.seconds * passes as f64,
            pass,
        })
    }
}

/// How an inference graph was lowered: autocast precision and fused attention regions.
#[derive(Clone, Debug, Serialize)]
pub struct InferenceLowering {
    pub dtype: &'static str,
    pub fused_attention: usize,
}

impl CompileReport {
    pub fn new(
        model: &str,
        mode: &'static str,
        config: &ModelConfig,
        graph: &Graph,
        live: &Liveness,
        plan: &vitdet_passes::MemoryPlan,
        seconds: f64,
    ) -> Self {
        CompileReport {
            model: model.to_string(),
            mode,
            image_size: config.image_size,
            nodes: graph.graph.node_count(),
            params_by_scope: params_by_scope(graph),
            cost: CostSummary::of(graph),
            param_bytes: live.param_bytes,
            peak_activation_bytes: live.peak_bytes,
            peak_memory_bytes: live.param_bytes + live.peak_bytes,
            arena_bytes: plan.arena_bytes,
            lower_bound_bytes: plan.lower_bound_bytes,
            compile_seconds: seconds,
            train: None,
            lowering: None,
            predicted_time: None,
            benchmark: None,
        }
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "model        {} ({} mode, {}x{} input)",
            self.model, self.mode, self.image_size, self.image_size
        );
        let _ = writeln!(s, "nodes        {}", self.nodes);
        if let Some(l) = &self.lowering {
            let autocast = if l.dtype == "f32" { "" } else { " (autocast)" };
            let _ = writeln!(
                s,
                "precision    {}{autocast}, {} attention regions fused",
                l.dtype, l.fused_attention
            );
        }
        let _ = writeln!(
            s,
            "params       {} ({})",
            self.cost.params,
            human(self.cost.params as f64, "")
        );
        let _ = writeln!(
            s,
            "flops        {} multiply-adds (fvcore) / {} plain",
            human(self.cost.flops as f64, ""),
            human(self.cost.flops_plain as f64, "")
        );
        let _ = writeln!(s, "activations  {}", human(self.cost.activations as f64, ""));
        match &self.train {
            None => {
                let _ = writeln!(
                    s,
                    "memory       {} peak = {} parameters + {} live activations",
                    bytes(self.peak_memory_bytes),
                    bytes(self.param_bytes),
                    bytes(self.peak_activation_bytes)
                );
                let _ = writeln!(
                    s,
                    "arena        {} planned for all activations (lower bound {})",
                    bytes(self.arena_bytes),
                    bytes(self.lower_bound_bytes)
                );
            }
            Some(t) => t.write_text(&mut s, self),
        }
        let _ = writeln!(s, "\n{:<28} {:>14} {:>14}", "scope", "params", "flops (fvcore)");
        let scopes: std::collections::BTreeSet<&String> = self
            .params_by_scope
            .keys()
            .chain(self.cost.flops_by_scope.keys())
            .collect();
        for scope in scopes {
            let p = self.params_by_scope.get(scope).copied().unwrap_or(0);
            let f = self.cost.flops_by_scope.get(scope).copied().unwrap_or(0);
            let _ = writeln!(s, "{:<28} {:>14} {:>14}", scope, p, human(f as f64, ""));
        }
        let _ = writeln!(
            s,
            "\nops: {}",
            self.cost
                .ops
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(s, "compiled in {:.2} s", self.compile_seconds);
        if let Some(p) = &self.predicted_time {
            let by_op: BTreeMap<String, f64> = p.pass.by_op.iter().map(|(k, v)| (k.clone(), v.seconds)).collect();
            let slowest: Vec<String> = slowest_first(&by_op)
                .iter()
                .take(4)
                .map(|(op, t)| format!("{op} {:.1} ms", t * 1e3))
                .collect();
            // Under a calibration, the part it had no timed call for.
            let assumed = if p.calibrated {
                format!("; {:.1} ms at assumed efficiencies", p.pass.assumed_seconds * 1e3)
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "\npredicted    {:.1} ms on {} ({} kernels{assumed}; most time: {})",
                p.seconds * 1e3,
                p.profile,
                p.pass.kernels,
                slowest.join(", ")
            );
        }
        if let Some(b) = &self.benchmark {
            let _ = writeln!(s, "\nbenchmark (random weights and input, one pass after a warm-up)");
            let _ = writeln!(s, "  device   {} ({} threads)", b.device, b.threads);
            let _ = writeln!(s, "  time     {:.3} s = {:.3} fps", b.seconds, b.fps);
            let _ = writeln!(
                s,
                "  memory   {} live activations measured",
                bytes(b.measured_peak_activation_bytes)
            );
            if let Some(heap) = b.measured_heap_peak_bytes {
                let rows = b
                    .dynamic_rows
                    .map_or(String::new(), |r| format!(" at the run's {r} dynamic rows"));
                let _ = writeln!(
                    s,
                    "  heap     {} high-water mark ({:+.1}% of the planned arena{rows})",
                    bytes(heap),
                    100.0 * (heap as f64 / b.planned_arena_bytes_at_rows.max(1) as f64 - 1.0)
                );
            }
        }
        s
    }
}

/// What `--mode train` decided, and the step's memory.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    pub dtype: &'static str,
    pub batch: usize,
    pub memory_breakdown: crate::compile::StepMemory,
    /// `none`, `blocks`, `global` or `auto`.
    pub checkpoint: crate::compile::CheckpointChoice,
    /// Scopes whose activations are recomputed in the backward.
    pub checkpointed: Vec<String>,
    /// Plain FLOPs of the recomputation (per image).
    pub recompute_flops: u64,
    /// Plain FLOPs of the whole step, recomputation included (`batch` images).
    pub step_flops: u64,
    /// Attention regions replaced by the fused `window_attention` op.
    pub fused_attention: usize,
    /// Training activation memory the fusion saved, over all fused blocks.
    pub fusion_saved_bytes: u64,
    /// Per fused block (scope, window, windows, saved bytes) and the attention left unfused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fusion: Option<vitdet_passes::FusionReport>,
}

impl TrainReport {
    pub fn new(step: &crate::compile::TrainStep) -> Self {
        TrainReport {
            dtype: step.precision.name(),
            batch: step.batch,
            memory_breakdown: step.memory.clone(),
            checkpoint: step.checkpoint,
            checkpointed: step.checkpointed.clone(),
            recompute_flops: step.recompute_flops,
            step_flops: step.graph.cost().flops * step.batch as u64,
            fused_attention: step.fused_attention,
            fusion_saved_bytes: step.fusion_saved_bytes,
            fusion: step.fusion.clone(),
        }
    }

    fn write_text(&self, s: &mut String, r: &CompileReport) {
        let m = &self.memory_breakdown;
        let b = &m.breakdown;
        let _ = writeln!(
            s,
            "step         {} {}, batch {}{}",
            human(self.step_flops as f64, "FLOP"),
            self.dtype,
            self.batch,
            if self.batch > 1 {
                " (per-image passes, gradients accumulated)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "memory       {} planned peak; arena {} (lower bound {})",
            bytes(r.peak_memory_bytes),
            bytes(r.arena_bytes),
            bytes(r.lower_bound_bytes)
        );
        // Outside the arena, then the arena split at its peak step.
        for (what, v) in [
            ("parameters", b.parameters),
            ("optimizer state", b.optimizer_state),
            ("accumulator", m.accumulation),
            ("arena at its peak:", b.arena),
            ("  saved activations", b.saved_activations),
            ("  transient", b.transient_activations),
            ("  gradients", b.gradients_at_peak),
            ("  workspace", b.workspace),
            ("  fragmentation", b.fragmentation),
        ] {
            let _ = writeln!(s, "  {what:<21}{:>12}", bytes(v as usize));
        }
        let _ = writeln!(
            s,
            "  (all gradients: {}, live in the arena to the end of the step)",
            bytes(b.gradients as usize)
        );
        let _ = writeln!(
            s,
            "attention    {} regions fused (saving {} of training activations)",
            self.fused_attention,
            bytes(self.fusion_saved_bytes as usize)
        );
        if let Some(f) = &self.fusion {
            // Blocks of one kind save the same: one line per (window, windows, bytes).
            let mut kinds: Vec<(usize, usize, u64, usize)> = Vec::new();
            for b in &f.blocks {
                match kinds
                    .iter_mut()
                    .find(|k| (k.0, k.1, k.2) == (b.window, b.windows, b.saved_activation_bytes))
                {
                    Some(k) => k.3 += 1,
                    None => kinds.push((b.window, b.windows, b.saved_activation_bytes, 1)),
                }
            }
            for (window, windows, saved, n) in kinds {
                let _ = writeln!(
                    s,
                    "  {n} x {windows} window(s) of {window}: {} saved per block",
                    bytes(saved as usize)
                );
            }
            for u in &f.unmatched {
                let _ = writeln!(s, "  not fused: {} ({})", u.scope, u.reason);
            }
        }
        let pct = 100.0 * self.recompute_flops as f64 * self.batch as f64 / self.step_flops.max(1) as f64;
        let _ = writeln!(
            s,
            "checkpoint   {}: {} scopes recomputed, {} ({pct:.1}% of the step)",
            self.checkpoint.name(),
            self.checkpointed.len(),
            human(self.recompute_flops as f64, "FLOP"),
        );
        for scope in &self.checkpointed {
            let _ = writeln!(s, "  {scope}");
        }
    }
}

/// Kernel times keyed by op or scope, as `(name, seconds)` pairs, slowest first.
pub fn slowest_first(times: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = times.iter().map(|(k, &t)| (k.clone(), t)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// Adds each of `from`'s kernel times (per op or per scope) to `into`'s total under its name.
pub fn add_times(into: &mut BTreeMap<String, f64>, from: &BTreeMap<String, f64>) {
    for (name, t) in from {
        *into.entry(name.clone()).or_default() += t;
    }
}

/// 1234567 -> "1.23M".
pub fn human(x: f64, unit: &str) -> String {
    let (v, p) = if x >= 1e12 {
        (x / 1e12, "T")
    } else if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    format!("{v:.2}{p}{unit}")
}

/// Bytes in binary units.
pub fn bytes(b: usize) -> String {
    let b = b as f64;
    let gib = 1024.0 * 1024.0 * 1024.0;
    if b >= gib {
        format!("{:.2} GiB", b / gib)
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}
