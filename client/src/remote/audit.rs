//! Checking what nodes answer. A stage's *verifier* is a session on a second replica that
//! re-executes the stage's rows: at a step chosen at random (probability `rate`, unknown to
//! the nodes), the client sends the verifier every row since its last check together with
//! the step's input, in one prefill, while the primary computes the step; then it compares
//! every row's answer. Every row is so re-executed at the next check (and at the end of the
//! generation). With `--verify 1` each step's answer is used only once it agrees; below, the
//! check runs in the background and is settled before the stage's next step, so that it
//! costs the generation no waiting (a lie it finds was used by the later stages for one
//! step, and they are repaired).
//!
//! On the CPU, a prefill computes each row to the bit as the steps did, so honest answers
//! agree exactly (`veil_model::integrity`); answers differ beyond the tolerance only when a
//! node lied. A disagreement is settled by a referee: the stage recomputed here from the
//! deployment's own copy of the shard when it is at hand, else a third replica. The liar's
//! answers are discarded, its signed receipts kept as evidence, the honest replica carries
//! the stage on, and later stages are repaired where they were fed a wrong row.

use std::path::PathBuf;

use veil_model::integrity::{first_disagreement, GPU_TOLERANCE, TOLERANCE};
use veil_protocol::wire::SessionId;
use veil_protocol::Receipt;

/// How a pipeline checks its nodes.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    /// Probability that a stage's step starts a check (every row since the last one is
    /// re-executed); at 1 every step is checked before its answer is used, below 1 checks
    /// run in the background; 0 turns checking off.
    pub rate: f64,
    /// A directory with the deployment's shards (`shard-<stage>.veil`), to settle disputes by
    /// recomputing here.
    pub shards: Option<PathBuf>,
    /// Submit the fraud proof of every conviction to the deployment's other nodes, which
    /// announce it on the network.
    pub publish: bool,
}

/// The default `--verify` rate: a node that lies on 10% of its steps is caught within 200
/// of them with probability above 0.99 (its first lie falls in its first 100 steps with
/// probability 1 − 0.9¹⁰⁰, and a check follows within 100 steps with 1 − 0.95¹⁰⁰ ≈ 0.994).
pub const DEFAULT_RATE: f64 = 0.05;

/// A node found lying, and how.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Detection {
    pub stage: usize,
    pub peer: String,
    /// The first row (position of the session) whose answer was wrong.
    pub row: usize,
    /// Rows the stage had when the lie was found: from the answer to the last of them on,
    /// every answer used is right.
    pub found_at: usize,
    /// Largest relative difference of its answers from the referee's.
    pub error: f32,
    /// Steps this node had answered in the generation when it was caught.
    pub steps_answered: u64,
    /// Who settled it: `local` (recomputed here) or a referee node's peer id.
    pub referee: String,
    /// The evidence: the inputs, its wrong answers and its receipts for them.
    #[serde(skip)]
    pub proof: Option<crate::proof::FraudProof>,
    /// Nodes that accepted the proof and announced it on the network.
    pub published: Vec<String>,
    #[serde(skip)]
    pub publish_tried: bool,
}

/// Verification counters of a pipeline.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AuditStats {
    /// Checks that compared a verifier's answers with the primary's.
    pub checks: u32,
    /// Rows whose answers were re-executed and agreed.
    pub rows_verified: u64,
    /// The same per peer (who gave the answers).
    pub verified: std::collections::BTreeMap<String, u64>,
    /// Steps each peer answered as a stage's primary.
    pub answered: std::collections::BTreeMap<String, u64>,
    /// Checks where the answers disagreed (each settled by a referee).
    pub disputes: u32,
    pub detections: Vec<Detection>,
    /// Rows that later stages had used before the row was found wrong (they were repaired;
    /// tokens already sampled from them stay as they were).
    pub rows_repaired: u64,
    /// Checks that could not run (a verifier failed, or no second replica).
    pub skipped: u32,
    /// Stages that have no second replica: nothing re-executes them.
    pub unverifiable: Vec<usize>,
    /// Proofs published on the network against this deployment's nodes, checked here.
    pub learned: Vec<super::publish::Learned>,
}

