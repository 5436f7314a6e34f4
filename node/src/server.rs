//! The node's main loop: network events in, engine and store work out, capacity ads on a
//! timer, graceful shutdown on ctrl-c or SIGTERM.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, oneshot, Mutex};
use veil_model::Compute;
use veil_protocol::ad::now_ms;
use veil_protocol::proof::{ProofRequest, ProofResponse};
use veil_protocol::wire::{
    ErrorCode, InferRequest, InferResponse, NodeStats, UploadRequest, UploadResponse,
};
use veil_protocol::{
    network, AdBook, CapacityAd, Event, Identity, Multiaddr, NetConfig, Network, SignedAd,
};

use crate::config::NodeConfig;
use crate::engine::{self, Job, Limits, StatusBoard};
use crate::fair::{Queues, RateLimiter};
use crate::metrics::NodeMetrics;
use crate::proofs::ProofStore;
use crate::store::{ShardStore, StoreError};

/// Appends what peers send to a file, for audits: a tag byte (1 inference, 2 upload), the
/// length (u32 LE) and the encoded request.
struct TrafficRecorder {
    file: std::fs::File,
}

impl TrafficRecorder {
    fn record(&mut self, tag: u8, bytes: &[u8]) {
        let r = self
            .file
            .write_all(&[tag])
            .and_then(|_| self.file.write_all(&(bytes.len() as u32).to_le_bytes()))
            .and_then(|_| self.file.write_all(bytes));
        if let Err(e) = r {
            tracing::warn!("cannot record traffic: {e}");
        }
    }
}

/// Writes the activation payload of every step and masked op as received to `<n>.bin`.
struct PayloadRecorder {
    dir: PathBuf,
    next: u64,
}

impl PayloadRecorder {
    fn record(&mut self, request: &InferRequest) {
        let payload = match request {
            InferRequest::Step { hidden, .. } => &hidden.data,
            InferRequest::Linear { words, .. } => words,
            _ => return,
        };
        let path = self.dir.join(format!("{}.bin", self.next));
        self.next += 1;
        if let Err(e) = std::fs::write(&path, payload) {
            tracing::warn!("cannot record a payload to {}: {e}", path.display());
        }
    }
}

/// Inference traffic counters, shared with the tasks that answer requests.
#[derive(Default)]
struct Traffic {
    received: AtomicU64,
    sent: AtomicU64,
}

fn encoded_len<T: bincode::Encode>(message: &T) -> u64 {
    veil_protocol::codec::encode(message).map_or(0, |b| b.len() as u64)
}

struct Node {
    config: NodeConfig,
    started: Instant,
    traffic: Arc<Traffic>,
    identity: Identity,
    network: Network,
    engine: mpsc::Sender<Job>,
    board: StatusBoard,
    store: Arc<ShardStore>,
    proofs: Arc<std::sync::Mutex<ProofStore>>,
    uploads: Arc<Mutex<()>>,
    ads: AdBook,
    compute: Compute,
    throughput_gflops: f64,
    recorder: Option<TrafficRecorder>,
    payloads: Option<PayloadRecorder>,
    metrics: Arc<NodeMetrics>,
    rates: RateLimiter,
    queues: Queues,
}

