//! Hyper-parameters of a Llama-family decoder, read from GGUF metadata.

use serde::{Deserialize, Serialize};

use crate::arch::{Family, FamilySpec};
use crate::gguf::GgufFile;
use crate::ModelError;

/// Shape and constants of a Llama-family model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Tokens in the vocabulary (rows of the embedding table).
    pub vocab_size: usize,
    /// Width of the residual stream, `d`.
    pub d_model: usize,
    /// Width of the MLP, `f`.
    pub d_ff: usize,
    pub n_layers: usize,
    /// Query heads, `H`.
    pub n_heads: usize,
    /// Key/value heads, `G` (`H / G` query heads share one).
    pub n_kv_heads: usize,
    /// Width of one head, `h`.
    pub head_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Longest sequence (prompt plus generated tokens) the model accepts.
    pub max_seq_len: usize,
    /// Whether the output head is the transposed embedding table.
    pub tied_embeddings: bool,
    /// The architecture family: which extras its blocks carry ([`crate::arch`]).
    #[serde(default)]
    pub family: Family,
    /// Per RoPE pair, a divisor of its frequency (`rope_freqs.weight`: Llama 3.1's long
    /// context scaling); `None` for plain RoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Keys a query of a sliding-window layer sees, itself included (which layers slide:
    /// [`LlamaConfig::layer_window`]); `None`: every layer sees the whole context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// RoPE base of the sliding-window layers (Gemma 3's local layers); `None`: `rope_theta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_rope_theta: Option<f32>,
}

impl LlamaConfig {
    /// Read the configuration from a GGUF file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let arch = file.get_str("general.architecture")?;
        let family = Family::from_gguf_name(arch)?;
        let key = |k: &str| format!("{arch}.{k}");
        let d_model = file.get_usize(&key("embedding_length"))?;
        let n_heads = file.get_usize(&key("attention.head_count"))?;
        let n_kv_heads = if file.has_key(&key("attention.head_count_kv")) {
            file.get_usize(&key("attention.head_count_kv"))?
        } else {
            n_heads
        };
        let vocab_size = if file.has_key(&key("vocab_size")) {
            file.get_usize(&key("vocab_size"))?
        } else {
            file.get_str_array("tokenizer.ggml.tokens")?.len()
        };
        let rope_theta = if file.has_key(&key("rope.freq_base")) {
            file.get_f32(&key("rope.freq_base"))?
        } else {
            10_000.0
        };
        // Heads may be wider than d / H (Qwen 3, Gemma 3 say so with `key_length`).
        let head_dim = if file.has_key(&key("attention.key_length")) {
            file.get_usize(&key("attention.key_length"))?
        } else {
            d_model.checked_div(n_heads).unwrap_or(0)
        };
        if file.has_key(&key("attention.value_length"))
            && file.get_usize(&key("attention.value_length"))? != head_dim
        {
            return Err(ModelError::InvalidConfig(format!(
                "value heads of width {} differ from query heads of width {head_dim}",
                file.get_usize(&key("attention.value_length"))?
            )));
        }
        let rope_freq_factors = if file.has_tensor("rope_freqs.weight") {
            Some(file.tensor_f32_shaped("rope_freqs.weight", &[head_dim / 2])?)
        } else {
            None
        };
        // RoPE scaling (Gemma 3 4B+ and others stretch positions): refused rather than
        // computed wrong
        let scaling = key("rope.scaling.type");
        if file.has_key(&scaling) && !matches!(file.get_str(&scaling)?, "none" | "") {
            return Err(ModelError::InvalidConfig(format!(
                "RoPE scaling `{}` ({scaling}) is not supported yet",
                file.get_str(&scaling)?
            )));
        }
        let spec = family.spec();
        let sliding_window =
            if spec.sliding_pattern > 0 && file.has_key(&key("attention.sliding_window")) {
                Some(file.get_usize(&key("attention.sliding_window"))?)
            } else {
                None
            };
        let local_rope_theta = if file.has_key(&key("rope.freq_base_swa")) {
            Some(file.get_f32(&key("rope.freq_base_swa"))?)
        } else {
            spec.local_rope_theta
        };
        let config = LlamaConfig {
            sliding_window,
            local_rope_theta: sliding_window.and(local_rope_theta),
            vocab_size,
            d_model,
            d_ff: file.get_usize(&key("feed_forward_length"))?,
            n_layers: file.get_usize(&key("block_count"))?,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_theta,
            rms_eps: file.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
            max_seq_len: file.get_usize(&key("context_length"))?,
            tied_embeddings: !file.has_tensor("output.weight"),
            family,
            rope_freq_factors,
        };
        if file.has_key(&key("rope.dimension_count")) {
            let rope_dims = file.get_usize(&key("rope.dimension_count"))?;
            if rope_dims != config.head_dim {
                return Err(ModelError::InvalidConfig(format!(
                    "partial rotary embeddings ({rope_dims} of {} dims) are not supported",
                    config.head_dim
                )));
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Check the invariants the model code relies on.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |msg: String| Err(ModelError::InvalidConfig(msg));
        if self.d_model == 0 || self.n_layers == 0 || self.vocab_size == 0 || self.d_ff == 0 {
            return bad(format!("empty dimension in {self:?}"));
        }
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return bad(format!(
                "{} query heads cannot share {} key/value heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head width {} is not even", self.head_dim));
        }
        if let Some(f) = &self.rope_freq_factors {
            if f.len() != self.head_dim / 2 || f.iter().any(|x| x.is_nan() || *x <= 0.0) {
                return bad(format!(
                    "{} RoPE frequency factors for heads of width {} (one positive factor per pair)",
                    f.len(),
                    self.head_dim
                ));
            }
        }
        if self.sliding_window == Some(0) {
            return bad("a sliding window of 0 keys".into());
        }
        if self
            .local_rope_theta
            .is_some_and(|t| t.is_nan() || t <= 0.0)
        {
            return bad("the local RoPE base must be positive".into());
        }
        if self.max_seq_len == 0 {
            return bad("context length is 0".into());
        }
        if !(self.rope_theta > 0.0 && self.rms_eps > 0.0) {
            return bad("RoPE base and RMSNorm epsilon must be positive".into());
        }
        Ok(())
    }

