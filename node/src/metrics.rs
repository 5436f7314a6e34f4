//! `metrics_listen`: the node's Prometheus metrics on `GET /metrics` (off by default). The
//! engine's figures are read from its status board when scraped; requests are counted as
//! they are answered.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use veil_protocol::wire::{ErrorCode, InferResponse};

use crate::engine::{Status, StatusBoard};

type Labels = Vec<(String, String)>;

pub struct NodeMetrics {
    registry: Registry,
    board: StatusBoard,
    requests: Family<Labels, Counter>,
    step_seconds: Histogram,
    sessions: Gauge,
    reserved_bytes: Gauge,
    shards_loaded: Gauge,
    largest_batch: Gauge,
    steps: Counter,
    batches: Counter,
    busy_seconds: Counter<f64, AtomicU64>,
    /// The board's figures at the last scrape (counters advance by the difference).
    last: Mutex<Status>,
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMetrics").finish_non_exhaustive()
    }
}

/// A response's outcome label: `ok`, or its error code in snake case.
fn outcome(r: &InferResponse) -> &'static str {
    match r {
        InferResponse::Error { code, .. } => match code {
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::UnknownShard => "unknown_shard",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Busy => "busy",
            ErrorCode::ContextFull => "context_full",
            ErrorCode::Internal => "internal",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NoSpace => "no_space",
        },
        _ => "ok",
    }
}

impl NodeMetrics {
    pub fn new(board: StatusBoard) -> Self {
        let mut registry = Registry::with_prefix("veil_node");
        let m = NodeMetrics {
            registry: Registry::default(),
            board,
            requests: Family::default(),
            step_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            sessions: Gauge::default(),
            reserved_bytes: Gauge::default(),
            shards_loaded: Gauge::default(),
            largest_batch: Gauge::default(),
            steps: Counter::default(),
            batches: Counter::default(),
            busy_seconds: Counter::default(),
            last: Mutex::new(Status::default()),
        };
        let r = &mut registry;
        r.register(
            "requests",
            "Inference requests answered, by kind (open, step, close, stats) and outcome (ok or the error)",
            m.requests.clone(),
        );
        r.register(
            "step_seconds",
            "From a step's arrival to its answer (queueing and the forward pass)",
            m.step_seconds.clone(),
        );
        r.register(
            "sessions_active",
            "Open inference sessions",
            m.sessions.clone(),
        );
        r.register(
            "memory_reserved_bytes",
            "Memory held by loaded shards and KV caches",
            m.reserved_bytes.clone(),
        );
        r.register("shards_loaded", "Shards in memory", m.shards_loaded.clone());
        r.register(
            "batch_size",
            "Sessions' steps per forward pass (the engine batches concurrent sessions' steps)",
            m.board.batch_sizes().clone(),
        );
        r.register(
            "largest_batch",
            "Most sessions' steps run in one forward pass so far",
            m.largest_batch.clone(),
        );
        r.register(
            "steps",
            "Steps answered with hidden states",
            m.steps.clone(),
        );
        r.register(
            "batches",
            "Forward passes (steps / batches is the mean batch size)",
            m.batches.clone(),
        );
        r.register(
            "busy_seconds",
            "Time the engine spent serving",
            m.busy_seconds.clone(),
        );
        NodeMetrics { registry, ..m }
    }

    /// The registry, to add more metrics before serving (libp2p's own).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Count an answered request of `kind` that took `took`.
    pub fn answered(&self, kind: &str, response: &InferResponse, took: Duration) {
        self.requests
            .get_or_create(&vec![
                ("kind".into(), kind.into()),
                ("outcome".into(), outcome(response).into()),
            ])
            .inc();
        if kind == "step" {
            self.step_seconds.observe(took.as_secs_f64());
        }
    }

    /// Prometheus' text format, with the engine's figures as of now.
    pub fn render(&self) -> String {
        let now = self.board.get();
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            self.steps.inc_by(now.steps.saturating_sub(last.steps));
            self.batches
                .inc_by(now.batches.saturating_sub(last.batches));
            self.busy_seconds
                .inc_by(now.busy.saturating_sub(last.busy).as_secs_f64());
            *last = now;
        }
        self.sessions.set(i64::from(now.active_sessions));
        self.reserved_bytes
            .set(i64::try_from(now.reserved_bytes).unwrap_or(i64::MAX));
        self.shards_loaded.set(i64::from(now.loaded_shards));
        self.largest_batch.set(i64::from(now.largest_batch));
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serve `GET /metrics` on `addr`; returns the bound address.
pub async fn serve(addr: SocketAddr, metrics: Arc<NodeMetrics>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
                    .into_response()
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the metrics endpoint stopped: {e}");
        }
    });
    Ok(bound)
}