/// A stage's verifier session.
#[derive(Debug, Clone, Copy)]
pub(super) struct Verifier {
    pub replica: usize,
    pub session: SessionId,
    /// Rows of the stage it has computed (it catches up from here).
    pub rows: usize,
    pub gpu: bool,
}

/// What a stage keeps to be checked.
#[derive(Debug, Default)]
pub(super) struct StageAudit {
    pub verifier: Option<Verifier>,
    /// Rows whose answers agreed with a re-execution.
    pub checked: usize,
    /// The answers used for rows `checked..`, as `[rows, d]`.
    pub unchecked: Vec<f32>,
    /// Who gave them: replica, rows, receipt (one per step).
    pub steps: Vec<(usize, usize, Receipt)>,
    /// Steps answered per replica in this generation.
    pub answered: Vec<u64>,
    /// Whether the primary of the latest session computes on a GPU.
    pub primary_gpu: bool,
    /// A check running in the background (below `--verify 1`), settled before the stage's
    /// next step.
    pub pending: Option<super::check::Pending>,
    pub warned: bool,
}

impl StageAudit {
    pub fn new(replicas: usize) -> Self {
        StageAudit {
            answered: vec![0; replicas],
            ..StageAudit::default()
        }
    }

    /// Record the primary's answer to a step of `rows` rows.
    pub fn answered(&mut self, replica: usize, answer: &[f32], rows: usize, receipt: Receipt) {
        self.unchecked.extend_from_slice(answer);
        self.steps.push((replica, rows, receipt));
        if let Some(n) = self.answered.get_mut(replica) {
            *n += 1;
        }
    }

    /// The answers for rows `checked..` agreed with a re-execution.
    pub fn agreed(&mut self, rows: usize) {
        self.checked = rows;
        self.unchecked.clear();
        self.steps.clear();
    }
}

/// The tolerance for comparing answers of two sides, by whether each computes on a GPU.
pub fn tolerance(a_gpu: bool, b_gpu: bool) -> f32 {
    if a_gpu || b_gpu {
        GPU_TOLERANCE
    } else {
        TOLERANCE
    }
}

/// The first row (counted from the start of both slices) where `a` and `b` disagree.
pub(super) fn disagreement(a: &[f32], b: &[f32], d: usize, tol: f32) -> Option<(usize, f32)> {
    first_disagreement(a, b, d, tol)
}

/// The largest row difference of `a` from `b`.
pub(super) fn largest(a: &[f32], b: &[f32], d: usize) -> f32 {
    veil_model::integrity::row_errors(a, b, d)
        .into_iter()
        .fold(
            0.0,
            |m, e| if e.is_nan() { f32::INFINITY } else { m.max(e) },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt() -> Receipt {
        veil_protocol::Statement {
            session: [0; 16],
            shard: [0; 32],
            first_row: 0,
            rows: 1,
            input_chain: [0; 32],
            output_hash: [0; 32],
        }
        .sign(&veil_protocol::Identity::from_secret([1; 32]))
    }

    #[test]
    fn answers_are_kept_until_they_agree() {
        let mut a = StageAudit::new(2);
        a.answered(0, &[1.0; 6], 3, receipt());
        a.answered(1, &[2.0; 2], 1, receipt());
        a.answered(0, &[3.0; 4], 2, receipt());
        assert_eq!(a.answered, vec![2, 1]);
        assert_eq!((a.unchecked.len(), a.steps.len()), (12, 3));
        a.agreed(6);
        assert!(a.unchecked.is_empty() && a.steps.is_empty() && a.checked == 6);
    }

    #[test]
    fn a_gpu_on_either_side_widens_the_tolerance() {
        assert_eq!(tolerance(false, false), TOLERANCE);
        assert_eq!(tolerance(true, false), GPU_TOLERANCE);
        assert_eq!(largest(&[1.0, 0.0], &[1.0, 0.0], 2), 0.0);
        assert!(disagreement(&[1.0, 0.0, 5.0, 0.0], &[1.0, 0.0, 1.0, 0.0], 2, 0.1).is_some());
    }
}
