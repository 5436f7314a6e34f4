//! The pipeline's side of verification (see `audit`): starting a check beside a step,
//! comparing, settling a dispute with a referee, and repairing the stages after a liar.

use anyhow::{anyhow, bail, Context, Result};
use rand::{Rng, RngCore};
use tokio::task::JoinHandle;
use veil_model::crypto::Shard;
use veil_protocol::wire::{InferRequest, InferResponse, SessionId, TensorFrame};
use veil_protocol::{InputChain, Network, PeerId, Receipt};

use super::audit::{disagreement, largest, tolerance, Detection, Verifier};
use super::RemotePipeline;

/// Rows per request when a verifier or referee catches up (a frame stays far below the
/// protocol's limit).
const ROWS_PER_REQUEST: usize = 256;

/// What a node answered wrongly: from which row, by how much, its signed answers, and
/// whether it said it computes on a GPU.
struct Wrong {
    row: usize,
    error: f32,
    answers: Vec<(Receipt, Vec<f32>)>,
    gpu: bool,
}

/// A verifier's answers, their receipts, and whether it computes on a GPU (when the check
/// opened its session).
type Checked = (Vec<f32>, Vec<Receipt>, Option<bool>);

/// A check under way: the verifier, and its answers to the rows from `verifier.rows` on.
#[derive(Debug)]
pub(super) struct Pending {
    pub verifier: Verifier,
    task: JoinHandle<Result<Checked>>,
}

/// Send `rows` (`[n, d]`) to `session` on `peer` in requests of at most
/// [`ROWS_PER_REQUEST`] rows; returns the answers, in order, and their receipts.
async fn send_rows(
    network: Network,
    peer: PeerId,
    session: SessionId,
    rows: Vec<f32>,
    d: usize,
) -> Result<(Vec<f32>, Vec<Receipt>)> {
    let mut out = Vec::with_capacity(rows.len());
    let mut receipts = Vec::new();
    for chunk in rows.chunks(ROWS_PER_REQUEST * d) {
        let t = chunk.len() / d;
        let hidden = TensorFrame::from_f32(&[t, d], chunk);
        match network
            .infer(peer, InferRequest::Step { session, hidden })
            .await?
        {
            InferResponse::Hidden { hidden, receipt } => {
                if receipt.signer().ok() != Some(peer) {
                    bail!("{peer} signed its answer wrongly");
                }
                let (shape, values) = hidden.to_f32()?;
                if shape != [t, d] {
                    bail!("{peer} answered with shape {shape:?}");
                }
                out.extend_from_slice(&values);
                receipts.push(receipt);
            }
            InferResponse::Error { message, .. } => bail!("{peer}: {message}"),
            other => bail!("{peer}: unexpected answer {other:?}"),
        }
    }
    Ok((out, receipts))
}

impl RemotePipeline {
    /// Whether to check stage `i`'s next step; if so, start the verifier on every row since
    /// its last check plus `x`.
    pub(super) fn start_check(&mut self, i: usize, x: &[f32]) -> Result<Option<Pending>> {
        let rate = self.verification.rate;
        if rate <= 0.0 || (rate < 1.0 && !rand::thread_rng().gen_bool(rate)) {
            return Ok(None);
        }
        if self.stages[i].current.is_none() {
            self.connect(i)?;
        }
        let pending = self.start_verifier(i, x);
        if pending.is_none() {
            self.stats.audit.skipped += 1;
        }
        Ok(pending)
    }

