//! Generation through a deployment's nodes: the client encodes, each stage's node runs its
//! shard, the client decodes. Every stage keeps the encrypted inputs it was sent, so that
//! when a node fails or times out the stage moves to a replica, which rebuilds its KV cache
//! by replaying them, and generation goes on with the same result. Every answer carries the
//! node's signed receipt, checked here; with verification on, `check` re-executes a
//! stage's rows on a second replica and settles disagreements (see `audit`).

mod audit;
mod check;
pub mod masked;
mod publish;
mod session;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{Tensor, TensorData};
use tokio::runtime::Handle;
use veil_model::crypto::{ClientBundle, ClientModel};
use veil_model::nn::tensor_to_vec;
use veil_model::{ModelError, Precision, TokenModel};
use veil_protocol::wire::{InferRequest, InferResponse, SessionId};
use veil_protocol::{InputChain, Multiaddr, Network, PeerId};

use audit::StageAudit;
pub use audit::{tolerance, AuditStats, Detection, Verification, DEFAULT_RATE};
pub use publish::{verdict_word, Learned};

use crate::deployment::Deployment;

struct RemoteStage {
    stage: usize,
    layers: (usize, usize),
    shard: [u8; 32],
    replicas: Vec<PeerId>,
    /// Replicas that failed during this generation.
    dead: Vec<bool>,
    current: Option<(usize, SessionId)>,
    /// The replica of the latest session.
    last: usize,
    /// Where the search for a live replica starts: chosen at random per pipeline, so that
    /// sessions spread over the replicas.
    first: usize,
    /// Every input row sent so far, `[n, d]` flattened.
    history: Vec<f32>,
    /// Rows per step of `history`, in order: a replay repeats the same steps, so that the
    /// new replica computes bit for bit what the old one did (a prompt replayed with the
    /// tokens after it in one step would round differently, and quantized products can
    /// turn that into another token).
    steps: Vec<usize>,
    /// The commitment to `history` that receipts sign.
    chain: InputChain,
    /// What verification keeps of this stage.
    audit: StageAudit,
}

/// Traffic, failover and verification counters of a remote generation.
#[derive(Debug, Clone, Default)]
pub struct RemoteStats {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub failovers: u32,
    pub audit: AuditStats,
}

/// A deployment used as a [`TokenModel`].
pub struct RemotePipeline {
    handle: Handle,
    network: Network,
    client: ClientModel,
    /// The KV cache of the layers the client runs itself (empty without client layers).
    client_cache: veil_model::crypto::ClientCache,
    stages: Vec<RemoteStage>,
    d_model: usize,
    context: usize,
    position: usize,
    /// Whether nodes keep f32 activations for this pipeline's sessions.
    exact: bool,
    pub stats: RemoteStats,
    verification: Verification,
    /// Stages recomputed here to settle disputes, loaded on first need.
    referees: HashMap<usize, veil_model::StageRunner>,
}

/// A stage's replicas (their addresses told to `network`) and its shard id, or why the
/// stage cannot be served.
pub(crate) fn resolve_stage(
    handle: &Handle,
    network: &Network,
    deployment: &Deployment,
    s: &crate::deployment::StagePlacement,
) -> Result<(Vec<PeerId>, [u8; 32])> {
    let mut replicas = Vec::new();
    for r in &s.replicas {
        let peer: PeerId = r
            .peer
            .parse()
            .with_context(|| format!("bad peer id `{}`", r.peer))?;
        for a in &r.addrs {
            if let Ok(addr) = a.parse::<Multiaddr>() {
                let _ = handle.block_on(network.add_address(peer, addr));
            }
        }
        replicas.push(peer);
    }
    if replicas.is_empty() {
        bail!(
            "stage {} has no replica; run `veil deploy --repair {}`",
            s.stage,
            deployment.id
        );
    }
    let shard = hex::decode(&s.shard)
        .ok()
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("bad shard id in stage {}", s.stage))?;
    Ok((replicas, shard))
}

