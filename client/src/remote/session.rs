//! Sessions on a stage's replicas: choosing one, opening it (replaying the stage's rows on
//! a new replica), and a step with failover.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rand::RngCore;
use veil_model::ModelError;
use veil_protocol::receipt::frame_hash;
use veil_protocol::wire::{ErrorCode, InferRequest, InferResponse, SessionId, TensorFrame};
use veil_protocol::{InputChain, PeerId, Receipt, Statement};

use super::RemotePipeline;

/// A node answered that it does not know the session (it expired).
#[derive(Debug)]
struct SessionLost;

impl std::fmt::Display for SessionLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the node no longer holds the session")
    }
}

impl std::error::Error for SessionLost {}

impl RemotePipeline {
    /// Among the live replicas `live` of stage `i` (in a random order), the one with the
    /// fewest active sessions right now, asked with a stats request (1 s limit each, all at
    /// once). Replicas that do not answer are not preferred; ties keep the random order.
    pub(super) fn least_loaded(&self, i: usize, live: &[usize]) -> Option<usize> {
        if live.len() < 2 {
            return live.first().copied();
        }
        let asks: Vec<_> = live
            .iter()
            .map(|&k| {
                let (network, peer) = (self.network.clone(), self.stages[i].replicas[k]);
                self.handle.spawn(async move {
                    let ask = network.infer(peer, InferRequest::Stats);
                    match tokio::time::timeout(Duration::from_secs(1), ask).await {
                        Ok(Ok(InferResponse::Stats(s))) => Some(s.active_sessions),
                        _ => None,
                    }
                })
            })
            .collect();
        let loads: Vec<Option<u32>> = asks
            .into_iter()
            .map(|h| self.handle.block_on(h).ok().flatten())
            .collect();
        live.iter()
            .zip(&loads)
            .min_by_key(|(_, load)| load.unwrap_or(u32::MAX))
            .map(|(&k, _)| k)
    }

