//! A bench's Markdown summary and its SVG charts: tokens/s against concurrent sessions, with
//! the single-process baselines, and the distribution of per-token latency.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::bench::BenchReport;
use crate::stats::percentile;

/// Throughput chart file name inside the report directory.
pub const THROUGHPUT_SVG: &str = "tokens-per-second.svg";
/// Latency chart file name inside the report directory.
pub const LATENCY_SVG: &str = "per-token-latency.svg";

/// The Markdown summary (also what `bench` prints).
pub fn markdown(r: &BenchReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Veil testnet bench\n\n{} on {} nodes ({} stages × {} replicas), {} prompt + {} \
         generated tokens per session, {} CPU cores, deploy {:.1} s.\n",
        r.model, r.nodes, r.stages, r.replicas, r.prompt_tokens, r.gen_tokens, r.cpus, r.deploy_s
    );
    let plain = r.baseline("plaintext, 1 process").map(|b| b.tokens_per_s);
    let enc = r.baseline("encrypted, 1 process").map(|b| b.tokens_per_s);
    let ratio = |x: f64, base: Option<f64>| match base {
        Some(b) if b > 0.0 => format!("{:.2}", x / b),
        _ => "-".into(),
    };
    s.push_str(
        "| sessions | done/failed | tokens/s | vs plaintext | vs encrypted | TTFT p50 ms | \
         per-token p50 / p95 / p99 ms | bytes/token |\n|---|---|---|---|---|---|---|---|\n",
    );
    for l in &r.levels {
        let _ = writeln!(
            s,
            "| {} | {}/{} | {:.1} | {} | {} | {:.0} | {:.1} / {:.1} / {:.1} | {:.0} |",
            l.sessions,
            l.completed,
            l.failed,
            l.tokens_per_s,
            ratio(l.tokens_per_s, plain),
            ratio(l.tokens_per_s, enc),
            l.time_to_first_token.p50_ms,
            l.per_token.p50_ms,
            l.per_token.p95_ms,
            l.per_token.p99_ms,
            l.bytes_per_token
        );
    }
    if !r.baselines.is_empty() {
        s.push_str(
            "\n| single process (same prompts, one at a time) | tokens/s | TTFT p50 ms | \
             per-token p50 / p95 / p99 ms |\n|---|---|---|---|\n",
        );
        for b in &r.baselines {
            let _ = writeln!(
                s,
                "| {} | {:.1} | {:.0} | {:.1} / {:.1} / {:.1} |",
                b.name,
                b.tokens_per_s,
                b.time_to_first_token.p50_ms,
                b.per_token.p50_ms,
                b.per_token.p95_ms,
                b.per_token.p99_ms
            );
        }
    }
    if let Some(g) = &r.gateway {
        s.push_str(
            "\n| through the gateway (`veil serve`, HTTP + SSE) | tokens/s | vs in-process | \
             TTFT p50 ms | added TTFT ms |\n|---|---|---|---|---|\n",
        );
        for l in &g.levels {
            let _ = writeln!(
                s,
                "| {} session(s) | {:.1} | {} | {:.0} | {:+.1} |",
                l.sessions,
                l.tokens_per_s,
                ratio(l.tokens_per_s, Some(l.in_process_tokens_per_s)),
                l.time_to_first_token.p50_ms,
                l.time_to_first_token.p50_ms - l.in_process_ttft_p50_ms
            );
        }
        let _ = writeln!(
            s,
            "\nAn idle connection costs the gateway {:.1} KiB of resident memory.",
            g.idle_connection_bytes / 1024.0
        );
    }
    if let Some(top) = r.levels.last() {
        let _ = writeln!(
            s,
            "\nPer node at {} session(s):\n\n| node | busy | steps | forward passes | sent | \
             received |\n|---|---|---|---|---|---|",
            top.sessions
        );
        for n in &top.nodes {
            let _ = writeln!(
                s,
                "| {} | {:.0}% ({} ms) | {} | {} | {:.1} KiB | {:.1} KiB |",
                n.node,
                n.busy_fraction * 100.0,
                n.busy_ms,
                n.steps,
                n.batches,
                n.bytes_sent as f64 / 1024.0,
                n.bytes_received as f64 / 1024.0
            );
        }
    }
    wan_section(r, &mut s);
    simulated_section(r, &mut s);
    s
}

