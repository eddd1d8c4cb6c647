//! `vitdet study`: the paper's Table 3 as a command — memory and time of training-step
//! configurations predicted by the compiler, and measured on the current device.
//!
//! Each row is one [`TrainOptions`] compiled by [`compile_train`]: the planned peak memory is the
//! whole step (parameters, optimizer state, arena), the predicted time the roofline of
//! [`vitdet_passes::timing`] over a device profile. The defaults reproduce the paper's setting:
//! a V100-32GB, automatic mixed precision (f16) and attention as PyTorch's eager code runs it,
//! materializing the probabilities (`--fuse` compiles the fused attention instead).

mod calibration;
mod measure;
mod plot;
mod table;

use anyhow::{bail, Result};
use serde::Serialize;
use vitdet_models::{AttentionStrategy, ModelConfig};
use vitdet_passes::timing::{predict_step_time, DeviceProfile, TimeEstimate};
use vitdet_passes::Precision;
use vitdet_runtime::Device;

use crate::compile::{compile_train, CheckpointChoice, TrainOptions};

pub use measure::{calibrate_cpu, Measured};
pub use plot::write_plot;
pub use table::{to_markdown, to_text};

/// What a study sweeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dim {
    Attention,
    Checkpoint,
    Budget,
    ImageSize,
    Batch,
    Dtype,
    Fusion,
}

impl Dim {
    pub fn parse_list(text: &str) -> Result<Vec<Dim>> {
        let mut dims = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let d = match part {
                "attention" => Dim::Attention,
                "checkpoint" => Dim::Checkpoint,
                "budget" => Dim::Budget,
                "image-size" | "image_size" => Dim::ImageSize,
                "batch" => Dim::Batch,
                "dtype" => Dim::Dtype,
                "fusion" => Dim::Fusion,
                other => bail!(
                    "unknown sweep `{other}` (expected attention, checkpoint, budget, image-size, batch, dtype, fusion)"
                ),
            };
            if dims.contains(&d) {
                bail!("`{part}` is swept twice");
            }
            dims.push(d);
        }
        if dims.is_empty() {
            bail!("--sweep names nothing");
        }
        if dims.contains(&Dim::Budget) && dims.contains(&Dim::Checkpoint) {
            bail!("sweep either budget (auto checkpointing) or checkpoint (named policies), not both");
        }
        Ok(dims)
    }
}

/// A study's options.
#[derive(Clone, Debug)]
pub struct StudyOptions {
    pub model: String,
    pub image_size: Option<usize>,
    pub sweep: Vec<Dim>,
    /// The point every row starts from (its attention, checkpoint, dtype, batch, fusion).
    pub base: TrainOptions,
    /// Device profile for predicted times (`v100-32gb`, `a100-80gb`, `h100-80gb`, `h200-141gb`).
    pub profile: String,
    /// `vitdet bench --ops` reports timed on that device, whose efficiencies replace the
    /// profile's assumed ones (`DeviceProfile::calibrated`).
    pub calibration: Vec<std::path::PathBuf>,
    /// The profile of the GPU the `calibration` reports were timed on, where it is not
    /// `profile`'s (one architecture: `DeviceProfile::calibrated_on`).
    pub calibrated_on: Option<String>,
    /// Also run each configuration on `device`.
    pub measure: bool,
    /// Where `measure` runs (the CPU, or a GPU in a `cuda` build).
    pub device: Device,
    /// Timed steps per measured row (after one warm-up step).
    pub steps: usize,
}

/// One configuration of the study.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub attention: AttentionStrategy,
    pub checkpoint: CheckpointChoice,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_bytes: Option<u64>,
    pub image_size: usize,
    pub batch: usize,
    pub dtype: &'static str,
    pub fused_attention: bool,
    /// A measured reference for this configuration, if one exists (see [`reference()`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<Reference>,
    /// Why this configuration could not be compiled (e.g. an unreachable budget).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted: Option<Predicted>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
}

/// What the compiler predicts for a row.
#[derive(Clone, Debug, Serialize)]
pub struct Predicted {
    /// Planned peak of the whole step.
    pub peak_bytes: u64,
    pub arena_bytes: u64,
    pub lower_bound_bytes: u64,
    /// Forward values kept for the backward (what checkpointing reduces).
    pub saved_activation_bytes: u64,
    /// Whether the peak exceeds the device profile's memory.
    pub out_of_memory: bool,
    pub step_seconds: f64,
    pub time: TimeEstimate,
    pub step_flops: u64,
    pub recompute_percent: f64,
    pub checkpointed: Vec<String>,
}

