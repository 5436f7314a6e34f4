//! The compute engine: one thread owns the device, the loaded stage runners and every
//! session's KV cache. Requests arrive on a bounded channel; steps of concurrent sessions on
//! the same shard that are waiting together run as one batched forward pass.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::{Device, Distribution, Tensor};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use tokio::sync::{mpsc, oneshot};
use veil_model::cache::KvCache;
use veil_model::StageRunner;
use veil_protocol::receipt::frame_hash;
use veil_protocol::wire::{ErrorCode, InferResponse, SessionId, ShardId, TensorFrame};
use veil_protocol::{Identity, InputChain, PeerId, Statement};

use crate::lie::{Liar, LieMode};

mod masked;
use crate::store::ShardStore;

/// Work for the engine.
#[derive(Debug)]
pub enum Job {
    Open {
        peer: PeerId,
        session: SessionId,
        shard: ShardId,
        max_len: u32,
        /// f32 activations for this session's quantized products.
        exact: bool,
        reply: oneshot::Sender<InferResponse>,
    },
    Step {
        peer: PeerId,
        session: SessionId,
        hidden: TensorFrame,
        reply: oneshot::Sender<InferResponse>,
    },
    Close {
        peer: PeerId,
        session: SessionId,
        reply: oneshot::Sender<InferResponse>,
    },
    /// A masked-mode session (see `masked`): compute node without `seed`, mask provider
    /// with it.
    OpenMasked {
        peer: PeerId,
        session: SessionId,
        shard: ShardId,
        seed: Option<[u8; 32]>,
        exact: bool,
        reply: oneshot::Sender<InferResponse>,
    },
    Linear {
        peer: PeerId,
        session: SessionId,
        op: u64,
        words: Vec<u8>,
        reply: oneshot::Sender<InferResponse>,
    },
    MaskProducts {
        peer: PeerId,
        session: SessionId,
        op: u64,
        first: u64,
        n: u32,
        reply: oneshot::Sender<InferResponse>,
    },
}

/// What the engine is doing, for capacity ads and logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Status {
    pub active_sessions: u32,
    pub reserved_bytes: u64,
    pub loaded_shards: u32,
    /// Largest number of sessions' steps run in one forward pass so far.
    pub largest_batch: u32,
    /// Time spent serving jobs since the engine started.
    pub busy: Duration,
    /// Steps answered with hidden states, and the forward passes that computed them.
    pub steps: u64,
    pub batches: u64,
}

/// The engine's latest [`Status`], readable at any time without queueing behind its work
/// (ads and the least-loaded routing of clients ask while the engine is busy), and the sizes
/// of its forward passes as a histogram (sessions' steps per pass).
#[derive(Debug, Clone)]
pub struct StatusBoard {
    status: Arc<Mutex<Status>>,
    /// Shards with an open session (the disk sweep must keep them).
    in_use: Arc<Mutex<HashSet<ShardId>>>,
    batch_sizes: Histogram,
}

impl Default for StatusBoard {
    fn default() -> Self {
        StatusBoard {
            status: Arc::default(),
            in_use: Arc::default(),
            // 1, 2, 4, … 128 sessions' steps per forward pass
            batch_sizes: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
        }
    }
}

impl StatusBoard {
    pub fn get(&self) -> Status {
        *self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, status: Status, in_use: HashSet<ShardId>) {
        *self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = status;
        *self
            .in_use
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = in_use;
    }

    /// Shards that have an open session now.
    pub fn in_use(&self) -> HashSet<ShardId> {
        self.in_use
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Sessions' steps per forward pass, one observation per pass (shared: the metrics
    /// registry holds a clone).
    pub fn batch_sizes(&self) -> &Histogram {
        &self.batch_sizes
    }
}

/// Limits the engine enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub memory_bytes: u64,
    pub max_sessions: u32,
    /// Sessions one peer may hold at once.
    pub max_sessions_per_peer: u32,
    pub idle_timeout: Duration,
    /// Added to every batch of steps (see the `step_delay_ms` setting).
    pub step_delay: Duration,
    /// Testnet only: corrupt this fraction of answers this way (`lie_mode`, `lie_rate`).
    pub lie: Option<(LieMode, f64)>,
}

struct Loaded {
    runner: StageRunner,
    /// The shard's linear ops as integers, built when a masked session first needs them:
    /// `[blocked, wide]` (sessions at the default precision, exact ones).
    ring: [Option<masked::RingOps>; 2],
    bytes: u64,
    last_used: Instant,
}

struct Session {
    peer: PeerId,
    shard: ShardId,
    exact: bool,
    cache: KvCache,
    reserved: u64,
    last_used: Instant,
    /// Every input row so far, committed (receipts sign it).
    chain: InputChain,
    /// The last row of the previous answer (what a `replay-stale` liar repeats).
    previous: Option<Vec<f32>>,
}

struct Engine {
    device: Device,
    store: Arc<ShardStore>,
    limits: Limits,
    runners: HashMap<ShardId, Loaded>,
    sessions: HashMap<SessionId, Session>,
    masked: HashMap<SessionId, masked::MaskedSession>,
    largest_batch: u32,
    busy: Duration,
    steps: u64,
    batches: u64,
    board: StatusBoard,
    /// Signs every answer's receipt.
    identity: Identity,
    liar: Option<Liar>,
}

/// A step that passed validation: session, input rows, row count, where to answer.
type ValidStep = (SessionId, Vec<f32>, usize, oneshot::Sender<InferResponse>);

fn error(code: ErrorCode, message: impl Into<String>) -> InferResponse {
    InferResponse::Error {
        code,
        message: message.into(),
    }
}

/// Why a request is refused, before it becomes the answer (small, unlike the answer).
#[derive(Debug)]
struct Refusal(ErrorCode, String);

impl Refusal {
    fn response(self) -> InferResponse {
        error(self.0, self.1)
    }
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal(code, message.into())
}

