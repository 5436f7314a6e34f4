//! What `--model` may name: a known model (fetched on first use), `tiny`, or a GGUF path.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use veil_model::{ModelBundle, QuantBundle};

use crate::fetch;

/// A model named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A model Veil fetches itself (e.g. `smollm2`).
    Known(&'static str),
    /// The deterministic tiny random model.
    Tiny,
    /// A GGUF file.
    Path(PathBuf),
}

impl ModelSpec {
    pub fn parse(s: &str) -> Result<Self> {
        if s.eq_ignore_ascii_case("tiny") {
            return Ok(ModelSpec::Tiny);
        }
        if let Some(m) = fetch::known(s) {
            return Ok(ModelSpec::Known(m.name));
        }
        let path = PathBuf::from(s);
        if path.exists() {
            return Ok(ModelSpec::Path(path));
        }
        let names: Vec<&str> = fetch::KNOWN.iter().map(|m| m.name).collect();
        bail!(
            "unknown model `{s}`: expected {}, tiny, or the path of a .gguf file",
            names.join(", ")
        )
    }

    /// The GGUF path, fetching a known model if it is not cached yet.
    pub fn path(&self) -> Result<Option<PathBuf>> {
        match self {
            ModelSpec::Tiny => Ok(None),
            ModelSpec::Path(p) => Ok(Some(p.clone())),
            ModelSpec::Known(name) => {
                let model = fetch::known(name).context("known model")?;
                let cached = fetch::cached_path(model)?;
                if !cached.exists() {
                    tracing::info!("{name} is not cached yet; fetching it (about 100 MB)");
                }
                fetch::fetch(model).map(Some)
            }
        }
    }

    /// Load the model with its weights in their GGUF blocks (for the CPU's kernels).
    pub fn load_quantized(&self) -> Result<QuantBundle> {
        match self.path()? {
            None => Ok(QuantBundle::tiny()?),
            Some(path) => QuantBundle::load(&path)
                .with_context(|| format!("cannot load model {}", path.display())),
        }
    }

    /// Load the model's weights (dequantized to f32), tokenizer and chat template.
    pub fn load(&self) -> Result<ModelBundle> {
        match self.path()? {
            None => Ok(ModelBundle::tiny()?),
            Some(path) => ModelBundle::load(&path)
                .with_context(|| format!("cannot load model {}", path.display())),
        }
    }
}
