//! Fraud proofs on the network: a pipeline that convicted a node submits the proof to the
//! deployment's other nodes, which check its receipts and announce it by gossip; a pipeline
//! that starts asks a node for the notices it heard against its own nodes, fetches each
//! proof, and believes it only once recomputed here from the deployment's shard. A forged
//! proof, or a genuine receipt over a right answer, so never costs an honest node anything.

use std::time::Duration;

use veil_protocol::proof::{proof_id, FraudProof, ProofNotice, ProofRequest, ProofResponse};
use veil_protocol::PeerId;

use super::RemotePipeline;
use crate::proof::Verdict;

/// Nodes a proof is submitted to.
const HOLDERS: usize = 3;
/// How long one proof request may take.
const PROOF_TIMEOUT: Duration = Duration::from_secs(20);

/// What a pipeline did with a published proof against one of its nodes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Learned {
    pub peer: String,
    /// `guilty` (recomputed here and found wrong: the peer is left out), `innocent` (every
    /// answer it signed is right: the report is false), `rejected: why` (the receipts do not
    /// hold), or `unchecked` (the shard is not here: not believed).
    pub verdict: String,
    pub reporter: String,
    pub holder: String,
    /// The proof's id (hex).
    pub proof: String,
}

impl RemotePipeline {
    /// Every node of the deployment, each once.
    pub fn peers(&self) -> Vec<PeerId> {
        let mut peers: Vec<PeerId> = Vec::new();
        for s in &self.stages {
            for p in &s.replicas {
                if !peers.contains(p) {
                    peers.push(*p);
                }
            }
        }
        peers
    }

    async fn proof_request(
        &self,
        peer: PeerId,
        request: ProofRequest,
    ) -> anyhow::Result<ProofResponse> {
        match tokio::time::timeout(PROOF_TIMEOUT, self.network.proof(peer, request)).await {
            Ok(r) => Ok(r?),
            Err(_) => anyhow::bail!("{peer} did not answer within {PROOF_TIMEOUT:?}"),
        }
    }

    /// Submit the proof of every detection not yet published to [`HOLDERS`] of the
    /// deployment's other nodes at once; each detection lists the nodes that accepted it.
    pub(super) fn publish_proofs(&mut self) {
        if !self.verification.publish {
            return;
        }
        let peers = self.peers();
        for k in 0..self.stats.audit.detections.len() {
            let d = &self.stats.audit.detections[k];
            if d.publish_tried {
                continue;
            }
            let Some(proof) = &d.proof else { continue };
            let bytes = proof.to_bytes();
            let accused = d.peer.clone();
            // to the first few other nodes at once: a dead one costs its timeout only once
            let this = &*self;
            let submits = peers
                .iter()
                .filter(|p| p.to_string() != accused)
                .take(HOLDERS)
                .map(|&peer| {
                    let request = ProofRequest::Submit(bytes.clone());
                    async move { (peer, this.proof_request(peer, request).await) }
                });
            let answers = this.handle.block_on(futures::future::join_all(submits));
            let mut holders = Vec::new();
            for (peer, answer) in answers {
                match answer {
                    Ok(ProofResponse::Accepted(_)) => holders.push(peer.to_string()),
                    Ok(ProofResponse::Rejected(why)) => {
                        tracing::warn!("{peer} refused the proof against {accused}: {why}")
                    }
                    Ok(other) => tracing::warn!("{peer}: unexpected answer {other:?}"),
                    Err(e) => tracing::debug!("cannot submit the proof to {peer}: {e:#}"),
                }
            }
            if holders.is_empty() {
                tracing::warn!("the proof against {accused} could not be published");
            } else {
                tracing::info!(
                    "published the proof against {accused} through {} node(s)",
                    holders.len()
                );
            }
            let d = &mut self.stats.audit.detections[k];
            d.publish_tried = true;
            d.published = holders;
        }
    }

    /// The proof notices the deployment's nodes heard against its nodes (from the first node
    /// that answers).
    pub(crate) fn published_notices(&self) -> Vec<(ProofNotice, PeerId)> {
        let peers = self.peers();
        for &peer in &peers {
            match self
                .handle
                .block_on(self.proof_request(peer, ProofRequest::Notices))
            {
                Ok(ProofResponse::Notices(n)) => {
                    return n
                        .into_iter()
                        .filter(|n| peers.iter().any(|p| p.to_string() == n.accused))
                        .map(|n| (n, peer))
                        .collect();
                }
                Ok(other) => tracing::debug!("{peer}: unexpected answer {other:?}"),
                Err(e) => tracing::debug!("proof notices of {peer}: {e:#}"),
            }
        }
        Vec::new()
    }

    /// Fetch the proof `notice` announces, from its holder or else from `via`, checked to be
    /// the one announced.
    pub(crate) fn fetch_proof(
        &self,
        notice: &ProofNotice,
        via: PeerId,
    ) -> anyhow::Result<(FraudProof, Vec<u8>)> {
        let mut from = Vec::new();
        if let Ok(h) = notice.holder.parse::<PeerId>() {
            from.push(h);
        }
        if !from.contains(&via) {
            from.push(via);
        }
        let mut errors = Vec::new();
        for peer in from {
            match self
                .handle
                .block_on(self.proof_request(peer, ProofRequest::Get(notice.id)))
            {
                Ok(ProofResponse::Proof(bytes)) if proof_id(&bytes) == notice.id => {
                    let proof = FraudProof::from_bytes(&bytes)?;
                    if proof.peer != notice.accused {
                        anyhow::bail!("the proof accuses another peer than its notice");
                    }
                    return Ok((proof, bytes));
                }
                Ok(ProofResponse::Proof(_)) => errors.push(format!("{peer}: another proof")),
                Ok(other) => errors.push(format!("{peer}: {other:?}")),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        anyhow::bail!("cannot fetch the proof: {}", errors.join("; "))
    }
}

/// The words of a verdict for [`Learned::verdict`].
pub fn verdict_word(v: &anyhow::Result<Verdict>) -> String {
    match v {
        Ok(Verdict::Guilty { .. }) => "guilty".into(),
        Ok(Verdict::Innocent { .. }) => "innocent".into(),
        Ok(Verdict::Unchecked) => "unchecked".into(),
        Err(e) => format!("rejected: {e:#}"),
    }
}
