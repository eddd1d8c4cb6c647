//! `vitdet bench --model M`: one end-to-end step on a device, timed with synchronization.
//!
//! * `infer`: the whole Mask R-CNN at test time on a random square image (the graph of
//!   `vitdet compile`), with the attention fused and autocast to `--dtype` as a training step
//!   would be, so both modes run the same kernels.
//! * `train`: the training step of `vitdet compile --mode train` (forward to the losses and
//!   every parameter gradient, no optimizer update) on a synthetic image with two instances.
//!
//! Weights are a seeded random init. The step time is the median over `iters` runs after the
//! warm-up ones; memory is the device's peak allocation during the runs above the resident
//! weights and inputs, beside the memory planner's arena for the same graph.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use vitdet_ir::{Graph, NodeIndex};
use vitdet_passes::Precision;
use vitdet_runtime::{Device, ParamStore, Program, Tensor};

use super::timer::{time_calls, Timing};
use crate::compile::{compile_train, load_config, lower_inference, TrainOptions};

/// Which step to time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum StepMode {
    Infer,
    Train,
}

impl StepMode {
    pub fn name(self) -> &'static str {
        match self {
            StepMode::Infer => "infer",
            StepMode::Train => "train",
        }
    }
}

#[derive(Clone, Debug)]
pub struct StepOptions {
    pub model: String,
    pub image_size: Option<usize>,
    pub mode: StepMode,
    pub precision: Precision,
    /// Run the windowed-attention fusion pass.
    pub fuse_attention: bool,
    pub warmup: usize,
    pub iters: usize,
    /// After the timed runs, on a GPU one that times each node on the device's clock
    /// ([`OpTime::device_ms`]), then one that waits for the device after every op
    /// ([`OpTime::synced_ms`]).
    pub profile: bool,
}

/// One op kind's share of a step.
#[derive(Clone, Debug, Serialize)]
pub struct OpTime {
    pub op: String,
    /// Nodes of this kind in the step's graph.
    pub count: usize,
    /// Host time issuing them in the last timed run: on a GPU, where kernels run
    /// asynchronously, the dispatch cost (the kernels' own time where an op waits for the
    /// device, e.g. to read a count back).
    pub host_ms: f64,
    /// Their time with the device waited for after each op (`--profile`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synced_ms: Option<f64>,
    /// Their spans on the device's clock in a run that does not wait (`--profile` on a GPU:
    /// `Program::run_device_timed`): their kernels plus the device's idle time waiting for
    /// the host to issue them. The kinds add up to the step's time on the device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_ms: Option<f64>,
}

/// One scope's share of a step (scopes cut to two components: `backbone.net`,
/// `backward/roi_heads.mask_head`, ...).
#[derive(Clone, Debug, Serialize)]
pub struct ScopeTime {
    pub scope: String,
    /// Host time in its ops in the last timed run (see [`OpTime::host_ms`]).
    pub host_ms: f64,
    /// Their time with the device waited for after each op (`--profile`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synced_ms: Option<f64>,
    /// Their spans on the device's clock (see [`OpTime::device_ms`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_ms: Option<f64>,
}

/// What timing a step measured.
#[derive(Clone, Debug, Serialize)]
pub struct StepResult {
    pub model: String,
    pub image_size: usize,
    pub mode: StepMode,
    pub dtype: &'static str,
    /// Attention regions replaced by the fused op.
    pub fused_attention: usize,
    pub compile_seconds: f64,
    #[serde(flatten)]
    pub timing: Timing,
    /// The memory planner's arena for the graph (the activations a run holds at its peak),
    /// dynamic rows at their bound.
    pub planned_arena_bytes: u64,
    /// The rows the run's dynamic values held (the mask head's RoIs), if the graph has any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamic_rows: Option<usize>,
    /// The arena planned at those rows (`Graph::with_rows`): the figure the measured peak
    /// compares with; `planned_arena_bytes` without dynamic rows.
    pub planned_arena_bytes_at_rows: u64,
    pub param_bytes: u64,
    /// Per op kind, the slowest first (by the device clock's spans, else the synced time, else
    /// the host time: the first the run measured).
    pub ops: Vec<OpTime>,
    /// Per scope, the slowest first (same order key).
    pub scopes: Vec<ScopeTime>,
    /// Why the device-clock run failed, where it did (the other measurements stand).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_clock_error: Option<String>,
}

