//! Masked-mode sessions (see `veil_model::masked`): the node serves a shard's linear ops as
//! integers on words it cannot read. A compute session gets masked words `u` and returns
//! `W u mod 2^32`; a mask provider's session holds the client's mask seed and returns
//! `W r mod 2^32` for the masks of the positions asked. A session has one role, fixed when
//! it opens, so a node never sees both halves of an op in the same session (the client's
//! placement keeps the two roles of an op on different nodes).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use veil_kernels::ring::RingMatrix;
use veil_model::masked::MaskSeed;
use veil_protocol::codec::MAX_FRAME;
use veil_protocol::wire::{
    bytes_to_words, words_to_bytes, ErrorCode, InferResponse, SessionId, ShardId,
};
use veil_protocol::PeerId;

use super::{error, refuse, short, Engine, Refusal};

/// Where an answer goes.
type Reply = tokio::sync::oneshot::Sender<InferResponse>;

/// A checked `Linear` request waiting for its op's pass: words, positions, reply.
type Waiting = (Vec<u32>, usize, Reply);

/// A `Linear` request as the engine receives it: peer, session, op, words, reply.
pub(super) type LinearJob = (PeerId, SessionId, u64, Vec<u8>, Reply);

/// A shard's ops as integers: op number → weights.
pub(super) type RingOps = Arc<HashMap<u64, Arc<RingMatrix>>>;

pub(super) struct MaskedSession {
    pub(super) peer: PeerId,
    pub(super) shard: ShardId,
    ops: RingOps,
    /// The mask seed of a mask provider's session; `None` for a compute node's.
    seed: Option<MaskSeed>,
    pub(super) last_used: Instant,
}

/// Largest answer a masked request may ask for, in words (the codec's frame, less room
/// for the envelope).
const MAX_WORDS: usize = (MAX_FRAME - 1024) / 4;

impl Engine {
    pub(super) fn open_masked(
        &mut self,
        peer: PeerId,
        session: SessionId,
        shard: ShardId,
        seed: Option<[u8; 32]>,
        exact: bool,
    ) -> InferResponse {
        if let Err(refusal) = self.admit(peer, &session) {
            return refusal.response();
        }
        if let Err(refusal) = self.load(shard) {
            return refusal.response();
        }
        let Some(loaded) = self.runners.get_mut(&shard) else {
            return error(ErrorCode::Internal, "shard vanished");
        };
        let ops = match &loaded.ring[usize::from(exact)] {
            Some(ops) => ops.clone(),
            None => {
                let started = Instant::now();
                let ops: RingOps = match loaded.runner.ring_ops_with(exact) {
                    Ok(ops) => Arc::new(ops.into_iter().collect()),
                    Err(e) => return error(ErrorCode::Internal, e.to_string()),
                };
                let bytes: usize = ops.values().map(|w| w.weight_bytes()).sum();
                loaded.bytes += bytes as u64;
                loaded.ring[usize::from(exact)] = Some(ops.clone());
                tracing::info!(
                    "shard {}: {} ops as {} integers for masked sessions ({} MiB, {:.1} s)",
                    &hex::encode(shard)[..12],
                    ops.len(),
                    if exact { "wide (exact)" } else { "blocked" },
                    bytes >> 20,
                    started.elapsed().as_secs_f64()
                );
                ops
            }
        };
        let meta = loaded.runner.meta();
        let layers = (meta.layers.0 as u32, meta.layers.1 as u32);
        let mut list: Vec<(u64, u32, u32)> = ops
            .iter()
            .map(|(&op, w)| (op, w.rows() as u32, w.cols() as u32))
            .collect();
        list.sort_unstable();
        let role = if seed.is_some() {
            "mask provider"
        } else {
            "compute node"
        };
        self.store.touch(&shard);
        self.masked.insert(
            session,
            MaskedSession {
                peer,
                shard,
                ops,
                seed: seed.map(MaskSeed::new),
                last_used: Instant::now(),
            },
        );
        tracing::info!(
            "masked session {} opened on shard {} (layers {}..{}) as {role} for {peer}",
            short(&session),
            &hex::encode(shard)[..12],
            layers.0,
            layers.1
        );
        InferResponse::OpenedMasked {
            session,
            layers,
            ops: list,
        }
    }

    /// The session and op a masked request names, checked: the session is the peer's and
    /// has the role the request needs (`provider`), and the op is the shard's.
    fn masked_op(
        &mut self,
        peer: PeerId,
        session: &SessionId,
        op: u64,
        provider: bool,
    ) -> Result<(Arc<RingMatrix>, Option<MaskSeed>), Refusal> {
        let s = match self.masked.get_mut(session) {
            Some(s) if s.peer == peer => s,
            _ => return Err(refuse(ErrorCode::UnknownSession, "no such masked session")),
        };
        s.last_used = Instant::now();
        match (provider, s.seed.is_some()) {
            (true, false) => {
                return Err(refuse(
                    ErrorCode::BadRequest,
                    "this session computes masked words (Linear); it holds no mask seed",
                ))
            }
            (false, true) => {
                return Err(refuse(
                    ErrorCode::BadRequest,
                    "this session is a mask provider's (MaskProducts); it computes no \
                     masked words",
                ))
            }
            _ => {}
        }
        let w = s.ops.get(&op).cloned().ok_or_else(|| {
            refuse(
                ErrorCode::BadRequest,
                format!("op {op} is not one of this shard's"),
            )
        })?;
        Ok((w, s.seed.clone()))
    }