/// Run a node until ctrl-c or SIGTERM.
pub async fn run(config: NodeConfig, identity: Identity) -> Result<()> {
    let requested = match config.backend.as_str() {
        "auto" => None,
        other => Some(other.parse().context("backend")?),
    };
    let (compute, notice) = Compute::select(requested)?;
    if let Some(n) = notice {
        tracing::warn!("{n}");
    }
    tracing::info!("backend {} on {}", compute.kind, compute.adapter);
    let store = Arc::new(open_store(&config)?);
    let proofs = ProofStore::open(&config.data_dir, identity.peer_id())
        .with_context(|| format!("cannot keep proofs in {}", config.data_dir.display()))?;
    let throughput_gflops = engine::self_benchmark(&compute.device, Duration::from_millis(300));
    tracing::info!(
        "self-benchmark: {throughput_gflops:.1} GFLOP/s; holding {} shard(s)",
        store.list().len()
    );
    let (engine, board) = engine::spawn(
        compute.device.clone(),
        store.clone(),
        Limits {
            memory_bytes: config.memory_limit_mib << 20,
            max_sessions: config.max_sessions,
            max_sessions_per_peer: config.max_sessions_per_peer,
            idle_timeout: Duration::from_secs(config.session_idle_timeout_s),
            step_delay: Duration::from_millis(config.step_delay_ms),
            lie: config.lie,
        },
        identity.clone(),
    );
    let external_addrs = config
        .external_addresses
        .iter()
        .map(|a| {
            a.parse()
                .with_context(|| format!("bad external address `{a}`"))
        })
        .collect::<Result<Vec<Multiaddr>>>()?;
    let net_config = NetConfig {
        serve: true,
        request_timeout: Duration::from_secs(config.request_timeout_s),
        reachable: true,
        relay: config.relay.clone(),
        external_addrs,
        ..NetConfig::default()
    };
    if let Some(r) = &config.relay {
        tracing::info!(
            "relaying for nodes behind NAT: up to {} reservations, {} connections ({} per peer), \
             each for at most {} s and {} MiB",
            r.max_reservations,
            r.max_circuits,
            r.max_circuits_per_peer,
            r.max_circuit_duration.as_secs(),
            r.max_circuit_bytes >> 20
        );
    }
    // libp2p's own metrics join the node's registry when metrics are served
    let mut metrics = NodeMetrics::new(board.clone());
    let registry = config.metrics_listen.map(|_| metrics.registry_mut());
    let (network, mut events, event_loop) =
        network::new_with_metrics(&identity, &net_config, registry)?;
    tokio::spawn(event_loop.run());
    for addr in &config.listen {
        let addr: Multiaddr = addr
            .parse()
            .with_context(|| format!("bad listen address `{addr}`"))?;
        network.listen(addr).await?;
    }
    let recorder = match &config.record_traffic {
        Some(path) => Some(TrafficRecorder {
            file: std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?,
        }),
        None => None,
    };
    let payloads = match &config.record_payloads {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            tracing::warn!(
                "recording every activation payload received to {} (record_payloads)",
                dir.display()
            );
            Some(PayloadRecorder {
                dir: dir.clone(),
                next: 0,
            })
        }
        None => None,
    };
    let metrics = Arc::new(metrics);
    if let Some(addr) = config.metrics_listen {
        let bound = crate::metrics::serve(addr, metrics.clone()).await?;
        tracing::info!("metrics on http://{bound}/metrics");
    }
    tracing::info!("peer id {}", identity.peer_id());
    let (config_rate, config_queue) = (
        config.max_requests_per_s_per_peer,
        config.max_queued_per_peer,
    );
    let mut node = Node {
        config,
        started: Instant::now(),
        traffic: Arc::default(),
        identity,
        network,
        engine,
        board,
        store,
        proofs: Arc::new(std::sync::Mutex::new(proofs)),
        uploads: Arc::new(Mutex::new(())),
        ads: AdBook::default(),
        compute,
        throughput_gflops,
        recorder,
        payloads,
        metrics,
        rates: RateLimiter::new(config_rate),
        queues: Queues::new(config_queue),
    };
    node.bootstrap().await;
    node.serve(&mut events).await
}

/// Open the shard store with its disk quota (from the free space when not configured).
fn open_store(config: &NodeConfig) -> Result<ShardStore> {
    let dir = &config.data_dir;
    let what = || format!("cannot use the data directory {}", dir.display());
    let probe = ShardStore::open(dir, crate::store::DiskLimits::unlimited(0)).with_context(what)?;
    let held = probe.usage().used;
    let free = crate::store::disk_free(dir).with_context(what)?;
    let quota = config.disk_limit_bytes(held, free);
    let store = ShardStore::open(dir, config.disk_limits(quota)).with_context(what)?;
    tracing::info!(
        "shards may take {} MiB of disk ({} MiB held, {} MiB free on the disk{})",
        quota >> 20,
        held >> 20,
        free >> 20,
        if config.max_disk_mib.is_some() {
            "; max_disk_mib"
        } else {
            "; 90% of it is the default quota"
        }
    );
    if free < crate::store::DISK_MARGIN {
        tracing::warn!(
            "the data directory's disk is full ({} MiB free): uploads will be refused until \
             space is freed",
            free >> 20
        );
    }
    if held > quota {
        tracing::warn!(
            "the shards held take {} MiB, more than max_disk_mib ({} MiB): new uploads are \
             refused until unused ones are evicted",
            held >> 20,
            quota >> 20
        );
    }
    Ok(store)
}

