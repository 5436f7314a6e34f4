//! Masked mode through a deployment (`--privacy masked`): the client runs everything but
//! the linear ops itself, on the deployment's own shards, and sends each op's masked
//! integers to a node that holds the stage's shard (its compute node), while a mask
//! provider — this process by default, or a node the user names — computes the masks'
//! share. Every product is checked (Freivalds); a node caught answering wrongly is not asked
//! again and the op is replayed on another replica (`veil_model::masked::party`).
//!
//! Placement: a mask provider never computes the ops it provides masks for — it would see
//! both `x + r` and `r` — so the compute replicas of a stage are its replicas less the
//! providers named for it; a stage left with none is refused with the reason.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::runtime::Handle;
use veil_model::crypto::{shard_path, ClientBundle, EncryptedLocal, Shard};
use veil_model::masked::{
    ComputeParty, Detection, LocalParty, MaskParty, MaskedStats, MasksAhead, Parties, PartyError,
    SplitParties, MASK_POSITIONS_AHEAD,
};
use veil_model::{ModelError, Precision, TokenModel};
use veil_protocol::wire::{
    bytes_to_words, words_to_bytes, ErrorCode, InferRequest, InferResponse, SessionId, ShardId,
};
use veil_protocol::{Network, PeerId};

use crate::deployment::Deployment;

/// Bytes of masked words per request at most: a prefill's op is split into requests of
/// whole positions below this, so that even the widest answer (gate and up, up to 8 times
/// its input in today's shapes) stays within the protocol's frame.
const CHUNK_BYTES: usize = 2 << 20;

/// How long a party that did not answer is left out before it is asked again.
const RETRY_DOWN_AFTER: Duration = Duration::from_secs(5);

/// Positions per mask-provider request.
const PROVIDER_POSITIONS: usize = 128;

/// Who computes the masks' share of each op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskProviders {
    /// This process (the default): the seed never leaves the client.
    Local,
    /// These nodes, tried in order; each must hold the shards of the stages it serves.
    Peers(Vec<PeerId>),
}