    /// What the family's blocks carry.
    pub fn spec(&self) -> FamilySpec {
        self.family.spec()
    }

    /// The window of layer `l`: how many keys (itself included) each query sees, or
    /// `None` when the layer attends to the whole context.
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        let w = self.sliding_window?;
        let n = self.spec().sliding_pattern;
        if n > 0 && (l + 1).is_multiple_of(n) {
            None
        } else {
            Some(w)
        }
    }

    /// The factor token embeddings are multiplied by before the first block (Gemma's
    /// `sqrt(d)`), or `None`. A tied head reads the unscaled table.
    pub fn embedding_scale(&self) -> Option<f32> {
        self.spec()
            .embed_scale
            .then(|| (self.d_model as f32).sqrt())
    }

    /// The RoPE base of layer `l`.
    pub fn layer_rope_theta(&self, l: usize) -> f32 {
        match self.layer_window(l) {
            Some(_) => self.local_rope_theta.unwrap_or(self.rope_theta),
            None => self.rope_theta,
        }
    }

    /// Width of the query projection: `H * h` (not always `d`).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Width of the key (and value) projection: `G * h`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// A small configuration for tests and demos: fast on any backend.
    pub fn tiny(vocab_size: usize) -> Self {
        LlamaConfig {
            vocab_size,
            d_model: 64,
            d_ff: 160,
            n_layers: 4,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            max_seq_len: 512,
            tied_embeddings: true,
            family: Family::Llama,
            rope_freq_factors: None,
            sliding_window: None,
            local_rope_theta: None,
        }
    }
}
