//! A model's weights kept in the GGUF's own blocks, sharing the file's bytes: what the
//! CPU's quantized kernels run on. Only the norm gains (a few vectors) are f32.

use veil_kernels::QMatrix;

use crate::arch::PostNorms;
use crate::gguf::GgufFile;
use crate::weights::{gguf_extras, gguf_post_norms, qk_order};
use crate::{AttnExtras, LlamaConfig, ModelError};

/// One decoder block; matrices in GGUF's layout (`[out, in]`, one row per output).
#[derive(Debug, Clone)]
pub struct QuantLayer {
    pub attn_norm: Vec<f32>,
    /// `[H h, d]`; RoPE pairs are adjacent rows within a head.
    pub wq: QMatrix,
    /// `[G h, d]`.
    pub wk: QMatrix,
    /// `[G h, d]`.
    pub wv: QMatrix,
    /// `[d, H h]`.
    pub wo: QMatrix,
    pub ffn_norm: Vec<f32>,
    /// `[f, d]`.
    pub w_gate: QMatrix,
    /// `[f, d]`.
    pub w_up: QMatrix,
    /// `[d, f]`.
    pub w_down: QMatrix,
    /// Biases and per-head norms of the attention (f32), as the family has them.
    pub extras: AttnExtras,
    /// Norms on the attention's and the MLP's outputs (f32), if the family has them.
    pub post_norms: Option<PostNorms>,
}

/// Every weight of a model, quantized as in its file.
#[derive(Debug, Clone)]
pub struct QuantWeights {
    pub config: LlamaConfig,
    /// `[vocab, d]`.
    pub embedding: QMatrix,
    pub layers: Vec<QuantLayer>,
    pub final_norm: Vec<f32>,
    /// `[vocab, d]`; `None` when tied to the embedding.
    pub output: Option<QMatrix>,
}

impl QuantWeights {
    /// The tensors of `file`, by their GGUF names, without copying or dequantizing them.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let c = LlamaConfig::from_gguf(file)?;
        let (d, f, q, kv) = (c.d_model, c.d_ff, c.q_dim(), c.kv_dim());
        let vector = |name: &str| file.tensor_f32_shaped(name, &[d]);
        // Queries and keys of families with another RoPE layout are reordered: a copy of
        // those two matrices (the file's rows are then never read again).
        let ordered = |m: QMatrix, heads: usize| match qk_order(&c, heads) {
            Some(order) => m.select_rows(&order),
            None => m,
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(QuantLayer {
                attn_norm: vector(&n("attn_norm"))?,
                wq: ordered(file.tensor_matrix(&n("attn_q"), d, q)?, c.n_heads),
                wk: ordered(file.tensor_matrix(&n("attn_k"), d, kv)?, c.n_kv_heads),
                wv: file.tensor_matrix(&n("attn_v"), d, kv)?,
                wo: file.tensor_matrix(&n("attn_output"), q, d)?,
                ffn_norm: vector(&n("ffn_norm"))?,
                w_gate: file.tensor_matrix(&n("ffn_gate"), d, f)?,
                w_up: file.tensor_matrix(&n("ffn_up"), d, f)?,
                w_down: file.tensor_matrix(&n("ffn_down"), f, d)?,
                extras: gguf_extras(file, &c, i)?,
                post_norms: gguf_post_norms(file, &c, i)?,
            });
        }
        let output = if c.tied_embeddings {
            None
        } else {
            Some(file.tensor_matrix("output.weight", d, c.vocab_size)?)
        };
        Ok(QuantWeights {
            embedding: file.tensor_matrix("token_embd.weight", d, c.vocab_size)?,
            final_norm: vector("output_norm.weight")?,
            layers,
            output,
            config: c,
        })
    }

    /// The output head, `[vocab, d]`.
    pub fn head(&self) -> &QMatrix {
        self.output.as_ref().unwrap_or(&self.embedding)
    }

    /// Bytes of weight data (shared with the file).
    pub fn byte_len(&self) -> usize {
        let layer = |l: &QuantLayer| {
            [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                .iter()
                .map(|m| m.byte_len())
                .sum::<usize>()
        };
        self.embedding.byte_len()
            + self.output.as_ref().map_or(0, QMatrix::byte_len)
            + self.layers.iter().map(layer).sum::<usize>()
    }
}
