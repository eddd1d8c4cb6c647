//! The study's Pareto plot: predicted step time against planned peak memory, one point per
//! configuration, the Pareto-optimal ones joined by a line.

use std::path::Path;

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::Study;

const GIB: f64 = (1u64 << 30) as f64;

/// Writes the plot as SVG (atomically: a temporary file renamed into place). SVG only: its text
/// is drawn by the viewer, where a PNG would need a font file on every machine.
pub fn write_plot(study: &Study, path: &Path) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let points = points(study);
    if points.is_empty() {
        bail!("no configuration of the study compiled: nothing to plot");
    }
    let tmp = path.with_extension(format!("{}.tmp", ext.as_deref().unwrap_or("")));
    if ext.as_deref() != Some("svg") {
        bail!(
            "--plot {}: the plot is written as SVG; name the file *.svg",
            path.display()
        );
    }
    let root = SVGBackend::new(&tmp, (900, 600)).into_drawing_area();
    draw(study, &points, &root)?;
    root.present().context("writing the SVG plot")?;
    drop(root);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// `(memory GiB, seconds, label)` of every compiled row.
fn points(study: &Study) -> Vec<(f64, f64, String)> {
    study
        .rows
        .iter()
        .filter_map(|r| {
            let p = r.predicted.as_ref()?;
            let mut label = format!("{:?} {}", r.attention, r.checkpoint.name()).to_lowercase();
            if let Some(b) = r.budget_bytes {
                label += &format!(" {:.1}G", b as f64 / GIB);
            }
            label += &format!(" {}px b{} {}", r.image_size, r.batch, r.dtype);
            Some((p.peak_bytes as f64 / GIB, p.step_seconds, label))
        })
        .collect()
}

/// Points no other point beats on both memory and time, by memory.
fn pareto(points: &[(f64, f64, String)]) -> Vec<(f64, f64)> {
    let mut front: Vec<(f64, f64)> = points
        .iter()
        .filter(|(m, t, _)| {
            !points
                .iter()
                .any(|(m2, t2, _)| m2 <= m && t2 <= t && (m2 < m || t2 < t))
        })
        .map(|(m, t, _)| (*m, *t))
        .collect();
    front.sort_by(|a, b| a.0.total_cmp(&b.0));
    front
}

fn draw<DB: DrawingBackend>(study: &Study, points: &[(f64, f64, String)], root: &DrawingArea<DB, Shift>) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing the plot: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let range = |f: fn(&(f64, f64, String)) -> f64| {
        let lo = points.iter().map(f).fold(f64::INFINITY, f64::min);
        let hi = points.iter().map(f).fold(0.0, f64::max);
        let pad = ((hi - lo) * 0.1).max(hi * 0.02).max(1e-9);
        ((lo - pad).max(0.0), hi + 3.0 * pad)
    };
    let (x, y) = (range(|p| p.0), range(|p| p.1));
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("{}: step time vs peak memory ({})", study.model, study.profile.name),
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x.0..x.1, y.0..y.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("planned peak memory (GiB)")
        .y_desc("predicted step time (s)")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(pareto(points), BLUE.stroke_width(2)))
        .map_err(err)?;
    chart
        .draw_series(points.iter().map(|(m, t, label)| {
            EmptyElement::at((*m, *t))
                + Circle::new((0, 0), 5, RED.filled())
                + Text::new(label.clone(), (8, -8), ("sans-serif", 14))
        }))
        .map_err(err)?;
    Ok(())
}