    /// A `Linear` request checked: the op's weights and the words, `n` whole inputs.
    fn linear_input(
        &mut self,
        peer: PeerId,
        session: SessionId,
        op: u64,
        words: &[u8],
    ) -> Result<(Arc<RingMatrix>, Vec<u32>, usize), Refusal> {
        let (w, _) = self.masked_op(peer, &session, op, false)?;
        let u = bytes_to_words(words).map_err(|e| refuse(ErrorCode::BadRequest, e.to_string()))?;
        if u.is_empty() || u.len() % w.cols() != 0 {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!(
                    "{} words are not whole inputs of op {op}, which takes {}",
                    u.len(),
                    w.cols()
                ),
            ));
        }
        let n = u.len() / w.cols();
        if n * w.rows() > MAX_WORDS {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!("{n} positions of op {op} at once: the answer would be too large"),
            ));
        }
        Ok((w, u, n))
    }

    /// Answer the `Linear` requests that arrived together. Requests of different sessions
    /// for the same op of the same shard are multiplied in one pass over its weights
    /// (decode reads the weights from memory once for all of them); each answer is its own
    /// rows of the product.
    pub(super) fn linears(&mut self, jobs: Vec<LinearJob>) {
        let started = Instant::now();
        // valid requests grouped by their weights (one Arc per shard's op)
        let mut groups: Vec<(Arc<RingMatrix>, Vec<Waiting>)> = Vec::new();
        for (peer, session, op, words, reply) in jobs {
            match self.linear_input(peer, session, op, &words) {
                Ok((w, u, n)) => match groups.iter_mut().find(|g| Arc::ptr_eq(&g.0, &w)) {
                    Some(g) => g.1.push((u, n, reply)),
                    None => groups.push((w, vec![(u, n, reply)])),
                },
                Err(refusal) => {
                    let _ = reply.send(refusal.response());
                }
            }
        }
        for (w, requests) in groups {
            let total: usize = requests.iter().map(|r| r.1).sum();
            let answers: Vec<Vec<u32>> = if requests.len() == 1 || total * w.rows() > MAX_WORDS {
                requests
                    .iter()
                    .map(|(u, n, _)| {
                        let mut out = vec![0u32; n * w.rows()];
                        veil_kernels::on_workers(|| w.mul(u, *n, &mut out));
                        out
                    })
                    .collect()
            } else {
                let u: Vec<u32> = requests.iter().flat_map(|r| r.0.iter().copied()).collect();
                let mut out = vec![0u32; total * w.rows()];
                veil_kernels::on_workers(|| w.mul(&u, total, &mut out));
                let mut rest = out.as_slice();
                requests
                    .iter()
                    .map(|(_, n, _)| {
                        let (mine, after) = rest.split_at(n * w.rows());
                        rest = after;
                        mine.to_vec()
                    })
                    .collect()
            };
            self.largest_batch = self.largest_batch.max(requests.len() as u32);
            self.batches += 1;
            for ((_, _, reply), out) in requests.into_iter().zip(answers) {
                let _ = reply.send(self.answered(out, started));
            }
        }
    }

    pub(super) fn mask_products(
        &mut self,
        peer: PeerId,
        session: SessionId,
        op: u64,
        first: u64,
        n: u32,
    ) -> InferResponse {
        let started = Instant::now();
        let (w, seed) = match self.masked_op(peer, &session, op, true) {
            Ok((w, Some(seed))) => (w, seed),
            Ok(_) => return error(ErrorCode::Internal, "a provider's session without seed"),
            Err(refusal) => return refusal.response(),
        };
        let n = n as usize;
        if n == 0 || n * w.rows().max(w.cols()) > MAX_WORDS {
            return error(
                ErrorCode::BadRequest,
                format!("{n} positions of op {op} at once: ask for 1 to a frame's worth"),
            );
        }
        if first.checked_add(n as u64).is_none() {
            return error(ErrorCode::BadRequest, "positions overflow");
        }
        let mut r = vec![0u32; n * w.cols()];
        seed.fill(op, first, n, w.cols(), &mut r);
        let mut out = vec![0u32; n * w.rows()];
        veil_kernels::on_workers(|| w.mul(&r, n, &mut out));
        self.batches += 1;
        self.answered(out, started)
    }

    /// The answer's words (corrupted if this testnet node lies), counted as a step (the
    /// caller counts the passes over the weights).
    fn answered(&mut self, mut out: Vec<u32>, started: Instant) -> InferResponse {
        if let Some(liar) = self.liar.as_mut() {
            if liar.apply_words(&mut out) {
                tracing::debug!("lied on a masked answer");
            }
        }
        self.steps += 1;
        tracing::trace!("masked answer in {:?}", started.elapsed());
        InferResponse::Words {
            words: words_to_bytes(&out),
        }
    }

    /// The shards sessions of either mode use.
    pub(super) fn shards_in_use(&self) -> std::collections::HashSet<ShardId> {
        self.sessions
            .values()
            .map(|s| s.shard)
            .chain(self.masked.values().map(|s| s.shard))
            .collect()
    }
}
