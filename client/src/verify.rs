//! `--verify`, and what the client remembers of nodes: `$VEIL_HOME/reputation.json` counts,
//! per peer, the rows of its answers that re-execution confirmed and the times it was caught
//! answering wrongly (with the signed receipts of those answers). Pipelines leave out peers
//! caught before, by this client or by anyone whose published proof this client recomputed
//! and found to hold.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use veil_model::container::write_atomic;
use veil_protocol::proof::proof_id;
use veil_protocol::PeerId;

use crate::proof::Verdict;

use crate::deployment::Deployment;
use crate::home::veil_home;
use crate::remote::{RemotePipeline, Verification, DEFAULT_RATE};

pub const VERIFY_HELP: &str = "Fraction of each stage's steps that start a check (chosen at \
    random, unknown to the nodes): a second replica re-executes every row since the last check \
    in one prefill, in the background, and a node caught lying is replaced (its answers \
    corrected, later stages recomputed). Every row is re-executed by the end of a generation. \
    1 checks every step before its answer is used (no wrong answer is ever used); 0 turns \
    checking off. [default: the deployment's `veil deploy --verify`, else 0.05]";

/// A `--verify` value: a fraction in [0, 1].
pub fn parse_rate(s: &str) -> std::result::Result<f64, String> {
    let r: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number between 0 and 1"))?;
    if !(0.0..=1.0).contains(&r) {
        return Err(format!("{r} is outside [0, 1]"));
    }
    Ok(r)
}

/// How to check deployment `deployment`: `rate` if given, else its recorded default, else
/// [`DEFAULT_RATE`]; disputes are settled with the shards in its directory.
pub fn verification_for(deployment: &Deployment, rate: Option<f64>) -> Result<Verification> {
    Ok(Verification {
        rate: rate.or(deployment.verify).unwrap_or(DEFAULT_RATE),
        shards: Some(Deployment::dir(&deployment.id)?),
        publish: true,
    })
}

/// Turn verification on for `pipeline`, learn the proofs published against its nodes, and
/// leave out peers caught lying.
pub fn prepare(pipeline: &mut RemotePipeline, verification: Verification) -> Result<()> {
    pipeline.set_verification(verification);
    let mut book = Reputation::load()?;
    if learn_due() {
        learn(pipeline, &mut book)?;
    }
    pipeline.avoid(&|p| book.caught(p));
    Ok(())
}

/// How often one process asks the network for new proofs (a gateway prepares a pipeline per
/// request).
const LEARN_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

fn learn_due() -> bool {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_some_and(|t| t.elapsed() < LEARN_EVERY) {
        return false;
    }
    *last = Some(std::time::Instant::now());
    true
}

/// Check the proofs published against `pipeline`'s nodes that `book` has not settled yet:
/// each is fetched and recomputed from the deployment's shard when this client holds it; a
/// proof that holds convicts its node here as if this client had caught it, one that does
/// not counts against its reporter, and without the shard nothing is believed.
pub fn learn(pipeline: &mut RemotePipeline, book: &mut Reputation) -> Result<()> {
    let notices = pipeline.published_notices();
    let mut changed = false;
    for (notice, via) in notices {
        let id = hex::encode(notice.id);
        if book.settled.contains_key(&id) {
            continue;
        }
        let shard = match crate::proof::find_shard(&hex::encode(notice.shard))? {
            Some(s) => s,
            None => {
                tracing::info!(
                    "a proof against {} is published, but its shard is not here to check it: \
                     not believed",
                    notice.accused
                );
                pipeline
                    .stats
                    .audit
                    .learned
                    .push(learned(&notice, "unchecked"));
                continue;
            }
        };
        let (proof, bytes) = match pipeline.fetch_proof(&notice, via) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("a proof against {}: {e:#}", notice.accused);
                continue;
            }
        };
        let verdict = crate::proof::check(&proof, Some((&shard.0, shard.1)));
        let word = crate::remote::verdict_word(&verdict);
        match verdict {
            Ok(Verdict::Guilty { row, error }) => {
                tracing::warn!(
                    "a published proof holds: {} answered wrongly at position {row} of stage \
                     {} (checked here); it is no longer used",
                    notice.accused,
                    notice.stage
                );
                let path = proof_path(&notice.accused, veil_protocol::ad::now_ms())?;
                std::fs::create_dir_all(path.parent().expect("in a directory"))?;
                write_atomic(&path, &bytes, false)?;
                book.peers
                    .entry(notice.accused.clone())
                    .or_default()
                    .caught
                    .push(Caught {
                        deployment: String::new(),
                        stage: proof.stage,
                        row,
                        error,
                        referee: format!("published by {} (checked here)", notice.reporter),
                        at_ms: veil_protocol::ad::now_ms(),
                        proof: Some(path),
                    });
            }
            _ => {
                tracing::warn!(
                    "a published proof against {} does not hold ({word}); reported by {}: \
                     ignored",
                    notice.accused,
                    notice.reporter
                );
                *book
                    .false_reports
                    .entry(notice.reporter.clone())
                    .or_default() += 1;
            }
        }
        book.settled.insert(id, word.clone());
        pipeline.stats.audit.learned.push(learned(&notice, &word));
        changed = true;
    }
    if changed {
        book.save()?;
    }
    Ok(())
}