impl std::str::FromStr for MaskProviders {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "local" {
            return Ok(MaskProviders::Local);
        }
        s.split(',')
            .map(|p| {
                p.trim()
                    .parse::<PeerId>()
                    .map_err(|e| format!("`{p}` is neither `local` nor a peer id: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(MaskProviders::Peers)
    }
}

/// Bytes a masked generation sent and received.
#[derive(Debug, Default)]
pub struct Traffic {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// A node in one role of a masked session: compute node (no seed) or mask provider.
#[derive(Debug)]
pub struct NetParty {
    peer: PeerId,
    shard: ShardId,
    seed: Option<[u8; 32]>,
    /// The session's precision, which sets the node's integers (`RingFormat`).
    exact: bool,
    handle: Handle,
    network: Network,
    session: Mutex<Option<SessionId>>,
    /// Set once opening failed: the party is not tried again.
    failed: AtomicBool,
    /// Not asked before then: it did not answer (a node down or unreachable).
    down_until: Mutex<Option<Instant>>,
    traffic: Arc<Traffic>,
}

impl NetParty {
    fn new(
        peer: PeerId,
        shard: ShardId,
        seed: Option<[u8; 32]>,
        exact: bool,
        handle: Handle,
        network: Network,
        traffic: Arc<Traffic>,
    ) -> Self {
        NetParty {
            peer,
            shard,
            seed,
            exact,
            handle,
            network,
            session: Mutex::new(None),
            failed: AtomicBool::new(false),
            down_until: Mutex::new(None),
            traffic,
        }
    }

    fn err(&self, reason: impl Into<String>) -> PartyError {
        PartyError {
            party: self.peer.to_string(),
            reason: reason.into(),
        }
    }

    /// Send `req`, pausing and retrying while the node says this client is too fast.
    fn call(&self, req: InferRequest) -> Result<InferResponse, PartyError> {
        let mut pause = Duration::from_millis(5);
        loop {
            let sent = veil_protocol::codec::encode(&req).map_or(0, |b| b.len() as u64);
            self.traffic.sent.fetch_add(sent, Ordering::Relaxed);
            let resp = match self
                .handle
                .block_on(self.network.infer(self.peer, req.clone()))
            {
                Ok(r) => r,
                Err(e) => {
                    // its replicas serve meanwhile, without waiting for it on every op
                    *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Instant::now() + RETRY_DOWN_AFTER);
                    return Err(self.err(e.to_string()));
                }
            };
            let got = veil_protocol::codec::encode(&resp).map_or(0, |b| b.len() as u64);
            self.traffic.received.fetch_add(got, Ordering::Relaxed);
            match resp {
                InferResponse::Error {
                    code: ErrorCode::RateLimited,
                    ..
                } if pause < Duration::from_secs(5) => {
                    std::thread::sleep(pause);
                    pause *= 2;
                }
                InferResponse::Error { code, message } => {
                    return Err(self.err(format!("{code:?}: {message}")))
                }
                resp => return Ok(resp),
            }
        }
    }

    /// The session, opened on first use.
    fn session(&self) -> Result<SessionId, PartyError> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(self.err("its masked session could not be opened"));
        }
        let down = *self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        if down.is_some_and(|t| Instant::now() < t) {
            return Err(self.err(format!(
                "skipped: it did not answer in the last {} s",
                RETRY_DOWN_AFTER.as_secs()
            )));
        }
        let mut current = self.session.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = *current {
            return Ok(s);
        }
        let session: SessionId = rand::random();
        let opened = self.call(InferRequest::OpenMasked {
            session,
            shard: self.shard,
            seed: self.seed,
            exact: self.exact,
        });
        match opened {
            Ok(InferResponse::OpenedMasked { .. }) => {
                tracing::debug!(
                    "masked session opened on {} as {}",
                    self.peer,
                    if self.seed.is_some() {
                        "mask provider"
                    } else {
                        "compute node"
                    }
                );
                *current = Some(session);
                Ok(session)
            }
            other => {
                // a refusal is final for this session; a node that did not answer is
                // only skipped for a while (`down_until`, set by `call`)
                let down = *self.down_until.lock().unwrap_or_else(|e| e.into_inner());
                if down.is_none_or(|t| Instant::now() >= t) {
                    self.failed.store(true, Ordering::Relaxed);
                }
                Err(match other {
                    Err(e) => e,
                    Ok(r) => self.err(format!("unexpected answer to OpenMasked: {r:?}")),
                })
            }
        }
    }

    /// The words answering `make(session)`. A node that lost the session (it restarted,
    /// or the session idled out) gets it opened again: a masked session holds no state but
    /// its role and seed, so nothing is replayed.
    fn words(&self, make: impl Fn(SessionId) -> InferRequest) -> Result<Vec<u32>, PartyError> {
        let session = self.session()?;
        let answer = match self.call(make(session)) {
            Err(e) if e.reason.starts_with("UnknownSession") => {
                tracing::info!(
                    "{}: its masked session was gone; opening another",
                    self.peer
                );
                *self.session.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let session = self.session()?;
                self.call(make(session))?
            }
            other => other?,
        };
        match answer {
            InferResponse::Words { words } => {
                bytes_to_words(&words).map_err(|e| self.err(e.to_string()))
            }
            other => Err(self.err(format!("unexpected answer: {other:?}"))),
        }
    }

    /// Close the session (best effort).
    fn close(&self) {
        let session = self
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(session) = session {
            let fut = self
                .network
                .infer(self.peer, InferRequest::Close { session });
            let _ = self
                .handle
                .block_on(async { tokio::time::timeout(Duration::from_secs(2), fut).await });
        }
    }
}

/// Positions per request so that neither its words nor its answer's pass [`CHUNK_BYTES`].
fn chunk_positions(width: usize) -> usize {
    (CHUNK_BYTES / (4 * width.max(1))).max(1)
}

impl ComputeParty for NetParty {
    fn name(&self) -> String {
        self.peer.to_string()
    }

    fn products(&self, op: u64, words: &[u32], n: usize) -> Result<Vec<u32>, PartyError> {
        if n == 0 || !words.len().is_multiple_of(n) {
            return Err(self.err(format!("{} words are not {n} positions", words.len())));
        }
        let cols = words.len() / n;
        let per = chunk_positions(cols);
        let mut out = Vec::new();
        for chunk in words.chunks(per * cols) {
            let bytes = words_to_bytes(chunk);
            out.extend(self.words(|session| InferRequest::Linear {
                session,
                op,
                words: bytes.clone(),
            })?);
        }
        Ok(out)
    }
}

impl MaskParty for NetParty {
    fn name(&self) -> String {
        self.peer.to_string()
    }

