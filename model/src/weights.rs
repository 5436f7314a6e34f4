//! Plaintext weights of a Llama-family model on the host, in the `x -> x W` convention
//! (`W` is `[in, out]`). This is the input of the encryption transforms and of the burn
//! model constructors.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::arch::{head_order, heads_order, AttnExtras, PairMap, PostNorms, QkNorm, RopeLayout};
use crate::gguf::GgufFile;
use crate::{LlamaConfig, Matrix, ModelError};

/// Weights of one decoder block.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// RMSNorm gain before attention, `g1`, `[d]`.
    pub attn_norm: Vec<f32>,
    /// `[d, H*h]`; RoPE pairs are adjacent columns within a head (GGUF layout).
    pub wq: Matrix,
    /// `[d, G*h]`.
    pub wk: Matrix,
    /// `[d, G*h]`.
    pub wv: Matrix,
    /// `[H*h, d]`.
    pub wo: Matrix,
    /// RMSNorm gain before the MLP, `g2`, `[d]`.
    pub ffn_norm: Vec<f32>,
    /// `[d, f]`.
    pub w_gate: Matrix,
    /// `[d, f]`.
    pub w_up: Matrix,
    /// `[f, d]`.
    pub w_down: Matrix,
    /// Biases and per-head norms of the attention, as the family has them.
    pub extras: AttnExtras,
    /// Norms on the attention's and the MLP's outputs, if the family has them.
    pub post_norms: Option<PostNorms>,
}

/// All weights of a model.
#[derive(Debug, Clone)]
pub struct LlamaWeights {
    pub config: LlamaConfig,
    /// `[vocab, d]`.
    pub embedding: Matrix,
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm gain, `[d]`.
    pub final_norm: Vec<f32>,
    /// Output head `[d, vocab]`; `None` when tied to the embedding.
    pub output: Option<Matrix>,
}

/// Load a GGUF linear weight (stored `[out][in]`) as `[in, out]`.
fn linear(file: &GgufFile, name: &str, d_in: usize, d_out: usize) -> Result<Matrix, ModelError> {
    let data = file.tensor_f32_shaped(name, &[d_in, d_out])?;
    Ok(Matrix::new(d_out, d_in, data).transpose())
}

fn vector(file: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
    Ok(file.tensor_f32_shaped(name, &[n])?)
}

/// `v` reordered: element `i` of the result is `v[order[i]]`.
pub(crate) fn reorder(v: &[f32], order: &[usize]) -> Vec<f32> {
    order.iter().map(|&i| v[i]).collect()
}

/// Columns of `m` reordered: column `i` of the result is column `order[i]` of `m`.
fn reorder_columns(m: &Matrix, order: &[usize]) -> Matrix {
    let data = (0..m.rows)
        .flat_map(|r| order.iter().map(move |&c| m.get(r, c)))
        .collect();
    Matrix::new(m.rows, order.len(), data)
}

/// The order of the query (`heads = H`) or key (`G`) projection's outputs in Veil's RoPE
/// layout, or `None` when the file's layout is already Veil's.
pub(crate) fn qk_order(c: &LlamaConfig, heads: usize) -> Option<Vec<usize>> {
    match c.spec().rope {
        RopeLayout::Adjacent => None,
        layout => Some(heads_order(layout, heads, c.head_dim)),
    }
}

/// Block `i`'s biases and per-head norms from the file, in Veil's RoPE layout.
pub(crate) fn gguf_extras(
    file: &GgufFile,
    c: &LlamaConfig,
    i: usize,
) -> Result<AttnExtras, ModelError> {
    let spec = c.spec();
    let (h, q, kv) = (c.head_dim, c.q_dim(), c.kv_dim());
    let n = |s: &str| format!("blk.{i}.{s}");
    let ordered = |v: Vec<f32>, heads: usize| match qk_order(c, heads) {
        Some(order) => reorder(&v, &order),
        None => v,
    };
    let qkv_bias = if spec.qkv_bias {
        let mut b = ordered(vector(file, &n("attn_q.bias"), q)?, c.n_heads);
        b.extend(ordered(vector(file, &n("attn_k.bias"), kv)?, c.n_kv_heads));
        b.extend(vector(file, &n("attn_v.bias"), kv)?);
        b
    } else {
        Vec::new()
    };
    let qk_norm = if spec.qk_norm {
        let order = head_order(spec.rope, h);
        let gain = |name: &str| -> Result<Vec<f32>, ModelError> {
            Ok(reorder(&vector(file, &n(name), h)?, &order))
        };
        Some(QkNorm {
            q: PairMap::gain(&gain("attn_q_norm.weight")?, c.n_heads),
            k: PairMap::gain(&gain("attn_k_norm.weight")?, c.n_kv_heads),
        })
    } else {
        None
    };
    Ok(AttnExtras { qkv_bias, qk_norm })
}