impl StepResult {
    pub fn to_text(&self) -> String {
        let t = &self.timing;
        let bytes = |b: u64| crate::report::bytes(b as usize);
        format!(
            "{model} {mode} at {size}px, {dtype}, {fused} fused attention blocks, compiled in {compile:.1} s\n\
             step: median {median:.1} ms, min {min:.1} ms ({iters} timed runs)\n\
             memory: peak {peak} besides the weights ({weights}), planned arena {arena}{at_rows}\n",
            model = self.model,
            mode = self.mode.name(),
            size = self.image_size,
            dtype = self.dtype,
            fused = self.fused_attention,
            compile = self.compile_seconds,
            median = t.median_ms,
            min = t.min_ms,
            iters = t.iters,
            peak = t.peak_bytes.map_or("-".to_string(), bytes),
            weights = bytes(self.param_bytes),
            arena = bytes(self.planned_arena_bytes),
            at_rows = self.dynamic_rows.map_or(String::new(), |r| format!(
                " ({} at the run's {r} dynamic rows)",
                bytes(self.planned_arena_bytes_at_rows)
            )),
        ) + &self.device_clock_text()
            + &self.ops_text()
            + &self.scopes_text()
    }

    /// The device clock's total (its spans add up to the step's time on the device), or why
    /// it failed.
    fn device_clock_text(&self) -> String {
        if let Some(e) = &self.device_clock_error {
            return format!("device clock: failed ({e})\n");
        }
        let spans: Vec<f64> = self.ops.iter().filter_map(|o| o.device_ms).collect();
        if spans.is_empty() {
            return String::new();
        }
        format!(
            "device clock: {:.1} ms from the run's start event to the last node's end\n",
            spans.iter().sum::<f64>()
        )
    }

    /// The slowest scopes, as text.
    fn scopes_text(&self) -> String {
        let rows = self
            .scopes
            .iter()
            .map(|r| (&r.scope, None, r.host_ms, r.synced_ms, r.device_ms));
        timing_table("scope", rows)
    }

    /// The slowest op kinds, as text.
    fn ops_text(&self) -> String {
        let rows = self
            .ops
            .iter()
            .map(|r| (&r.op, Some(r.count), r.host_ms, r.synced_ms, r.device_ms));
        timing_table("op", rows)
    }
}

/// Rows (name, node count, host, synced, device ms) as a text table of the first
/// [`OPS_SHOWN`].
fn timing_table<'a>(
    what: &str,
    rows: impl Iterator<Item = (&'a String, Option<usize>, f64, Option<f64>, Option<f64>)>,
) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    let mut text = format!(
        "{what:<40} {:>6} {:>10} {:>10} {:>10}\n",
        "count", "host ms", "synced ms", "device ms"
    );
    for (name, count, host, synced, device) in rows.take(OPS_SHOWN) {
        let count = count.map_or(String::new(), |c| c.to_string());
        text += &format!(
            "{name:<40} {count:>6} {host:>10.2} {:>10} {:>10}\n",
            ms(synced),
            ms(device)
        );
    }
    text
}

/// Op kinds the text report lists.
const OPS_SHOWN: usize = 12;

/// A run's seconds by name: the host's, and where measured the synced run's and the device
/// clock's.
struct Clocks<'a> {
    host: &'a BTreeMap<String, f64>,
    synced: Option<&'a BTreeMap<String, f64>>,
    device: Option<&'a BTreeMap<String, f64>>,
}

