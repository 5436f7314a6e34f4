//! Where Veil keeps its files: `$VEIL_HOME`, by default `~/.veil`.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// The Veil home directory (not created).
pub fn veil_home() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("VEIL_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither VEIL_HOME nor HOME is set; set VEIL_HOME to a writable directory")?;
    Ok(PathBuf::from(home).join(".veil"))
}

/// `$VEIL_HOME/models`, created if missing.
pub fn models_dir() -> Result<PathBuf> {
    let dir = veil_home()?.join("models");
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the model cache {}", dir.display()))?;
    Ok(dir)
}
