//! Encrypted shards: the weights of a contiguous range of layers in the key's basis, with
//! everything a node needs to run them and nothing in plaintext (no norm gains, no
//! embedding, no head).

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::container::{Container, ContainerWriter};
use crate::{LayerWeights, LlamaConfig, Matrix, ModelError};

pub const SHARD_KIND: &str = "veil-shard";
/// Version of the shard layout.
pub const SHARD_VERSION: u32 = 1;

/// The self-description of a shard (its container header).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardMeta {
    pub version: u32,
    /// Shape of the whole model (a node needs the head layout and RoPE constants).
    pub config: LlamaConfig,
    /// Index of this stage among `n_stages`.
    pub stage: usize,
    pub n_stages: usize,
    /// First layer and one past the last.
    pub layers: (usize, usize),
    /// Fingerprint of the key the shard was made with.
    pub key_fingerprint: String,
    /// Storage type of the weights.
    pub dtype: String,
}

impl ShardMeta {
    pub fn layer_range(&self) -> Range<usize> {
        self.layers.0..self.layers.1
    }
}

/// A shard in memory.
#[derive(Debug, Clone)]
pub struct Shard {
    pub meta: ShardMeta,
    /// One per layer of the range; norm gains are empty (folded).
    pub layers: Vec<LayerWeights>,
}

/// `(name, rows, cols)` of every matrix of layer `l`.
fn matrices(l: usize, c: &LlamaConfig) -> [(String, usize, usize); 7] {
    let (d, f, q, kv) = (c.d_model, c.d_ff, c.n_heads * c.head_dim, c.kv_dim());
    let n = |s: &str| format!("blk.{l}.{s}");
    [
        (n("attn_q"), d, q),
        (n("attn_k"), d, kv),
        (n("attn_v"), d, kv),
        (n("attn_output"), q, d),
        (n("ffn_gate"), d, f),
        (n("ffn_up"), d, f),
        (n("ffn_down"), f, d),
    ]
}

fn layer_matrices(w: &LayerWeights) -> [&Matrix; 7] {
    [&w.wq, &w.wk, &w.wv, &w.wo, &w.w_gate, &w.w_up, &w.w_down]
}

impl Shard {
    /// The container bytes of this shard.
    pub fn to_writer(&self) -> Result<ContainerWriter, ModelError> {
        let mut w = ContainerWriter::new(SHARD_KIND, &self.meta)?;
        for (i, layer) in self.meta.layer_range().zip(&self.layers) {
            for ((name, _, _), m) in matrices(i, &self.meta.config)
                .iter()
                .zip(layer_matrices(layer))
            {
                w.add_f32(name, &[m.rows, m.cols], &m.data);
            }
        }
        Ok(w)
    }

    pub fn write(&self, path: &Path) -> Result<(), ModelError> {
        self.to_writer()?.write(path, false)
    }

    pub fn read(path: &Path) -> Result<Self, ModelError> {
        Self::from_container(&Container::open(path)?)
            .map_err(|e| ModelError::Shard(format!("{}: {e}", path.display())))
    }

    /// Parse and validate a shard container.
    pub fn from_container(c: &Container) -> Result<Self, ModelError> {
        if c.kind() != SHARD_KIND {
            return Err(ModelError::Shard(format!(
                "a `{}` file is not a shard",
                c.kind()
            )));
        }
        let meta: ShardMeta = c.meta()?;
        if meta.version != SHARD_VERSION {
            return Err(ModelError::Shard(format!(
                "shard version {} is not supported (this build reads {SHARD_VERSION})",
                meta.version
            )));
        }
        meta.config.validate()?;
        let r = meta.layer_range();
        if r.is_empty() || r.end > meta.config.n_layers || meta.stage >= meta.n_stages {
            return Err(ModelError::Shard(format!(
                "stage {} of {} with layers {r:?} does not fit a {}-layer model",
                meta.stage, meta.n_stages, meta.config.n_layers
            )));
        }
        let expected = r.len() * 7;
        if c.tensor_names().count() != expected {
            return Err(ModelError::Shard(format!(
                "holds {} tensors, a shard of {} layers has {expected}",
                c.tensor_names().count(),
                r.len()
            )));
        }
        let mut layers = Vec::with_capacity(r.len());
        for l in r {
            let [q, k, v, o, g, u, d] = matrices(l, &meta.config).map(|(name, rows, cols)| {
                c.f32_shaped(&name, &[rows, cols])
                    .map(|data| Matrix::new(rows, cols, data))
            });
            layers.push(LayerWeights {
                attn_norm: Vec::new(),
                wq: q?,
                wk: k?,
                wv: v?,
                wo: o?,
                ffn_norm: Vec::new(),
                w_gate: g?,
                w_up: u?,
                w_down: d?,
            });
        }
        Ok(Shard { meta, layers })
    }
}
