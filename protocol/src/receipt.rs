//! Signed step receipts: with every hidden state it returns, a node signs what it was given
//! and what it answered, so that a wrong answer, once found, is attributable to its signer
//! by anyone (a fraud proof), and a right one cannot be disowned.
//!
//! Inputs are committed row by row in a hash chain that starts from the shard: two nodes
//! that were sent the same rows of a session, in steps of any sizes, commit to the same
//! chain value after the same row. Outputs are committed by the SHA-256 of their frame.

use bincode::{Decode, Encode};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::identity::{peer_id_of, verify_signature, Identity};
use crate::wire::{SessionId, ShardId, TensorFrame};
use crate::ProtocolError;

const RECEIPT_DOMAIN: &[u8] = b"veil-step-receipt-v1";
const CHAIN_DOMAIN: &[u8] = b"veil-input-chain-v1";

/// What a node signs with the answer to one step.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct Receipt {
    pub session: SessionId,
    pub shard: ShardId,
    /// Rows of the session before this step.
    pub first_row: u64,
    /// Rows in this step.
    pub rows: u32,
    /// The input chain after this step's last row (see [`InputChain`]).
    #[serde(with = "hex32")]
    pub input_chain: [u8; 32],
    /// SHA-256 of the answer's frame (see [`frame_hash`]).
    #[serde(with = "hex32")]
    pub output_hash: [u8; 32],
    /// The signer's ed25519 public key (its peer id derives from it).
    #[serde(with = "hex32")]
    pub public_key: [u8; 32],
    #[serde(with = "hexvec")]
    pub signature: Vec<u8>,
}

/// The fields a receipt signs, before signing.
#[derive(Debug, Clone, Copy)]
pub struct Statement {
    pub session: SessionId,
    pub shard: ShardId,
    pub first_row: u64,
    pub rows: u32,
    pub input_chain: [u8; 32],
    pub output_hash: [u8; 32],
}

impl Statement {
    fn message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(RECEIPT_DOMAIN.len() + 16 + 32 + 8 + 4 + 64);
        m.extend_from_slice(RECEIPT_DOMAIN);
        m.extend_from_slice(&self.session);
        m.extend_from_slice(&self.shard);
        m.extend_from_slice(&self.first_row.to_le_bytes());
        m.extend_from_slice(&self.rows.to_le_bytes());
        m.extend_from_slice(&self.input_chain);
        m.extend_from_slice(&self.output_hash);
        m
    }

    pub fn sign(self, id: &Identity) -> Receipt {
        Receipt {
            session: self.session,
            shard: self.shard,
            first_row: self.first_row,
            rows: self.rows,
            input_chain: self.input_chain,
            output_hash: self.output_hash,
            public_key: id.public_key(),
            signature: id.sign(&self.message()).to_vec(),
        }
    }
}

impl Receipt {
    pub fn statement(&self) -> Statement {
        Statement {
            session: self.session,
            shard: self.shard,
            first_row: self.first_row,
            rows: self.rows,
            input_chain: self.input_chain,
            output_hash: self.output_hash,
        }
    }

    /// Check the signature; returns the signer.
    pub fn signer(&self) -> Result<PeerId, ProtocolError> {
        if !verify_signature(
            &self.public_key,
            &self.statement().message(),
            &self.signature,
        ) {
            return Err(ProtocolError::BadReceipt(
                "the signature does not verify".into(),
            ));
        }
        peer_id_of(&self.public_key)
    }

    /// Check that `peer` signed this receipt for `answer`, the answer to rows
    /// `first_row..first_row + rows` of `session` on `shard` whose chain ends at `chain`.
    pub fn check(
        &self,
        peer: &PeerId,
        expect: &Statement,
        answer: &TensorFrame,
    ) -> Result<(), ProtocolError> {
        let bad = |m: String| Err(ProtocolError::BadReceipt(m));
        let signer = self.signer()?;
        if &signer != peer {
            return bad(format!("signed by {signer}, not by {peer}"));
        }
        let s = self.statement();
        if s.session != expect.session || s.shard != expect.shard {
            return bad("for another session or shard".into());
        }
        if (s.first_row, s.rows) != (expect.first_row, expect.rows) {
            return bad(format!(
                "for rows {}+{}, not {}+{}",
                s.first_row, s.rows, expect.first_row, expect.rows
            ));
        }
        if s.input_chain != expect.input_chain {
            return bad("for other inputs".into());
        }
        if s.output_hash != frame_hash(answer) {
            return bad("for another answer".into());
        }
        Ok(())
    }
}

/// The running commitment to a session's input rows: `c₀ = H(domain ‖ shard)`,
/// `cₖ = H(cₖ₋₁ ‖ rowₖ)` over each row's little-endian f32 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputChain {
    hash: [u8; 32],
    rows: u64,
}

