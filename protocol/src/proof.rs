//! Fraud proofs and their publication.
//!
//! A [`FraudProof`] holds every input row a node's session was sent up to its wrong answers,
//! those answers, and the node's signed receipts for them. Checking one takes two steps:
//! [`FraudProof::open`] checks here that the accused signed exactly these answers to exactly
//! these inputs (a forgery fails: it cannot carry the node's signature over answers the node
//! did not give); then whoever holds the stage's shard recomputes the answers (the client's
//! `veil verify-proof`) and the node is guilty only if one differs beyond the tolerance (a
//! genuine receipt over a right answer convicts nobody).
//!
//! Publication: a proof is submitted to a node, which checks its receipts, keeps it and
//! gossips a small [`ProofNotice`] on [`PROOFS_TOPIC`]; nodes keep the notices they hear,
//! and anyone fetches the proof from the node that holds it. Nobody believes a notice: a
//! client that holds the shard fetches the proof and recomputes it first.

use bincode::{Decode, Encode};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::receipt::{frame_hash, InputChain, Receipt};
use crate::wire::{ShardId, TensorFrame};

/// Gossipsub topic of fraud-proof notices.
pub const PROOFS_TOPIC: &str = "veil/proofs/1";

/// The largest proof a node accepts or serves (JSON bytes).
pub const MAX_PROOF_BYTES: usize = 64 << 20;

const FORMAT: &str = "veil-fraud-proof-v1";

/// Why a proof does not hold up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProofError(pub String);

fn bad(m: impl Into<String>) -> ProofError {
    ProofError(m.into())
}

/// A node's signed answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedAnswer {
    pub receipt: Receipt,
    /// `[rows, d]` little-endian f32, hex.
    pub output: String,
}

/// The evidence that a node signed a wrong answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FraudProof {
    pub format: String,
    /// The accused node.
    pub peer: String,
    /// The stage's shard (content hash, hex) and layers.
    pub shard: String,
    pub stage: usize,
    pub layers: (usize, usize),
    pub d_model: usize,
    /// Whether the session kept f32 activations, and whether the node said it runs on a GPU
    /// (which widens the tolerance).
    pub exact: bool,
    pub gpu: bool,
    /// Every input row of the session up to the last answer, `[n, d]` little-endian f32, hex.
    pub inputs: String,
    pub answers: Vec<SignedAnswer>,
    /// Who settled it when the client convicted the node.
    pub referee: String,
}

/// A proof whose receipts hold: the accused did give these answers to these inputs.
#[derive(Debug, Clone)]
pub struct OpenedProof {
    pub peer: PeerId,
    pub shard: ShardId,
    /// `[n, d]`.
    pub inputs: Vec<f32>,
    /// First row and the answer `[rows, d]` of each signed step.
    pub answers: Vec<(usize, Vec<f32>)>,
}

