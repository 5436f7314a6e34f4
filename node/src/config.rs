//! The node's TOML configuration: every key optional, defaults documented in
//! [`DEFAULT_CONFIG`] (what `veil-node init` writes).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The commented configuration `veil-node init` writes; parsing it gives the defaults.
pub const DEFAULT_CONFIG: &str = r#"# Veil node configuration. Every key is optional; the values shown are the defaults.

# Where the identity key, shards and partial uploads live. A relative path is relative to
# this file's directory.
data_dir = "."

# Addresses to listen on: TCP and QUIC. Port 0 picks a free port.
listen = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]

# Peers to join the network through, e.g. "/ip4/192.0.2.7/tcp/4001". The "/p2p/<peer id>"
# suffix may be omitted.
bootstrap = []

# Addresses peers can dial this node at, when you know them: a forwarded port on your
# router, e.g. "/ip4/203.0.113.5/tcp/4001". Without them the node finds out by itself
# (AutoNAT: peers try to dial it back); behind a NAT it stays reachable through relays and
# upgrades to direct connections by hole punching where the NAT allows.
external_addresses = []

# Relay connections for nodes behind NAT (Circuit Relay v2), within the limits below. Only
# useful on a node others can dial directly.
relay = false
# Peers holding a reservation at once; relayed connections at once and per peer.
relay_max_reservations = 128
relay_max_circuits = 64
relay_max_circuits_per_peer = 16
# Each relayed connection is closed after this many seconds or MiB.
relay_max_circuit_duration_s = 3600
relay_max_circuit_mib = 1024

# Compute backend: "auto" (wgpu on a hardware adapter, else the CPU), "wgpu" or "cpu".
# wgpu needs a build with it: cargo build --release --workspace --features wgpu
backend = "auto"

# Memory, in MiB, the node may give to loaded shards and KV caches. Sessions that would
# exceed it are refused with a clear error.
memory_limit_mib = 4096

# Most inference sessions open at once.
max_sessions = 64

# Sessions without a step for this many seconds are closed and their memory freed.
session_idle_timeout_s = 300

# Largest shard accepted for upload, in MiB.
max_shard_mib = 4096

# Disk, in MiB, that shards and uploads in progress may take together (an upload counts at
# its announced size from its start). An upload that does not fit is refused before its
# first byte, and the deploying client places the shard elsewhere. Default: what the shards
# here take now plus 90% of the data directory's free space when the node starts. Uploads
# also always leave 64 MiB of the disk free.
# max_disk_mib = 20480

# The fraction of max_disk_mib that one peer's uploads may take.
peer_disk_share = 0.5

# An upload without a new chunk for this many seconds is abandoned and its bytes removed.
partial_upload_timeout_s = 3600

# Shards that no session has used for this many hours are removed (least recently used
# first; never one with an open session). 0 keeps them forever.
evict_unused_shards_after_h = 168

# Fairness between peers. A peer over one of these limits gets a clear refusal (Busy or
# RateLimited) while everyone else keeps being served.
# Sessions one peer may hold open at once (a gateway serving many users is one peer).
max_sessions_per_peer = 16
# Requests per second one peer may send (inference and uploads; bursts of up to one
# second's worth; a masked-mode op counts a quarter, since a token takes four per layer).
# A gateway serving many users is one peer: give it room.
max_requests_per_s_per_peer = 500
# Inference requests of one peer waiting for the engine at once.
max_queued_per_peer = 64

# Who may upload shards (deploy_allow) and run sessions (serve_allow), as peer ids. Empty:
# anyone.
deploy_allow = []
serve_allow = []

# The capacity ad is re-published every ad_interval_s seconds and valid for ad_ttl_s.
ad_interval_s = 15
ad_ttl_s = 60

# Requests to other peers fail after this many seconds.
request_timeout_s = 60

# Append every request this node receives to this file (audits and tests).
# record_traffic = "traffic.bin"