fn learned(n: &veil_protocol::ProofNotice, verdict: &str) -> crate::remote::Learned {
    crate::remote::Learned {
        peer: n.accused.clone(),
        verdict: verdict.into(),
        reporter: n.reporter.clone(),
        holder: n.holder.clone(),
        proof: hex::encode(n.id),
    }
}

/// Where a proof against `peer` is kept.
fn proof_path(peer: &str, at_ms: u64) -> Result<PathBuf> {
    Ok(veil_home()?.join("proofs").join(format!(
        "{}-{at_ms}.json",
        peer.get(peer.len().saturating_sub(12)..).unwrap_or(peer)
    )))
}

/// Record what `pipeline` learned of its nodes (call after `close`).
pub fn record(pipeline: &RemotePipeline, deployment: &str) -> Result<()> {
    let audit = &pipeline.stats.audit;
    if audit.rows_verified == 0 && audit.detections.is_empty() {
        return Ok(());
    }
    let mut book = Reputation::load()?;
    for (peer, rows) in &audit.verified {
        book.peers.entry(peer.clone()).or_default().rows_verified += rows;
    }
    for d in &audit.detections {
        let at_ms = veil_protocol::ad::now_ms();
        // the evidence, checkable by anyone with `veil verify-proof`
        let proof = match &d.proof {
            Some(p) => {
                let path = proof_path(&d.peer, at_ms)?;
                crate::proof::write(p, &path)?;
                // what this client convicted, it does not need to check again
                book.settled
                    .insert(hex::encode(proof_id(&p.to_bytes())), "guilty".into());
                Some(path)
            }
            None => None,
        };
        book.peers
            .entry(d.peer.clone())
            .or_default()
            .caught
            .push(Caught {
                deployment: deployment.to_string(),
                stage: d.stage,
                row: d.row,
                error: d.error,
                referee: d.referee.clone(),
                at_ms,
                proof,
            });
    }
    book.save()
}

/// A time a peer was caught.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Caught {
    /// The deployment where this client caught it; empty when learned from a published proof.
    pub deployment: String,
    pub stage: usize,
    pub row: usize,
    pub error: f32,
    pub referee: String,
    pub at_ms: u64,
    /// The fraud proof (`veil verify-proof FILE`): the inputs, its wrong answers and its
    /// signed receipts for them.
    pub proof: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerRecord {
    /// Rows of its answers that a re-execution confirmed.
    pub rows_verified: u64,
    pub caught: Vec<Caught>,
}

/// The client's record of nodes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reputation {
    pub peers: BTreeMap<String, PeerRecord>,
    /// Published proofs checked here (id, hex) and what was found.
    #[serde(default)]
    pub settled: BTreeMap<String, String>,
    /// Published proofs per reporter that did not hold.
    #[serde(default)]
    pub false_reports: BTreeMap<String, u32>,
}

impl Reputation {
    pub fn path() -> Result<PathBuf> {
        Ok(veil_home()?.join("reputation.json"))
    }

    pub fn load() -> Result<Self> {
        let path = Self::path()?;
        if !path.exists() {
            return Ok(Reputation::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        match serde_json::from_str(&text) {
            Ok(r) => Ok(r),
            Err(e) => bail!(
                "{} is corrupt ({e}); move it away to start a new record",
                path.display()
            ),
        }
    }

    pub fn save(&self) -> Result<()> {
        let path = Self::path()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_atomic(&path, &serde_json::to_vec_pretty(self)?, false)?;
        Ok(())
    }

    /// Whether `peer` was ever caught answering wrongly.
    pub fn caught(&self, peer: &PeerId) -> bool {
        self.peers
            .get(&peer.to_string())
            .is_some_and(|r| !r.caught.is_empty())
    }
}
