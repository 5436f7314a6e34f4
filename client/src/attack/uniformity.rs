//! `veil attack uniformity DIR`: what nodes recorded (`record_payloads`, or
//! `veil-testnet --record DIR`), tested byte lane by byte lane against the uniform
//! distribution. Masked words pass (they are uniform whatever the prompt); rotated hidden
//! states, f32 numbers, fail at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use veil_model::attack::masked::{uniformity, LaneTest};

#[derive(Args, Debug, Clone)]
pub struct UniformityArgs {
    /// A directory of recorded payloads: `<n>.bin` files, directly or one directory per
    /// node.
    pub dir: PathBuf,
    /// A lane fails below this p-value (each node's four lanes are tested separately).
    #[arg(long, default_value_t = 1e-3)]
    pub alpha: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct NodeReport {
    node: String,
    payloads: usize,
    words: usize,
    lanes: [LaneTest; 4],
    uniform: bool,
}

#[derive(Serialize)]
struct Report {
    alpha: f64,
    nodes: Vec<NodeReport>,
    /// Every lane of every node passed.
    uniform: bool,
}

/// Every `.bin` under `dir`, grouped by the directory holding it.
fn payloads(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<PathBuf>>> {
    let mut found: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in
            std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "bin") {
                found.entry(d.clone()).or_default().push(path);
            }
        }
    }
    Ok(found)
}

pub fn run(args: &UniformityArgs) -> Result<()> {
    let groups = payloads(&args.dir)?;
    if groups.is_empty() {
        bail!(
            "no recorded payloads (*.bin) under {}: record some with `veil-testnet up --record \
             DIR` or a node's record_payloads",
            args.dir.display()
        );
    }
    let mut nodes = Vec::new();
    for (dir, files) in groups {
        let mut words = Vec::new();
        for f in &files {
            let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
            words.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        let lanes = uniformity(&words);
        let node = dir
            .strip_prefix(&args.dir)
            .ok()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| ".".to_string(), |p| p.display().to_string());
        nodes.push(NodeReport {
            node,
            payloads: files.len(),
            words: words.len(),
            uniform: words.len() >= 256 * 5 && lanes.iter().all(|l| l.p >= args.alpha),
            lanes,
        });
    }
    let report = Report {
        alpha: args.alpha,
        uniform: nodes.iter().all(|n| n.uniform),
        nodes,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("| node | payloads | words | p of byte lanes 0-3 (chi-square, 255 dof) | uniform |");
    println!("|---|---|---|---|---|");
    for n in &report.nodes {
        let p: Vec<String> = n.lanes.iter().map(|l| format!("{:.3}", l.p)).collect();
        println!(
            "| {} | {} | {} | {} | {} |",
            n.node,
            n.payloads,
            n.words,
            p.join(" "),
            if n.uniform { "yes" } else { "no" }
        );
    }
    println!(
        "{}",
        if report.uniform {
            format!(
                "every lane of every node is consistent with uniform bytes (p ≥ {})",
                args.alpha
            )
        } else {
            format!(
                "NOT uniform: some lane has p < {} (or too few words to test): the payloads \
                 carry structure a node can read",
                args.alpha
            )
        }
    );
    Ok(())
}
