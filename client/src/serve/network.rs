//! `GET /api/network`: where each stage of the served model runs and how its nodes are doing,
//! for the page's network view and for operators. For a deployment: every stage's replicas
//! with their verified capacity ads (from the bootstrap peers' directories) and their work
//! counters (a stats request to each, at most one second); for a model in this process: its
//! stages here.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde::Serialize;
use tokio::runtime::Handle;
use veil_model::crypto::ClientLayers;
use veil_protocol::ad::now_ms;
use veil_protocol::wire::{InferRequest, InferResponse, NodeStats};
use veil_protocol::{AdBook, CapacityAd, Network, PeerId};

use crate::deployment::Deployment;

/// Views younger than this are served again rather than asking every node anew.
const FRESH_FOR: Duration = Duration::from_secs(2);
/// How long a node may take to answer its stats request.
const STATS_TIMEOUT: Duration = Duration::from_secs(1);

/// The view's JSON.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    /// `deployment`, `local` (plaintext in this process) or `local-encrypted` (encrypted
    /// stages, all in this process).
    pub mode: &'static str,
    /// The model or deployment id.
    pub model: String,
    /// Short fingerprint of the deployment's key (encrypted modes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Layers the gateway runs itself before the first stage.
    pub client_layers: usize,
    /// Layers the gateway runs itself after the last stage.
    pub client_last_layers: usize,
    pub stages: Vec<StageView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageView {
    pub stage: usize,
    /// First layer and one past the last.
    pub layers: (usize, usize),
    pub replicas: Vec<ReplicaView>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplicaView {
    /// A node's peer id, or `local`.
    pub peer: String,
    /// From its capacity ad.
    pub backend: Option<String>,
    pub adapter: Option<String>,
    pub free_memory_mib: Option<u64>,
    pub throughput_gflops: Option<f64>,
    pub max_sessions: Option<u32>,
    /// Seconds since the ad was signed.
    pub ad_age_s: Option<f64>,
    /// From its stats answer (`None` when it did not answer in time).
    pub active_sessions: Option<u32>,
    pub steps: Option<u64>,
    /// Mean milliseconds per forward pass, and sessions' steps per pass.
    pub step_ms: Option<f64>,
    pub mean_batch: Option<f64>,
    pub uptime_s: Option<f64>,
    /// Whether it answered its stats request.
    pub reachable: bool,
}

impl ReplicaView {
    fn with_ad(mut self, ad: &CapacityAd, now: u64) -> Self {
        self.backend = Some(ad.backend.clone());
        self.adapter = Some(ad.adapter.clone());
        self.free_memory_mib = Some(ad.free_memory_bytes >> 20);
        self.throughput_gflops = Some(ad.throughput_gflops);
        self.max_sessions = Some(ad.max_sessions);
        self.active_sessions = Some(ad.active_sessions);
        self.ad_age_s = Some(now.saturating_sub(ad.timestamp_ms) as f64 / 1000.0);
        self
    }

    fn with_stats(mut self, s: &NodeStats) -> Self {
        self.reachable = true;
        self.active_sessions = Some(s.active_sessions);
        self.steps = Some(s.steps);
        if s.batches > 0 {
            self.step_ms = Some(s.busy_ms as f64 / s.batches as f64);
            self.mean_batch = Some(s.steps as f64 / s.batches as f64);
        }
        self.uptime_s = Some(s.uptime_ms as f64 / 1000.0);
        self
    }
}

/// Source of the view, shared by the HTTP handlers.
pub enum Source {
    /// Fixed: a model in this process.
    Fixed(View),
    /// A deployment's nodes, asked when the view is older than [`FRESH_FOR`].
    Nodes(Box<Nodes>),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Fixed(v) => f.debug_tuple("Fixed").field(&v.mode).finish(),
            Source::Nodes(_) => f.write_str("Nodes"),
        }
    }
}

impl Source {
    /// The view as of now (blocking: asks the nodes; call it off the async threads).
    pub fn view(&self) -> View {
        match self {
            Source::Fixed(v) => v.clone(),
            Source::Nodes(n) => n.view(),
        }
    }
}

