//! The parties of a masked op, seen from the client: compute nodes, which get masked words
//! and return `W u`, and mask providers, which hold the session's seed and return `W r`.
//! The network implements these traits over its transport; [`LocalParty`] is either role
//! in this process (the default mask provider, and the tests' honest and lying nodes).
//!
//! The client checks every product (Freivalds). On a mismatch it recomputes `W r` itself
//! (the weights are public) to see who lied: if the compute node's answer passes against
//! it, the mask provider lied; otherwise the compute node did (and the provider too if its
//! `W r` differs), and the op is replayed on the next compute replica. A party caught once
//! is not asked again. When no replica is left, the client computes the op itself, so the
//! output is always the exact one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use veil_kernels::ring::RingMatrix;

use super::MaskSeed;

/// Why a party gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{party}: {reason}")]
pub struct PartyError {
    pub party: String,
    pub reason: String,
}

/// A compute node for masked ops.
pub trait ComputeParty: Send + Sync + std::fmt::Debug {
    /// How logs and detections name it (its peer id on the network).
    fn name(&self) -> String;
    /// `W_op u (mod 2^32)` for `n` masked words (`[n, d_in]` → `[n, d_out]`).
    fn products(&self, op: u64, words: &[u32], n: usize) -> Result<Vec<u32>, PartyError>;
}

/// A mask provider.
pub trait MaskParty: Send + Sync + std::fmt::Debug {
    fn name(&self) -> String;
    /// `W_op r (mod 2^32)` for the masks of positions `first..first + n` of op `op`.
    fn mask_products(&self, op: u64, first: u64, n: usize) -> Result<Vec<u32>, PartyError>;
}

/// Either role in this process, for the ops whose integer weights it holds.
#[derive(Debug, Clone)]
pub struct LocalParty {
    name: String,
    ops: Arc<HashMap<u64, Arc<RingMatrix>>>,
    /// The session's seed, for the mask provider's role.
    seed: Option<Arc<MaskSeed>>,
}

impl LocalParty {
    pub fn new(
        name: impl Into<String>,
        ops: Arc<HashMap<u64, Arc<RingMatrix>>>,
        seed: Option<Arc<MaskSeed>>,
    ) -> Self {
        LocalParty {
            name: name.into(),
            ops,
            seed,
        }
    }

    fn op(&self, op: u64) -> Result<&RingMatrix, PartyError> {
        self.ops.get(&op).map(|w| &**w).ok_or_else(|| PartyError {
            party: self.name.clone(),
            reason: format!("no op {op} here"),
        })
    }
}

impl ComputeParty for LocalParty {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn products(&self, op: u64, words: &[u32], n: usize) -> Result<Vec<u32>, PartyError> {
        let w = self.op(op)?;
        if words.len() != n * w.cols() {
            return Err(PartyError {
                party: self.name.clone(),
                reason: format!("{} words are not {n} inputs of {}", words.len(), w.cols()),
            });
        }
        let mut out = vec![0u32; n * w.rows()];
        w.mul(words, n, &mut out);
        Ok(out)
    }
}

impl MaskParty for LocalParty {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn mask_products(&self, op: u64, first: u64, n: usize) -> Result<Vec<u32>, PartyError> {
        let w = self.op(op)?;
        let seed = self.seed.as_ref().ok_or_else(|| PartyError {
            party: self.name.clone(),
            reason: "no mask seed for this session".into(),
        })?;
        let mut r = vec![0u32; n * w.cols()];
        seed.fill(op, first, n, w.cols(), &mut r);
        let mut out = vec![0u32; n * w.rows()];
        w.mul(&r, n, &mut out);
        Ok(out)
    }
}

/// A party caught answering wrongly.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Detection {
    pub party: String,
    /// `compute` or `mask provider`.
    pub role: String,
    pub op: u64,
    /// The first position of the request it answered wrongly.
    pub position: u64,
}

/// Who runs a session's masked ops.
#[derive(Debug, Clone, Default)]
pub enum Parties {
    /// This process plays both parties, in one pass over each op's weights.
    #[default]
    Local,
    /// Separate parties: compute replicas and mask providers, tried in order.
    Split(Arc<SplitParties>),
}

/// Compute replicas and mask providers, and who among them has been caught.
#[derive(Debug)]
pub struct SplitParties {
    pub compute: Vec<Arc<dyn ComputeParty>>,
    pub providers: Vec<Arc<dyn MaskParty>>,
    caught: Mutex<HashSet<String>>,
    detections: Mutex<Vec<Detection>>,
}

impl SplitParties {
    pub fn new(compute: Vec<Arc<dyn ComputeParty>>, providers: Vec<Arc<dyn MaskParty>>) -> Self {
        SplitParties {
            compute,
            providers,
            caught: Mutex::new(HashSet::new()),
            detections: Mutex::new(Vec::new()),
        }
    }

    /// Every party caught so far, in order.
    pub fn detections(&self) -> Vec<Detection> {
        self.detections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The compute party asked first now: the first not caught.
    pub fn serving(&self) -> Option<String> {
        self.compute
            .iter()
            .map(|c| c.name())
            .find(|n| !self.is_caught(n))
    }

    pub(super) fn is_caught(&self, name: &str) -> bool {
        self.caught
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    pub(super) fn catch(&self, party: String, role: &str, op: u64, position: u64) {
        tracing::warn!(
            "masked op {op} (from position {position}): {role} {party} answered wrongly; \
             it is not asked again"
        );
        self.caught
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(party.clone());
        self.detections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Detection {
                party,
                role: role.into(),
                op,
                position,
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_kernels::ring::Ints;

    fn party(seed: Option<Arc<MaskSeed>>) -> LocalParty {
        let w = RingMatrix::from_parts(2, 3, Ints::I8(vec![1, 2, 3, -1, -2, -3]), vec![1.0; 2])
            .expect("sizes");
        LocalParty::new("p", Arc::new(HashMap::from([(7, Arc::new(w))])), seed)
    }

    #[test]
    fn bad_requests_are_clear_errors_and_good_ones_are_answered() {
        let p = party(None);
        assert_eq!(p.products(7, &[1, 1, 1], 1), Ok(vec![6, (-6i32) as u32]));
        let e = p.products(7, &[1, 1], 1).expect_err("short");
        assert!(
            e.to_string().contains("2 words are not 1 inputs of 3"),
            "{e}"
        );
        let e = p.products(8, &[1, 1, 1], 1).expect_err("unknown op");
        assert!(e.to_string().contains("no op 8"), "{e}");
        let e = p.mask_products(7, 0, 1).expect_err("no seed");
        assert!(e.to_string().contains("no mask seed"), "{e}");
        // a provider's W r is the compute node's product of the same masks
        let seed = Arc::new(MaskSeed::new([3; 32]));
        let mut r = vec![0u32; 2 * 3];
        seed.fill(7, 5, 2, 3, &mut r);
        let provider = party(Some(seed));
        assert_eq!(
            provider.mask_products(7, 5, 2).expect("masks"),
            p.products(7, &r, 2).expect("products")
        );
    }
}
