//! The `vitdet compile` report, as JSON and as text.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;
use vitdet_ir::Graph;
use vitdet_models::ModelConfig;
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
    pub compile_seconds: f64,
    /// Measured with `--bench`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub benchmark: Option<crate::bench::Benchmark>,
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
            compile_seconds: seconds,
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
        let _ = writeln!(
            s,
            "memory       {} peak = {} parameters + {} live activations",
            bytes(self.peak_memory_bytes),
            bytes(self.param_bytes),
            bytes(self.peak_activation_bytes)
        );
        let _ = writeln!(
            s,
            "arena        {} planned for all activations",
            bytes(self.arena_bytes)
        );
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
        if let Some(b) = &self.benchmark {
            let _ = writeln!(s, "\nbenchmark (random weights and input, one pass after a warm-up)");
            let _ = writeln!(s, "  device   {} ({} threads)", b.device, b.threads);
            let _ = writeln!(s, "  time     {:.3} s = {:.3} fps", b.seconds, b.fps);
            let _ = writeln!(
                s,
                "  memory   {} live activations measured",
                bytes(b.measured_peak_activation_bytes)
            );
        }
        s
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