fn to_model_error(e: anyhow::Error) -> ModelError {
    ModelError::Backend(format!("{e:#}"))
}

impl RemotePipeline {
    /// Prepare sessions on `deployment` (opened lazily on first use). `precision` applies to
    /// the client's own products and to the nodes' for these sessions.
    pub fn new(
        handle: Handle,
        network: Network,
        bundle: &ClientBundle,
        deployment: &Deployment,
        context: usize,
        precision: Precision,
    ) -> Result<Self> {
        let device = veil_model::Compute::cpu().device;
        let client = ClientModel::with_precision(bundle, &device, precision)?;
        Self::with_client(handle, network, client, deployment, context, precision)
    }

    /// Like [`RemotePipeline::new`] with the client's tables already built (they can be
    /// cloned cheaply and shared by many pipelines).
    pub fn with_client(
        handle: Handle,
        network: Network,
        client: ClientModel,
        deployment: &Deployment,
        context: usize,
        precision: Precision,
    ) -> Result<Self> {
        let mut stages = Vec::new();
        for s in &deployment.stages {
            let (replicas, shard) = resolve_stage(&handle, &network, deployment, s)?;
            let n_replicas = replicas.len();
            stages.push(RemoteStage {
                stage: s.stage,
                layers: s.layers,
                shard,
                dead: vec![false; replicas.len()],
                audit: StageAudit::new(n_replicas),
                replicas,
                current: None,
                last: 0,
                first: rand::random::<usize>() % n_replicas,
                history: Vec::new(),
                steps: Vec::new(),
                chain: InputChain::new(&shard),
            });
        }
        let (d_model, max_seq_len) = (client.config.d_model, client.config.max_seq_len);
        Ok(RemotePipeline {
            handle,
            network,
            client_cache: client.new_cache(context),
            client,
            stages,
            d_model,
            context: context.min(max_seq_len),
            position: 0,
            exact: precision == Precision::Exact,
            stats: RemoteStats::default(),
            verification: Verification::default(),
            referees: HashMap::new(),
        })
    }

    /// Check the nodes' answers as `v` says (off by default).
    pub fn set_verification(&mut self, v: Verification) {
        self.verification = v;
    }

    /// Leave out replicas that `distrusted` names (peers with proof of lying against them),
    /// unless that would leave a stage with none.
    pub fn avoid(&mut self, distrusted: &dyn Fn(&PeerId) -> bool) {
        for s in &mut self.stages {
            let bad: Vec<bool> = s.replicas.iter().map(distrusted).collect();
            if bad.iter().any(|b| !b) {
                for (dead, bad) in s.dead.iter_mut().zip(bad) {
                    *dead |= bad;
                }
            }
        }
    }

    /// The peer serving each stage now.
    pub fn route(&self) -> Vec<String> {
        self.stages
            .iter()
            .map(|s| {
                s.current
                    .map_or_else(|| "-".into(), |(i, _)| s.replicas[i].to_string())
            })
            .collect()
    }

    /// Send `req` to `peer`. A node that asks this client to slow down (`RateLimited`) gets
    /// the same request again after a growing pause, for up to about five seconds, before its
    /// refusal counts as a failure.
    fn request(&mut self, peer: PeerId, req: InferRequest) -> Result<InferResponse> {
        let mut pause = Duration::from_millis(20);
        loop {
            let sent = veil_protocol::codec::encode(&req).map_or(0, |b| b.len() as u64);
            self.stats.bytes_sent += sent;
            let resp = self
                .handle
                .block_on(self.network.infer(peer, req.clone()))?;
            self.stats.bytes_received +=
                veil_protocol::codec::encode(&resp).map_or(0, |b| b.len() as u64);
            match resp {
                InferResponse::Error {
                    code: veil_protocol::wire::ErrorCode::RateLimited,
                    ref message,
                } if pause < Duration::from_secs(5) => {
                    tracing::debug!("{peer}: {message}; retrying in {pause:?}");
                    std::thread::sleep(pause);
                    pause *= 2;
                }
                resp => return Ok(resp),
            }
        }
    }