# Write the activation payload of every step and masked op this node receives, exactly as
# received, to DIR/<n>.bin (n counts from 0): what a curious operator would keep, for the
# attack suite (`veil attack uniformity DIR`). Off unless set.
# record_payloads = "payloads"

# Serve Prometheus metrics (sessions, steps, batch sizes, step latency, memory, requests by
# outcome, and libp2p's own: connections, Kademlia, gossipsub, identify, ping) on
# http://ADDRESS/metrics. Off unless set; keep it on a private address.
# metrics_listen = "127.0.0.1:9101"

# Artificial delay added to every inference step, in milliseconds: simulates a slower
# machine (tests, latency experiments). Leave at 0 in production.
step_delay_ms = 0

# Testnet only: corrupt this fraction of answers on purpose (noise, zeros, skip-layers or
# replay-stale), to measure clients' verification (`veil-testnet --byzantine`). Clients
# that verify will catch the node, record signed proof of it, and stop using it.
# lie_mode = "noise"
# lie_rate = 0.1
"#;

/// A node's configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub listen: Vec<String>,
    pub bootstrap: Vec<String>,
    pub backend: String,
    pub memory_limit_mib: u64,
    pub max_sessions: u32,
    pub session_idle_timeout_s: u64,
    pub max_shard_mib: u64,
    /// `None`: computed from the free space at start ([`NodeConfig::disk_limit_bytes`]).
    pub max_disk_mib: Option<u64>,
    pub peer_disk_share: f64,
    pub partial_upload_timeout_s: u64,
    pub evict_unused_shards_after_h: u64,
    pub max_sessions_per_peer: u32,
    pub max_requests_per_s_per_peer: u32,
    pub max_queued_per_peer: u32,
    #[serde(skip)]
    pub deploy_allow: Vec<veil_protocol::PeerId>,
    #[serde(skip)]
    pub serve_allow: Vec<veil_protocol::PeerId>,
    pub ad_interval_s: u64,
    pub ad_ttl_s: u32,
    pub request_timeout_s: u64,
    pub record_traffic: Option<PathBuf>,
    pub record_payloads: Option<PathBuf>,
    pub step_delay_ms: u64,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub external_addresses: Vec<String>,
    /// Relay for others within these limits (`relay = true`).
    #[serde(skip)]
    pub relay: Option<veil_protocol::RelayLimits>,
    /// Testnet only: how and how often this node lies.
    #[serde(skip)]
    pub lie: Option<(crate::lie::LieMode, f64)>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        parse_config(DEFAULT_CONFIG, None).expect("the default configuration parses")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Partial {
    data_dir: Option<PathBuf>,
    listen: Option<Vec<String>>,
    bootstrap: Option<Vec<String>>,
    backend: Option<String>,
    memory_limit_mib: Option<u64>,
    max_sessions: Option<u32>,
    session_idle_timeout_s: Option<u64>,
    max_shard_mib: Option<u64>,
    max_disk_mib: Option<u64>,
    peer_disk_share: Option<f64>,
    partial_upload_timeout_s: Option<u64>,
    evict_unused_shards_after_h: Option<u64>,
    max_sessions_per_peer: Option<u32>,
    max_requests_per_s_per_peer: Option<u32>,
    max_queued_per_peer: Option<u32>,
    deploy_allow: Option<Vec<String>>,
    serve_allow: Option<Vec<String>>,
    ad_interval_s: Option<u64>,
    ad_ttl_s: Option<u32>,
    request_timeout_s: Option<u64>,
    record_traffic: Option<PathBuf>,
    record_payloads: Option<PathBuf>,
    step_delay_ms: Option<u64>,
    metrics_listen: Option<String>,
    external_addresses: Option<Vec<String>>,
    relay: Option<bool>,
    relay_max_reservations: Option<usize>,
    relay_max_circuits: Option<usize>,
    relay_max_circuits_per_peer: Option<usize>,
    relay_max_circuit_duration_s: Option<u64>,
    relay_max_circuit_mib: Option<u64>,
    lie_mode: Option<String>,
    lie_rate: Option<f64>,
}