    fn mask_products(&self, op: u64, first: u64, n: usize) -> Result<Vec<u32>, PartyError> {
        let per = PROVIDER_POSITIONS;
        let mut out = Vec::new();
        let mut done = 0;
        while done < n {
            let k = per.min(n - done);
            out.extend(self.words(|session| InferRequest::MaskProducts {
                session,
                op,
                first: first + done as u64,
                n: k as u32,
            })?);
            done += k;
        }
        Ok(out)
    }
}

/// A deployment run in masked mode, as a [`TokenModel`].
pub struct MaskedPipeline {
    model: EncryptedLocal,
    parties: Vec<Arc<SplitParties>>,
    nodes: Vec<Arc<NetParty>>,
    pub stats: Arc<MaskedStats>,
    pub traffic: Arc<Traffic>,
}

/// What every masked session on a deployment shares: the client's side of its stages,
/// loaded from the deployment's own shards, their ops as integers, and where each stage's
/// replicas are. Cheap to turn into a session ([`MaskedDeployment::session`]).
#[derive(Clone)]
pub struct MaskedDeployment {
    local: EncryptedLocal,
    ops: Vec<veil_model::masked::StageOps>,
    /// Sessions keep f32 activations (wide integers on the nodes).
    exact: bool,
    /// Per stage: its layers, its shard and its replicas.
    stages: Vec<((usize, usize), ShardId, Vec<PeerId>)>,
    handle: Handle,
    network: Network,
}

impl MaskedDeployment {
    /// Load `deployment`'s shards (kept in its directory by `veil deploy`) for the client's
    /// side and tell `network` where its replicas are.
    pub fn load(
        handle: Handle,
        network: Network,
        bundle: &ClientBundle,
        deployment: &Deployment,
        context: usize,
        precision: Precision,
    ) -> Result<Self> {
        let dir = Deployment::dir(&deployment.id)?;
        let mut shards = Vec::new();
        let mut stages = Vec::new();
        for s in &deployment.stages {
            let path = shard_path(&dir, s.stage);
            let shard = Shard::read(&path).with_context(|| {
                format!(
                    "masked mode runs the stages' non-linear parts here, from the \
                     deployment's own shards: cannot read {}",
                    path.display()
                )
            })?;
            let (replicas, id) = super::resolve_stage(&handle, &network, deployment, s)?;
            stages.push((shard.meta.layers, id, replicas));
            shards.push(shard);
        }
        let device = veil_model::Compute::cpu().device;
        let local =
            EncryptedLocal::with_precision(bundle, &shards, &device, Some(context), precision)?;
        drop(shards);
        let ops = local.ring_ops()?;
        Ok(MaskedDeployment {
            local,
            ops,
            exact: precision == Precision::Exact,
            stages,
            handle,
            network,
        })
    }

    /// A new session (a fresh mask seed), its masks' products computed by `providers`.
    pub fn session(&self, providers: &MaskProviders) -> Result<MaskedPipeline> {
        let mut placed = Vec::new();
        for (i, (layers, shard, replicas)) in self.stages.iter().enumerate() {
            let (compute, provide) = place(i, replicas, providers)?;
            placed.push((*layers, *shard, compute, provide));
        }
        let stats = Arc::new(MaskedStats::default());
        let traffic = Arc::new(Traffic::default());
        let mut parties = Vec::new();
        let mut nodes = Vec::new();
        let model = self.local.masked(&self.ops, &stats, |runner, ops, seed| {
            let layers = runner.meta().layers;
            let Some((_, shard, compute, provide)) = placed.iter().find(|s| s.0 == layers).cloned()
            else {
                return Err(ModelError::Shape(format!(
                    "no stage of the deployment serves layers {}..{}",
                    layers.0, layers.1
                )));
            };
            let mut party = |peer: PeerId, seed: Option<[u8; 32]>| {
                let p = Arc::new(NetParty::new(
                    peer,
                    shard,
                    seed,
                    self.exact,
                    self.handle.clone(),
                    self.network.clone(),
                    traffic.clone(),
                ));
                nodes.push(p.clone());
                p
            };
            let compute: Vec<Arc<dyn ComputeParty>> = compute
                .into_iter()
                .map(|p| party(p, None) as Arc<dyn ComputeParty>)
                .collect();
            // decode's masks' products fetched several positions at a time
            let ahead = |p: Arc<dyn MaskParty>| {
                Arc::new(MasksAhead::new(p, MASK_POSITIONS_AHEAD)) as Arc<dyn MaskParty>
            };
            let providers: Vec<Arc<dyn MaskParty>> = match provide {
                None => vec![ahead(Arc::new(LocalParty::new(
                    "client",
                    Arc::new(ops.iter().cloned().collect()),
                    Some(seed.clone()),
                )))],
                Some(peers) => peers
                    .into_iter()
                    .map(|p| ahead(party(p, Some(seed.bytes()))))
                    .collect(),
            };
            let split = Arc::new(SplitParties::new(compute, providers));
            parties.push(split.clone());
            Ok(Parties::Split(split))
        })?;
        Ok(MaskedPipeline {
            model,
            parties,
            nodes,
            stats,
            traffic,
        })
    }
}

impl MaskedPipeline {
    /// Masked sessions on `deployment`'s nodes (opened on first use), the client running
    /// the rest on the deployment's own shards (see [`MaskedDeployment`]).
    pub fn new(
        handle: Handle,
        network: Network,
        bundle: &ClientBundle,
        deployment: &Deployment,
        providers: &MaskProviders,
        context: usize,
        precision: Precision,
    ) -> Result<Self> {
        MaskedDeployment::load(handle, network, bundle, deployment, context, precision)?
            .session(providers)
    }

