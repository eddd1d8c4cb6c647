//! A study as a text or markdown table.

use super::{Row, Study};

const GIB: f64 = (1u64 << 30) as f64;

fn header(study: &Study) -> Vec<String> {
    let mut h: Vec<String> = [
        "attention",
        "ckpt",
        "budget",
        "size",
        "batch",
        "dtype",
        "fused",
        "peak GiB",
        "saved GiB",
        "arena/bound",
        "recompute %",
        "s/iter",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if study.measured_on.is_some() {
        h.extend([
            "measured s/iter".into(),
            "predicted there".into(),
            "arena measured/planned".into(),
        ]);
    }
    if let Some(source) = study.rows.iter().find_map(|r| r.reference.map(|x| x.source)) {
        h.extend([format!("reference: {source}"), "mem".into(), "s/iter".into()]);
    }
    h
}

fn cells(study: &Study, r: &Row) -> Vec<String> {
    let mut c = vec![
        format!("{:?}", r.attention).to_lowercase(),
        r.checkpoint.name().to_string(),
        r.budget_bytes
            .map_or("-".into(), |b| format!("{:.2} GiB", b as f64 / GIB)),
        r.image_size.to_string(),
        r.batch.to_string(),
        r.dtype.to_string(),
        if r.fused_attention { "yes" } else { "no" }.to_string(),
    ];
    match (&r.predicted, &r.error) {
        (Some(p), _) => c.extend([
            format!(
                "{:.2}{}",
                p.peak_bytes as f64 / GIB,
                if p.out_of_memory { " (OOM)" } else { "" }
            ),
            format!("{:.2}", p.saved_activation_bytes as f64 / GIB),
            format!("{:.3}", p.arena_bytes as f64 / p.lower_bound_bytes.max(1) as f64),
            format!("{:.1}", p.recompute_percent),
            format!("{:.3}", p.step_seconds),
        ]),
        (None, Some(_)) => c.extend([
            "not compiled (below)".into(),
            String::new(),
            String::new(),
            String::new(),
        ]),
        (None, None) => c.extend(std::iter::repeat_n(String::new(), 5)),
    }
    if study.measured_on.is_some() {
        match &r.measured {
            Some(m) => c.extend([
                format!("{:.3}", m.step_seconds),
                format!("{:.3}", m.predicted_seconds),
                m.arena_error
                    .map_or("not measured".into(), |e| format!("{:+.1}%", 100.0 * e)),
            ]),
            None => c.extend(std::iter::repeat_n(String::new(), 3)),
        }
    }
    if study.rows.iter().any(|r| r.reference.is_some()) {
        match &r.reference {
            Some(p) => c.extend([
                p.row.to_string(),
                p.memory.map_or("OOM".into(), |m| format!("{m}")),
                p.train_seconds.map_or("-".into(), |s| format!("{s}")),
            ]),
            None => c.extend(std::iter::repeat_n(String::new(), 3)),
        }
    }
    c
}

fn title(study: &Study) -> String {
    format!(
        "{}: predicted on {}{}{}",
        study.model,
        study.profile.name,
        study
            .profile
            .calibration
            .as_ref()
            .map_or(String::new(), |c| format!(" by the op times of {}", c.source)),
        study
            .measured_on
            .as_ref()
            .map_or(String::new(), |p| format!("; measured on {}", p.name))
    )
}

/// What the predicted times are, then why rows did not compile, one line each.
fn notes(study: &Study) -> String {
    let mut s = String::new();
    // The datasheet profiles assume efficiencies that measured kernels fall well short of.
    if study.profile.calibration.is_none() && study.profile.memory_bytes.is_some() {
        s += &format!(
            "s/iter: {:.0}% of the datasheet compute peak, {:.0}% of its bandwidth: a lower bound \
             (--calibration with `vitdet bench --ops` reports timed on the GPU gives an estimate)\n",
            100.0 * study.profile.compute_efficiency,
            100.0 * study.profile.memory_efficiency
        );
    }
    for (i, r) in study.rows.iter().enumerate() {
        if let Some(e) = &r.error {
            s += &format!("row {}: {e}\n", i + 1);
        }
    }
    s
}

/// Aligned columns.
pub fn to_text(study: &Study) -> String {
    let rows: Vec<Vec<String>> = std::iter::once(header(study))
        .chain(study.rows.iter().map(|r| cells(study, r)))
        .collect();
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut s = title(study) + "\n";
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        s += line.join("  ").trim_end();
        s += "\n";
    }
    s + &notes(study)
}

/// A GitHub-flavoured markdown table.
pub fn to_markdown(study: &Study) -> String {
    let h = header(study);
    let mut s = format!(
        "**{}**\n\n| {} |\n|{}\n",
        title(study),
        h.join(" | "),
        "---|".repeat(h.len())
    );
    for r in &study.rows {
        s += &format!("| {} |\n", cells(study, r).join(" | "));
    }
    let n = notes(study);
    if !n.is_empty() {
        s += "\n";
        s += &n;
    }
    s
}