/// What the view of a deployment needs.
pub struct Nodes {
    pub handle: Handle,
    pub network: Network,
    pub bootstrap: Vec<PeerId>,
    pub deployment: Deployment,
    pub key: String,
    pub client_layers: ClientLayers,
    last: Mutex<Option<(Instant, View)>>,
}

impl Nodes {
    pub fn new(
        handle: Handle,
        network: Network,
        bootstrap: Vec<PeerId>,
        deployment: Deployment,
        key: String,
        client_layers: ClientLayers,
    ) -> Self {
        Nodes {
            handle,
            network,
            bootstrap,
            deployment,
            key,
            client_layers,
            last: Mutex::new(None),
        }
    }

    fn view(&self) -> View {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, v)) = &*last {
            if at.elapsed() < FRESH_FOR {
                return v.clone();
            }
        }
        let v = self.ask();
        *last = Some((Instant::now(), v.clone()));
        v
    }

    /// Ask the bootstrap peers for their directories and every replica for its stats, all
    /// at once.
    fn ask(&self) -> View {
        let peers: Vec<PeerId> = {
            let mut seen = Vec::new();
            for s in &self.deployment.stages {
                for r in &s.replicas {
                    if let Ok(p) = r.peer.parse::<PeerId>() {
                        if !seen.contains(&p) {
                            seen.push(p);
                        }
                    }
                }
            }
            seen
        };
        let (ads, stats) = self.handle.block_on(async {
            let dirs =
                join_all(self.bootstrap.iter().map(|&b| {
                    let network = self.network.clone();
                    async move {
                        tokio::time::timeout(Duration::from_secs(2), network.directory(b)).await
                    }
                }));
            let stats = join_all(peers.iter().map(|&p| {
                let network = self.network.clone();
                async move {
                    match tokio::time::timeout(STATS_TIMEOUT, network.infer(p, InferRequest::Stats))
                        .await
                    {
                        Ok(Ok(InferResponse::Stats(s))) => Some((p, s)),
                        _ => None,
                    }
                }
            }));
            futures::join!(dirs, stats)
        });
        let mut book = AdBook::default();
        let now = now_ms();
        for ad in ads.into_iter().flatten().flatten().flatten() {
            let _ = book.insert(ad, now);
        }
        let stats: HashMap<PeerId, NodeStats> = stats.into_iter().flatten().collect();
        let stages = self
            .deployment
            .stages
            .iter()
            .map(|s| StageView {
                stage: s.stage,
                layers: s.layers,
                replicas: s
                    .replicas
                    .iter()
                    .map(|r| {
                        let mut v = ReplicaView {
                            peer: r.peer.clone(),
                            ..ReplicaView::default()
                        };
                        if let Ok(p) = r.peer.parse::<PeerId>() {
                            if let Some(ad) = book.get(&p) {
                                v = v.with_ad(ad, now);
                            }
                            if let Some(s) = stats.get(&p) {
                                v = v.with_stats(s);
                            }
                        }
                        v
                    })
                    .collect(),
            })
            .collect();
        View {
            mode: "deployment",
            model: self.deployment.id.clone(),
            key: Some(self.key.clone()),
            client_layers: self.client_layers.first,
            client_last_layers: self.client_layers.last,
            stages,
        }
    }
}

/// The view of a model in this process: one stage per entry of `stages` (layer ranges).
pub fn local_view(
    mode: &'static str,
    model: &str,
    key: Option<String>,
    client_layers: ClientLayers,
    stages: &[(usize, usize)],
    backend: &str,
) -> View {
    View {
        mode,
        model: model.to_string(),
        key,
        client_layers: client_layers.first,
        client_last_layers: client_layers.last,
        stages: stages
            .iter()
            .enumerate()
            .map(|(i, &layers)| StageView {
                stage: i,
                layers,
                replicas: vec![ReplicaView {
                    peer: "local".into(),
                    backend: Some(backend.to_string()),
                    reachable: true,
                    ..ReplicaView::default()
                }],
            })
            .collect(),
    }
}
