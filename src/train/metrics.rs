//! `metrics.jsonl`: one JSON object per completed iteration.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One iteration's record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricsLine {
    /// Iterations completed (1-based).
    pub iteration: u64,
    /// `loss` and its terms, averaged over the batch.
    pub losses: BTreeMap<String, f64>,
    /// Anchors and RoIs sampled per image, averaged over the batch, under detectron2's event
    /// names (`rpn/num_pos_anchors`, `roi_head/num_fg_samples`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub samples: BTreeMap<String, f64>,
    /// Learning rate of parameters with multiplier 1 (the heads).
    pub lr: f64,
    /// Wall time of the iteration.
    pub seconds: f64,
    /// Ground-truth instances left out for lack of room in the graph.
    pub truncated_instances: usize,
    /// Float16: the loss scale this iteration's gradients were computed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// Float16: the optimizer step was skipped (inf/NaN gradients; the scale backed off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

/// Appends lines, flushing each so a killed run keeps every completed iteration's record.
pub struct Writer(File);

impl Writer {
    pub fn append(path: &Path) -> Result<Self> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Writer(f))
    }

    pub fn write(&mut self, line: &MetricsLine) -> Result<()> {
        let mut text = serde_json::to_string(line)?;
        text.push('\n');
        self.0.write_all(text.as_bytes()).context("writing metrics")?;
        self.0.flush().context("writing metrics")?;
        Ok(())
    }
}

/// Reads every record of a metrics file.
pub fn read(path: &Path) -> Result<Vec<MetricsLine>> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).with_context(|| format!("{} line {}", path.display(), i + 1))?);
    }
    Ok(out)
}

/// Drops the records after `iteration` (work a resumed run repeats), rewriting atomically. A
/// torn last line (the run was killed mid-write) is dropped too.
pub fn truncate_after(path: &Path, iteration: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut kept = String::new();
    for line in text.lines() {
        match serde_json::from_str::<MetricsLine>(line) {
            Ok(m) if m.iteration <= iteration => {
                kept.push_str(line);
                kept.push('\n');
            }
            _ => {}
        }
    }
    vitdet_runtime::write_atomic(path, kept.as_bytes()).with_context(|| format!("cannot rewrite {}", path.display()))
}
