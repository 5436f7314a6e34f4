//! The simulator beside the measurement: after a bench, the same network (stages, replicas,
//! placement, each machine's link, which connections go through a relay) and the same
//! session counts are simulated with per-layer costs from the bench's own single-process
//! run, so that `simulate`'s projections can be checked against what was measured.
//!
//! Nothing here is fitted to the networked levels: a hop's fixed cost is the simulator's
//! default (measured on loopback on another day), the links' delays are what the topology
//! was built with.

use serde::{Deserialize, Serialize};
use veil_protocol::ReachStatus;

use crate::bench::BenchReport;
use crate::network::LocalNetwork;
use crate::sim::{simulate, Links, SimParams};
use crate::stats::Latency;
use crate::wan::NatKind;

/// One node of a WAN bench: where it ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WanNode {
    pub node: String,
    pub peer: String,
    /// `public`, `endpoint-independent` or `symmetric`.
    pub nat: String,
    /// One-way delay of its uplink, ms.
    pub delay_ms: u32,
    /// Whether the client reaches it only through a relay.
    pub relayed: bool,
}

/// The topology a bench ran on, when it was a WAN.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WanReport {
    pub client_delay_ms: u32,
    pub client_nat: String,
    pub jitter_ms: u32,
    pub rate_mbit: u32,
    pub nodes: Vec<WanNode>,
    /// The bench client's connections at the end: hole punches, relayed and direct ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<ReachStatus>,
}

fn nat_name(k: Option<NatKind>) -> &'static str {
    match k {
        None => "public",
        Some(NatKind::EndpointIndependent) => "endpoint-independent",
        Some(NatKind::Symmetric) => "symmetric",
    }
}

/// Whether the client at `client` reaches a node behind `node` only through a relay: hole
/// punching needs both NATs to keep one mapping per port.
fn relayed(client: Option<NatKind>, node: Option<NatKind>) -> bool {
    node == Some(NatKind::Symmetric) || (node.is_some() && client == Some(NatKind::Symmetric))
}

/// The WAN `network` ran on, if it ran on one.
pub fn wan_report(network: &LocalNetwork, connections: Option<ReachStatus>) -> Option<WanReport> {
    let wan = network.wan.as_ref()?;
    let client = &wan.client;
    let nodes = network
        .nodes
        .iter()
        .zip(&network.hosts)
        .filter_map(|(n, h)| {
            let h = h.as_ref()?;
            Some(WanNode {
                node: n.name.clone(),
                peer: n.peer_id.clone(),
                nat: nat_name(h.nat).into(),
                delay_ms: h.link.delay_ms,
                relayed: relayed(client.nat, h.nat),
            })
        })
        .collect();
    Some(WanReport {
        client_delay_ms: client.link.delay_ms,
        client_nat: nat_name(client.nat).into(),
        jitter_ms: client.link.jitter_ms,
        rate_mbit: client.link.rate_mbit,
        nodes,
        connections,
    })
}

/// One session count, measured and simulated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Simulated {
    pub sessions: usize,
    pub measured_tokens_per_s: f64,
    pub simulated_tokens_per_s: f64,
    pub measured_per_token: Latency,
    pub simulated_per_token: Latency,
}

impl Simulated {
    /// Simulated over measured tokens/s.
    pub fn ratio(&self) -> f64 {
        self.simulated_tokens_per_s / self.measured_tokens_per_s.max(1e-9)
    }
}

