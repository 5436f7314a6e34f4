//! `--verify`, and what the client remembers of nodes: `$VEIL_HOME/reputation.json` counts,
//! per peer, the rows of its answers that re-execution confirmed and the times it was caught
//! answering wrongly (with the signed receipts of those answers). Pipelines leave out peers
//! caught before.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use veil_model::container::write_atomic;
use veil_protocol::PeerId;

use crate::deployment::Deployment;
use crate::home::veil_home;
use crate::remote::{RemotePipeline, Verification, DEFAULT_RATE};

pub const VERIFY_HELP: &str = "Fraction of each stage's steps whose answer is checked before \
    it is used, by re-executing on a second replica (chosen at random, unknown to the nodes). \
    Every row is re-executed at the next check, so a node that lies is caught at the next \
    check; 1 checks every step (no wrong answer is ever used), 0 turns checking off. \
    [default: the deployment's `veil deploy --verify`, else 0.05]";

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
    })
}

/// Turn verification on for `pipeline` and leave out peers caught lying before.
pub fn prepare(pipeline: &mut RemotePipeline, verification: Verification) -> Result<()> {
    pipeline.set_verification(verification);
    let book = Reputation::load()?;
    pipeline.avoid(&|p| book.caught(p));
    Ok(())
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
                let path = veil_home()?.join("proofs").join(format!(
                    "{}-{at_ms}.json",
                    d.peer
                        .get(d.peer.len().saturating_sub(12)..)
                        .unwrap_or(&d.peer)
                ));
                p.write(&path)?;
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