fn wan_section(r: &BenchReport, s: &mut String) {
    let Some(w) = &r.wan else { return };
    let _ = writeln!(
        s,
        "
On a WAN (network namespaces on this machine; every uplink {} Mbit/s, jitter ±{} \
         ms): the client behind its own NAT ({}), {} ms one way to the switch.\n\n| node | NAT | \
         uplink ms | reached |\n|---|---|---|---|",
        w.rate_mbit, w.jitter_ms, w.client_nat, w.client_delay_ms
    );
    for n in &w.nodes {
        let reached = match (n.nat.as_str(), n.relayed) {
            ("public", _) => "directly (bootstrap, relay)",
            (_, true) => "through a relay",
            (_, false) => "hole punched",
        };
        let _ = writeln!(s, "| {} | {} | {} | {reached} |", n.node, n.nat, n.delay_ms);
    }
    if let Some(c) = &w.connections {
        let _ = writeln!(
            s,
            "
The client's connections at the end: {} direct, {} relayed; {} holes punched, \
             {} punches failed.",
            c.direct_connections, c.relayed_connections, c.hole_punches, c.hole_punch_failures
        );
    }
}

fn simulated_section(r: &BenchReport, s: &mut String) {
    if r.simulated.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nThe simulator on the same network (`veil-testnet simulate`'s model: this run's \
         plaintext cost per layer, the default hop cost, the links above), beside the \
         measurement:\n\n{}",
        crate::calibrate::table(&r.simulated)
    );
}

/// Write `bench.md`, `bench.json` and the two charts into `dir`.
pub fn write(r: &BenchReport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    throughput_chart(r, &dir.join(THROUGHPUT_SVG))?;
    latency_chart(r, &dir.join(LATENCY_SVG))?;
    let mut md = markdown(r);
    let _ = write!(
        md,
        "\n![tokens per second]({THROUGHPUT_SVG})\n\n![per-token latency]({LATENCY_SVG})\n"
    );
    std::fs::write(dir.join("bench.md"), md)?;
    std::fs::write(dir.join("bench.json"), serde_json::to_vec_pretty(r)?)?;
    Ok(())
}

fn chart_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot draw a chart: {e}")
}

type Chart<'a> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draw the legend and write the file.
fn finish(chart: &mut Chart<'_>, root: &DrawingArea<SVGBackend<'_>, Shift>) -> Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(chart_error)?;
    root.present().map_err(chart_error)?;
    Ok(())
}

/// Tokens/s of the network at each session count, with the baselines as flat lines.
pub fn throughput_chart(r: &BenchReport, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_error)?;
    let max_s = r.levels.iter().map(|l| l.sessions).max().unwrap_or(1) as f64;
    let max_y = r
        .levels
        .iter()
        .map(|l| l.tokens_per_s)
        .chain(r.baselines.iter().map(|b| b.tokens_per_s))
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Aggregate tokens/s vs concurrent sessions",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.5f64..max_s + 0.5, 0f64..max_y)
        .map_err(chart_error)?;
    chart
        .configure_mesh()
        .x_desc("concurrent sessions")
        .y_desc("generated tokens/s")
        .draw()
        .map_err(chart_error)?;
    let points: Vec<(f64, f64)> = r
        .levels
        .iter()
        .map(|l| (l.sessions as f64, l.tokens_per_s))
        .collect();
    chart
        .draw_series(LineSeries::new(points.clone(), BLUE.stroke_width(2)))
        .map_err(chart_error)?
        .label("encrypted network")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))
        .map_err(chart_error)?;
    for (b, color) in r.baselines.iter().zip([GREEN, RED]) {
        chart
            .draw_series(LineSeries::new(
                vec![(0.5, b.tokens_per_s), (max_s + 0.5, b.tokens_per_s)],
                color.stroke_width(1),
            ))
            .map_err(chart_error)?
            .label(b.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    finish(&mut chart, &root)
}

/// The cumulative distribution of per-token latency at each session count.
pub fn latency_chart(r: &BenchReport, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_error)?;
    let all: Vec<f64> = r
        .levels
        .iter()
        .flat_map(|l| l.per_token_ms.iter().copied())
        .collect();
    let max_x = percentile(&all, 99.5).unwrap_or(1.0).max(1.0) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("Per-token latency (CDF)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..max_x, 0f64..100f64)
        .map_err(chart_error)?;
    chart
        .configure_mesh()
        .x_desc("milliseconds between tokens")
        .y_desc("% of tokens")
        .draw()
        .map_err(chart_error)?;
    for (i, l) in r.levels.iter().enumerate() {
        let mut v = l.per_token_ms.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        let points: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .map(|(k, &x)| (x.min(max_x), (k + 1) as f64 / n * 100.0))
            .collect();
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(chart_error)?
            .label(format!("{} session(s)", l.sessions))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    finish(&mut chart, &root)
}