/// `(name, host ms, synced ms, device ms)` for every name timed, slowest first (by the device
/// clock where measured, else the synced time, else the host time).
fn timing_rows(clocks: &Clocks) -> Vec<(String, f64, Option<f64>, Option<f64>)> {
    // A clock that did not time a name (the device clock's `input`) leaves it blank.
    let ms = |m: Option<&BTreeMap<String, f64>>, name: &str| m.and_then(|m| m.get(name)).map(|s| s * 1e3);
    // Every name any clock timed: the device clock also charges placing the inputs.
    let names: std::collections::BTreeSet<&String> = [Some(clocks.host), clocks.synced, clocks.device]
        .into_iter()
        .flatten()
        .flat_map(|m| m.keys())
        .collect();
    let mut rows: Vec<_> = names
        .into_iter()
        .map(|name| {
            (
                name.clone(),
                ms(Some(clocks.host), name).unwrap_or(0.0),
                ms(clocks.synced, name),
                ms(clocks.device, name),
            )
        })
        .collect();
    let key = |r: &(String, f64, Option<f64>, Option<f64>)| r.3.or(r.2).unwrap_or(r.1);
    rows.sort_by(|a, b| key(b).total_cmp(&key(a)));
    rows
}

/// Per op kind of `graph`: node count and times, slowest first.
fn op_times(graph: &Graph, clocks: &Clocks) -> Vec<OpTime> {
    let counts = vitdet_passes::CostSummary::of(graph).ops;
    timing_rows(clocks)
        .into_iter()
        .map(|(op, host_ms, synced_ms, device_ms)| OpTime {
            count: counts.get(&op).copied().unwrap_or(0),
            op,
            host_ms,
            synced_ms,
            device_ms,
        })
        .collect()
}

/// Per scope: times, slowest first.
fn scope_times(clocks: &Clocks) -> Vec<ScopeTime> {
    timing_rows(clocks)
        .into_iter()
        .map(|(scope, host_ms, synced_ms, device_ms)| ScopeTime {
            scope,
            host_ms,
            synced_ms,
            device_ms,
        })
        .collect()
}

/// A compiled step: the graph, its order, its planned arena and its attention fusions.
struct Step {
    graph: Graph,
    order: Vec<NodeIndex>,
    arena_bytes: u64,
    fused_attention: usize,
    image_size: usize,
}

fn compile_step(opts: &StepOptions) -> Result<Step> {
    let config = load_config(&opts.model, opts.image_size, None)?;
    let s = config.image_size;
    match opts.mode {
        StepMode::Train => {
            let step = compile_train(
                config,
                &TrainOptions {
                    fuse_attention: opts.fuse_attention,
                    precision: opts.precision,
                    ..Default::default()
                },
            )?;
            Ok(Step {
                graph: step.graph,
                order: step.order,
                arena_bytes: step.plan.arena_bytes as u64,
                fused_attention: step.fused_attention,
                image_size: s,
            })
        }
        StepMode::Infer => {
            let graph = vitdet_models::build_detector_for_image(&config, [s, s])?;
            let (graph, fused_attention) = lower_inference(&graph, opts.precision, opts.fuse_attention)?;
            let (graph, _) = vitdet_passes::prove_index_ranges(&graph)?;
            let order = vitdet_passes::schedule(&graph)?;
            let plan = vitdet_passes::plan_memory(&graph, &order)?;
            Ok(Step {
                graph,
                order,
                arena_bytes: plan.arena_bytes as u64,
                fused_attention,
                image_size: s,
            })
        }
    }
}