    /// The peer computing each stage's ops now (the first replica not caught).
    pub fn route(&self) -> Vec<String> {
        self.parties
            .iter()
            .map(|p| p.serving().unwrap_or_else(|| "-".into()))
            .collect()
    }

    /// Every party caught answering wrongly so far.
    pub fn detections(&self) -> Vec<Detection> {
        self.parties.iter().flat_map(|p| p.detections()).collect()
    }

    /// Close every session (best effort).
    pub fn close(&self) {
        for n in &self.nodes {
            n.close();
        }
    }
}

/// A stage's compute replicas and mask providers (`None`: this process), or why it cannot
/// be served: a provider must hold the stage's shard and may not be its compute node.
fn place(
    stage: usize,
    replicas: &[PeerId],
    providers: &MaskProviders,
) -> Result<(Vec<PeerId>, Option<Vec<PeerId>>)> {
    if replicas.is_empty() {
        bail!("stage {stage} has no replica; run `veil deploy --repair`");
    }
    let MaskProviders::Peers(named) = providers else {
        let mut compute = replicas.to_vec();
        let start = rand::random::<usize>() % compute.len();
        compute.rotate_left(start);
        return Ok((compute, None));
    };
    let provide: Vec<PeerId> = named
        .iter()
        .filter(|p| replicas.contains(p))
        .copied()
        .collect();
    if provide.is_empty() {
        bail!(
            "stage {stage}: none of the mask providers holds its shard (its replicas: {}); a \
             provider computes the masks' products with the stage's weights",
            replicas
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let compute: Vec<PeerId> = replicas
        .iter()
        .filter(|r| !named.contains(r))
        .copied()
        .collect();
    if compute.is_empty() {
        bail!(
            "stage {stage}: every replica is a mask provider, and a node may not compute the \
             ops it provides masks for (it would see both x + r and r, and so x); name fewer \
             providers or deploy more replicas"
        );
    }
    Ok((compute, Some(provide)))
}

impl TokenModel for MaskedPipeline {
    fn context_len(&self) -> usize {
        self.model.context_len()
    }

    fn position(&self) -> usize {
        self.model.position()
    }

    fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.model.feed(ids)
    }
}

impl Drop for MaskedPipeline {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    #[test]
    fn a_provider_never_computes_the_ops_it_masks() {
        let r = peers(3);
        let (compute, provide) = place(0, &r, &MaskProviders::Peers(vec![r[1]])).expect("placed");
        assert_eq!(provide, Some(vec![r[1]]));
        assert_eq!(compute, vec![r[0], r[2]]);
        let (compute, provide) = place(0, &r, &MaskProviders::Local).expect("placed");
        assert!(provide.is_none());
        assert_eq!(compute.len(), 3);
        // every replica a provider: refused, with the reason
        let e = place(1, &r[..1], &MaskProviders::Peers(vec![r[0]])).expect_err("refused");
        assert!(e.to_string().contains("may not compute"), "{e}");
        // a provider without the shard
        let other = peers(1);
        let e = place(2, &r, &MaskProviders::Peers(other)).expect_err("refused");
        assert!(e.to_string().contains("holds its shard"), "{e}");
        assert!("local".parse::<MaskProviders>() == Ok(MaskProviders::Local));
        assert!("nonsense".parse::<MaskProviders>().is_err());
    }
}