/// Parse a configuration; missing keys take the documented defaults, relative paths are
/// resolved against `base` (the config file's directory).
pub fn parse_config(text: &str, base: Option<&Path>) -> Result<NodeConfig, String> {
    let p: Partial = toml::from_str(text).map_err(|e| e.to_string())?;
    let resolve = |path: PathBuf| match base {
        Some(b) if path.is_relative() => b.join(path),
        _ => path,
    };
    let c = NodeConfig {
        data_dir: resolve(p.data_dir.unwrap_or_else(|| PathBuf::from("."))),
        listen: p.listen.unwrap_or_else(|| {
            vec![
                "/ip4/0.0.0.0/tcp/4001".into(),
                "/ip4/0.0.0.0/udp/4001/quic-v1".into(),
            ]
        }),
        bootstrap: p.bootstrap.unwrap_or_default(),
        backend: p.backend.unwrap_or_else(|| "auto".into()),
        memory_limit_mib: p.memory_limit_mib.unwrap_or(4096),
        max_sessions: p.max_sessions.unwrap_or(64),
        session_idle_timeout_s: p.session_idle_timeout_s.unwrap_or(300),
        max_shard_mib: p.max_shard_mib.unwrap_or(4096),
        max_disk_mib: p.max_disk_mib,
        peer_disk_share: p.peer_disk_share.unwrap_or(0.5),
        partial_upload_timeout_s: p.partial_upload_timeout_s.unwrap_or(3600),
        evict_unused_shards_after_h: p.evict_unused_shards_after_h.unwrap_or(168),
        max_sessions_per_peer: p.max_sessions_per_peer.unwrap_or(16),
        max_requests_per_s_per_peer: p.max_requests_per_s_per_peer.unwrap_or(500),
        max_queued_per_peer: p.max_queued_per_peer.unwrap_or(64),
        deploy_allow: peer_ids("deploy_allow", p.deploy_allow)?,
        serve_allow: peer_ids("serve_allow", p.serve_allow)?,
        ad_interval_s: p.ad_interval_s.unwrap_or(15),
        ad_ttl_s: p.ad_ttl_s.unwrap_or(60),
        request_timeout_s: p.request_timeout_s.unwrap_or(60),
        record_traffic: p.record_traffic.map(resolve),
        record_payloads: p.record_payloads.map(resolve),
        step_delay_ms: p.step_delay_ms.unwrap_or(0),
        metrics_listen: match p.metrics_listen {
            Some(a) => Some(a.parse().map_err(|_| {
                format!("metrics_listen must be an address such as \"127.0.0.1:9101\", not `{a}`")
            })?),
            None => None,
        },
        external_addresses: p.external_addresses.unwrap_or_default(),
        relay: p.relay.unwrap_or(false).then(|| {
            let d = veil_protocol::RelayLimits::default();
            veil_protocol::RelayLimits {
                max_reservations: p.relay_max_reservations.unwrap_or(d.max_reservations),
                max_circuits: p.relay_max_circuits.unwrap_or(d.max_circuits),
                max_circuits_per_peer: p
                    .relay_max_circuits_per_peer
                    .unwrap_or(d.max_circuits_per_peer),
                max_circuit_duration: std::time::Duration::from_secs(
                    p.relay_max_circuit_duration_s.unwrap_or(3600),
                ),
                max_circuit_bytes: p.relay_max_circuit_mib.unwrap_or(1024) << 20,
                ..d
            }
        }),
        lie: match (p.lie_mode, p.lie_rate) {
            (None, None) => None,
            (Some(mode), rate) => {
                let rate = rate.unwrap_or(1.0);
                if !(0.0..=1.0).contains(&rate) {
                    return Err(format!("lie_rate must be within [0, 1], not {rate}"));
                }
                Some((mode.parse()?, rate))
            }
            (None, Some(_)) => return Err("lie_rate needs a lie_mode".into()),
        },
    };
    if !matches!(c.backend.as_str(), "auto" | "wgpu" | "cpu") {
        return Err(format!(
            "backend must be auto, wgpu or cpu, not `{}`",
            c.backend
        ));
    }
    if c.ad_interval_s == 0 || u64::from(c.ad_ttl_s) <= c.ad_interval_s {
        return Err("ad_ttl_s must be longer than ad_interval_s (> 0)".into());
    }
    for a in &c.external_addresses {
        a.parse::<veil_protocol::Multiaddr>().map_err(|e| {
            format!("external_addresses: `{a}` is not an address such as \"/ip4/203.0.113.5/tcp/4001\": {e}")
        })?;
    }
    if let Some(r) = &c.relay {
        if r.max_reservations == 0 || r.max_circuits == 0 || r.max_circuits_per_peer == 0 {
            return Err("relay limits must be positive (or set relay = false)".into());
        }
    }
    if c.max_sessions == 0 || c.memory_limit_mib == 0 {
        return Err("max_sessions and memory_limit_mib must be positive".into());
    }
    positive("max_shard_mib", c.max_shard_mib)?;
    positive("max_disk_mib", c.max_disk_mib.unwrap_or(1))?;
    positive("partial_upload_timeout_s", c.partial_upload_timeout_s)?;
    positive("max_sessions_per_peer", c.max_sessions_per_peer.into())?;
    positive(
        "max_requests_per_s_per_peer",
        c.max_requests_per_s_per_peer.into(),
    )?;
    positive("max_queued_per_peer", c.max_queued_per_peer.into())?;
    if !(c.peer_disk_share > 0.0 && c.peer_disk_share <= 1.0) {
        return Err(format!(
            "peer_disk_share must be within (0, 1], not {}",
            c.peer_disk_share
        ));
    }
    if c.evict_unused_shards_after_h > 24 * 365 * 100 {
        return Err(format!(
            "evict_unused_shards_after_h is {} hours; use 0 to keep shards forever",
            c.evict_unused_shards_after_h
        ));
    }
    Ok(c)
}