fn parse_bootstrap(addr: &str) -> Result<Multiaddr> {
    addr.parse()
        .with_context(|| format!("bad bootstrap address `{addr}`"))
}

impl Node {
    async fn bootstrap(&self) {
        for addr in &self.config.bootstrap {
            match parse_bootstrap(addr) {
                Ok(a) => match self.network.dial(a).await {
                    Ok(peer) => tracing::info!("joined the network through {peer} at {addr}"),
                    Err(e) => tracing::warn!("bootstrap {addr}: {e}"),
                },
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }

    async fn serve(&mut self, events: &mut mpsc::Receiver<Event>) -> Result<()> {
        let mut ad_timer = tokio::time::interval(Duration::from_secs(self.config.ad_interval_s));
        let mut reconnect = tokio::time::interval(Duration::from_secs(10));
        // stalled uploads and unused shards: often enough for the shortest timeout
        let sweep_every =
            Duration::from_secs(self.config.partial_upload_timeout_s.clamp(1, 240) / 4 + 1);
        let mut sweep = tokio::time::interval(sweep_every);
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    tracing::info!("shutting down");
                    return Ok(());
                }
                _ = ad_timer.tick() => self.advertise().await,
                _ = sweep.tick() => self.sweep(),
                _ = reconnect.tick() => {
                    if !self.config.bootstrap.is_empty()
                        && self.network.connected_peers().await.map(|p| p.is_empty()).unwrap_or(false)
                    {
                        self.bootstrap().await;
                    }
                }
                event = events.recv() => match event {
                    Some(e) => self.on_event(e).await,
                    None => anyhow::bail!("the network stopped"),
                },
            }
        }
    }

    /// Remove stalled uploads and unused shards, off the event loop; the upload lock keeps
    /// it from racing an upload.
    fn sweep(&self) {
        let store = self.store.clone();
        let board = self.board.clone();
        let lock = self.uploads.clone();
        tokio::spawn(async move {
            let _guard = lock.lock().await;
            let swept = tokio::task::spawn_blocking(move || {
                store.sweep(&board.in_use(), std::time::SystemTime::now())
            })
            .await;
            if let Ok(s) = swept {
                if s.partial_removed > 0 {
                    tracing::info!("removed {} stalled upload(s)", s.partial_removed);
                }
                for id in &s.shards_evicted {
                    tracing::info!(
                        "evicted shard {}: no session used it for evict_unused_shards_after_h",
                        &hex::encode(id)[..12]
                    );
                }
            }
        });
    }

    /// A refusal for `peer` before any work, if it is over a limit or not allowed.
    fn gate(
        &mut self,
        peer: veil_protocol::PeerId,
        allow: &[veil_protocol::PeerId],
        what: &str,
        cost: f64,
    ) -> Option<(ErrorCode, String)> {
        if !allow.is_empty() && !allow.contains(&peer) {
            return Some((
                ErrorCode::Forbidden,
                format!("this node lets only the peers of its {what} list do that"),
            ));
        }
        if !self.rates.allow_cost(peer, Instant::now(), cost) {
            return Some((
                ErrorCode::RateLimited,
                format!(
                    "more than {} requests per second from you (max_requests_per_s_per_peer): \
                     slow down",
                    self.config.max_requests_per_s_per_peer
                ),
            ));
        }
        None
    }

    async fn advertise(&mut self) {
        let status = self.board.get();
        tracing::debug!(
            "{} session(s), {} shard(s) loaded, {} MiB reserved, largest batch {}",
            status.active_sessions,
            status.loaded_shards,
            status.reserved_bytes >> 20,
            status.largest_batch
        );
        let addrs = self.network.listen_addrs().await.unwrap_or_default();
        let reach = self.network.reach().await.unwrap_or_default();
        let limit = self.config.memory_limit_mib << 20;
        let ad = CapacityAd {
            peer_id: self.identity.peer_id().to_string(),
            addrs: addrs.iter().map(ToString::to_string).collect(),
            reachability: reach.reachability,
            backend: self.compute.kind.to_string(),
            adapter: self.compute.adapter.clone(),
            free_memory_bytes: limit.saturating_sub(status.reserved_bytes),
            free_disk_bytes: self.free_disk(),
            throughput_gflops: self.throughput_gflops,
            shards: self.store.list().iter().map(hex::encode).collect(),
            active_sessions: status.active_sessions,
            max_sessions: self.config.max_sessions,
            version: env!("CARGO_PKG_VERSION").to_string(),
            timestamp_ms: now_ms(),
            ttl_s: self.config.ad_ttl_s,
        };
        match SignedAd::sign(&ad, &self.identity) {
            Ok(signed) => {
                let _ = self.ads.insert(signed.clone(), now_ms());
                if let Err(e) = self.network.publish_ad(&signed).await {
                    tracing::debug!("{e}");
                }
            }
            Err(e) => tracing::warn!("cannot sign the capacity ad: {e}"),
        }
        self.ads.prune(now_ms());
    }

    /// Room left for uploads: the quota's and the disk's, whichever is smaller.
    fn free_disk(&self) -> u64 {
        let disk = crate::store::disk_free(&self.config.data_dir)
            .map_or(0, |f| f.saturating_sub(crate::store::DISK_MARGIN));
        self.store.free().min(disk)
    }

    fn record<T: bincode::Encode>(&mut self, tag: u8, message: &T) {
        if let Some(r) = self.recorder.as_mut() {
            match veil_protocol::codec::encode(message) {
                Ok(bytes) => r.record(tag, &bytes),
                Err(e) => tracing::warn!("cannot record: {e}"),
            }
        }
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::InboundInfer {
                peer,
                request,
                channel,
            } => {
                self.record(1, &request);
                if let Some(p) = self.payloads.as_mut() {
                    p.record(&request);
                }
                let kind = match &request {
                    InferRequest::Stats => "stats",
                    InferRequest::Open { .. } => "open",
                    InferRequest::Step { .. } => "step",
                    InferRequest::Close { .. } => "close",
                    InferRequest::OpenMasked { .. } => "open_masked",
                    InferRequest::Linear { .. } => "linear",
                    InferRequest::MaskProducts { .. } => "mask_products",
                };
                let cost = match &request {
                    InferRequest::Linear { .. } | InferRequest::MaskProducts { .. } => {
                        crate::fair::MASKED_OP_COST
                    }
                    _ => 1.0,
                };
                let sessions = !matches!(request, InferRequest::Stats);
                let allow = if sessions {
                    self.config.serve_allow.clone()
                } else {
                    Vec::new()
                };
                let refusal = self
                    .gate(peer, &allow, "serve_allow", cost)
                    .map(|(code, message)| InferResponse::Error { code, message });
                let place = match refusal {
                    None if sessions => match self.queues.enter(peer) {
                        Ok(p) => Ok(Some(p)),
                        Err(n) => Err(InferResponse::Error {
                            code: ErrorCode::Busy,
                            message: format!(
                                "{n} of your requests are already waiting here \
                                 (max_queued_per_peer)"
                            ),
                        }),
                    },
                    None => Ok(None),
                    Some(r) => Err(r),
                };
                let place = match place {
                    Ok(p) => p,
                    Err(response) => {
                        tracing::debug!("refused a request from {peer}: {response:?}");
                        let network = self.network.clone();
                        let metrics = self.metrics.clone();
                        tokio::spawn(async move {
                            metrics.answered(kind, &response, Duration::ZERO);
                            let _ = network.respond_infer(channel, response).await;
                        });
                        return;
                    }
                };
                let engine = self.engine.clone();
                let board = self.board.clone();
                let network = self.network.clone();
                let traffic = self.traffic.clone();
                let started = self.started;
                let metrics = self.metrics.clone();
                let arrived = Instant::now();
                traffic
                    .received
                    .fetch_add(encoded_len(&request), Ordering::Relaxed);
                tokio::spawn(async move {
                    let (tx, rx) = oneshot::channel();
                    let job = match request {
                        InferRequest::Stats => {
                            // from the board: a busy engine does not delay the answer
                            let status = board.get();
                            let stats = NodeStats {
                                busy_ms: status.busy.as_millis() as u64,
                                steps: status.steps,
                                batches: status.batches,
                                active_sessions: status.active_sessions,
                                bytes_received: traffic.received.load(Ordering::Relaxed),
                                bytes_sent: traffic.sent.load(Ordering::Relaxed),
                                uptime_ms: started.elapsed().as_millis() as u64,
                            };
                            let response = InferResponse::Stats(stats);
                            metrics.answered(kind, &response, arrived.elapsed());
                            let _ = network.respond_infer(channel, response).await;
                            return;
                        }
                        InferRequest::Open {
                            session,
                            shard,
                            max_len,
                            exact,
                        } => Job::Open {
                            peer,
                            session,
                            shard,
                            max_len,
                            exact,
                            reply: tx,
                        },
                        InferRequest::Step { session, hidden } => Job::Step {
                            peer,
                            session,
                            hidden,
                            reply: tx,
                        },
                        InferRequest::Close { session } => Job::Close {
                            peer,
                            session,
                            reply: tx,
                        },
                        InferRequest::OpenMasked {
                            session,
                            shard,
                            seed,
                            exact,
                        } => Job::OpenMasked {
                            peer,
                            session,
                            shard,
                            seed,
                            exact,
                            reply: tx,
                        },
                        InferRequest::Linear { session, op, words } => Job::Linear {
                            peer,
                            session,
                            op,
                            words,
                            reply: tx,
                        },
                        InferRequest::MaskProducts {
                            session,
                            op,
                            first,
                            n,
                        } => Job::MaskProducts {
                            peer,
                            session,
                            op,
                            first,
                            n,
                            reply: tx,
                        },
                    };
                    let response = match engine.send(job).await {
                        Ok(()) => rx.await.unwrap_or(InferResponse::Error {
                            code: ErrorCode::Internal,
                            message: "the engine stopped".into(),
                        }),
                        Err(_) => InferResponse::Error {
                            code: ErrorCode::Internal,
                            message: "the engine stopped".into(),
                        },
                    };
                    drop(place);
                    metrics.answered(kind, &response, arrived.elapsed());
                    traffic
                        .sent
                        .fetch_add(encoded_len(&response), Ordering::Relaxed);
                    let _ = network.respond_infer(channel, response).await;
                });
            }
            Event::InboundUpload {
                peer,
                request,
                channel,
            } => {
                self.record(2, &request);
                let network = self.network.clone();
                let allow = self.config.deploy_allow.clone();
                if let Some((code, message)) = self.gate(peer, &allow, "deploy_allow", 1.0) {
                    tracing::debug!("refused an upload request from {peer}: {message}");
                    tokio::spawn(async move {
                        let response = UploadResponse::Error { code, message };
                        let _ = network.respond_upload(channel, response).await;
                    });
                    return;
                }
                let store = self.store.clone();
                let lock = self.uploads.clone();
                let board = self.board.clone();
                tokio::spawn(async move {
                    let _guard = lock.lock().await;
                    let response = tokio::task::spawn_blocking(move || {
                        upload(&store, request, peer, &board.in_use())
                    })
                    .await
                    .unwrap_or_else(|e| UploadResponse::Error {
                        code: ErrorCode::Internal,
                        message: e.to_string(),
                    });
                    let _ = network.respond_upload(channel, response).await;
                });
            }
            Event::InboundDirectory { channel, .. } => {
                let ads = self.ads.signed();
                let _ = self.network.respond_directory(channel, ads).await;
            }
            Event::InboundProof {
                peer,
                request,
                channel,
            } => {
                let proofs = self.proofs.clone();
                let network = self.network.clone();
                tokio::spawn(async move {
                    let response = answer_proof(proofs, &network, peer, request).await;
                    let _ = network.respond_proof(channel, response).await;
                });
            }
            Event::ProofNotice { notice, source } => {
                let accused = notice.accused.clone();
                if lock(&self.proofs).heard(notice, source) {
                    tracing::info!("heard of a fraud proof against {accused}");
                }
            }
            Event::Ad { ad } => {
                if let Err(e) = self.ads.insert(ad, now_ms()) {
                    tracing::debug!("{e}");
                }
            }
            Event::PeerConnected(_) | Event::PeerDisconnected(_) => {}
        }
    }
}