pub fn to_hex(v: &[f32]) -> String {
    hex::encode(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
}

pub fn from_hex(s: &str, what: &str) -> Result<Vec<f32>, ProofError> {
    let bytes = hex::decode(s).map_err(|_| bad(format!("{what} is not hex")))?;
    if bytes.len() % 4 != 0 {
        return Err(bad(format!("{what} is not whole f32 values")));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

impl FraudProof {
    /// A proof against `peer` from the stage's inputs and its signed wrong answers.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        peer: &PeerId,
        shard: &ShardId,
        stage: usize,
        layers: (usize, usize),
        d_model: usize,
        (exact, gpu): (bool, bool),
        inputs: &[f32],
        answers: &[(Receipt, Vec<f32>)],
        referee: &str,
    ) -> Self {
        let end = answers
            .iter()
            .map(|(r, _)| r.first_row as usize + r.rows as usize)
            .max()
            .unwrap_or(0);
        FraudProof {
            format: FORMAT.into(),
            peer: peer.to_string(),
            shard: hex::encode(shard),
            stage,
            layers,
            d_model,
            exact,
            gpu,
            inputs: to_hex(&inputs[..(end * d_model).min(inputs.len())]),
            answers: answers
                .iter()
                .map(|(receipt, out)| SignedAnswer {
                    receipt: receipt.clone(),
                    output: to_hex(out),
                })
                .collect(),
            referee: referee.into(),
        }
    }

    /// The proof as published (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a proof serializes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProofError> {
        if bytes.len() > MAX_PROOF_BYTES {
            return Err(bad(format!(
                "a proof of {} bytes exceeds the limit of {MAX_PROOF_BYTES}",
                bytes.len()
            )));
        }
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not a fraud proof: {e}")))
    }

    /// The shard's content hash.
    pub fn shard_id(&self) -> Result<ShardId, ProofError> {
        hex::decode(&self.shard)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("bad shard id"))
    }

    /// Check the receipts: every answer is signed by the accused, for this shard, over
    /// exactly these inputs (their hash chain) and this answer (its hash). An error says why
    /// the proof is rejected.
    pub fn open(&self) -> Result<OpenedProof, ProofError> {
        if self.format != FORMAT {
            return Err(bad(format!("unknown format `{}`", self.format)));
        }
        let d = self.d_model;
        let peer: PeerId = self.peer.parse().map_err(|_| bad("bad peer id"))?;
        let shard = self.shard_id()?;
        let inputs = from_hex(&self.inputs, "the inputs")?;
        if d == 0 || inputs.len() % d != 0 {
            return Err(bad(format!("the inputs are not whole rows of {d}")));
        }
        if self.answers.is_empty() {
            return Err(bad("no answers"));
        }
        let mut answers = Vec::with_capacity(self.answers.len());
        for (k, a) in self.answers.iter().enumerate() {
            let r = &a.receipt;
            let signer = r.signer().map_err(|e| bad(format!("answer {k}: {e}")))?;
            if signer != peer {
                return Err(bad(format!(
                    "answer {k} is signed by {signer}, not by the accused {peer}"
                )));
            }
            if r.shard != shard {
                return Err(bad(format!("answer {k} is for another shard")));
            }
            let (first, rows) = (r.first_row as usize, r.rows as usize);
            let end = first
                .checked_add(rows)
                .and_then(|e| e.checked_mul(d))
                .filter(|&e| e <= inputs.len())
                .ok_or_else(|| bad(format!("answer {k} is for rows beyond the inputs")))?;
            let mut chain = InputChain::new(&shard);
            chain.push_rows(&inputs[..end], d);
            if chain.hash() != r.input_chain {
                return Err(bad(format!("answer {k}'s receipt commits to other inputs")));
            }
            let out = from_hex(&a.output, "an answer")?;
            if out.len() != rows * d {
                return Err(bad(format!(
                    "answer {k} has {} values for {rows} rows",
                    out.len()
                )));
            }
            if frame_hash(&TensorFrame::from_f32(&[rows, d], &out)) != r.output_hash {
                return Err(bad(format!(
                    "answer {k} is not the answer its receipt signs"
                )));
            }
            answers.push((first, out));
        }
        Ok(OpenedProof {
            peer,
            shard,
            inputs,
            answers,
        })
    }

    /// The notice that announces this proof, held by `holder` and reported by `reporter`.
    pub fn notice(&self, bytes: &[u8], holder: &PeerId, reporter: &PeerId) -> ProofNotice {
        ProofNotice {
            id: proof_id(bytes),
            accused: self.peer.clone(),
            shard: self.shard_id().unwrap_or_default(),
            stage: self.stage as u32,
            bytes: bytes.len() as u64,
            holder: holder.to_string(),
            reporter: reporter.to_string(),
            at_ms: crate::ad::now_ms(),
        }
    }
}

/// A proof's id: the SHA-256 of its published bytes.
pub fn proof_id(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// What gossip carries of a proof: who is accused, and where to fetch the evidence.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ProofNotice {
    pub id: [u8; 32],
    pub accused: String,
    pub shard: ShardId,
    pub stage: u32,
    pub bytes: u64,
    /// The node that checked the receipts and serves the proof (the gossip message's
    /// signed source must be this node).
    pub holder: String,
    /// Who submitted it to the holder.
    pub reporter: String,
    pub at_ms: u64,
}

/// Requests of the proof protocol (answered by nodes).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ProofRequest {
    /// Keep and announce this proof (JSON bytes).
    Submit(Vec<u8>),
    /// The proof with this id, if you hold it.
    Get([u8; 32]),
    /// The notices you have heard, newest last.
    Notices,
}

/// Responses of the proof protocol.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ProofResponse {
    /// The proof's receipts hold; it is kept and announced.
    Accepted(ProofNotice),
    /// Why it was not.
    Rejected(String),
    Proof(Vec<u8>),
    Missing,
    Notices(Vec<ProofNotice>),
}