/// Block `i`'s post-norm gains from the file, if the family has them.
pub(crate) fn gguf_post_norms(
    file: &GgufFile,
    c: &LlamaConfig,
    i: usize,
) -> Result<Option<PostNorms>, ModelError> {
    if !c.spec().post_norms {
        return Ok(None);
    }
    Ok(Some(PostNorms {
        attn: vector(
            file,
            &format!("blk.{i}.post_attention_norm.weight"),
            c.d_model,
        )?,
        ffn: vector(file, &format!("blk.{i}.post_ffw_norm.weight"), c.d_model)?,
    }))
}

impl LlamaWeights {
    /// Load every tensor by its GGUF name and dequantise it to f32.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let c = LlamaConfig::from_gguf(file)?;
        let (d, f, q, kv) = (c.d_model, c.d_ff, c.q_dim(), c.kv_dim());
        let ordered = |m: Matrix, heads: usize| match qk_order(&c, heads) {
            Some(order) => reorder_columns(&m, &order),
            None => m,
        };
        let embedding = Matrix::new(
            c.vocab_size,
            d,
            file.tensor_f32_shaped("token_embd.weight", &[d, c.vocab_size])?,
        );
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(LayerWeights {
                attn_norm: vector(file, &n("attn_norm"), d)?,
                wq: ordered(linear(file, &n("attn_q"), d, q)?, c.n_heads),
                wk: ordered(linear(file, &n("attn_k"), d, kv)?, c.n_kv_heads),
                wv: linear(file, &n("attn_v"), d, kv)?,
                wo: linear(file, &n("attn_output"), q, d)?,
                ffn_norm: vector(file, &n("ffn_norm"), d)?,
                w_gate: linear(file, &n("ffn_gate"), d, f)?,
                w_up: linear(file, &n("ffn_up"), d, f)?,
                w_down: linear(file, &n("ffn_down"), f, d)?,
                extras: gguf_extras(file, &c, i)?,
                post_norms: gguf_post_norms(file, &c, i)?,
            });
        }
        let output = if c.tied_embeddings {
            None
        } else {
            Some(linear(file, "output.weight", d, c.vocab_size)?)
        };
        Ok(LlamaWeights {
            final_norm: vector(file, "output_norm.weight", d)?,
            embedding,
            layers,
            output,
            config: c,
        })
    }

    /// Deterministic random weights for tests: every norm gain differs from 1 and every
    /// matrix is dense, so that no transform can pass by accident.
    pub fn random(config: &LlamaConfig, seed: u64) -> Result<Self, ModelError> {
        config.validate()?;
        let c = config;
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut matrix = |rows: usize, cols: usize, scale: f32| {
            let data = (0..rows * cols)
                .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
                .collect();
            Matrix::new(rows, cols, data)
        };
        let (d, f, q, kv) = (c.d_model, c.d_ff, c.q_dim(), c.kv_dim());
        let s_d = 1.7 / (d as f32).sqrt();
        let s_f = 1.7 / (f as f32).sqrt();
        let embedding = matrix(c.vocab_size, d, 1.0);
        let output = (!c.tied_embeddings).then(|| matrix(d, c.vocab_size, s_d));
        let mut layers = Vec::with_capacity(c.n_layers);
        for _ in 0..c.n_layers {
            layers.push(LayerWeights {
                attn_norm: Vec::new(),
                wq: matrix(d, q, s_d * 2.0),
                wk: matrix(d, kv, s_d * 2.0),
                wv: matrix(d, kv, s_d),
                wo: matrix(q, d, s_d),
                ffn_norm: Vec::new(),
                w_gate: matrix(d, f, s_d),
                w_up: matrix(d, f, s_d),
                w_down: matrix(f, d, s_f),
                extras: AttnExtras::default(),
                post_norms: None,
            });
        }
        let spec = c.spec();
        let mut gains =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(0.6f32..1.4)).collect() };
        for layer in &mut layers {
            layer.attn_norm = gains(d);
            layer.ffn_norm = gains(d);
            if spec.qkv_bias {
                // biases of the size of a projection's outputs: [-1, 1] per value
                layer.extras.qkv_bias = gains(q + 2 * kv).iter().map(|g| (g - 1.0) * 2.5).collect();
            }
            if spec.qk_norm {
                layer.extras.qk_norm = Some(QkNorm {
                    q: PairMap::gain(&gains(c.head_dim), c.n_heads),
                    k: PairMap::gain(&gains(c.head_dim), c.n_kv_heads),
                });
            }
            if spec.post_norms {
                layer.post_norms = Some(PostNorms {
                    attn: gains(d),
                    ffn: gains(d),
                });
            }
        }
        Ok(LlamaWeights {
            final_norm: gains(d),
            config: c.clone(),
            embedding,
            layers,
            output,
        })
    }

    /// The output head `[d, vocab]`, materialising the transposed embedding when tied.
    pub fn head(&self) -> Matrix {
        match &self.output {
            Some(m) => m.clone(),
            None => self.embedding.transpose(),
        }
    }
}