/// Compiles and times the step of `opts` on `device`.
pub fn run(opts: &StepOptions, device: &Device) -> Result<StepResult> {
    let start = Instant::now();
    let step = compile_step(opts)?;
    let compile_seconds = start.elapsed().as_secs_f64();
    let params = ParamStore::init_random(&step.graph, 0, device)?;
    let inputs = step_inputs(&step.graph, step.image_size)?;
    let named: Vec<(&str, Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let mut heap_peak: Option<usize> = None;
    let mut dynamic_rows: Option<usize> = None;
    let mut host_op_seconds = BTreeMap::new();
    let mut host_scope_seconds = BTreeMap::new();
    let program = Program::new(&step.graph, &step.order)?;
    let mut timing = time_calls(device, opts.warmup, opts.iters, || {
        let out = program.run(&params, &named, device).context("running the step")?;
        heap_peak = heap_peak.max(out.measured_peak_bytes);
        dynamic_rows = dynamic_rows.max(out.dynamic_rows);
        host_op_seconds = out.op_seconds.clone();
        host_scope_seconds = out.scope_seconds.clone();
        Ok(out)
    })?;
    // The device clock's run first: the synced run's waits leave the pool and caches as a
    // plain run would not. A failure there costs only its column.
    let (device_clock, device_clock_error) = if opts.profile && !device.is_cpu() {
        match program.run_device_timed(&params, &named, device) {
            Ok(out) => (Some((out.op_seconds, out.scope_seconds)), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        }
    } else {
        (None, None)
    };
    let synced = if opts.profile {
        let out = program
            .run_profiled(&params, &named, device)
            .context("profiling the step")?;
        Some((out.op_seconds, out.scope_seconds))
    } else {
        None
    };
    if device.is_cpu() {
        // The executor restarts the counting allocator's high-water mark at every node, so on
        // the CPU its own measured peak (of a run above its start) is the step's.
        timing.peak_bytes = heap_peak.map(|b| b as u64);
    }
    Ok(StepResult {
        model: opts.model.clone(),
        image_size: step.image_size,
        mode: opts.mode,
        dtype: opts.precision.name(),
        fused_attention: step.fused_attention,
        compile_seconds,
        timing,
        planned_arena_bytes: step.arena_bytes,
        dynamic_rows,
        planned_arena_bytes_at_rows: super::arena_at_rows(
            &step.graph,
            &step.order,
            dynamic_rows,
            step.arena_bytes as usize,
        )? as u64,
        param_bytes: params.total_bytes() as u64,
        ops: op_times(
            &step.graph,
            &Clocks {
                host: &host_op_seconds,
                synced: synced.as_ref().map(|s| &s.0),
                device: device_clock.as_ref().map(|s| &s.0),
            },
        ),
        scopes: scope_times(&Clocks {
            host: &host_scope_seconds,
            synced: synced.as_ref().map(|s| &s.1),
            device: device_clock.as_ref().map(|s| &s.1),
        }),
        device_clock_error,
    })
}

/// A value for every input of an inference or training graph of side `s`: a random image and,
/// for training, two ground-truth instances (boxes, classes, masks). On the host, as a data
/// loader hands them over: a run on a GPU moves them there, as part of the step (and keeps the
/// host copies its host loops read).
pub fn step_inputs(graph: &Graph, s: usize) -> Result<Vec<(String, Tensor)>> {
    let device = &Device::Cpu;
    let mut out = Vec::new();
    for (_, name, ty) in graph.inputs() {
        let shape = ty.shape.as_slice();
        let t = match name {
            "image" => Tensor::randn(0f32, 1f32, shape, device)?,
            "gt_boxes" => {
                let mut v = vec![0f32; shape[0] * 4];
                for (i, b) in v.chunks_mut(4).enumerate().take(2) {
                    let o = (i * s / 4) as f32;
                    b.copy_from_slice(&[o + 4.0, o + 8.0, o + s as f32 / 2.0, o + s as f32 / 2.5]);
                }
                Tensor::from_vec(v, shape, device)?
            }
            "gt_classes" => Tensor::from_vec((0..shape[0]).map(|i| (i % 2) as i64).collect::<Vec<_>>(), shape, device)?,
            "gt_masks" => {
                let (g, h, w) = (shape[0], shape[1], shape[2]);
                let mut v = vec![0u8; g * h * w];
                for i in 0..g.min(2) {
                    let o = i * s / 4;
                    for y in (o + 8)..(o + s / 3).min(h) {
                        for x in (o + 4)..(o + s / 2).min(w) {
                            v[(i * h + y) * w + x] = 1;
                        }
                    }
                }
                Tensor::from_vec(v, shape, device)?
            }
            "gt_valid" => Tensor::from_vec(
                (0..shape[0]).map(|i| u8::from(i < 2)).collect::<Vec<_>>(),
                shape,
                device,
            )?,
            "seed" => Tensor::from_vec(vec![7i64], shape, device)?,
            other => bail!("no synthetic value for the graph input `{other}`"),
        };
        let t = if ty.dtype.is_float() {
            t.to_dtype(vitdet_runtime::dtype::to_candle(ty.dtype))?
        } else {
            t
        };
        out.push((name.to_string(), t));
    }
    Ok(out)
}