/// A measured reference row.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Reference {
    /// Where it was measured.
    pub source: &'static str,
    pub row: &'static str,
    /// Peak training memory (GB as the source reports it), `None` for out of memory.
    pub memory: Option<f64>,
    pub train_seconds: Option<f64>,
}

/// The measured references for a configuration, in the setting they were measured in
/// (1024x1024, batch 1, automatic mixed precision f16, attention as PyTorch's eager code runs
/// it): the paper's Table 3 for `vit-l` (V100-32GB), and detectron2's ViTDet measured on one
/// H100 for `vitdet-b` / `vitdet-l` (numbers in DESIGN.md; GiB).
pub fn reference(model: &str, row: &Row) -> Option<Reference> {
    use AttentionStrategy as A;
    use CheckpointChoice as C;
    if row.image_size != 1024 || row.batch != 1 || row.dtype != "f16" || row.fused_attention {
        return None;
    }
    let i = match (row.attention, row.checkpoint) {
        (A::Window, C::None) => 0,
        (A::Hybrid, C::None) => 1,
        (A::Global, C::Blocks) => 2,
        (A::Global, C::None) => 3,
        _ => return None,
    };
    let rows = [
        "(1) windowed",
        "(2) windowed, 4 global",
        "(3) global + checkpointing",
        "(4) global",
    ];
    let (source, memory, seconds): (&str, [Option<f64>; 4], [Option<f64>; 4]) = match model {
        "vit-l" => (
            "paper, V100-32GB (GB)",
            [Some(16.0), Some(27.0), Some(14.0), None],
            [Some(0.67), Some(0.93), Some(2.26), None],
        ),
        "vitdet-l" => (
            "detectron2, H100 (GiB)",
            [Some(13.2), Some(18.8), Some(8.64), Some(47.1)],
            [Some(0.211), Some(0.220), Some(0.444), Some(0.334)],
        ),
        "vitdet-b" => (
            "detectron2, H100 (GiB)",
            [Some(5.65), Some(9.85), Some(4.46), Some(18.3)],
            [Some(0.111), Some(0.131), Some(0.215), Some(0.169)],
        ),
        _ => return None,
    };
    Some(Reference {
        source,
        row: rows[i],
        memory: memory[i],
        train_seconds: seconds[i],
    })
}

/// A study: its rows and the device profile behind the predicted times.
#[derive(Clone, Debug, Serialize)]
pub struct Study {
    pub model: String,
    pub profile: DeviceProfile,
    /// With `--measure`: the profile of the measured device, whose predictions sit beside the
    /// measurements (the CPU's, calibrated; a GPU's is the study's `--profile`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_on: Option<DeviceProfile>,
    pub rows: Vec<Row>,
}

/// The configurations of a sweep: the cross product of each swept dimension's values, the
/// first named dimension outermost.
fn configurations(
    opts: &StudyOptions,
    config: &ModelConfig,
    budget_range: Option<(u64, u64)>,
) -> Vec<(TrainOptions, usize)> {
    let mut configs = vec![(opts.base.clone(), config.image_size)];
    for dim in &opts.sweep {
        let mut next = Vec::new();
        for (o, size) in &configs {
            let mut push = |f: &dyn Fn(&mut TrainOptions, &mut usize)| {
                let (mut o, mut size) = (o.clone(), *size);
                f(&mut o, &mut size);
                next.push((o, size));
            };
            match dim {
                Dim::Attention => {
                    for a in [
                        AttentionStrategy::Window,
                        AttentionStrategy::Hybrid,
                        AttentionStrategy::Global,
                    ] {
                        push(&|o, _| o.attention = Some(a));
                    }
                }
                Dim::Checkpoint => {
                    for c in [CheckpointChoice::None, CheckpointChoice::Blocks] {
                        push(&|o, _| o.checkpoint = Some(c));
                    }
                }
                Dim::Budget => {
                    // Seven budgets from the no-recompute peak down to the peak with every
                    // block recomputed.
                    let (min, full) = budget_range.expect("computed for budget sweeps");
                    for k in (0..=6u64).rev() {
                        let b = min + (full - min) * k / 6;
                        push(&|o, _| {
                            o.checkpoint = Some(CheckpointChoice::Auto);
                            o.budget_bytes = Some(b);
                        });
                    }
                }
                Dim::ImageSize => {
                    let s = *size;
                    for f in [0.5, 0.75, 1.0, 1.25] {
                        // Multiples of 32 keep every level of the pyramid integral.
                        let side = ((s as f64 * f / 32.0).round() as usize).max(1) * 32;
                        push(&|_, size| *size = side);
                    }
                }
                Dim::Batch => {
                    for b in [1, 2, 4, 8] {
                        push(&|o, _| o.batch = b);
                    }
                }
                Dim::Dtype => {
                    for p in [Precision::F32, Precision::Bf16, Precision::F16] {
                        push(&|o, _| o.precision = p);
                    }
                }
                Dim::Fusion => {
                    for f in [false, true] {
                        push(&|o, _| o.fuse_attention = f);
                    }
                }
            }
        }
        configs = next;
    }
    configs
}

