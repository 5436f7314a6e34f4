//! The compute engine: one thread owns the device, the loaded stage runners and every
//! session's KV cache. Requests arrive on a bounded channel; steps of concurrent sessions on
//! the same shard that are waiting together run as one batched forward pass.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::{Device, Distribution, Tensor};
use tokio::sync::{mpsc, oneshot};
use veil_model::cache::KvCache;
use veil_model::StageRunner;
use veil_protocol::wire::{ErrorCode, InferResponse, SessionId, ShardId, TensorFrame};
use veil_protocol::PeerId;

use crate::store::ShardStore;

/// Work for the engine.
#[derive(Debug)]
pub enum Job {
    Open {
        peer: PeerId,
        session: SessionId,
        shard: ShardId,
        max_len: u32,
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
    Status(oneshot::Sender<Status>),
}

/// What the engine is doing, for capacity ads and logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Status {
    pub active_sessions: u32,
    pub reserved_bytes: u64,
    pub loaded_shards: u32,
}

/// Limits the engine enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub memory_bytes: u64,
    pub max_sessions: u32,
    pub idle_timeout: Duration,
    /// Added to every batch of steps (see the `step_delay_ms` setting).
    pub step_delay: Duration,
}

struct Loaded {
    runner: StageRunner,
    bytes: u64,
    last_used: Instant,
}

struct Session {
    peer: PeerId,
    shard: ShardId,
    cache: KvCache,
    reserved: u64,
    last_used: Instant,
}

struct Engine {
    device: Device,
    store: Arc<ShardStore>,
    limits: Limits,
    runners: HashMap<ShardId, Loaded>,
    sessions: HashMap<SessionId, Session>,
}

fn error(code: ErrorCode, message: impl Into<String>) -> InferResponse {
    InferResponse::Error {
        code,
        message: message.into(),
    }
}

/// Start the engine thread; returns the job queue.
pub fn spawn(device: Device, store: Arc<ShardStore>, limits: Limits) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel(1024);
    let engine = Engine {
        device,
        store,
        limits,
        runners: HashMap::new(),
        sessions: HashMap::new(),
    };
    std::thread::Builder::new()
        .name("veil-engine".into())
        .spawn(move || engine.run(rx))
        .expect("spawn the engine thread");
    tx
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
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut last_sweep = Instant::now();
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let mut steps = Vec::new();
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
                        reply,
                    } => {
                        let r = self.open(peer, session, shard, max_len);
                        let _ = reply.send(r);
                    }
                    Job::Close {
                        peer,
                        session,
                        reply,
                    } => {
                        let r = match self.sessions.get(&session) {
                            Some(s) if s.peer == peer => {
                                self.sessions.remove(&session);
                                InferResponse::Closed
                            }
                            _ => error(ErrorCode::UnknownSession, "no such session"),
                        };
                        let _ = reply.send(r);
                    }
                    Job::Status(reply) => {
                        let _ = reply.send(self.status());
                    }
                }
            }
            if !steps.is_empty() {
                if !self.limits.step_delay.is_zero() {
                    std::thread::sleep(self.limits.step_delay);
                }
                self.steps(steps);
            }
            if last_sweep.elapsed() > Duration::from_secs(5) {
                self.expire();
                last_sweep = Instant::now();
            }
        }
    }

    fn status(&self) -> Status {
        Status {
            active_sessions: self.sessions.len() as u32,
            reserved_bytes: self.reserved(),
            loaded_shards: self.runners.len() as u32,
        }
    }

    fn reserved(&self) -> u64 {
        self.runners.values().map(|r| r.bytes).sum::<u64>()
            + self.sessions.values().map(|s| s.reserved).sum::<u64>()
    }

    fn expire(&mut self) {
        let timeout = self.limits.idle_timeout;
        let before = self.sessions.len();
        self.sessions.retain(|_, s| s.last_used.elapsed() < timeout);
        let gone = before - self.sessions.len();
        if gone > 0 {
            tracing::info!("closed {gone} idle session(s)");
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
                .filter(|(id, _)| !self.sessions.values().any(|s| &s.shard == *id))
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

    fn open(
        &mut self,
        peer: PeerId,
        session: SessionId,
        shard: ShardId,
        max_len: u32,
    ) -> InferResponse {
        if self.sessions.contains_key(&session) {
            return error(ErrorCode::BadRequest, "session id already in use");
        }
        if self.sessions.len() >= self.limits.max_sessions as usize {
            return error(
                ErrorCode::Busy,
                format!(
                    "this node serves its maximum of {} sessions",
                    self.limits.max_sessions
                ),
            );
        }
        if max_len == 0 {
            return error(ErrorCode::BadRequest, "max_len must be positive");
        }
        if !self.runners.contains_key(&shard) {
            if !self.store.has(&shard) {
                return error(
                    ErrorCode::UnknownShard,
                    format!("no shard {}", hex::encode(shard)),
                );
            }
            let bytes = self.store.size(&shard);
            if !self.make_room(bytes, None) {
                return error(ErrorCode::Busy, "not enough memory to load the shard");
            }
            match self.store.load(&shard) {
                Ok(s) => {
                    tracing::info!(
                        "loaded shard {} (layers {}..{})",
                        &hex::encode(shard)[..12],
                        s.meta.layers.0,
                        s.meta.layers.1
                    );
                    let runner = StageRunner::new(&s, &self.device);
                    self.runners.insert(
                        shard,
                        Loaded {
                            runner,
                            bytes,
                            last_used: Instant::now(),
                        },
                    );
                }
                Err(e) => return error(ErrorCode::Internal, e.to_string()),
            }
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
        self.sessions.insert(
            session,
            Session {
                peer,
                shard,
                cache,
                reserved: kv_bytes,
                last_used: Instant::now(),
            },
        );
        InferResponse::Opened {
            session,
            layers: (meta.layers.0 as u32, meta.layers.1 as u32),
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
        // Validate each step and group the valid ones by shard.
        let mut groups: HashMap<
            ShardId,
            Vec<(SessionId, Vec<f32>, usize, oneshot::Sender<InferResponse>)>,
        > = HashMap::new();
        for (peer, session, frame, reply) in steps {
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
            let shard = s.shard;
            groups
                .entry(shard)
                .or_default()
                .push((session, values, shape[0], reply));
        }
        for (shard, group) in groups {
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
            let result = loaded.runner.forward_host(&inputs, &mut caches);
            let d = loaded.runner.meta().config.d_model;
            match result {
                Ok(outputs) => {
                    for ((_, _, t, reply), out) in group.into_iter().zip(outputs) {
                        let hidden = TensorFrame::from_f32(&[t, d], &out);
                        let _ = reply.send(InferResponse::Hidden { hidden });
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
    }
}
