//! `vitdet study --calibration` (and `compile`'s): a device profile's efficiencies from
//! `vitdet bench --ops` reports (JSON) timed on that device, or, with `--calibrated-on`, on
//! another GPU of its architecture.
//!
//! A report names the device and GPU it was timed on (`device`, `gpu`). One timed on the CPU,
//! or on another GPU than the one it is said to come from, is refused: its times would be read
//! at the wrong peaks. A report without the GPU's name (written before reports carried it) is
//! taken as it says.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use vitdet_ir::{DType, Op};
use vitdet_passes::timing::{DeviceProfile, MeasuredOp};

/// The fields of an ops report (`vitdet bench --ops --format json`) the calibration reads.
#[derive(Deserialize)]
struct OpsReport {
    /// Where it ran: `cpu`, `cuda`, `cuda:N`.
    device: String,
    /// The GPU's name (`NVIDIA H200`).
    gpu: Option<String>,
    scale: usize,
    ops: Vec<OpRow>,
}

#[derive(Deserialize)]
struct OpRow {
    name: String,
    op: Op,
    dtype: DType,
    flops: u64,
    bytes: u64,
    /// Absent where the row failed to run.
    median_ms: Option<f64>,
}

/// The timed rows of one report file, which must come from `timed_on`'s GPU; `target` is the
/// profile they calibrate (the same, or another named by `--calibrated-on`).
fn read_report(path: &Path, target: &DeviceProfile, timed_on: &DeviceProfile) -> Result<Vec<MeasuredOp>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let report: OpsReport = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a `vitdet bench --ops --format json` report", path.display()))?;
    if report.scale != 1 {
        // Shrunk shapes time launch latency more than the kernels the model runs.
        bail!(
            "{}: the op table ran at --scale {}; calibrate with the real shapes (--scale 1)",
            path.display(),
            report.scale
        );
    }
    // Every named profile is a GPU's.
    if !report.device.starts_with("cuda") {
        bail!(
            "{} was timed on `{}`, not on a GPU: it cannot calibrate the {} profile",
            path.display(),
            report.device,
            target.name
        );
    }
    if let Some(gpu) = &report.gpu {
        // Profile names start with the GPU's model: `h100-80gb`.
        let model = timed_on.name.split('-').next().unwrap_or_default().to_uppercase();
        // `NVIDIA H100 80GB HBM3`, `NVIDIA A100-SXM4-80GB`, `Tesla V100-SXM2-32GB`.
        let upper = gpu.to_uppercase();
        if !upper
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|word| word == model)
        {
            // Where the reports were said to come from, as the user named it.
            let (expected, hint) = if timed_on.name == target.name {
                (
                    format!("the {} profile's GPU", target.name),
                    ", or name that GPU's profile with --calibrated-on",
                )
            } else {
                (format!("the GPU --calibrated-on {} names", timed_on.name), "")
            };
            bail!(
                "{} was timed on {gpu}, not on {expected}: calibrate that GPU's profile with it{hint}",
                path.display()
            );
        }
    }
    let mut rows = Vec::new();
    for row in report.ops {
        let Some(ms) = row.median_ms else { continue };
        if !(ms.is_finite() && ms > 0.0) {
            bail!("{}: op `{}` has median_ms {ms}", path.display(), row.name);
        }
        rows.push(MeasuredOp {
            op: row.op.name().to_string(),
            dtype: row.dtype,
            flops: row.flops,
            bytes: row.bytes,
            seconds: ms * 1e-3,
        });
    }
    if rows.is_empty() {
        bail!("{}: no op of the report has a time", path.display());
    }
    Ok(rows)
}

/// `profile` calibrated by the timed rows of every report in `paths`, which were timed on the
/// GPU of `timed_on` (`profile` itself, or another of its architecture).
pub fn calibrate(profile: DeviceProfile, timed_on: &DeviceProfile, paths: &[PathBuf]) -> Result<DeviceProfile> {
    let mut measured = Vec::new();
    for path in paths {
        measured.extend(read_report(path, &profile, timed_on)?);
    }
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let profile = profile
        .calibrated_on(timed_on, &names.join(", "), &measured)
        .map_err(anyhow::Error::msg)?;
    for skipped in profile.calibration.iter().flat_map(|c| &c.skipped) {
        eprintln!("warning: calibration: left out {skipped}");
    }
    Ok(profile)
}