fn positive(key: &str, value: u64) -> Result<(), String> {
    if value == 0 {
        return Err(format!("{key} must be positive"));
    }
    Ok(())
}

fn peer_ids(key: &str, ids: Option<Vec<String>>) -> Result<Vec<veil_protocol::PeerId>, String> {
    ids.unwrap_or_default()
        .iter()
        .map(|p| {
            p.parse()
                .map_err(|e| format!("{key}: `{p}` is not a peer id (such as 12D3KooW…): {e}"))
        })
        .collect()
}

impl NodeConfig {
    /// The disk quota: `max_disk_mib`, or what the shards take now (`held`) plus 90% of the
    /// free space (`free`).
    pub fn disk_limit_bytes(&self, held: u64, free: u64) -> u64 {
        match self.max_disk_mib {
            Some(m) => m.saturating_mul(1 << 20),
            None => held.saturating_add(free / 10 * 9),
        }
    }

    /// The shard store's limits, given the disk quota.
    pub fn disk_limits(&self, max_bytes: u64) -> crate::store::DiskLimits {
        crate::store::DiskLimits {
            max_shard_bytes: self.max_shard_mib.saturating_mul(1 << 20),
            max_bytes,
            max_peer_bytes: (max_bytes as f64 * self.peer_disk_share) as u64,
            partial_timeout: std::time::Duration::from_secs(self.partial_upload_timeout_s),
            evict_unused_after: (self.evict_unused_shards_after_h > 0)
                .then(|| std::time::Duration::from_secs(self.evict_unused_shards_after_h * 3600)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_default_is_the_default() {
        let c = parse_config(DEFAULT_CONFIG, None).expect("parse");
        assert_eq!(c, parse_config("", None).expect("empty"));
        assert_eq!(c.max_sessions, 64);
        assert_eq!(c.backend, "auto");
        assert!(c.record_traffic.is_none());
        assert!(c.record_payloads.is_none());
        assert!(c.relay.is_none());
        assert!(c.external_addresses.is_empty());
        assert_eq!(c.max_disk_mib, None);
        assert!(c.deploy_allow.is_empty() && c.serve_allow.is_empty());
    }

    #[test]
    fn fairness_and_disk_settings_are_read_and_out_of_range_values_named() {
        let peer = veil_protocol::Identity::from_secret([4; 32]).peer_id();
        let c = parse_config(
            &format!(
                "max_disk_mib = 100\npeer_disk_share = 0.25\nevict_unused_shards_after_h = 0\n\
                 max_sessions_per_peer = 2\nserve_allow = [\"{peer}\"]"
            ),
            None,
        )
        .expect("parse");
        assert_eq!(c.serve_allow, vec![peer]);
        assert_eq!(c.max_sessions_per_peer, 2);
        let l = c.disk_limits(c.disk_limit_bytes(0, 0));
        assert_eq!((l.max_bytes, l.max_peer_bytes), (100 << 20, 25 << 20));
        assert_eq!(l.evict_unused_after, None);
        // the default quota follows the free space
        let d = NodeConfig::default();
        assert_eq!(d.disk_limit_bytes(5, 1000), 905);
        for (bad, key) in [
            ("max_disk_mib = 0", "max_disk_mib"),
            ("peer_disk_share = 1.5", "peer_disk_share"),
            ("peer_disk_share = 0.0", "peer_disk_share"),
            ("partial_upload_timeout_s = 0", "partial_upload_timeout_s"),
            ("max_sessions_per_peer = 0", "max_sessions_per_peer"),
            (
                "max_requests_per_s_per_peer = 0",
                "max_requests_per_s_per_peer",
            ),
            ("max_queued_per_peer = 0", "max_queued_per_peer"),
            ("deploy_allow = [\"alice\"]", "alice"),
            ("max_disk_mib = -3", "max_disk_mib"),
        ] {
            let e = parse_config(bad, None).expect_err(bad);
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn relay_limits_and_external_addresses_are_read_and_checked() {
        let c = parse_config(
            "relay = true\nrelay_max_circuits = 2\nrelay_max_circuit_mib = 8\n\
             external_addresses = [\"/ip4/203.0.113.5/tcp/4001\"]",
            None,
        )
        .expect("parse");
        let r = c.relay.expect("relay");
        assert_eq!(r.max_circuits, 2);
        assert_eq!(r.max_circuit_bytes, 8 << 20);
        assert_eq!(r.max_reservations, 128);
        assert_eq!(c.external_addresses.len(), 1);
        assert!(
            parse_config("external_addresses = [\"203.0.113.5:4001\"]", None)
                .expect_err("not a multiaddr")
                .contains("203.0.113.5:4001")
        );
        assert!(parse_config("relay = true\nrelay_max_circuits = 0", None).is_err());
    }

    #[test]
    fn relative_paths_follow_the_file_and_bad_values_are_named() {
        let c = parse_config(
            "data_dir = \"d\"\nrecord_traffic = \"t.bin\"",
            Some(Path::new("/etc/veil")),
        )
        .expect("parse");
        assert_eq!(c.data_dir, PathBuf::from("/etc/veil/d"));
        assert_eq!(c.record_traffic, Some(PathBuf::from("/etc/veil/t.bin")));
        assert!(parse_config("backend = \"tpu\"", None)
            .expect_err("bad")
            .contains("tpu"));
        assert!(parse_config("max_sesions = 3", None)
            .expect_err("typo")
            .contains("max_sesions"));
        assert!(parse_config("ad_ttl_s = 5\nad_interval_s = 10", None).is_err());
        assert!(parse_config("metrics_listen = \"localhost\"", None)
            .expect_err("no port")
            .contains("localhost"));
        let m = parse_config("metrics_listen = \"127.0.0.1:9101\"", None).expect("metrics");
        assert_eq!(
            m.metrics_listen,
            Some("127.0.0.1:9101".parse().expect("addr"))
        );
    }
}
