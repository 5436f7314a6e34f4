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

# The capacity ad is re-published every ad_interval_s seconds and valid for ad_ttl_s.
ad_interval_s = 15
ad_ttl_s = 60

# Requests to other peers fail after this many seconds.
request_timeout_s = 60

# Append every request this node receives to this file (audits and tests).
# record_traffic = "traffic.bin"

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
    pub ad_interval_s: u64,
    pub ad_ttl_s: u32,
    pub request_timeout_s: u64,
    pub record_traffic: Option<PathBuf>,
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
    ad_interval_s: Option<u64>,
    ad_ttl_s: Option<u32>,
    request_timeout_s: Option<u64>,
    record_traffic: Option<PathBuf>,
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
        ad_interval_s: p.ad_interval_s.unwrap_or(15),
        ad_ttl_s: p.ad_ttl_s.unwrap_or(60),
        request_timeout_s: p.request_timeout_s.unwrap_or(60),
        record_traffic: p.record_traffic.map(resolve),
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
    Ok(c)
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
        assert!(c.relay.is_none());
        assert!(c.external_addresses.is_empty());
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