    /// Stage `i`'s verifier, and the request that opens its session on another live
    /// replica when it has none yet (sent by the check's task, ahead of the rows, so that
    /// opening costs the generation no waiting).
    fn verifier(&mut self, i: usize) -> Option<(Verifier, Option<InferRequest>)> {
        if let Some(v) = self.stages[i].audit.verifier {
            if self.stages[i].current.map(|(r, _)| r) != Some(v.replica) {
                return Some((v, None));
            }
            // the stage failed over to the verifier's node: it cannot check itself
            self.drop_verifier(i, v);
        }
        let s = &self.stages[i];
        let primary = s.current.map(|(r, _)| r);
        let candidate = (0..s.replicas.len())
            .map(|k| (s.first + 1 + k) % s.replicas.len())
            .find(|&k| !s.dead[k] && Some(k) != primary);
        let Some(r) = candidate else {
            let s = &mut self.stages[i];
            if !s.audit.warned {
                s.audit.warned = true;
                self.stats.audit.unverifiable.push(s.stage);
                tracing::warn!(
                    "stage {} has no second live replica: verification by re-execution is \
                     unavailable for it",
                    s.stage
                );
            }
            return None;
        };
        let mut session = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut session);
        let open = InferRequest::Open {
            session,
            shard: s.shard,
            max_len: self.context as u32,
            exact: self.exact,
        };
        let v = Verifier {
            replica: r,
            session,
            rows: 0,
            // known once it answers the open
            gpu: false,
        };
        self.stages[i].audit.verifier = Some(v);
        Some((v, Some(open)))
    }

    /// Start stage `i`'s verifier on its rows since its last check plus `x`.
    fn start_verifier(&mut self, i: usize, x: &[f32]) -> Option<Pending> {
        let (verifier, open) = self.verifier(i)?;
        let d = self.d_model;
        let mut rows = self.stages[i].history[verifier.rows * d..].to_vec();
        rows.extend_from_slice(x);
        let peer = self.stages[i].replicas[verifier.replica];
        self.stats.bytes_sent += (rows.len() * 4) as u64;
        let network = self.network.clone();
        let task = self.handle.spawn(async move {
            let mut gpu = None;
            if let Some(open) = open {
                match network.infer(peer, open).await? {
                    InferResponse::Opened { gpu: g, .. } => gpu = Some(g),
                    InferResponse::Error { message, .. } => bail!("{peer}: {message}"),
                    other => bail!("{peer}: unexpected answer {other:?}"),
                }
            }
            let (out, receipts) = send_rows(network, peer, verifier.session, rows, d).await?;
            Ok((out, receipts, gpu))
        });
        Some(Pending { verifier, task })
    }

    /// Forget stage `i`'s verifier (its session no longer matches the stage's rows), and a
    /// check of it under way.
    pub(super) fn drop_verifier(&mut self, i: usize, v: Verifier) {
        self.stages[i].audit.verifier = None;
        if let Some(p) = self.stages[i].audit.pending.take() {
            p.task.abort();
        }
        self.close_session(self.stages[i].replicas[v.replica], v.session);
    }

    pub(super) fn close_session(&self, peer: PeerId, session: SessionId) {
        let fut = self.network.infer(peer, InferRequest::Close { session });
        let _ = self
            .handle
            .block_on(async { tokio::time::timeout(std::time::Duration::from_secs(2), fut).await });
    }

    /// Compare the verifier's answers with the primary's (`y` answered the step of `t`
    /// rows); returns the answer to use.
    ///
    /// `more`: later stages will be fed again (a check settled in the middle of a
    /// generation), so rows they were already fed are repaired if wrong, even with `t = 0`.
    pub(super) fn settle(
        &mut self,
        i: usize,
        p: Pending,
        (y, t): (Vec<f32>, usize),
        more: bool,
    ) -> Result<Vec<f32>> {
        let mut v = p.verifier;
        if self.stages[i].audit.verifier.map(|a| a.session) != Some(v.session) {
            // the verifier was dropped meanwhile (convicted elsewhere, or its rows repaired)
            p.task.abort();
            self.stats.audit.skipped += 1;
            return Ok(y);
        }
        let (out, receipts) = match self.handle.block_on(p.task) {
            Ok(Ok((out, receipts, gpu))) => {
                v.gpu = gpu.unwrap_or(v.gpu);
                (out, receipts)
            }
            Ok(Err(e)) => {
                tracing::warn!("stage {}: the verifier failed: {e:#}", self.stages[i].stage);
                self.stages[i].dead[v.replica] = true;
                self.stats.audit.skipped += 1;
                self.drop_verifier(i, v);
                return Ok(y);
            }
            Err(e) => bail!("the check of stage {i} stopped: {e}"),
        };
        self.stats.bytes_received += (out.len() * 4) as u64;
        let d = self.d_model;
        let rows = self.stages[i].history.len() / d;
        if self.stages[i].current.map(|(r, _)| r) == Some(v.replica) {
            // the stage failed over to the verifier's node: no independent check
            self.drop_verifier(i, v);
            self.stats.audit.skipped += 1;
            return Ok(y);
        }
        self.stages[i].audit.verifier = Some(Verifier { rows, ..v });
        let audit = &self.stages[i].audit;
        let from = audit.checked;
        let theirs = &out[(from - v.rows) * d..];
        let tol = tolerance(audit.primary_gpu, v.gpu);
        if disagreement(&audit.unchecked, theirs, d, tol).is_none() {
            self.stats.audit.checks += 1;
            self.confirmed(i, rows);
            return Ok(y);
        }
        let verifier_rows = out[(from - v.rows) * d..].to_vec();
        // its answers as it signed them, chunk by chunk
        let mut answers = Vec::with_capacity(receipts.len());
        let mut at = 0;
        for r in receipts {
            let n = r.rows as usize * d;
            answers.push((r, out[at..at + n].to_vec()));
            at += n;
        }
        self.dispute(i, v, (&verifier_rows, answers), t, more)
            .map(|c| c.unwrap_or(y))
    }

    /// Settle stage `i`'s background check, if one is under way.
    pub(super) fn settle_pending(&mut self, i: usize, more: bool) -> Result<()> {
        match self.stages[i].audit.pending.take() {
            Some(p) => self.settle(i, p, (Vec::new(), 0), more).map(|_| ()),
            None => Ok(()),
        }
    }

    /// At the end of a generation: start checking stage `i`'s rows not checked yet (settled
    /// by [`RemotePipeline::settle_pending`], so that every stage's last check runs at once).
    pub(super) fn final_check(&mut self, i: usize) -> Result<()> {
        self.settle_pending(i, false)?;
        let d = self.d_model;
        let rows = self.stages[i].history.len() / d;
        if self.stages[i].audit.checked >= rows || self.stages[i].current.is_none() {
            return Ok(());
        }
        self.stages[i].audit.pending = self.start_verifier(i, &[]);
        Ok(())
    }

    /// The primary's and the verifier's answers to stage `i`'s rows `checked..` disagree:
    /// ask a referee, convict whoever differs from it, and carry on with correct answers.
    /// Returns the correct answer to the current step of `t` rows when the primary's was
    /// wrong.
    fn dispute(
        &mut self,
        i: usize,
        v: Verifier,
        (verifier_rows, verifier_answers): (&[f32], Vec<(Receipt, Vec<f32>)>),
        t: usize,
        more: bool,
    ) -> Result<Option<Vec<f32>>> {
        self.stats.audit.disputes += 1;
        let d = self.d_model;
        let rows = self.stages[i].history.len() / d;
        let from = self.stages[i].audit.checked;
        let (referee, truth, referee_gpu) = self.referee(i, v.replica).with_context(|| {
            format!(
                "stage {}: two replicas disagree and nothing can settle it",
                self.stages[i].stage
            )
        })?;
        let truth = &truth[from * d..];
        // the verifier: one session, one node
        let tol = tolerance(v.gpu, referee_gpu);
        if let Some((k, _)) = disagreement(verifier_rows, truth, d, tol) {
            let wrong = Wrong {
                row: from + k,
                error: largest(verifier_rows, truth, d),
                answers: verifier_answers,
                gpu: v.gpu,
            };
            self.convict(i, v.replica, wrong, &referee);
            // free what it holds for us (best effort)
            self.drop_verifier(i, v);
        }
        // the primary's answers, step by step (a failover may have changed who gave them)
        let audit = &self.stages[i].audit;
        let tol = tolerance(audit.primary_gpu, referee_gpu);
        let mut liars: Vec<(usize, Wrong)> = Vec::new();
        let mut first_bad: Option<usize> = None;
        let mut at = 0;
        for (replica, n, receipt) in &audit.steps {
            let (ours, right) = (
                &audit.unchecked[at * d..(at + n) * d],
                &truth[at * d..(at + n) * d],
            );
            if let Some((k, _)) = disagreement(ours, right, d, tol) {
                let row = from + at + k;
                first_bad = Some(first_bad.map_or(row, |f| f.min(row)));
                let signed = (receipt.clone(), ours.to_vec());
                let error = largest(ours, right, d);
                match liars.iter_mut().find(|l| l.0 == *replica) {
                    Some((_, w)) => {
                        w.error = w.error.max(error);
                        w.answers.push(signed);
                    }
                    None => liars.push((
                        *replica,
                        Wrong {
                            row,
                            error,
                            answers: vec![signed],
                            gpu: audit.primary_gpu,
                        },
                    )),
                }
            }
            at += n;
        }
        let Some(first_bad) = first_bad else {
            // the primary agrees with the referee
            self.confirmed(i, rows);
            return Ok(None);
        };
        let before = self.stats.audit.detections.len();
        for (replica, wrong) in liars {
            self.convict(i, replica, wrong, &referee);
        }
        if t == 0 && more {
            // settled in the background: the answer to the stage's last row was already used,
            // so the first right one is the next row's
            for d in &mut self.stats.audit.detections[before..] {
                d.found_at += 1;
            }
        }
        if let Some((r, session)) = self.stages[i].current {
            if self.stages[i].dead[r] {
                self.stages[i].current = None;
                self.close_session(self.stages[i].replicas[r], session);
                // an honest verifier holds every row: it carries the stage on
                if let Some(v) = self.stages[i].audit.verifier.take() {
                    self.stages[i].current = Some((v.replica, v.session));
                    self.stages[i].last = v.replica;
                    self.stages[i].audit.primary_gpu = v.gpu;
                }
            }
        }
        let truth = truth.to_vec();
        self.stages[i].audit.agreed(rows);
        // later stages were fed the wrong rows before this step: recompute them (at the end
        // of a generation nothing more will be computed from them)
        let sent = rows - t;
        if (t > 0 || more) && first_bad < sent && i + 1 < self.stages.len() {
            let fixed = truth[(first_bad - from) * d..(sent - from) * d].to_vec();
            self.repair(i + 1, first_bad, fixed)?;
            self.stats.audit.rows_repaired += (sent - first_bad) as u64;
        }
        Ok(Some(truth[(rows - t - from) * d..].to_vec()))
    }

    /// Stage `i`'s unchecked answers (up to row `rows`) agreed with a re-execution.
    fn confirmed(&mut self, i: usize, rows: usize) {
        let s = &self.stages[i];
        let stats = &mut self.stats.audit;
        for (replica, n, _) in &s.audit.steps {
            *stats
                .verified
                .entry(s.replicas[*replica].to_string())
                .or_default() += *n as u64;
            stats.rows_verified += *n as u64;
        }
        self.stages[i].audit.agreed(rows);
    }

    fn convict(&mut self, i: usize, replica: usize, wrong: Wrong, referee: &str) {
        let peer = self.stages[i].replicas[replica];
        self.shun(i, peer);
        let s = &mut self.stages[i];
        tracing::warn!(
            "stage {}: {peer} answered wrongly from position {} (relative error {:.3}, \
             settled by {referee}); it is no longer used",
            s.stage,
            wrong.row,
            wrong.error
        );
        let proof = crate::proof::FraudProof::new(
            &peer,
            &s.shard,
            s.stage,
            s.layers,
            self.d_model,
            (self.exact, wrong.gpu),
            &s.history,
            &wrong.answers,
            referee,
        );
        self.stats.audit.detections.push(Detection {
            stage: s.stage,
            peer: peer.to_string(),
            row: wrong.row,
            found_at: s.history.len() / self.d_model,
            error: wrong.error,
            steps_answered: s.audit.answered.get(replica).copied().unwrap_or(0),
            referee: referee.to_string(),
            proof: Some(proof),
            published: Vec::new(),
            publish_tried: false,
        });
    }

    /// Stop using `peer` in every stage: where it is a verifier, drop it; where it is the
    /// primary of another stage than `i`, that stage moves to another replica on its next
    /// step (replaying its rows).
    fn shun(&mut self, i: usize, peer: PeerId) {
        for j in 0..self.stages.len() {
            let Some(k) = self.stages[j].replicas.iter().position(|p| *p == peer) else {
                continue;
            };
            self.stages[j].dead[k] = true;
            if j == i {
                continue;
            }
            if let Some(v) = self.stages[j].audit.verifier.filter(|v| v.replica == k) {
                self.drop_verifier(j, v);
            }
            if let Some((r, session)) = self.stages[j].current.filter(|(r, _)| *r == k) {
                self.stages[j].current = None;
                self.close_session(self.stages[j].replicas[r], session);
            }
        }
    }

    /// The correct answers to every row of stage `i`: recomputed here from the deployment's
    /// own shard when it is at hand, else from a replica other than the two that disagree.
    /// Returns who computed them, the answers and whether on a GPU.
    fn referee(&mut self, i: usize, verifier: usize) -> Result<(String, Vec<f32>, bool)> {
        let (d, exact) = (self.d_model, self.exact);
        let rows = self.stages[i].history.clone();
        if let Some(runner) = self.local_referee(i)? {
            let mut cache = runner.new_cache(rows.len() / d);
            let out = runner
                .forward_host_with(&[&rows], &mut [&mut cache], exact)?
                .remove(0);
            return Ok(("local".into(), out, false));
        }
        let s = &self.stages[i];
        let primary = s.current.map(|(r, _)| r);
        let third = (0..s.replicas.len())
            .find(|&k| !s.dead[k] && Some(k) != primary && k != verifier)
            .ok_or_else(|| anyhow!("no local copy of the shard and no third replica"))?;
        let peer = s.replicas[third];
        let (session, gpu) = self
            .new_session(i, peer)
            .with_context(|| format!("{peer} cannot referee"))?;
        let out = self
            .handle
            .block_on(send_rows(self.network.clone(), peer, session, rows, d));
        self.close_session(peer, session);
        Ok((peer.to_string(), out?.0, gpu))
    }

    /// Stage `i` as computed here, when the deployment's directory holds its shard.
    fn local_referee(&mut self, i: usize) -> Result<Option<&veil_model::StageRunner>> {
        let stage = self.stages[i].stage;
        if !self.referees.contains_key(&stage) {
            let Some(dir) = &self.verification.shards else {
                return Ok(None);
            };
            let path = dir.join(format!("shard-{stage}.veil"));
            if !path.exists() {
                return Ok(None);
            }
            let shard =
                Shard::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let device = veil_model::Compute::cpu().device;
            let runner = veil_model::StageRunner::new(&shard, &device)?;
            self.referees.insert(stage, runner);
        }
        Ok(self.referees.get(&stage))
    }

    /// Stages `j..` were fed wrong rows from `row` on: give stage `j` the correct ones
    /// (`fixed`, up to the rows it has), replay it, and pass its new answers on.
    fn repair(&mut self, j: usize, row: usize, mut fixed: Vec<f32>) -> Result<()> {
        let d = self.d_model;
        for j in j..self.stages.len() {
            let s = &mut self.stages[j];
            let end = row * d + fixed.len();
            s.history[row * d..end].copy_from_slice(&fixed);
            let mut chain = InputChain::new(&s.shard);
            chain.push_rows(&s.history, d);
            s.chain = chain;
            if let Some(v) = s.audit.verifier {
                self.drop_verifier(j, v);
            }
            if let Some((r, session)) = self.stages[j].current.take() {
                self.close_session(self.stages[j].replicas[r], session);
            }
            tracing::info!(
                "stage {}: recomputing from position {row} after a wrong answer upstream",
                self.stages[j].stage
            );
            let s = &self.stages[j];
            let r = if s.dead[s.last] {
                (0..s.replicas.len())
                    .find(|&k| !s.dead[k])
                    .ok_or_else(|| anyhow!("stage {} has no live replica left", s.stage))?
            } else {
                s.last
            };
            let replayed = self.open_replaying(j, r)?;
            let replica = self.stages[j].last;
            let audit = &mut self.stages[j].audit;
            audit.checked = 0;
            audit.unchecked.clear();
            audit.steps.clear();
            let mut answers = Vec::with_capacity(self.stages[j].history.len());
            for (n, a, receipt) in replayed {
                answers.extend_from_slice(&a);
                if self.verification.rate > 0.0 {
                    self.stages[j].audit.unchecked.extend_from_slice(&a);
                    self.stages[j].audit.steps.push((replica, n, receipt));
                }
            }
            fixed = answers[row * d..end].to_vec();
        }
        Ok(())
    }
}
