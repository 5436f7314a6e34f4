//! Encrypted shards: the weights of a contiguous range of layers in the key's basis, with
//! everything a node needs to run them and nothing in plaintext (no norm gains, no
//! embedding, no head).

use std::ops::Range;
use std::path::Path;
use std::str::FromStr;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use veil_kernels::{GgmlType, QMatrix};

use crate::calibrate::{gptq, LayerStats};
use crate::container::{Container, ContainerWriter};
use crate::qweights::QuantLayer;
use crate::{AttnExtras, LayerWeights, LlamaConfig, Matrix, ModelError};

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
    /// Storage type of the weights: a [`ShardQuant`] name.
    pub dtype: String,
}

/// How a shard stores its matrices: f32 (exact), or re-quantized to GGML blocks after the
/// key is applied, run by the CPU's quantized kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(non_camel_case_types)]
pub enum ShardQuant {
    F32,
    #[default]
    Q8_0,
    Q4_0,
    Q4_K,
}

impl ShardQuant {
    pub const ALL: [ShardQuant; 4] = [
        ShardQuant::F32,
        ShardQuant::Q8_0,
        ShardQuant::Q4_0,
        ShardQuant::Q4_K,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            ShardQuant::F32 => "f32",
            ShardQuant::Q8_0 => "q8_0",
            ShardQuant::Q4_0 => "q4_0",
            ShardQuant::Q4_K => "q4_k",
        }
    }

    /// The block format, `None` for f32.
    pub fn ggml(&self) -> Option<GgmlType> {
        match self {
            ShardQuant::F32 => None,
            ShardQuant::Q8_0 => Some(GgmlType::Q8_0),
            ShardQuant::Q4_0 => Some(GgmlType::Q4_0),
            ShardQuant::Q4_K => Some(GgmlType::Q4_K),
        }
    }
}

impl std::fmt::Display for ShardQuant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ShardQuant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.to_ascii_lowercase();
        ShardQuant::ALL
            .into_iter()
            .find(|q| q.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown shard format `{s}` (this build writes and runs {})",
                    ShardQuant::ALL.map(|q| q.as_str()).join(", ")
                )
            })
    }
}

/// The weights of a shard's layers.
#[derive(Debug, Clone)]
pub enum ShardLayers {
    /// `[in, out]` f32 matrices.
    F32(Vec<LayerWeights>),
    /// GGML blocks, `[out, in]` (GGUF's layout).
    Quant(Vec<QuantLayer>),
}