/// Start the engine thread; returns the job queue and the engine's status board.
pub fn spawn(
    device: Device,
    store: Arc<ShardStore>,
    limits: Limits,
    identity: Identity,
) -> (mpsc::Sender<Job>, StatusBoard) {
    let (tx, rx) = mpsc::channel(1024);
    let engine = Engine::new(device, store, limits, identity);
    let board = engine.board.clone();
    std::thread::Builder::new()
        .name("veil-engine".into())
        .spawn(move || engine.run(rx))
        .expect("spawn the engine thread");
    (tx, board)
}

/// Measure matrix-product throughput on `device` for about `budget`, in GFLOP/s.
pub fn self_benchmark(device: &Device, budget: Duration) -> f64 {
    let (m, k, n) = (64, 1024, 1024);
    let a = Tensor::<2>::random([m, k], Distribution::Default, device);
    let b = Tensor::<2>::random([k, n], Distribution::Default, device);
    let _ = a.clone().matmul(b.clone()).into_data();
    let start = Instant::now();
    let mut runs = 0u32;
    while start.elapsed() < budget || runs == 0 {
        let _ = a.clone().matmul(b.clone()).into_data();
        runs += 1;
    }
    let flops = 2.0 * (m * k * n) as f64 * f64::from(runs);
    flops / start.elapsed().as_secs_f64() / 1e9
}

impl Engine {
    fn new(device: Device, store: Arc<ShardStore>, limits: Limits, identity: Identity) -> Self {
        let liar = limits.lie.map(|(mode, rate)| {
            tracing::warn!("this node lies on purpose: {mode:?} on {rate} of its answers");
            Liar::new(mode, rate, rand::random())
        });
        Engine {
            identity,
            liar,
            device,
            store,
            limits,
            runners: HashMap::new(),
            sessions: HashMap::new(),
            masked: HashMap::new(),
            largest_batch: 0,
            busy: Duration::ZERO,
            steps: 0,
            batches: 0,
            board: StatusBoard::default(),
        }
    }

