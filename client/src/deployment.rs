//! Deployment records: `$VEIL_HOME/deployments/<id>/` holds `client.veil` (the secret bundle,
//! 0600), the shards (kept to repair the deployment) and `deployment.json` (where each
//! stage's replicas live).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use veil_model::container::write_atomic;

use crate::home::veil_home;

/// A node that holds a stage's shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub peer: String,
    pub addrs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePlacement {
    pub stage: usize,
    pub layers: (usize, usize),
    /// Content hash of the shard (hex).
    pub shard: String,
    pub bytes: u64,
    pub replicas: Vec<Replica>,
}

/// Where a deployment lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: String,
    pub model: String,
    pub key_fingerprint: String,
    pub created_ms: u64,
    /// The bootstrap addresses used at deploy time (a default for later commands).
    pub bootstrap: Vec<String>,
    /// `veil deploy --verify`: the default verification rate of later commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<f64>,
    /// `veil deploy --privacy`: the default mode of later commands (rotated when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<veil_model::masked::Privacy>,
    pub stages: Vec<StagePlacement>,
}

pub fn deployments_dir() -> Result<PathBuf> {
    Ok(veil_home()?.join("deployments"))
}

impl Deployment {
    pub fn dir(id: &str) -> Result<PathBuf> {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("`{id}` is not a deployment id");
        }
        Ok(deployments_dir()?.join(id))
    }

    /// Load a deployment by id.
    pub fn load(id: &str) -> Result<Self> {
        let path = Self::dir(id)?.join("deployment.json");
        if !path.exists() {
            bail!(
                "no deployment `{id}` under {} (see `veil deploy`)",
                deployments_dir()?.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
    }

    pub fn save(&self) -> Result<()> {
        let dir = Self::dir(&self.id)?;
        std::fs::create_dir_all(&dir)?;
        let json = serde_json::to_vec_pretty(self)?;
        write_atomic(&dir.join("deployment.json"), &json, true)?;
        Ok(())
    }
}