fn lock(proofs: &std::sync::Mutex<ProofStore>) -> std::sync::MutexGuard<'_, ProofStore> {
    proofs.lock().unwrap_or_else(|e| e.into_inner())
}

/// Answer a request of the proof protocol.
async fn answer_proof(
    proofs: Arc<std::sync::Mutex<ProofStore>>,
    network: &Network,
    peer: veil_protocol::PeerId,
    request: ProofRequest,
) -> ProofResponse {
    match request {
        ProofRequest::Submit(bytes) => {
            // checking the receipts hashes every input row: off the event loop
            let r = tokio::task::spawn_blocking(move || lock(&proofs).submit(&bytes, &peer))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            match r {
                Ok((notice, new)) => {
                    if new {
                        tracing::warn!(
                            "{peer} submitted a fraud proof against {} (stage {}); its \
                             receipts hold: announcing it",
                            notice.accused,
                            notice.stage
                        );
                        if let Err(e) = network.publish_proof_notice(&notice).await {
                            tracing::warn!("cannot announce the proof: {e}");
                        }
                    }
                    ProofResponse::Accepted(notice)
                }
                Err(reason) => {
                    tracing::info!("refused a proof from {peer}: {reason}");
                    ProofResponse::Rejected(reason)
                }
            }
        }
        ProofRequest::Get(id) => match lock(&proofs).get(&id) {
            Some(bytes) => ProofResponse::Proof(bytes),
            None => ProofResponse::Missing,
        },
        ProofRequest::Notices => ProofResponse::Notices(lock(&proofs).notices()),
    }
}

