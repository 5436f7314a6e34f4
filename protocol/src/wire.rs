//! Messages of Veil's request-response protocols. Every message is bincode 2 with a size
//! limit; tensors travel as raw little-endian bytes behind a dtype and shape header.

use bincode::{Decode, Encode};

use crate::ad::SignedAd;
use crate::receipt::Receipt;
use crate::ProtocolError;

/// A client-chosen random id of an inference session.
pub type SessionId = [u8; 16];
/// A shard's content hash (SHA-256 of its data section).
pub type ShardId = [u8; 32];

/// Element type of a [`TensorFrame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum WireDType {
    F32,
}

/// A tensor on the wire: dtype, shape, then the elements as little-endian bytes.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct TensorFrame {
    pub dtype: WireDType,
    pub shape: Vec<u32>,
    pub data: Vec<u8>,
}

/// Largest number of dimensions a frame may have.
const MAX_RANK: usize = 4;

impl TensorFrame {
    pub fn from_f32(shape: &[usize], values: &[f32]) -> Self {
        TensorFrame {
            dtype: WireDType::F32,
            shape: shape.iter().map(|&d| d as u32).collect(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// The shape and values, checked: rank, byte length, finite values.
    pub fn to_f32(&self) -> Result<(Vec<usize>, Vec<f32>), ProtocolError> {
        let bad = |m: String| ProtocolError::Malformed(m);
        if self.shape.is_empty() || self.shape.len() > MAX_RANK {
            return Err(bad(format!("tensor of rank {}", self.shape.len())));
        }
        let n = self
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
            .ok_or_else(|| bad("tensor shape overflows".into()))?;
        if n.checked_mul(4) != Some(self.data.len()) {
            return Err(bad(format!(
                "shape {:?} needs {} bytes, got {}",
                self.shape,
                n.saturating_mul(4),
                self.data.len()
            )));
        }
        let values: Vec<f32> = self
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if values.iter().any(|v| !v.is_finite()) {
            return Err(bad("tensor holds NaN or infinity".into()));
        }
        Ok((self.shape.iter().map(|&d| d as usize).collect(), values))
    }
}

/// Requests of the inference protocol.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum InferRequest {
    /// Open a session on a shard the node holds, for sequences of at most `max_len`. With
    /// `exact`, a quantized shard's products keep f32 activations for this session (the
    /// f32 model's result up to rounding; slower), as `veil generate --exact` asks.
    Open {
        session: SessionId,
        shard: ShardId,
        max_len: u32,
        exact: bool,
    },
    /// Encrypted hidden states `[t, d]` of the next `t` positions.
    Step {
        session: SessionId,
        hidden: TensorFrame,
    },
    Close {
        session: SessionId,
    },
    /// The node's work counters since it started (for operators and the testnet).
    Stats,
    /// Open a masked-mode session on a shard the node holds (see `veil_model::masked`): the
    /// node serves the shard's linear ops as integers. Without `seed` it is the session's
    /// compute node (it answers [`InferRequest::Linear`]); with the session's mask seed it
    /// is its mask provider (it answers [`InferRequest::MaskProducts`]). Never both: a
    /// session has one role. `exact` sessions round a quantized shard's weights to wide
    /// integers (two bytes each), the others to blocked ones (`RingFormat`): the node's
    /// integers must be the client's.
    OpenMasked {
        session: SessionId,
        shard: ShardId,
        seed: Option<[u8; 32]>,
        exact: bool,
    },
    /// `W_op u (mod 2^32)` for masked words `u` (`[n, d_in]` u32, little-endian).
    Linear {
        session: SessionId,
        op: u64,
        words: Vec<u8>,
    },
    /// `W_op r (mod 2^32)` for the session's masks of positions `first..first + n`.
    MaskProducts {
        session: SessionId,
        op: u64,
        first: u64,
        n: u32,
    },
}

/// Work counters of a node since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Encode, Decode)]
pub struct NodeStats {
    /// Milliseconds the engine spent computing (opens, steps, replays).
    pub busy_ms: u64,
    /// Step requests served successfully.
    pub steps: u64,
    /// Forward passes run for them (several sessions' steps may share one).
    pub batches: u64,
    pub active_sessions: u32,
    /// Bytes of inference requests received and responses sent (encoded messages).
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub uptime_ms: u64,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum ErrorCode {
    UnknownSession,
    UnknownShard,
    BadRequest,
    /// The node has no room for another session (memory or session limit).
    Busy,
    /// The session's sequence would exceed its maximum length.
    ContextFull,
    Internal,
    /// The peer sent more requests per second than the node allows one peer; it may retry
    /// after a pause (the message names the limit).
    RateLimited,
    /// The node's operator does not let this peer upload shards or run sessions here
    /// (`deploy_allow` / `serve_allow`).
    Forbidden,
    /// No room on the node's disk for the shard (its quota, the peer's share of it, or the
    /// disk itself); refused before any byte is sent.
    NoSpace,
}

/// Responses of the inference protocol.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum InferResponse {
    Opened {
        session: SessionId,
        /// First layer and one past the last.
        layers: (u32, u32),
        /// Whether the node computes on a GPU, whose answers round differently from a CPU's
        /// (a verifier compares them with a wider tolerance).
        gpu: bool,
    },
    /// Hidden states `[t, d]` after the shard's last layer, with the node's signed
    /// receipt for them.
    Hidden {
        hidden: TensorFrame,
        receipt: Receipt,
    },
    Closed,
    Stats(NodeStats),
    /// A masked session is open: the shard's layers and its ops as (op, rows, columns).
    OpenedMasked {
        session: SessionId,
        layers: (u32, u32),
        ops: Vec<(u64, u32, u32)>,
    },
    /// The answer to [`InferRequest::Linear`] or [`InferRequest::MaskProducts`]: `[n,
    /// d_out]` u32, little-endian.
    Words {
        words: Vec<u8>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// Words as the wire carries them: u32 little-endian.
pub fn words_to_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The words of a `Linear` or `Words` payload; its length must be a whole number of words.
pub fn bytes_to_words(bytes: &[u8]) -> Result<Vec<u32>, ProtocolError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(ProtocolError::Malformed(format!(
            "{} bytes are not whole 32-bit words",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Requests of the shard-upload protocol: chunks in order; the node answers how much it has.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum UploadRequest {
    /// How much of this shard do you hold?
    Query { shard: ShardId, total: u64 },
    Chunk {
        shard: ShardId,
        total: u64,
        offset: u64,
        data: Vec<u8>,
    },
}

/// Responses of the shard-upload protocol.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum UploadResponse {
    /// Bytes received so far; `complete` once the whole shard is stored and verified.
    Progress {
        received: u64,
        complete: bool,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// Requests of the directory protocol.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum DirectoryRequest {
    /// Every fresh capacity ad you know, yours included.
    Ads,
}

/// Responses of the directory protocol.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum DirectoryResponse {
    Ads(Vec<SignedAd>),
}