    fn publish(&self) {
        let in_use = self.shards_in_use();
        self.board.set(self.status(), in_use);
    }

    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut last_sweep = Instant::now();
        // a clock for waiting on the queue: idle sessions expire with no traffic at all
        let timer = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("the engine cannot start its timer: {e}");
                return;
            }
        };
        let tick = self
            .limits
            .idle_timeout
            .min(Duration::from_secs(5))
            .max(Duration::from_millis(10));
        loop {
            // the timeout is made inside the timer's runtime, whose clock it needs
            let first = match timer.block_on(async { tokio::time::timeout(tick, rx.recv()).await })
            {
                Ok(Some(job)) => job,
                Ok(None) => break,
                Err(_) => {
                    self.expire();
                    last_sweep = Instant::now();
                    continue;
                }
            };
            // Expire idle sessions before serving: a request that arrives after its session
            // went idle too long must find it gone, whatever else the node was doing.
            if last_sweep.elapsed() > self.limits.idle_timeout.min(Duration::from_secs(5)) {
                self.expire();
                last_sweep = Instant::now();
            }
            let started = Instant::now();
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let mut steps = Vec::new();
            let mut linears = Vec::new();
            for job in batch {
                match job {
                    Job::Step {
                        peer,
                        session,
                        hidden,
                        reply,
                    } => steps.push((peer, session, hidden, reply)),
                    Job::Open {
                        peer,
                        session,
                        shard,
                        max_len,
                        exact,
                        reply,
                    } => {
                        let r = self.open(peer, session, shard, max_len, exact);
                        self.publish();
                        let _ = reply.send(r);
                    }
                    Job::Close {
                        peer,
                        session,
                        reply,
                    } => {
                        let r = match (self.sessions.get(&session), self.masked.get(&session)) {
                            (Some(s), _) if s.peer == peer => {
                                self.store.touch(&s.shard);
                                self.sessions.remove(&session);
                                tracing::info!("session {} closed", short(&session));
                                InferResponse::Closed
                            }
                            (_, Some(s)) if s.peer == peer => {
                                self.store.touch(&s.shard);
                                self.masked.remove(&session);
                                tracing::info!("masked session {} closed", short(&session));
                                InferResponse::Closed
                            }
                            _ => error(ErrorCode::UnknownSession, "no such session"),
                        };
                        self.publish();
                        let _ = reply.send(r);
                    }
                    Job::OpenMasked {
                        peer,
                        session,
                        shard,
                        seed,
                        exact,
                        reply,
                    } => {
                        let r = self.open_masked(peer, session, shard, seed, exact);
                        self.publish();
                        let _ = reply.send(r);
                    }
                    Job::Linear {
                        peer,
                        session,
                        op,
                        words,
                        reply,
                    } => linears.push((peer, session, op, words, reply)),
                    Job::MaskProducts {
                        peer,
                        session,
                        op,
                        first,
                        n,
                        reply,
                    } => {
                        let _ = reply.send(self.mask_products(peer, session, op, first, n));
                    }
                }
            }
            if !linears.is_empty() {
                self.linears(linears);
            }
            if !steps.is_empty() {
                if !self.limits.step_delay.is_zero() {
                    std::thread::sleep(self.limits.step_delay);
                }
                self.steps(steps);
            }
            self.busy += started.elapsed();
            self.publish();
        }
    }

    fn status(&self) -> Status {
        Status {
            active_sessions: (self.sessions.len() + self.masked.len()) as u32,
            reserved_bytes: self.reserved(),
            loaded_shards: self.runners.len() as u32,
            largest_batch: self.largest_batch,
            busy: self.busy,
            steps: self.steps,
            batches: self.batches,
        }
    }

    fn reserved(&self) -> u64 {
        self.runners.values().map(|r| r.bytes).sum::<u64>()
            + self.sessions.values().map(|s| s.reserved).sum::<u64>()
    }

    fn expire(&mut self) {
        let timeout = self.limits.idle_timeout;
        let before = self.sessions.len() + self.masked.len();
        let store = &self.store;
        self.sessions.retain(|_, s| {
            let keep = s.last_used.elapsed() < timeout;
            if !keep {
                store.touch(&s.shard);
            }
            keep
        });
        self.masked.retain(|_, s| {
            let keep = s.last_used.elapsed() < timeout;
            if !keep {
                store.touch(&s.shard);
            }
            keep
        });
        let gone = before - self.sessions.len() - self.masked.len();
        if gone > 0 {
            tracing::info!("closed {gone} idle session(s)");
            self.publish();
        }
    }

    /// Unload shards nobody uses (except `keep`), least recently used first, until `need`
    /// more bytes fit.
    fn make_room(&mut self, need: u64, keep: Option<ShardId>) -> bool {
        while self.reserved() + need > self.limits.memory_bytes {
            let idle = self
                .runners
                .iter()
                .filter(|(id, _)| Some(**id) != keep)
                .filter(|(id, _)| {
                    !self.sessions.values().any(|s| &s.shard == *id)
                        && !self.masked.values().any(|s| &s.shard == *id)
                })
                .min_by_key(|(_, l)| l.last_used)
                .map(|(id, _)| *id);
            match idle {
                Some(id) => {
                    self.runners.remove(&id);
                }
                None => return false,
            }
        }
        true
    }

    /// A refusal if `peer` may not open `session` now (id in use, session limits).
    fn admit(&self, peer: PeerId, session: &SessionId) -> Result<(), Refusal> {
        if self.sessions.contains_key(session) || self.masked.contains_key(session) {
            return Err(refuse(ErrorCode::BadRequest, "session id already in use"));
        }
        if self.sessions.len() + self.masked.len() >= self.limits.max_sessions as usize {
            return Err(refuse(
                ErrorCode::Busy,
                format!(
                    "this node serves its maximum of {} sessions",
                    self.limits.max_sessions
                ),
            ));
        }
        let mine = self.sessions.values().filter(|s| s.peer == peer).count()
            + self.masked.values().filter(|s| s.peer == peer).count();
        if mine >= self.limits.max_sessions_per_peer as usize {
            return Err(refuse(
                ErrorCode::Busy,
                format!(
                    "you hold {mine} sessions here, this node's limit per peer \
                     (max_sessions_per_peer)"
                ),
            ));
        }
        Ok(())
    }

    /// Load `shard` unless it is loaded (making room for it).
    fn load(&mut self, shard: ShardId) -> Result<(), Refusal> {
        if !self.runners.contains_key(&shard) {
            if !self.store.has(&shard) {
                return Err(refuse(
                    ErrorCode::UnknownShard,
                    format!("no shard {}", hex::encode(shard)),
                ));
            }
            let bytes = self.store.size(&shard);
            if !self.make_room(bytes, None) {
                return Err(refuse(
                    ErrorCode::Busy,
                    "not enough memory to load the shard",
                ));
            }
            match self.store.load(&shard) {
                Ok(s) => {
                    tracing::info!(
                        "loaded shard {} (layers {}..{})",
                        &hex::encode(shard)[..12],
                        s.meta.layers.0,
                        s.meta.layers.1
                    );
                    let runner = match StageRunner::new(&s, &self.device) {
                        Ok(r) => r,
                        Err(e) => return Err(refuse(ErrorCode::Internal, e.to_string())),
                    };
                    self.runners.insert(
                        shard,
                        Loaded {
                            runner,
                            ring: [None, None],
                            bytes,
                            last_used: Instant::now(),
                        },
                    );
                }
                Err(e) => return Err(refuse(ErrorCode::Internal, e.to_string())),
            }
        }
        Ok(())
    }

    fn open(
        &mut self,
        peer: PeerId,
        session: SessionId,
        shard: ShardId,
        max_len: u32,
        exact: bool,
    ) -> InferResponse {
        if let Err(refusal) = self.admit(peer, &session) {
            return refusal.response();
        }
        if max_len == 0 {
            return error(ErrorCode::BadRequest, "max_len must be positive");
        }
        if let Err(refusal) = self.load(shard) {
            return refusal.response();
        }
        let Some(loaded) = self.runners.get(&shard) else {
            return error(ErrorCode::Internal, "shard vanished");
        };
        let meta = loaded.runner.meta().clone();
        let max_len = (max_len as usize).min(meta.config.max_seq_len);
        let n_layers = (meta.layers.1 - meta.layers.0) as u64;
        let kv_bytes = 2 * n_layers * meta.config.kv_dim() as u64 * max_len as u64 * 4;
        if !self.make_room(kv_bytes, Some(shard)) {
            return error(
                ErrorCode::Busy,
                format!("no memory for a KV cache of {} MiB", kv_bytes >> 20),
            );
        }
        let Some(loaded) = self.runners.get(&shard) else {
            return error(ErrorCode::Internal, "shard vanished");
        };
        let cache = loaded.runner.new_cache(max_len);
        self.store.touch(&shard);
        self.sessions.insert(
            session,
            Session {
                peer,
                shard,
                exact,
                cache,
                reserved: kv_bytes,
                last_used: Instant::now(),
                chain: InputChain::new(&shard),
                previous: None,
            },
        );
        tracing::info!(
            "session {} opened on shard {} (layers {}..{}, up to {max_len} positions{}) for {peer}",
            short(&session),
            &hex::encode(shard)[..12],
            meta.layers.0,
            meta.layers.1,
            if exact { ", f32 activations" } else { "" }
        );
        InferResponse::Opened {
            session,
            layers: (meta.layers.0 as u32, meta.layers.1 as u32),
            gpu: self.device != Device::flex(),
        }
    }

    fn steps(
        &mut self,
        steps: Vec<(
            PeerId,
            SessionId,
            TensorFrame,
            oneshot::Sender<InferResponse>,
        )>,
    ) {
        // Validate each step and group the valid ones by shard and precision. A session's
        // second step in the same batch (a client that pipelines) waits for the next round:
        // its input follows the first one's in the KV cache.
        let mut groups: HashMap<(ShardId, bool), Vec<ValidStep>> = HashMap::new();
        let mut seen: HashSet<SessionId> = HashSet::new();
        let mut later = Vec::new();
        for (peer, session, frame, reply) in steps {
            if !seen.insert(session) {
                later.push((peer, session, frame, reply));
                continue;
            }
            let Some(s) = self.sessions.get(&session).filter(|s| s.peer == peer) else {
                let _ = reply.send(error(
                    ErrorCode::UnknownSession,
                    "no such session (expired?)",
                ));
                continue;
            };
            let Some(loaded) = self.runners.get(&s.shard) else {
                let _ = reply.send(error(ErrorCode::Internal, "shard not loaded"));
                continue;
            };
            let d = loaded.runner.meta().config.d_model;
            let (shape, values) = match frame.to_f32() {
                Ok(x) => x,
                Err(e) => {
                    let _ = reply.send(error(ErrorCode::BadRequest, e.to_string()));
                    continue;
                }
            };
            if shape.len() != 2 || shape[1] != d || shape[0] == 0 {
                let _ = reply.send(error(
                    ErrorCode::BadRequest,
                    format!("hidden states must be [t, {d}], got {shape:?}"),
                ));
                continue;
            }
            if let Err(e) = s.cache.check_room(shape[0]) {
                let _ = reply.send(error(ErrorCode::ContextFull, e.to_string()));
                continue;
            }
            let key = (s.shard, s.exact);
            groups
                .entry(key)
                .or_default()
                .push((session, values, shape[0], reply));
        }
        for ((shard, exact), group) in groups {
            // Take the caches out so that they can be borrowed together.
            let mut taken: Vec<(SessionId, Session)> = group
                .iter()
                .filter_map(|(id, ..)| self.sessions.remove(id).map(|s| (*id, s)))
                .collect();
            let Some(loaded) = self.runners.get_mut(&shard) else {
                continue;
            };
            loaded.last_used = Instant::now();
            let inputs: Vec<&[f32]> = group.iter().map(|(_, v, ..)| v.as_slice()).collect();
            let mut caches: Vec<&mut KvCache> =
                taken.iter_mut().map(|(_, s)| &mut s.cache).collect();
            let result = loaded.runner.forward_host_with(&inputs, &mut caches, exact);
            self.largest_batch = self.largest_batch.max(inputs.len() as u32);
            let d = loaded.runner.meta().config.d_model;
            match result {
                Ok(outputs) => {
                    self.batches += 1;
                    self.board.batch_sizes.observe(outputs.len() as f64);
                    self.steps += outputs.len() as u64;
                    for ((id, input, t, reply), mut out) in group.into_iter().zip(outputs) {
                        let Some((_, s)) = taken.iter_mut().find(|(k, _)| *k == id) else {
                            continue;
                        };
                        if let Some(liar) = &mut self.liar {
                            liar.apply(&input, &mut out, s.previous.as_deref(), d);
                        }
                        s.previous = Some(out[(t - 1) * d..].to_vec());
                        let first_row = s.chain.rows();
                        s.chain.push_rows(&input, d);
                        let hidden = TensorFrame::from_f32(&[t, d], &out);
                        let receipt = Statement {
                            session: id,
                            shard,
                            first_row,
                            rows: t as u32,
                            input_chain: s.chain.hash(),
                            output_hash: frame_hash(&hidden),
                        }
                        .sign(&self.identity);
                        let _ = reply.send(InferResponse::Hidden { hidden, receipt });
                    }
                }
                Err(e) => {
                    for (.., reply) in group {
                        let _ = reply.send(error(ErrorCode::Internal, e.to_string()));
                    }
                }
            }
            for (id, mut s) in taken {
                s.last_used = Instant::now();
                self.sessions.insert(id, s);
            }
        }
        if !later.is_empty() {
            self.steps(later);
        }
    }
}

