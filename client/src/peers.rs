//! `veil peers`: the verified capacity ads of the network.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use veil_protocol::ad::now_ms;

use crate::net::{Client, NetArgs};

#[derive(Args, Debug)]
pub struct PeersArgs {
    #[command(flatten)]
    pub net: NetArgs,
    /// Seconds to listen for ads beyond what the bootstrap peers already know.
    #[arg(long, default_value_t = 3)]
    pub wait: u64,
    /// Print a JSON list (one object per peer) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct PeerRow {
    peer_id: String,
    addrs: Vec<String>,
    /// public, private (reachable through relays), unreachable (private, no relay) or
    /// unknown, as the node's AutoNAT found.
    reachability: String,
    backend: String,
    adapter: String,
    free_memory_mib: u64,
    throughput_gflops: f64,
    shards: Vec<String>,
    active_sessions: u32,
    max_sessions: u32,
    version: String,
    age_s: f64,
}

/// A node's reachability as its ad tells it: `private` with no relayed address means no
/// one can reach it.
fn reach_label(ad: &veil_protocol::CapacityAd) -> String {
    let relayed = ad.addrs.iter().any(|a| a.contains("/p2p-circuit"));
    match ad.reachability {
        veil_protocol::Reachability::Private if !relayed => "unreachable".into(),
        r => r.to_string(),
    }
}

pub fn run(args: PeersArgs) -> Result<()> {
    let mut client = Client::connect(&args.net)?;
    let book = client.discover(Duration::from_secs(args.wait), usize::MAX);
    let now = now_ms();
    let rows: Vec<PeerRow> = book
        .ads(now)
        .into_iter()
        .map(|(_, ad)| PeerRow {
            reachability: reach_label(&ad),
            peer_id: ad.peer_id,
            addrs: ad.addrs,
            backend: ad.backend,
            adapter: ad.adapter,
            free_memory_mib: ad.free_memory_bytes >> 20,
            throughput_gflops: ad.throughput_gflops,
            shards: ad.shards,
            active_sessions: ad.active_sessions,
            max_sessions: ad.max_sessions,
            version: ad.version,
            age_s: now.saturating_sub(ad.timestamp_ms) as f64 / 1000.0,
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<54} {:<8} {:<5} {:>9} {:>8} {:>6} {:>9}  adapter",
        "peer", "reach", "back", "free MiB", "GFLOP/s", "shards", "sessions"
    );
    for r in &rows {
        println!(
            "{:<54} {:<8} {:<5} {:>9} {:>8.1} {:>6} {:>4}/{:<4}  {}",
            r.peer_id,
            r.reachability,
            r.backend,
            r.free_memory_mib,
            r.throughput_gflops,
            r.shards.len(),
            r.active_sessions,
            r.max_sessions,
            r.adapter
        );
    }
    if rows.is_empty() {
        tracing::warn!("no verified capacity ads yet (nodes publish every few seconds)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_node_without_a_relayed_address_is_unreachable() {
        let mut ad = veil_protocol::CapacityAd {
            peer_id: String::new(),
            addrs: vec!["/ip4/10.0.0.2/tcp/4001".into()],
            reachability: veil_protocol::Reachability::Private,
            backend: "cpu".into(),
            adapter: String::new(),
            free_memory_bytes: 0,
            free_disk_bytes: 0,
            throughput_gflops: 0.0,
            shards: vec![],
            active_sessions: 0,
            max_sessions: 1,
            version: String::new(),
            timestamp_ms: 0,
            ttl_s: 1,
        };
        assert_eq!(reach_label(&ad), "unreachable");
        ad.addrs
            .push("/ip4/203.0.113.5/tcp/4001/p2p/12D3KooWRelay/p2p-circuit".into());
        assert_eq!(reach_label(&ad), "private");
        ad.reachability = veil_protocol::Reachability::Public;
        ad.addrs.truncate(1);
        assert_eq!(reach_label(&ad), "public");
    }
}
