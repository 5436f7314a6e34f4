//! `veil-testnet wan`: a WAN topology with nodes on it, left up for a person to use from the
//! client's namespace (`ip netns exec <client> veil …`), removed on ctrl-c.

use anyhow::{bail, Context, Result};

use super::{Host, NatKind, Wan, WanOptions};
use crate::cluster::{start_nodes_on, NodeProcess, NodeSettings};

/// A WAN with nodes running; dropping it stops the nodes and removes the topology.
pub struct WanNetwork {
    /// Dropped first: the nodes stop before their namespaces go.
    pub nodes: Vec<NodeProcess>,
    /// Where each node runs.
    pub hosts: Vec<Host>,
    pub wan: Wan,
    _root: tempfile::TempDir,
}

/// `5-40` or `20`: a delay range in milliseconds.
pub fn parse_delay(s: &str) -> std::result::Result<(u32, u32), String> {
    let bad = || format!("`{s}` is not a delay in ms (`20`) or a range (`5-40`)");
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (s.trim(), s.trim()),
    };
    let (a, b): (u32, u32) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if a > b {
        return Err(format!("the delay range {a}-{b} runs backwards"));
    }
    Ok((a, b))
}

/// Start a node on each public host of `wan` (`boot` first, the others bootstrapping from
/// it; both relay for the nodes at home) and, with `home_nodes`, one in each home network
/// after them. Returns the nodes and where each runs.
pub fn start_nodes(
    root: &std::path::Path,
    wan: &Wan,
    home_nodes: bool,
    settings: &NodeSettings,
) -> Result<(Vec<NodeProcess>, Vec<Host>)> {
    let mut hosts = vec![wan.boot.clone(), wan.relay.clone()];
    if home_nodes {
        hosts.extend(wan.homes.iter().cloned());
    }
    let places: Vec<_> = hosts.iter().map(Host::place).collect();
    let settings = NodeSettings {
        relays: 2,
        ..settings.clone()
    };
    let nodes = start_nodes_on(root, &places, &settings)?;
    Ok((nodes, hosts))
}

impl WanNetwork {
    /// Build the WAN and start a node on each public host (`boot` first, the others
    /// bootstrapping from it) and, with `home_nodes`, one in each home network.
    pub fn start(opts: &WanOptions, home_nodes: bool, settings: &NodeSettings) -> Result<Self> {
        if opts.homes.is_empty() && home_nodes {
            bail!("--home-nodes needs at least one home network");
        }
        let wan = Wan::build(opts)?;
        let root = tempfile::Builder::new()
            .prefix("veil-testnet-wan-")
            .tempdir()
            .context("cannot make a directory for the nodes")?;
        crate::cleanup::add_dir(root.path().to_path_buf());
        let (nodes, hosts) = start_nodes(root.path(), &wan, home_nodes, settings)?;
        Ok(WanNetwork {
            nodes,
            hosts,
            wan,
            _root: root,
        })
    }

    /// The bootstrap address (the node on `boot`).
    pub fn bootstrap(&self) -> Option<&str> {
        self.nodes.first().and_then(|n| n.addr.as_deref())
    }

    /// What is where, and how to use it, for a person.
    pub fn describe(&self) -> String {
        let nat = |k: Option<NatKind>| match k {
            None => "public".to_string(),
            Some(NatKind::EndpointIndependent) => "behind an endpoint-independent NAT".into(),
            Some(NatKind::Symmetric) => "behind a symmetric NAT".into(),
        };
        let mut out = String::from("WAN up (one-way delay per uplink, both directions):\n");
        for (h, n) in self.hosts.iter().zip(&self.nodes) {
            out.push_str(&format!(
                "  {:<7} {:<12} {}, {} ms ±{} ms, {} Mbit/s; node {}{}\n",
                h.name,
                h.addr,
                nat(h.nat),
                h.link.delay_ms,
                h.link.jitter_ms,
                h.link.rate_mbit,
                n.peer_id,
                if h.nat.is_some() {
                    " (reached through the relays, then directly where a hole can be punched)"
                } else {
                    " (relays for the nodes at home)"
                },
            ));
        }
        let c = &self.wan.client;
        out.push_str(&format!(
            "  client  {:<12} {}, {} ms; namespace {}\n\nFrom the client's side:\n",
            c.addr,
            nat(c.nat),
            c.link.delay_ms,
            c.ns
        ));
        let boot = self.bootstrap().unwrap_or("?");
        for cmd in [
            format!("veil peers --bootstrap {boot}"),
            format!("veil deploy --model smollm2 --bootstrap {boot}"),
            "veil chat --deployment <id printed by deploy>".to_string(),
        ] {
            out.push_str(&format!("  ip netns exec {} {cmd}\n", c.ns));
        }
        out
    }
}
