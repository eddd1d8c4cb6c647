//! `vitdet study --calibration`: a device profile's efficiencies from `vitdet bench --ops` reports
//! (JSON) timed on that device.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use vitdet_ir::{DType, Op};
use vitdet_passes::timing::{DeviceProfile, MeasuredOp};

/// The fields of an ops report (`vitdet bench --ops --format json`) the calibration reads.
#[derive(Deserialize)]
struct OpsReport {
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

/// The timed rows of one report file.
fn read_report(path: &Path) -> Result<Vec<MeasuredOp>> {
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

/// `profile` calibrated by the timed rows of every report in `paths`.
pub fn calibrate(profile: DeviceProfile, paths: &[PathBuf]) -> Result<DeviceProfile> {
    let mut measured = Vec::new();
    for path in paths {
        measured.extend(read_report(path)?);
    }
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    profile
        .calibrated(&names.join(", "), &measured)
        .map_err(anyhow::Error::msg)
}