/// The first bytes of a session id, for logs.
fn short(session: &SessionId) -> String {
    hex::encode(&session[..4])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use veil_model::crypto::{
        encrypt_model_quant, KeyOptions, KeyShape, ModelKey, Shard, ShardQuant,
    };
    use veil_model::{Compute, ModelBundle};

    struct Fixture {
        _dir: tempfile::TempDir,
        jobs: mpsc::Sender<Job>,
        board: StatusBoard,
        /// The engine and its queue, until `start` (jobs sent before then queue up).
        paused: Option<(Engine, mpsc::Receiver<Job>)>,
        shard_id: ShardId,
        shard: Shard,
        d: usize,
    }

    impl Fixture {
        fn start(&mut self) {
            let (engine, rx) = self.paused.take().expect("not started yet");
            std::thread::spawn(move || engine.run(rx));
        }
    }

    fn fixture(limits: Limits) -> Fixture {
        let mut f = paused_fixture(limits);
        f.start();
        f
    }

    /// An engine that does not run until `Fixture::start`.
    fn paused_fixture(limits: Limits) -> Fixture {
        paused_fixture_quant(limits, ShardQuant::F32)
    }

    fn paused_fixture_quant(limits: Limits, quant: ShardQuant) -> Fixture {
        let b = ModelBundle::tiny().expect("tiny");
        let key = ModelKey::generate(
            KeyShape::of(&b.weights.config),
            KeyOptions::default(),
            &mut rand_chacha::ChaCha20Rng::seed_from_u64(3),
        );
        let e = encrypt_model_quant(&b, key, 1, 0, quant, &mut |_, _| {}).expect("encrypt");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ShardStore::open(dir.path(), crate::store::DiskLimits::unlimited(1 << 30))
            .expect("store");
        let writer = e.shards[0].to_writer().expect("writer");
        let shard_id: ShardId = hex::decode(writer.data_sha256())
            .expect("hex")
            .try_into()
            .expect("32");
        writer.write(&store.path(&shard_id), false).expect("write");
        let engine = Engine::new(
            Compute::cpu().device,
            Arc::new(store),
            limits,
            veil_protocol::Identity::from_secret([9; 32]),
        );
        let board = engine.board.clone();
        let (jobs, rx) = mpsc::channel(1024);
        Fixture {
            _dir: dir,
            jobs,
            board,
            paused: Some((engine, rx)),
            shard_id,
            shard: e.shards[0].clone(),
            d: b.weights.config.d_model,
        }
    }

    fn limits() -> Limits {
        Limits {
            memory_bytes: 1 << 30,
            max_sessions: 8,
            max_sessions_per_peer: 8,
            idle_timeout: Duration::from_secs(60),
            step_delay: Duration::ZERO,
            lie: None,
        }
    }

    fn peer() -> PeerId {
        veil_protocol::Identity::from_secret([1; 32]).peer_id()
    }

    fn call(
        f: &Fixture,
        make: impl FnOnce(oneshot::Sender<InferResponse>) -> Job,
    ) -> InferResponse {
        let (tx, rx) = oneshot::channel();
        f.jobs.blocking_send(make(tx)).expect("send");
        rx.blocking_recv().expect("reply")
    }

    fn open(f: &Fixture, session: SessionId) -> InferResponse {
        call(f, |reply| Job::Open {
            peer: peer(),
            session,
            shard: f.shard_id,
            max_len: 64,
            exact: false,
            reply,
        })
    }

    /// Queue an open without waiting for its answer.
    fn open_later(f: &Fixture, session: SessionId) -> oneshot::Receiver<InferResponse> {
        open_later_with(f, session, false)
    }

    fn open_later_with(
        f: &Fixture,
        session: SessionId,
        exact: bool,
    ) -> oneshot::Receiver<InferResponse> {
        let (tx, rx) = oneshot::channel();
        f.jobs
            .blocking_send(Job::Open {
                peer: peer(),
                session,
                shard: f.shard_id,
                max_len: 64,
                exact,
                reply: tx,
            })
            .expect("send");
        rx
    }

    /// The status once `done` holds (the board is updated right after each batch's answers
    /// are sent), within a generous deadline.
    fn wait_for(f: &Fixture, done: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = f.board.get();
            if done(&s) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn step(f: &Fixture, session: SessionId, rows: &[f32]) -> oneshot::Receiver<InferResponse> {
        let (tx, rx) = oneshot::channel();
        let t = rows.len() / f.d;
        let hidden = TensorFrame::from_f32(&[t, f.d], rows);
        f.jobs
            .blocking_send(Job::Step {
                peer: peer(),
                session,
                hidden,
                reply: tx,
            })
            .expect("send");
        rx
    }

    fn hidden(r: InferResponse) -> Vec<f32> {
        match r {
            InferResponse::Hidden { hidden, .. } => hidden.to_f32().expect("tensor").1,
            other => panic!("expected hidden states, got {other:?}"),
        }
    }

    fn rows(seed: u32, t: usize, d: usize) -> Vec<f32> {
        (0..t * d)
            .map(|i| ((i as u32 * 7 + seed * 13) % 17) as f32 / 17.0 - 0.5)
            .collect()
    }

    /// On a quantized shard, a session opened with `exact` gets f32 activations while one
    /// queued beside it keeps 8-bit ones: each gets the bits its precision gives alone.
    #[test]
    fn each_session_runs_at_the_precision_it_opened_with() {
        let mut f = paused_fixture_quant(
            Limits {
                step_delay: Duration::from_millis(50),
                ..limits()
            },
            ShardQuant::Q8_0,
        );
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let opens = [open_later_with(&f, a, true), open_later_with(&f, b, false)];
        let x = rows(4, 3, f.d);
        let (ya, yb) = (step(&f, a, &x), step(&f, b, &x));
        f.start();
        for r in opens {
            let r = r.blocking_recv().expect("open");
            assert!(matches!(r, InferResponse::Opened { .. }), "{r:?}");
        }
        let (ya, yb) = (
            hidden(ya.blocking_recv().expect("a")),
            hidden(yb.blocking_recv().expect("b")),
        );
        let status = wait_for(&f, |s| s.steps == 2);
        assert_eq!(status.batches, 2, "one forward pass per precision");
        let runner = StageRunner::new(&f.shard, &Compute::cpu().device).expect("runner");
        let alone = |exact: bool| {
            let mut c = runner.new_cache(64);
            runner
                .forward_host_with(&[&x], &mut [&mut c], exact)
                .expect("fwd")
                .remove(0)
        };
        assert_eq!(ya, alone(true), "the exact session");
        assert_eq!(yb, alone(false), "the fast session");
        assert_ne!(ya, yb, "8-bit activations change the result");
    }

    #[test]
    fn concurrent_sessions_are_batched_and_correct() {
        let mut f = paused_fixture(Limits {
            step_delay: Duration::from_millis(100),
            ..limits()
        });
        let (a, b) = ([1u8; 16], [2u8; 16]);
        // Everything is queued before the engine runs, so that it finds it waiting together
        // (no sleep that assumes how fast the engine picks up work): two sessions' steps
        // share one forward pass; session a's second step (a client pipelining) waits for
        // the next one, after a's first.
        let (open_a, open_b) = (open_later(&f, a), open_later(&f, b));
        let xa = rows(1, 3, f.d);
        let xb = rows(2, 5, f.d);
        let xc = rows(3, 1, f.d);
        let first = step(&f, a, &xa);
        let second = step(&f, b, &xb);
        let third = step(&f, a, &xc);
        f.start();
        for r in [open_a, open_b] {
            assert!(matches!(
                r.blocking_recv().expect("open"),
                InferResponse::Opened { .. }
            ));
        }
        assert_eq!(
            f.board.get().active_sessions,
            2,
            "opens are visible at once"
        );
        let (ya, yb, yc) = (
            hidden(first.blocking_recv().expect("a")),
            hidden(second.blocking_recv().expect("b")),
            hidden(third.blocking_recv().expect("c")),
        );
        let status = wait_for(&f, |s| s.steps == 3);
        assert_eq!(status.largest_batch, 2, "a's and b's steps were batched");
        assert_eq!(status.batches, 2, "in two forward passes");
        assert!(
            status.busy >= Duration::from_millis(100),
            "busy time counts the work"
        );
        // the same computations one at a time
        let device = Compute::cpu().device;
        let runner = StageRunner::new(&f.shard, &device).expect("runner");
        let (mut ca, mut cb) = (runner.new_cache(64), runner.new_cache(64));
        let alone = |x: &[f32], c: &mut KvCache| {
            runner.forward_host(&[x], &mut [c]).expect("fwd").remove(0)
        };
        let ea = alone(&xa, &mut ca);
        let eb = alone(&xb, &mut cb);
        let ec = alone(&xc, &mut ca);
        for (got, want) in [(ya, ea), (yb, eb), (yc, ec)] {
            let diff = got
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-4, "batched result differs by {diff}");
        }
    }

    #[test]
    fn bad_requests_get_errors_and_the_engine_keeps_serving() {
        let f = fixture(limits());
        let s = [9u8; 16];
        let err = |r: InferResponse| match r {
            InferResponse::Error { code, message } => (code, message),
            other => panic!("expected an error, got {other:?}"),
        };
        // unknown shard, unknown session, zero length
        let (code, _) = err(call(&f, |reply| Job::Open {
            peer: peer(),
            session: s,
            shard: [0; 32],
            max_len: 8,
            exact: false,
            reply,
        }));
        assert_eq!(code, ErrorCode::UnknownShard);
        let (code, _) = err(step(&f, s, &rows(0, 1, f.d))
            .blocking_recv()
            .expect("reply"));
        assert_eq!(code, ErrorCode::UnknownSession);
        assert!(matches!(open(&f, s), InferResponse::Opened { .. }));
        let (code, _) = err(open(&f, s));
        assert_eq!(
            code,
            ErrorCode::BadRequest,
            "a session id cannot be opened twice"
        );
        // wrong width, NaN, wrong dtype size
        let (tx, rx) = oneshot::channel();
        let hidden = TensorFrame::from_f32(&[1, f.d + 1], &vec![0.0; f.d + 1]);
        f.jobs
            .blocking_send(Job::Step {
                peer: peer(),
                session: s,
                hidden,
                reply: tx,
            })
            .expect("send");
        let (code, msg) = err(rx.blocking_recv().expect("reply"));
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(msg.contains(&format!("[t, {}]", f.d)), "{msg}");
        let mut nan = rows(0, 1, f.d);
        nan[3] = f32::NAN;
        assert_eq!(
            err(step(&f, s, &nan).blocking_recv().expect("reply")).0,
            ErrorCode::BadRequest
        );
        // another peer cannot use this session
        let (tx, rx) = oneshot::channel();
        let other = veil_protocol::Identity::from_secret([2; 32]).peer_id();
        let hidden = TensorFrame::from_f32(&[1, f.d], &rows(0, 1, f.d));
        f.jobs
            .blocking_send(Job::Step {
                peer: other,
                session: s,
                hidden,
                reply: tx,
            })
            .expect("send");
        assert_eq!(
            err(rx.blocking_recv().expect("reply")).0,
            ErrorCode::UnknownSession
        );
        // past the session's length
        let (code, _) = err(step(&f, s, &rows(0, 65, f.d))
            .blocking_recv()
            .expect("reply"));
        assert_eq!(code, ErrorCode::ContextFull);
        // still serving
        assert_eq!(hidden_len(step(&f, s, &rows(0, 2, f.d))), 2 * f.d);
    }

    fn hidden_len(rx: oneshot::Receiver<InferResponse>) -> usize {
        hidden(rx.blocking_recv().expect("reply")).len()
    }

    /// Each answer carries the node's receipt: its signature over the session, the rows so
    /// far (the chain a client computes from what it sent) and the answer.
    #[test]
    fn every_answer_is_signed_over_its_inputs_and_itself() {
        let f = fixture(limits());
        let s = [4u8; 16];
        assert!(matches!(open(&f, s), InferResponse::Opened { .. }));
        let node = veil_protocol::Identity::from_secret([9; 32]).peer_id();
        let mut chain = InputChain::new(&f.shard_id);
        for (seed, t) in [(1, 3), (2, 1), (3, 2)] {
            let x = rows(seed, t, f.d);
            let first_row = chain.rows();
            chain.push_rows(&x, f.d);
            let InferResponse::Hidden { hidden, receipt } =
                step(&f, s, &x).blocking_recv().expect("reply")
            else {
                panic!("expected hidden states");
            };
            let expect = Statement {
                session: s,
                shard: f.shard_id,
                first_row,
                rows: t as u32,
                input_chain: chain.hash(),
                output_hash: frame_hash(&hidden),
            };
            receipt
                .check(&node, &expect, &hidden)
                .expect("a valid receipt");
        }
    }

    /// A lying node (testnet only) corrupts its answers, and signs them all the same.
    #[test]
    fn a_liar_signs_its_lies() {
        let f = fixture(Limits {
            lie: Some((LieMode::Zeros, 1.0)),
            ..limits()
        });
        let s = [6u8; 16];
        assert!(matches!(open(&f, s), InferResponse::Opened { .. }));
        let x = rows(1, 2, f.d);
        let InferResponse::Hidden { hidden, receipt } =
            step(&f, s, &x).blocking_recv().expect("reply")
        else {
            panic!("expected hidden states");
        };
        assert!(hidden.to_f32().expect("tensor").1.iter().all(|v| *v == 0.0));
        assert_eq!(receipt.output_hash, frame_hash(&hidden));
        assert_eq!(
            receipt.signer().expect("signed"),
            veil_protocol::Identity::from_secret([9; 32]).peer_id()
        );
    }

    #[test]
    fn memory_and_session_limits_refuse_clearly() {
        // room for the shard and one 64-position cache (64 KiB for the tiny model)
        let shard_bytes = {
            let f = fixture(limits());
            std::fs::metadata(
                f._dir
                    .path()
                    .join("shards")
                    .join(format!("{}.veil", hex::encode(f.shard_id))),
            )
            .expect("shard")
            .len()
        };
        let f = fixture(Limits {
            memory_bytes: shard_bytes + 100_000,
            max_sessions: 8,
            ..limits()
        });
        assert!(matches!(open(&f, [1; 16]), InferResponse::Opened { .. }));
        match open(&f, [2; 16]) {
            InferResponse::Error {
                code: ErrorCode::Busy,
                message,
            } => assert!(message.contains("KV cache"), "{message}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let f = fixture(Limits {
            max_sessions: 1,
            ..limits()
        });
        assert!(matches!(open(&f, [1; 16]), InferResponse::Opened { .. }));
        match open(&f, [2; 16]) {
            InferResponse::Error {
                code: ErrorCode::Busy,
                message,
            } => assert!(message.contains("maximum of 1"), "{message}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // closing frees the slot
        assert_eq!(
            call(&f, |reply| Job::Close {
                peer: peer(),
                session: [1; 16],
                reply
            }),
            InferResponse::Closed
        );
        assert!(matches!(open(&f, [2; 16]), InferResponse::Opened { .. }));
    }

    #[test]
    fn one_peer_cannot_take_every_session() {
        let f = fixture(Limits {
            max_sessions: 8,
            max_sessions_per_peer: 2,
            ..limits()
        });
        assert!(f.board.in_use().is_empty());
        assert!(matches!(open(&f, [1; 16]), InferResponse::Opened { .. }));
        assert!(matches!(open(&f, [2; 16]), InferResponse::Opened { .. }));
        assert_eq!(f.board.in_use(), [f.shard_id].into());
        match open(&f, [3; 16]) {
            InferResponse::Error {
                code: ErrorCode::Busy,
                message,
            } => assert!(message.contains("max_sessions_per_peer"), "{message}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // another peer is still served
        let other = veil_protocol::Identity::from_secret([2; 32]).peer_id();
        let r = call(&f, |reply| Job::Open {
            peer: other,
            session: [4; 16],
            shard: f.shard_id,
            max_len: 64,
            exact: false,
            reply,
        });
        assert!(matches!(r, InferResponse::Opened { .. }), "{r:?}");
    }

    #[test]
    fn idle_sessions_expire_without_any_traffic() {
        let f = fixture(Limits {
            idle_timeout: Duration::from_millis(200),
            ..limits()
        });
        assert!(matches!(open(&f, [6; 16]), InferResponse::Opened { .. }));
        assert_eq!(f.board.get().active_sessions, 1);
        let start = Instant::now();
        while f.board.get().active_sessions > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the idle session was never closed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(f.board.in_use().is_empty());
    }

    #[test]
    fn idle_sessions_expire() {
        let f = fixture(Limits {
            idle_timeout: Duration::from_millis(200),
            ..limits()
        });
        let s = [5u8; 16];
        assert!(matches!(open(&f, s), InferResponse::Opened { .. }));
        std::thread::sleep(Duration::from_millis(400));
        // the first request after the timeout already finds the session gone
        match step(&f, s, &rows(0, 1, f.d))
            .blocking_recv()
            .expect("reply")
        {
            InferResponse::Error {
                code: ErrorCode::UnknownSession,
                ..
            } => {}
            other => panic!("expected the session to have expired, got {other:?}"),
        }
    }

    fn open_masked(f: &Fixture, session: SessionId, seed: Option<[u8; 32]>) -> InferResponse {
        open_masked_with(f, session, seed, false)
    }

    fn open_masked_with(
        f: &Fixture,
        session: SessionId,
        seed: Option<[u8; 32]>,
        exact: bool,
    ) -> InferResponse {
        call(f, |reply| Job::OpenMasked {
            peer: peer(),
            session,
            shard: f.shard_id,
            seed,
            exact,
            reply,
        })
    }

    /// On a quantized shard, a masked session at the default precision gets the blocked
    /// integers (a byte a weight) and an exact one the wide ones, each exactly the
    /// client's for that precision: a node that mixed them up would fail every check.
    #[test]
    fn masked_sessions_get_the_integers_of_their_precision() {
        use veil_kernels::ring::Ints;
        use veil_protocol::wire::words_to_bytes;
        let mut f = paused_fixture_quant(limits(), ShardQuant::Q8_0);
        f.start();
        let runner = StageRunner::new(&f.shard, &Compute::cpu().device).expect("runner");
        let mut blocked_ops = 0;
        for (session, exact) in [([41u8; 16], false), ([42u8; 16], true)] {
            let ops = match open_masked_with(&f, session, None, exact) {
                InferResponse::OpenedMasked { ops, .. } => ops,
                other => panic!("{other:?}"),
            };
            let mine: HashMap<u64, _> = runner
                .ring_ops_with(exact)
                .expect("ops")
                .into_iter()
                .collect();
            for (op, rows, cols) in ops {
                let w = &mine[&op];
                let blocked = matches!(w.ints(), Ints::Blocked { .. });
                assert!(!(exact && blocked), "op {op}: an exact session's are wide");
                blocked_ops += usize::from(blocked);
                let u: Vec<u32> = (0..cols).map(|i| i.wrapping_mul(2_654_435_761)).collect();
                let mut want = vec![0u32; rows as usize];
                w.mul(&u, 1, &mut want);
                let got = call(&f, |reply| Job::Linear {
                    peer: peer(),
                    session,
                    op,
                    words: words_to_bytes(&u),
                    reply,
                });
                assert_eq!(words(got), want, "op {op}, exact {exact}");
            }
        }
        assert!(
            blocked_ops > 0,
            "no op of the default precision was blocked"
        );
    }

    fn words(r: InferResponse) -> Vec<u32> {
        match r {
            InferResponse::Words { words } => {
                veil_protocol::wire::bytes_to_words(&words).expect("words")
            }
            other => panic!("expected words, got {other:?}"),
        }
    }

    fn refused(r: InferResponse, code: ErrorCode, says: &str) {
        match r {
            InferResponse::Error { code: c, message } => {
                assert_eq!(c, code, "{message}");
                assert!(message.contains(says), "{message}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Masked sessions: a compute node returns `W u` for any words and a mask provider `W r`
    /// for the seed's masks, each exactly as the client's own integer weights give them;
    /// each role refuses the other's request, and wrong lengths, unknown ops and sessions
    /// are clear errors that leave the session serving.
    #[test]
    fn masked_sessions_answer_in_their_role_and_refuse_bad_requests() {
        use veil_protocol::wire::words_to_bytes;
        let f = fixture(limits());
        let (compute, provider) = ([31u8; 16], [32u8; 16]);
        let seed = [5u8; 32];
        let ops = match open_masked(&f, compute, None) {
            InferResponse::OpenedMasked { ops, layers, .. } => {
                assert_eq!(layers.0, 0);
                ops
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(ops.len(), 4 * f.shard.meta.layer_range().len());
        assert!(matches!(
            open_masked(&f, provider, Some(seed)),
            InferResponse::OpenedMasked { .. }
        ));
        // the client's integers for the same shard
        let runner = StageRunner::new(&f.shard, &Compute::cpu().device).expect("runner");
        let mine: HashMap<u64, _> = runner.ring_ops().expect("ops").into_iter().collect();
        let (op, rows, cols) = ops[1];
        let w = &mine[&op];
        assert_eq!((w.rows(), w.cols()), (rows as usize, cols as usize));
        let n = 3;
        let u: Vec<u32> = (0..n * cols as usize)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761))
            .collect();
        let linear = |session, op, words: &[u32]| {
            call(&f, |reply| Job::Linear {
                peer: peer(),
                session,
                op,
                words: words_to_bytes(words),
                reply,
            })
        };
        let mut expected = vec![0u32; n * rows as usize];
        w.mul(&u, n, &mut expected);
        assert_eq!(words(linear(compute, op, &u)), expected);
        let masks = |session, op, first, n| {
            call(&f, |reply| Job::MaskProducts {
                peer: peer(),
                session,
                op,
                first,
                n,
                reply,
            })
        };
        let mut r = vec![0u32; 2 * cols as usize];
        veil_model::masked::MaskSeed::new(seed).fill(op, 7, 2, cols as usize, &mut r);
        let mut wr = vec![0u32; 2 * rows as usize];
        w.mul(&r, 2, &mut wr);
        assert_eq!(words(masks(provider, op, 7, 2)), wr);
        // each role refuses the other's request
        refused(
            masks(compute, op, 0, 1),
            ErrorCode::BadRequest,
            "no mask seed",
        );
        refused(
            linear(provider, op, &u),
            ErrorCode::BadRequest,
            "mask provider",
        );
        // bad input: a clear error, the session intact
        refused(
            linear(compute, op, &u[..cols as usize + 1]),
            ErrorCode::BadRequest,
            "not whole inputs",
        );
        refused(linear(compute, 9999, &u), ErrorCode::BadRequest, "op 9999");
        refused(
            masks(provider, op, 0, 0),
            ErrorCode::BadRequest,
            "positions",
        );
        refused(
            linear([77; 16], op, &u),
            ErrorCode::UnknownSession,
            "no such",
        );
        let odd = call(&f, |reply| Job::Linear {
            peer: peer(),
            session: compute,
            op,
            words: vec![1, 2, 3],
            reply,
        });
        refused(odd, ErrorCode::BadRequest, "32-bit words");
        assert_eq!(words(linear(compute, op, &u)), expected);
        // another peer cannot use the session; its owner can close it
        let stranger = call(&f, |reply| Job::Linear {
            peer: PeerId::random(),
            session: compute,
            op,
            words: words_to_bytes(&u),
            reply,
        });
        refused(stranger, ErrorCode::UnknownSession, "no such");
        let closed = call(&f, |reply| Job::Close {
            peer: peer(),
            session: compute,
            reply,
        });
        assert_eq!(closed, InferResponse::Closed);
        refused(
            linear(compute, op, &u),
            ErrorCode::UnknownSession,
            "no such",
        );
    }

    /// Two sessions' `Linear` requests for the same op that wait together are one pass over
    /// the weights, and each gets exactly its own product.
    #[test]
    fn concurrent_masked_requests_for_an_op_share_one_pass() {
        use veil_protocol::wire::words_to_bytes;
        let mut f = paused_fixture(limits());
        let runner = StageRunner::new(&f.shard, &Compute::cpu().device).expect("runner");
        let (op, w) = runner.ring_ops().expect("ops").swap_remove(2);
        let send = |job: Job| f.jobs.blocking_send(job).expect("send");
        let mut answers = Vec::new();
        let mut expected = Vec::new();
        for (k, session) in [[41u8; 16], [42u8; 16]].into_iter().enumerate() {
            let (tx, _rx) = oneshot::channel();
            send(Job::OpenMasked {
                peer: peer(),
                session,
                shard: f.shard_id,
                seed: None,
                exact: false,
                reply: tx,
            });
            let n = k + 1;
            let u: Vec<u32> = (0..n * w.cols())
                .map(|i| (i as u32 + 7 * k as u32).wrapping_mul(0x9e37_79b9))
                .collect();
            let mut y = vec![0u32; n * w.rows()];
            w.mul(&u, n, &mut y);
            expected.push(y);
            let (tx, rx) = oneshot::channel();
            send(Job::Linear {
                peer: peer(),
                session,
                op,
                words: words_to_bytes(&u),
                reply: tx,
            });
            answers.push(rx);
        }
        f.start();
        for (rx, y) in answers.into_iter().zip(expected) {
            assert_eq!(words(rx.blocking_recv().expect("reply")), y);
        }
        let status = wait_for(&f, |s| s.steps >= 2);
        assert_eq!(status.largest_batch, 2, "both requests in one pass");
        assert_eq!(status.batches, 1, "{status:?}");
    }
}
