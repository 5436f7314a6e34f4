//! A model ready to use: weights, tokenizer and chat template, from one GGUF file.

use std::path::Path;

use crate::gguf::GgufFile;
use crate::qweights::QuantWeights;
use crate::text::{TextCodec, TextSpec};
use crate::tiny::TinyVariant;
use crate::{LlamaConfig, LlamaWeights, ModelError};

/// Everything read from a model file.
#[derive(Debug)]
pub struct ModelBundle {
    /// `general.name`, or the file name.
    pub name: String,
    pub weights: LlamaWeights,
    pub text: TextCodec,
}

impl ModelBundle {
    /// Read a GGUF model file.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let (file, fallback) = open(path)?;
        Self::from_gguf(&file, &fallback)
    }

    pub fn from_gguf(file: &GgufFile, fallback_name: &str) -> Result<Self, ModelError> {
        let weights = LlamaWeights::from_gguf(file)?;
        let (name, text) = name_and_text(file, &weights.config, fallback_name)?;
        Ok(ModelBundle {
            name,
            weights,
            text,
        })
    }

    /// The deterministic tiny random model (see [`crate::tiny`]).
    pub fn tiny() -> Result<Self, ModelError> {
        Self::tiny_variant(TinyVariant::Llama)
    }

    /// The deterministic tiny random model of another architecture family.
    pub fn tiny_variant(v: TinyVariant) -> Result<Self, ModelError> {
        Self::from_gguf(&tiny_file(v)?, "tiny")
    }
}

/// A model whose weights stay in their GGUF blocks, for the CPU's quantized kernels: the
/// file's bytes are held once and nothing is dequantized.
#[derive(Debug)]
pub struct QuantBundle {
    pub name: String,
    pub weights: QuantWeights,
    pub text: TextCodec,
}

impl QuantBundle {
    /// Read a GGUF model file.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let (file, fallback) = open(path)?;
        Self::from_gguf(&file, &fallback)
    }

    pub fn from_gguf(file: &GgufFile, fallback_name: &str) -> Result<Self, ModelError> {
        let weights = QuantWeights::from_gguf(file)?;
        let (name, text) = name_and_text(file, &weights.config, fallback_name)?;
        Ok(QuantBundle {
            name,
            weights,
            text,
        })
    }

    /// The deterministic tiny random model (F32 tensors).
    pub fn tiny() -> Result<Self, ModelError> {
        Self::tiny_variant(TinyVariant::Llama)
    }

    /// The deterministic tiny random model of another architecture family (F32 tensors).
    pub fn tiny_variant(v: TinyVariant) -> Result<Self, ModelError> {
        Self::from_gguf(&tiny_file(v)?, "tiny")
    }
}

/// The file at `path`, and the name to use if its metadata has none (the file's stem).
fn open(path: &Path) -> Result<(GgufFile, String), ModelError> {
    let fallback = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((GgufFile::open(path)?, fallback))
}

/// The deterministic tiny random model's file.
fn tiny_file(v: TinyVariant) -> Result<GgufFile, ModelError> {
    Ok(GgufFile::from_bytes(crate::tiny::tiny_variant_gguf(
        v,
        crate::tiny::TINY_SEED,
    )?)?)
}

/// The model's name and its text codec, checked against the embedding table.
fn name_and_text(
    file: &GgufFile,
    config: &LlamaConfig,
    fallback_name: &str,
) -> Result<(String, TextCodec), ModelError> {
    let text = TextCodec::new(TextSpec::from_gguf(file)?)?;
    if text.tokenizer.vocab_size() != config.vocab_size {
        return Err(ModelError::InvalidConfig(format!(
            "the tokenizer has {} tokens but the embedding table has {} rows",
            text.tokenizer.vocab_size(),
            config.vocab_size
        )));
    }
    let name = if file.has_key("general.name") {
        file.get_str("general.name")?.to_string()
    } else {
        fallback_name.to_string()
    };
    Ok((name, text))
}