    /// Open a session for stage `i` on its least loaded live replica and replay its
    /// history; replicas that fail are marked dead and the next one is tried.
    pub(super) fn connect(&mut self, i: usize) -> Result<()> {
        loop {
            let s = &self.stages[i];
            let n = s.replicas.len();
            let live: Vec<usize> = (0..n)
                .map(|k| (s.first + k) % n)
                .filter(|&k| !s.dead[k])
                .collect();
            let Some(r) = self.least_loaded(i, &live) else {
                let s = &self.stages[i];
                bail!(
                    "stage {} (layers {}..{}) has no live replica left; run `veil deploy --repair` for this deployment",
                    s.stage,
                    s.layers.0,
                    s.layers.1
                );
            };
            match self.open_on(i, r) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let s = &mut self.stages[i];
                    s.dead[r] = true;
                    s.current = None;
                    self.stats.failovers += 1;
                    tracing::warn!(
                        "stage {}: {} is unavailable ({e:#})",
                        s.stage,
                        s.replicas[r]
                    );
                }
            }
        }
    }

    /// Open a new session on the replica stage `i` last used (after it forgot the old one).
    pub(super) fn reopen(&mut self, i: usize) -> Result<()> {
        let last = self.stages[i].last;
        self.open_on(i, last)
    }

    /// Open a fresh session for stage `i`'s shard on `peer`; returns its id and whether the
    /// node computes on a GPU.
    pub(super) fn new_session(&mut self, i: usize, peer: PeerId) -> Result<(SessionId, bool)> {
        let mut session = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut session);
        let open = InferRequest::Open {
            session,
            shard: self.stages[i].shard,
            max_len: self.context as u32,
            exact: self.exact,
        };
        match self.request(peer, open)? {
            InferResponse::Opened { gpu, .. } => Ok((session, gpu)),
            InferResponse::Error { message, .. } => bail!("{peer}: {message}"),
            other => bail!("{peer}: unexpected answer {other:?}"),
        }
    }

    pub(super) fn open_on(&mut self, i: usize, r: usize) -> Result<()> {
        self.open_replaying(i, r).map(|_| ())
    }

    /// Open a session for stage `i` on replica `r` and replay the stage's history in its
    /// steps; returns the replica's answers to the replayed steps (rows, answer, receipt).
    pub(super) fn open_replaying(
        &mut self,
        i: usize,
        r: usize,
    ) -> Result<Vec<(usize, Vec<f32>, Receipt)>> {
        let peer = self.stages[i].replicas[r];
        let (session, gpu) = self.new_session(i, peer)?;
        self.stages[i].current = Some((r, session));
        self.stages[i].last = r;
        self.stages[i].audit.primary_gpu = gpu;
        let history = std::mem::take(&mut self.stages[i].history);
        if history.is_empty() {
            return Ok(Vec::new());
        }
        let t = history.len() / self.d_model;
        tracing::info!(
            "stage {}: replaying {t} positions in {} steps on {peer}",
            self.stages[i].stage,
            self.stages[i].steps.len()
        );
        let steps = self.stages[i].steps.clone();
        let mut result = Ok(Vec::with_capacity(steps.len()));
        let mut chain = InputChain::new(&self.stages[i].shard);
        let mut at = 0;
        for rows in steps {
            let chunk = &history[at * self.d_model..(at + rows) * self.d_model];
            let first_row = at as u64;
            at += rows;
            chain.push_rows(chunk, self.d_model);
            let frame = TensorFrame::from_f32(&[rows, self.d_model], chunk);
            let r = self.request(
                peer,
                InferRequest::Step {
                    session,
                    hidden: frame,
                },
            );
            let expect = Statement {
                session,
                shard: self.stages[i].shard,
                first_row,
                rows: rows as u32,
                input_chain: chain.hash(),
                output_hash: [0; 32],
            };
            let answer = match r {
                Ok(InferResponse::Hidden { hidden, receipt }) => {
                    checked_answer(peer, &expect, hidden, receipt, rows, self.d_model)
                }
                Ok(InferResponse::Error { message, .. }) => Err(anyhow!("{peer}: {message}")),
                Ok(other) => Err(anyhow!("{peer}: unexpected answer {other:?}")),
                Err(e) => Err(e),
            };
            match (answer, &mut result) {
                (Ok(a), Ok(out)) => out.push(a),
                (Err(e), _) => {
                    result = Err(e);
                    break;
                }
                _ => {}
            }
        }
        self.stages[i].history = history;
        result
    }

    /// [`RemotePipeline::stage_step`] without the check.
    pub(super) fn primary_step(&mut self, i: usize, x: &[f32]) -> Result<Vec<f32>> {
        let t = x.len() / self.d_model;
        let mut reopened = false;
        loop {
            let attempt = (|| -> Result<(usize, Vec<f32>, Receipt)> {
                if self.stages[i].current.is_none() {
                    self.connect(i)?;
                }
                let (r, session) = self.stages[i]
                    .current
                    .ok_or_else(|| anyhow!("no session"))?;
                let peer = self.stages[i].replicas[r];
                let frame = TensorFrame::from_f32(&[t, self.d_model], x);
                let mut chain = self.stages[i].chain.clone();
                chain.push_rows(x, self.d_model);
                let expect = Statement {
                    session,
                    shard: self.stages[i].shard,
                    first_row: (self.stages[i].history.len() / self.d_model) as u64,
                    rows: t as u32,
                    input_chain: chain.hash(),
                    output_hash: [0; 32],
                };
                match self.request(
                    peer,
                    InferRequest::Step {
                        session,
                        hidden: frame,
                    },
                )? {
                    InferResponse::Hidden { hidden, receipt } => {
                        let (_, values, receipt) =
                            checked_answer(peer, &expect, hidden, receipt, t, self.d_model)?;
                        Ok((r, values, receipt))
                    }
                    InferResponse::Error {
                        code: ErrorCode::ContextFull,
                        message,
                    } => Err(anyhow!(ModelError::ContextOverflow {
                        needed: self.position + t,
                        capacity: self.context
                    }))
                    .context(message),
                    InferResponse::Error {
                        code: ErrorCode::UnknownSession,
                        message,
                    } => Err(anyhow!(SessionLost)).context(format!("{peer}: {message}")),
                    InferResponse::Error { message, .. } => bail!("{peer}: {message}"),
                    other => bail!("{peer}: unexpected answer {other:?}"),
                }
            })();
            match attempt {
                Ok((r, y, receipt)) => {
                    let s = &mut self.stages[i];
                    s.history.extend_from_slice(x);
                    s.steps.push(t);
                    s.chain.push_rows(x, self.d_model);
                    if self.verification.rate > 0.0 {
                        s.audit.answered(r, &y, t, receipt);
                    } else if let Some(n) = s.audit.answered.get_mut(r) {
                        *n += 1;
                    }
                    return Ok(y);
                }
                Err(e) if e.downcast_ref::<ModelError>().is_some() => return Err(e),
                Err(e) if e.downcast_ref::<SessionLost>().is_some() && !reopened => {
                    // The node forgot the session (it expired while idle): open a new one on
                    // the same node and replay, once per step.
                    reopened = true;
                    let s = &mut self.stages[i];
                    s.current = None;
                    tracing::info!("stage {}: {e:#}; reopening the session", s.stage);
                    if let Err(e) = self.reopen(i) {
                        tracing::warn!("stage {i}: cannot reopen ({e:#})");
                    }
                }
                Err(e) => {
                    let s = &mut self.stages[i];
                    let Some((r, _)) = s.current.take() else {
                        return Err(e);
                    };
                    s.dead[r] = true;
                    self.stats.failovers += 1;
                    tracing::warn!(
                        "stage {}: {} failed ({e:#}); trying another replica",
                        s.stage,
                        s.replicas[r]
                    );
                }
            }
        }
    }
}

/// The answer of `peer` to a step of `rows` rows, checked: shape, values, and its receipt
/// against `expect` (whose output hash is taken from the answer itself).
fn checked_answer(
    peer: PeerId,
    expect: &Statement,
    hidden: TensorFrame,
    receipt: Receipt,
    rows: usize,
    d: usize,
) -> Result<(usize, Vec<f32>, Receipt)> {
    let (shape, values) = hidden.to_f32()?;
    if shape != [rows, d] {
        bail!("{peer} answered with shape {shape:?}");
    }
    let expect = Statement {
        output_hash: frame_hash(&hidden),
        ..*expect
    };
    receipt
        .check(&peer, &expect, &hidden)
        .with_context(|| format!("{peer}'s answer"))?;
    Ok((rows, values, receipt))
}
