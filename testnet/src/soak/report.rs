//! The soak's report: a Markdown summary (also printed), the JSON of every sample, and SVG
//! charts of each node's memory and disk over time beside their bounds.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use super::{NodeSeries, SoakReport};

/// Memory chart file name inside the report directory.
pub const MEMORY_SVG: &str = "soak-memory.svg";
/// Disk chart file name inside the report directory.
pub const DISK_SVG: &str = "soak-disk.svg";

pub fn markdown(r: &SoakReport) -> String {
    let mut s = String::new();
    let l = &r.limits;
    let _ = writeln!(
        s,
        "# Veil testnet soak\n\n{} on {} nodes for {:.0} s, {}; limits: memory_limit_mib {}, \
         max_disk_mib {}, partial_upload_timeout_s {}, session_idle_timeout_s {}, \
         max_sessions_per_peer {}, max_requests_per_s_per_peer {}, max_queued_per_peer {}.\n",
        r.model,
        r.nodes,
        r.duration_s,
        if r.abuse {
            "abusive peers running throughout"
        } else {
            "no abusive peers"
        },
        l.memory_limit_mib,
        l.max_disk_mib,
        l.partial_upload_timeout_s,
        l.session_idle_timeout_s,
        l.max_sessions_per_peer,
        l.max_requests_per_s_per_peer,
        l.max_queued_per_peer
    );
    let ratio = if r.p99_calm_ms > 0.0 {
        r.p99_soak_ms / r.p99_calm_ms
    } else {
        0.0
    };
    let _ = writeln!(
        s,
        "Normal generations: {} run, {} completed, {} identical to the fault-free run. \
         Per-token latency p99: {:.1} ms fault-free, {:.1} ms during the soak ({:.2}x; target \
         ≤ 2x: {}).\n",
        r.generations,
        r.completed,
        r.identical,
        r.p99_calm_ms,
        r.p99_soak_ms,
        ratio,
        if ratio <= 2.0 { "met" } else { "missed" }
    );
    s.push_str(
        "| node | RSS idle / max MiB | RSS trend after warm-up | disk max MiB | open files max | \
         sessions left | partial uploads left |\n|---|---|---|---|---|---|---|\n",
    );
    for n in &r.series {
        let _ = writeln!(
            s,
            "| {} | {:.0} / {:.0} | {} | {:.1} | {} | {} | {} |",
            n.name,
            n.idle_rss_mib,
            n.max_rss_mib,
            n.rss_slope_mib_per_h
                .map_or("-".into(), |v| format!("{v:+.1} MiB/h")),
            n.max_disk_mib,
            n.max_open_files,
            n.sessions_left.map_or("?".into(), |v| v.to_string()),
            n.partial_uploads_left
        );
    }
    if !r.abusers.is_empty() {
        s.push_str("\n| abuser | requests | answers |\n|---|---|---|\n");
        for (kind, c) in &r.abusers {
            let answers: Vec<String> = c.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(s, "| {kind} | {} | {} |", c.requests, answers.join(", "));
        }
    }
    s.push_str("\n| check | result | detail |\n|---|---|---|\n");
    for c in &r.checks {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            c.what,
            if c.passed { "pass" } else { "**FAIL**" },
            c.detail
        );
    }
    if r.series.iter().all(|n| n.rss_slope_mib_per_h.is_none()) {
        let _ = writeln!(
            s,
            "\nNo memory trend: the run after its warm-up (the first fifth) was shorter than {} \
             s.",
            super::MIN_TREND_S
        );
    }
    for e in r.errors.iter().take(5) {
        let _ = writeln!(s, "\nfailed generation: {e}");
    }
    s
}

/// soak.md, soak.json and the two charts into `dir`.
pub fn write(r: &SoakReport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("soak.md"), markdown(r))?;
    std::fs::write(dir.join("soak.json"), serde_json::to_vec_pretty(r)?)?;
    chart(
        &r.series,
        &dir.join(MEMORY_SVG),
        "Resident memory of each node",
        "MiB",
        (r.limits.memory_limit_mib + r.limits.rss_allowance_mib) as f64,
        "bound: memory_limit_mib + process allowance",
        |x| x.rss_mib,
    )?;
    chart(
        &r.series,
        &dir.join(DISK_SVG),
        "Disk of each node's shards and uploads",
        "MiB",
        r.limits.max_disk_mib as f64,
        "max_disk_mib",
        |x| x.disk_mib,
    )?;
    Ok(())
}

fn chart_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the chart: {e}")
}

fn chart(
    series: &[NodeSeries],
    path: &Path,
    title: &str,
    unit: &str,
    bound: f64,
    bound_label: &str,
    value: impl Fn(&super::Sample) -> f64,
) -> Result<()> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_error)?;
    let max_t = series
        .iter()
        .flat_map(|s| s.samples.iter().map(|x| x.t_s))
        .fold(1.0f64, f64::max);
    let max_y = series
        .iter()
        .flat_map(|s| s.samples.iter().map(&value))
        .fold(bound, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..max_t, 0f64..max_y)
        .map_err(chart_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(unit)
        .draw()
        .map_err(chart_error)?;
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, bound), (max_t, bound)],
            RED.stroke_width(1),
        ))
        .map_err(chart_error)?
        .label(bound_label)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.samples.iter().map(|x| (x.t_s, value(x))),
                color.stroke_width(2),
            ))
            .map_err(chart_error)?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(chart_error)?;
    root.present().map_err(chart_error)?;
    Ok(())
}