/// The named datasheet profile, calibrated by the `vitdet bench --ops` reports in `calibration`
/// if any, which were timed on the GPU of the profile `calibrated_on` names (default: this one).
pub fn device_profile(
    name: &str,
    calibration: &[std::path::PathBuf],
    calibrated_on: Option<&str>,
) -> Result<DeviceProfile> {
    let profile = DeviceProfile::named(name).map_err(anyhow::Error::msg)?;
    if calibration.is_empty() {
        if let Some(other) = calibrated_on {
            bail!("--calibrated-on {other} names where the --calibration reports were timed: give them");
        }
        return Ok(profile);
    }
    let timed_on = match calibrated_on {
        Some(other) => DeviceProfile::named(other).map_err(|e| anyhow::anyhow!("--calibrated-on: {e}"))?,
        None => profile.clone(),
    };
    calibration::calibrate(profile, &timed_on, calibration)
}

/// Runs a study: compiles every configuration, predicts, and measures if asked.
pub fn run_study(opts: &StudyOptions, progress: &dyn Fn(&str)) -> Result<Study> {
    let config = crate::compile::load_config(&opts.model, opts.image_size, None)?;
    let profile = device_profile(&opts.profile, &opts.calibration, opts.calibrated_on.as_deref())?;
    let budget_range = if opts.sweep.contains(&Dim::Budget) {
        let peak = |c| -> Result<u64> {
            let mut o = opts.base.clone();
            o.checkpoint = Some(c);
            o.budget_bytes = None;
            Ok(compile_train(config.clone(), &o)?.peak_memory_bytes)
        };
        let (full, min) = (peak(CheckpointChoice::None)?, peak(CheckpointChoice::Blocks)?);
        Some((min.min(full), full))
    } else {
        None
    };
    let measured_on = match (opts.measure, opts.device.is_cpu()) {
        (false, _) => None,
        (true, true) => Some(calibrate_cpu()?),
        (true, false) => Some(DeviceProfile {
            name: format!("{:?} ({} profile)", opts.device.location(), profile.name),
            ..profile.clone()
        }),
    };

    let mut rows = Vec::new();
    for (o, size) in configurations(opts, &config, budget_range) {
        let mut cfg = config.clone();
        cfg.image_size = size;
        let attention = o.attention.unwrap_or(cfg.attention);
        let checkpoint = o.checkpoint.unwrap_or(CheckpointChoice::None);
        let mut row = Row {
            attention,
            checkpoint,
            budget_bytes: o.budget_bytes,
            image_size: size,
            batch: o.batch,
            dtype: o.precision.name(),
            fused_attention: o.fuse_attention,
            reference: None,
            error: None,
            predicted: None,
            measured: None,
        };
        row.reference = reference(&opts.model, &row);
        progress(&format!(
            "{} {:?} checkpoint {} {} batch {} {}px",
            opts.model,
            attention,
            checkpoint.name(),
            row.dtype,
            row.batch,
            size
        ));
        let step = match compile_train(cfg.clone(), &o) {
            Ok(step) => step,
            Err(e) => {
                row.error = Some(format!("{e:#}"));
                rows.push(row);
                continue;
            }
        };
        let time = predict_step_time(&step.graph, &step.order, &profile).map_err(anyhow::Error::msg)?;
        let step_flops = step.graph.cost().flops;
        row.predicted = Some(Predicted {
            peak_bytes: step.peak_memory_bytes,
            arena_bytes: step.plan.arena_bytes as u64,
            lower_bound_bytes: step.plan.lower_bound_bytes as u64,
            saved_activation_bytes: step.saved_activation_bytes,
            out_of_memory: profile.memory_bytes.is_some_and(|m| step.peak_memory_bytes > m),
            step_seconds: time.seconds * o.batch as f64,
            time,
            step_flops: step_flops * o.batch as u64,
            recompute_percent: 100.0 * step.recompute_flops as f64 / step_flops.max(1) as f64,
            checkpointed: step.checkpointed.clone(),
        });
        if let Some(on) = &measured_on {
            row.measured = Some(measure::measure(&step, on, opts.steps, &opts.device)?);
        }
        rows.push(row);
    }
    Ok(Study {
        model: opts.model.clone(),
        profile,
        measured_on,
        rows,
    })
}