/// The simulator's parameters for the network a bench ran on: this run's plaintext
/// per-layer costs, the deployment's stages and replicas, and the links (zero on loopback).
pub fn sim_params(r: &BenchReport, network: &LocalNetwork) -> SimParams {
    let measured = r.sim_params(&SimParams::default());
    let stages = network.deployment.stages.len().max(1);
    let replicas = network.min_replicas().max(1);
    // simulated node `i` holds stage `i % stages`: replica `i / stages` of it
    let mut node_ms = Vec::new();
    let mut relayed_to = Vec::new();
    for i in 0..stages * replicas {
        let peer = network.deployment.stages[i % stages]
            .replicas
            .get(i / stages)
            .map(|rep| rep.peer.clone());
        let host = peer.and_then(|p| {
            network
                .nodes
                .iter()
                .zip(&network.hosts)
                .find(|(n, _)| n.peer_id == p)
                .and_then(|(_, h)| h.clone())
        });
        node_ms.push(host.as_ref().map_or(0.0, |h| f64::from(h.link.delay_ms)));
        let client_nat = network.wan.as_ref().and_then(|w| w.client.nat);
        relayed_to.push(host.is_some_and(|h| relayed(client_nat, h.nat)));
    }
    let links = match &network.wan {
        Some(w) => Links {
            client_ms: f64::from(w.client.link.delay_ms),
            node_ms,
            relayed: relayed_to,
            // a client reaches a node through one of the two relays: their mean
            relay_ms: f64::from(w.boot.link.delay_ms + w.relay.link.delay_ms) / 2.0,
        },
        None => Links {
            node_ms: vec![0.0; stages * replicas],
            relayed: vec![false; stages * replicas],
            ..Links::default()
        },
    };
    SimParams {
        nodes: stages * replicas,
        layers: r.layers,
        layers_per_node: r.layers.div_ceil(stages),
        prompt_tokens: r.prompt_tokens,
        gen_tokens: r.gen_tokens,
        pass_ms_per_layer: measured.pass_ms_per_layer,
        row_ms_per_layer: measured.row_ms_per_layer,
        row_bytes: measured.row_bytes,
        // not fitted to the networked levels: the default, measured on loopback
        hop_overhead_ms: SimParams::default().hop_overhead_ms,
        // one machine: every node runs at the same speed, and a forward pass takes its
        // cores, so the nodes take turns
        speed_sigma: 0.0,
        machine_passes: 1,
        links: Some(links),
        bandwidth_mbit: network
            .wan
            .as_ref()
            .map_or(1e6, |w| f64::from(w.client.link.rate_mbit)),
        duration_s: 60.0,
        warmup_s: 10.0,
        ..SimParams::default()
    }
}

/// Simulate every level of `r` with `params`.
pub fn compare(r: &BenchReport, params: &SimParams) -> Vec<Simulated> {
    r.levels
        .iter()
        .map(|l| {
            let s = simulate(&SimParams {
                sessions: l.sessions,
                ..params.clone()
            });
            Simulated {
                sessions: l.sessions,
                measured_tokens_per_s: l.tokens_per_s,
                simulated_tokens_per_s: s.tokens_per_s,
                measured_per_token: l.per_token,
                simulated_per_token: s.per_token,
            }
        })
        .collect()
}

/// The bench's own network simulated again at its session counts, with another `relay`
/// and `routing` (`simulate --from bench.json --same-network`).
pub fn same_network(
    r: &BenchReport,
    relay: crate::sim::Relay,
    routing: crate::sim::Routing,
) -> Option<(SimParams, Vec<Simulated>)> {
    let params = SimParams {
        relay,
        routing,
        ..r.sim_params.clone()?
    };
    let rows = compare(r, &params);
    Some((params, rows))
}

/// Measured beside simulated, one Markdown row per session count.
pub fn table(rows: &[Simulated]) -> String {
    let mut s = String::from(
        "| sessions | measured tokens/s | simulated | simulated / measured | per-token p50 ms \
         measured / simulated |\n|---|---|---|---|---|\n",
    );
    for l in rows {
        s.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.1} / {:.1} |\n",
            l.sessions,
            l.measured_tokens_per_s,
            l.simulated_tokens_per_s,
            l.ratio(),
            l.measured_per_token.p50_ms,
            l.simulated_per_token.p50_ms
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_symmetric_nats_need_a_relay() {
        use NatKind::*;
        assert!(!relayed(Some(EndpointIndependent), None));
        assert!(!relayed(
            Some(EndpointIndependent),
            Some(EndpointIndependent)
        ));
        assert!(relayed(Some(EndpointIndependent), Some(Symmetric)));
        assert!(relayed(Some(Symmetric), Some(EndpointIndependent)));
        assert!(!relayed(Some(Symmetric), None));
    }
}
