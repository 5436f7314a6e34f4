//! `GET /metrics`: the gateway's Prometheus metrics (prometheus-client, the crate and version
//! libp2p's own metrics use). Names follow llama.cpp's server where they mean the same, so
//! its dashboards carry over: `veil_prompt_tokens_total`, `veil_tokens_predicted_total`,
//! `veil_requests_processing`, `veil_requests_deferred`.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::worker::Served;

/// Request outcomes by endpoint and status code.
type Labels = Vec<(String, String)>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub prompt_tokens: Counter,
    pub tokens_predicted: Counter,
    /// Requests being answered.
    pub processing: Gauge<i64, AtomicI64>,
    /// Requests waiting for a worker.
    pub deferred: Gauge<i64, AtomicI64>,
    pub requests: Family<Labels, Counter>,
    /// From the request's arrival to its first piece of text.
    pub time_to_first_token: Histogram,
    /// Generated tokens per second of each answer, after its first token.
    pub decode_tokens_per_s: Histogram,
    /// Stages that moved to another replica in the middle of an answer.
    pub failovers: Counter,
    /// Bytes sent to nodes and received from them (hidden states and protocol).
    pub node_bytes_sent: Counter,
    pub node_bytes_received: Counter,
    /// This process's resident memory, read when scraped.
    resident_bytes: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("veil");
        let m = Metrics {
            registry: Registry::default(),
            prompt_tokens: Counter::default(),
            tokens_predicted: Counter::default(),
            processing: Gauge::default(),
            deferred: Gauge::default(),
            requests: Family::default(),
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            decode_tokens_per_s: Histogram::new(exponential_buckets(0.5, 2.0, 12)),
            failovers: Counter::default(),
            node_bytes_sent: Counter::default(),
            node_bytes_received: Counter::default(),
            resident_bytes: Gauge::default(),
        };
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "tokens_predicted",
            "Tokens generated",
            m.tokens_predicted.clone(),
        );
        registry.register(
            "requests_processing",
            "Requests being answered",
            m.processing.clone(),
        );
        registry.register(
            "requests_deferred",
            "Requests waiting in the queue",
            m.deferred.clone(),
        );
        registry.register(
            "requests",
            "Requests answered, by endpoint and HTTP status",
            m.requests.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From a request's arrival to its first text",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "decode_tokens_per_second",
            "Generation speed of each answer after its first token",
            m.decode_tokens_per_s.clone(),
        );
        registry.register(
            "failovers",
            "Stages moved to another replica during an answer",
            m.failovers.clone(),
        );
        registry.register(
            "node_bytes_sent",
            "Bytes of requests sent to nodes",
            m.node_bytes_sent.clone(),
        );
        registry.register(
            "node_bytes_received",
            "Bytes of answers received from nodes",
            m.node_bytes_received.clone(),
        );
        registry.register(
            "resident_memory_bytes",
            "Resident memory of the gateway process",
            m.resident_bytes.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Count who served an answer.
    pub fn served(&self, served: &Served) {
        self.failovers.inc_by(u64::from(served.failovers));
        self.node_bytes_sent.inc_by(served.bytes_sent);
        self.node_bytes_received.inc_by(served.bytes_received);
    }

    pub fn count(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&vec![
                ("endpoint".into(), endpoint.into()),
                ("status".into(), status.to_string()),
            ])
            .inc();
    }

    /// Prometheus' text format.
    pub fn render(&self) -> String {
        if let Some(rss) = resident_bytes() {
            self.resident_bytes
                .set(i64::try_from(rss).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // writing into a String cannot fail
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// This process's resident memory (Linux: `VmRSS` of `/proc/self/status`; `None` elsewhere).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Moves a request from deferred to processing when a worker takes it, and out when done.
#[derive(Debug)]
pub struct InFlight<'a> {
    metrics: &'a Metrics,
}

impl<'a> InFlight<'a> {
    pub fn start(metrics: &'a Metrics) -> Self {
        metrics.deferred.dec();
        metrics.processing.inc();
        InFlight { metrics }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.processing.dec();
    }
}