fn upload(
    store: &ShardStore,
    request: UploadRequest,
    peer: veil_protocol::PeerId,
    in_use: &std::collections::HashSet<veil_protocol::wire::ShardId>,
) -> UploadResponse {
    let result = match request {
        UploadRequest::Query { shard, total } => store.admit(&shard, total, &peer, in_use),
        UploadRequest::Chunk {
            shard,
            total,
            offset,
            data,
        } => {
            let r = store.write_chunk(&shard, total, offset, &data, &peer, in_use);
            if let Ok(p) = &r {
                if p.complete && offset + data.len() as u64 == total {
                    tracing::info!(
                        "stored shard {} ({total} bytes) from {peer}",
                        &hex::encode(shard)[..12]
                    );
                }
            }
            r
        }
    };
    match result {
        Ok(p) => UploadResponse::Progress {
            received: p.received,
            complete: p.complete,
        },
        Err(e) => {
            tracing::warn!("upload from {peer} refused: {e}");
            let code = match e {
                _ if e.is_no_space() => ErrorCode::NoSpace,
                StoreError::TooLarge { .. } => ErrorCode::NoSpace,
                StoreError::Io(_) => ErrorCode::Internal,
                _ => ErrorCode::BadRequest,
            };
            UploadResponse::Error {
                code,
                message: e.to_string(),
            }
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The identity key's path in a data directory.
pub fn identity_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("identity.key")
}