    /// Send `x` (`[t, d]`) through stage `i`, failing over to replicas as needed, and check
    /// the answer when verification picks this step.
    fn stage_step(&mut self, i: usize, x: &[f32]) -> Result<Vec<f32>> {
        // a check started at an earlier step ran meanwhile: its answers are in by now
        self.settle_pending(i, true)?;
        let pending = self.start_check(i, x)?;
        let y = self.primary_step(i, x);
        match (pending, y) {
            (None, y) => y,
            (Some(p), Ok(y)) if self.verification.rate >= 1.0 => {
                self.settle(i, p, (y, x.len() / self.d_model), true)
            }
            (Some(p), Ok(y)) => {
                self.stages[i].audit.pending = Some(p);
                Ok(y)
            }
            (Some(p), Err(e)) => {
                // the verifier computed a step that did not happen
                self.drop_verifier(i, p.verifier);
                Err(e)
            }
        }
    }

    /// Check what is still unchecked (with verification on), then close every open session
    /// (best effort).
    pub fn close(&mut self) {
        if self.verification.rate > 0.0 {
            // every stage's last check at once, then each settled
            for i in 0..self.stages.len() {
                if let Err(e) = self.final_check(i) {
                    tracing::warn!(
                        "stage {}: the last check failed: {e:#}",
                        self.stages[i].stage
                    );
                }
            }
            for i in 0..self.stages.len() {
                if let Err(e) = self.settle_pending(i, false) {
                    tracing::warn!(
                        "stage {}: the last check failed: {e:#}",
                        self.stages[i].stage
                    );
                }
            }
        }
        self.publish_proofs();
        for s in &mut self.stages {
            for (k, n) in std::mem::take(&mut s.audit.answered)
                .into_iter()
                .enumerate()
            {
                if n > 0 {
                    *self
                        .stats
                        .audit
                        .answered
                        .entry(s.replicas[k].to_string())
                        .or_default() += n;
                }
            }
            s.audit.answered = vec![0; s.replicas.len()];
        }
        // every session closed at once (best effort)
        let mut closing = Vec::new();
        for s in &mut self.stages {
            if let Some(v) = s.audit.verifier.take() {
                closing.push((s.replicas[v.replica], v.session));
            }
            if let Some((r, session)) = s.current.take() {
                closing.push((s.replicas[r], session));
            }
        }
        let network = &self.network;
        let closes = closing.into_iter().map(|(peer, session)| async move {
            let fut = network.infer(peer, InferRequest::Close { session });
            let _ = tokio::time::timeout(Duration::from_secs(2), fut).await;
        });
        self.handle.block_on(futures::future::join_all(closes));
    }

    fn run(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        if self.position + ids.len() > self.context {
            return Err(anyhow!(ModelError::ContextOverflow {
                needed: self.position + ids.len(),
                capacity: self.context
            }));
        }
        let mut x = tensor_to_vec(self.client.encode(ids, &mut self.client_cache)?)?;
        for i in 0..self.stages.len() {
            x = self.stage_step(i, &x)?;
        }
        self.position += ids.len();
        let t = ids.len();
        let device = veil_model::Compute::cpu().device;
        // every new row: with last client layers each one runs through them
        let hidden = Tensor::<2>::from_data(TensorData::new(x, [t, self.d_model]), &device);
        let logits = self.client.decode(hidden, &mut self.client_cache, false)?;
        Ok(tensor_to_vec(logits)?)
    }
}

impl TokenModel for RemotePipeline {
    fn context_len(&self) -> usize {
        self.context
    }

    fn position(&self) -> usize {
        self.position
    }

    fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.run(ids).map_err(|e| match e.downcast::<ModelError>() {
            Ok(m) => m,
            Err(e) => to_model_error(e),
        })
    }
}

impl Drop for RemotePipeline {
    fn drop(&mut self) {
        self.close();
    }
}