impl ShardLayers {
    /// The f32 layers, `None` for a quantized shard.
    pub fn f32(&self) -> Option<&[LayerWeights]> {
        match self {
            ShardLayers::F32(l) => Some(l),
            ShardLayers::Quant(_) => None,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            ShardLayers::F32(l) => l.len(),
            ShardLayers::Quant(l) => l.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The format matrix `i` (in the order of [`matrices`]) is stored in when a shard asks for
/// `ty`. The key scales the *inputs* of `attn_output` (the value heads' mixing `C^-1`) and
/// of `ffn_down` (`D^-1`, factors in [1/2, 2]), so one block of 32 inputs spans a range up
/// to 4x wider than in the plaintext model: at 4 bits that costs SmolLM2 3.4x its
/// perplexity. 4-bit shards keep those two in Q8_0 (as llama.cpp's `_M` mixes keep some
/// tensors wider): 1.7x, for about a third more bytes.
pub fn storage_type(i: usize, ty: GgmlType) -> GgmlType {
    let key_scaled_inputs = matches!(i, 3 | 6);
    if key_scaled_inputs && matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_K) {
        GgmlType::Q8_0
    } else {
        ty
    }
}

/// Re-quantize the encrypted f32 layer `l` (`[in, out]` matrices, gains folded) to `ty`
/// (see `storage_type`), row by row in GGUF's `[out, in]` layout.
pub fn quantize_layer(
    w: &LayerWeights,
    l: usize,
    config: &LlamaConfig,
    ty: GgmlType,
) -> Result<QuantLayer, ModelError> {
    let names = matrices(l, config);
    folded_layer(
        w.extras.clone(),
        std::array::from_fn(|i| {
            let t = layer_matrices(w)[i].transpose();
            let ty = storage_type(i, ty);
            QMatrix::quantize(ty, t.rows, t.cols, &t.data).map_err(|e| {
                ModelError::Shard(format!(
                    "cannot store `{}` as {ty}: {e}{}",
                    names[i].0,
                    if ty == GgmlType::Q4_K {
                        " (q4_0 has blocks of 32)"
                    } else {
                        ""
                    }
                ))
            })
        }),
    )
}

/// [`quantize_layer`] with the 4-bit matrices rounded by GPTQ against the second moments of
/// their inputs (`stats`, measured in the key's basis by [`crate::calibrate::Calibrator`]):
/// `wq`, `wk`, `wv` against the attention's, `w_gate`, `w_up` against the MLP's. Matrices
/// stored in a format GPTQ does not round into are rounded plainly.
pub fn quantize_layer_calibrated(
    w: &LayerWeights,
    l: usize,
    config: &LlamaConfig,
    ty: GgmlType,
    stats: &LayerStats,
    device: &Device,
) -> Result<QuantLayer, ModelError> {
    let names = matrices(l, config);
    let matrices = layer_matrices(w);
    let t = std::time::Instant::now();
    let attn = gptq::InverseFactor::new(&stats.attn, gptq::DAMP)?;
    let mlp = gptq::InverseFactor::new(&stats.mlp, gptq::DAMP)?;
    tracing::debug!("layer {l}: inverse factors in {:.1?}", t.elapsed());
    folded_layer(
        w.extras.clone(),
        std::array::from_fn(|i| {
            let t = matrices[i].transpose();
            let ty = storage_type(i, ty);
            let u = match i {
                0..=2 => Some(&attn),
                4 | 5 => Some(&mlp),
                _ => None,
            };
            match u {
                Some(u) if ty != GgmlType::Q8_0 && gptq::supports(ty) => {
                    gptq::quantize(ty, t.rows, t.cols, &t.data, u, device)
                }
                _ => QMatrix::quantize(ty, t.rows, t.cols, &t.data)
                    .map_err(|e| ModelError::Shard(e.to_string())),
            }
            .map_err(|e| ModelError::Shard(format!("cannot store `{}` as {ty}: {e}", names[i].0)))
        }),
    )
}

/// A quantized layer with its norm gains folded away, from its seven matrices (in the
/// order of [`matrices`]) and its (encrypted) attention extras.
fn folded_layer(
    extras: AttnExtras,
    m: [Result<QMatrix, ModelError>; 7],
) -> Result<QuantLayer, ModelError> {
    let [q, k, v, o, g, u, d] = m;
    Ok(QuantLayer {
        attn_norm: Vec::new(),
        wq: q?,
        wk: k?,
        wv: v?,
        wo: o?,
        ffn_norm: Vec::new(),
        w_gate: g?,
        w_up: u?,
        w_down: d?,
        extras,
        post_norms: None,
    })
}

/// Block `l`'s attention extras from a container (`prefix.blk.l.*`).
pub(crate) fn read_extras(
    c: &Container,
    prefix: &str,
    l: usize,
    config: &LlamaConfig,
) -> Result<AttnExtras, ModelError> {
    AttnExtras::read(
        config.spec(),
        &format!("{prefix}blk.{l}"),
        (config.q_dim(), config.kv_dim()),
        |name, n| c.f32_shaped(name, &[n]),
    )
}

/// Add block `l`'s attention extras to a container (`prefix.blk.l.*`).
pub(crate) fn write_extras(w: &mut ContainerWriter, prefix: &str, l: usize, e: &AttnExtras) {
    for (name, v) in e.tensors(&format!("{prefix}blk.{l}")) {
        w.add_f32(&name, &[v.len()], v);
    }
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
    pub layers: ShardLayers,
}

/// `(name, rows, cols)` of every matrix of layer `l`.
fn matrices(l: usize, c: &LlamaConfig) -> [(String, usize, usize); 7] {
    let (d, f, q, kv) = (c.d_model, c.d_ff, c.q_dim(), c.kv_dim());
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

fn quant_matrices(w: &QuantLayer) -> [&QMatrix; 7] {
    [&w.wq, &w.wk, &w.wv, &w.wo, &w.w_gate, &w.w_up, &w.w_down]
}

impl Shard {
    /// This f32 shard re-quantized to `quant` (the same key; only the storage changes).
    pub fn requantized(&self, quant: ShardQuant) -> Result<Shard, ModelError> {
        let ShardLayers::F32(layers) = &self.layers else {
            return Err(ModelError::Shard(format!(
                "a {} shard cannot be re-quantized; start from an f32 one",
                self.meta.dtype
            )));
        };
        let layers = match quant.ggml() {
            None => ShardLayers::F32(layers.clone()),
            Some(ty) => ShardLayers::Quant(
                self.meta
                    .layer_range()
                    .zip(layers)
                    .map(|(l, w)| quantize_layer(w, l, &self.meta.config, ty))
                    .collect::<Result<_, _>>()?,
            ),
        };
        let mut meta = self.meta.clone();
        meta.dtype = quant.to_string();
        Ok(Shard { meta, layers })
    }

    /// The container bytes of this shard.
    pub fn to_writer(&self) -> Result<ContainerWriter, ModelError> {
        let mut w = ContainerWriter::new(SHARD_KIND, &self.meta)?;
        match &self.layers {
            ShardLayers::F32(layers) => {
                for (i, layer) in self.meta.layer_range().zip(layers) {
                    for ((name, _, _), m) in matrices(i, &self.meta.config)
                        .iter()
                        .zip(layer_matrices(layer))
                    {
                        w.add_f32(name, &[m.rows, m.cols], &m.data);
                    }
                    write_extras(&mut w, "", i, &layer.extras);
                }
            }
            ShardLayers::Quant(layers) => {
                for (i, layer) in self.meta.layer_range().zip(layers) {
                    for ((name, _, _), m) in matrices(i, &self.meta.config)
                        .iter()
                        .zip(quant_matrices(layer))
                    {
                        w.add_matrix(name, m)?;
                    }
                    write_extras(&mut w, "", i, &layer.extras);
                }
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
        let expected = r.len() * (7 + AttnExtras::tensor_count(meta.config.spec()));
        if c.tensor_names().count() != expected {
            return Err(ModelError::Shard(format!(
                "holds {} tensors, a shard of {} layers has {expected}",
                c.tensor_names().count(),
                r.len()
            )));
        }
        let quant: ShardQuant = meta.dtype.parse().map_err(ModelError::Shard)?;
        if quant != ShardQuant::F32 {
            let mut layers = Vec::with_capacity(r.len());
            for l in r {
                // stored `[out, in]`
                layers.push(folded_layer(
                    read_extras(c, "", l, &meta.config)?,
                    matrices(l, &meta.config).map(|(name, rows, cols)| c.matrix(&name, cols, rows)),
                )?);
            }
            return Ok(Shard {
                meta,
                layers: ShardLayers::Quant(layers),
            });
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
                extras: read_extras(c, "", l, &meta.config)?,
                post_norms: None,
            });
        }
        Ok(Shard {
            meta,
            layers: ShardLayers::F32(layers),
        })
    }
}