impl InputChain {
    pub fn new(shard: &ShardId) -> Self {
        let mut h = Sha256::new();
        h.update(CHAIN_DOMAIN);
        h.update(shard);
        InputChain {
            hash: h.finalize().into(),
            rows: 0,
        }
    }

    /// Extend by the rows of `frame` (`[t, d]`: `t` rows of `d` values).
    pub fn push_frame(&mut self, frame: &TensorFrame) {
        let t = frame.shape.first().copied().unwrap_or(0) as usize;
        if t == 0 {
            return;
        }
        let row_bytes = frame.data.len() / t;
        for row in frame.data.chunks_exact(row_bytes.max(1)) {
            self.push_row_bytes(row);
        }
    }

    /// Extend by rows of `d` f32 values.
    pub fn push_rows(&mut self, values: &[f32], d: usize) {
        let mut bytes = Vec::with_capacity(d * 4);
        for row in values.chunks_exact(d.max(1)) {
            bytes.clear();
            bytes.extend(row.iter().flat_map(|v| v.to_le_bytes()));
            self.push_row_bytes(&bytes);
        }
    }

    fn push_row_bytes(&mut self, row: &[u8]) {
        let mut h = Sha256::new();
        h.update(self.hash);
        h.update(row);
        self.hash = h.finalize().into();
        self.rows += 1;
    }

    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }
}

/// SHA-256 over a frame's shape and data.
pub fn frame_hash(frame: &TensorFrame) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((frame.shape.len() as u32).to_le_bytes());
    for d in &frame.shape {
        h.update(d.to_le_bytes());
    }
    h.update(&frame.data);
    h.finalize().into()
}

/// `[u8; 32]` as hex in JSON.
mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(&s).map_err(serde::de::Error::custom)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("expected 32 bytes"))
    }
}

/// `Vec<u8>` as hex in JSON.
mod hexvec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(rows: &[[f32; 3]]) -> TensorFrame {
        let values: Vec<f32> = rows.iter().flatten().copied().collect();
        TensorFrame::from_f32(&[rows.len(), 3], &values)
    }

    #[test]
    fn the_chain_does_not_depend_on_how_rows_are_split_into_steps() {
        let shard = [7u8; 32];
        let rows = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]];
        let mut one = InputChain::new(&shard);
        one.push_frame(&frame(&rows));
        let mut three = InputChain::new(&shard);
        for r in &rows {
            three.push_frame(&frame(&[*r]));
        }
        let mut values = InputChain::new(&shard);
        values.push_rows(&rows.concat(), 3);
        assert_eq!(one, three);
        assert_eq!(one, values);
        assert_eq!(one.rows(), 3);
        // another shard, or another row, is another chain
        let mut other = InputChain::new(&[8u8; 32]);
        other.push_frame(&frame(&rows));
        assert_ne!(other.hash(), one.hash());
        let mut changed = InputChain::new(&shard);
        changed.push_frame(&frame(&[rows[0], rows[1], [7.0, 8.0, 9.5]]));
        assert_ne!(changed.hash(), one.hash());
    }

    #[test]
    fn a_receipt_binds_its_signer_inputs_and_answer() {
        let id = Identity::generate();
        let shard = [3u8; 32];
        let input = frame(&[[1.0, 2.0, 3.0]]);
        let answer = frame(&[[0.5, 0.25, 0.125]]);
        let mut chain = InputChain::new(&shard);
        chain.push_frame(&input);
        let statement = Statement {
            session: [1u8; 16],
            shard,
            first_row: 0,
            rows: 1,
            input_chain: chain.hash(),
            output_hash: frame_hash(&answer),
        };
        let receipt = statement.sign(&id);
        assert_eq!(receipt.signer().expect("signer"), id.peer_id());
        receipt
            .check(&id.peer_id(), &statement, &answer)
            .expect("a genuine receipt");
        // another signer, answer, input or row range is refused with a reason
        let other = Identity::generate().peer_id();
        assert!(receipt.check(&other, &statement, &answer).is_err());
        let wrong = frame(&[[0.5, 0.25, 0.0]]);
        let e = receipt.check(&id.peer_id(), &statement, &wrong);
        assert!(format!("{e:?}").contains("another answer"), "{e:?}");
        let moved = Statement {
            first_row: 1,
            ..statement
        };
        assert!(receipt.check(&id.peer_id(), &moved, &answer).is_err());
        // a tampered field breaks the signature
        let mut forged = receipt.clone();
        forged.output_hash = frame_hash(&wrong);
        assert!(forged.signer().is_err());
        // as JSON and back
        let json = serde_json::to_string(&receipt).expect("json");
        let back: Receipt = serde_json::from_str(&json).expect("back");
        assert_eq!(back, receipt);
    }
}
