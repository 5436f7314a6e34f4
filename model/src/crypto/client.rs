//! The model owner's side: the secret client bundle (key, embeddings, final norm, head,
//! tokenizer) and the client computations around the nodes: encode a token into the key's
//! basis, and decode the last stage's output into logits.

use std::path::Path;

use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use veil_kernels::{GgmlType, Precision, QMatrix};

use super::key::{short_fingerprint, ModelKey};
use super::key_io::{read_key, write_key, KeyMeta};
use super::linalg::to_f32;
use super::shard::{quantize_layer, read_extras, write_extras, ShardMeta, ShardQuant};
use crate::cache::{KvCache, RopeTables};
use crate::container::{Container, ContainerWriter};
use crate::nn::Stage;
use crate::nn::{
    matrix_to_tensor, tensor_to_vec, vector_to_tensor, Linear, RmsNorm, TokenEmbedding,
};
use crate::text::TextSpec;
use crate::{Compute, LayerWeights, LlamaConfig, Matrix, ModelError, QuantLayer};

pub const CLIENT_KIND: &str = "veil-client";
/// Version of the client bundle layout.
pub const CLIENT_VERSION: u32 = 1;

/// What the client knows about one stage's shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: usize,
    pub layers: (usize, usize),
    /// Content hash of the shard file's data.
    pub shard_sha256: String,
}

/// The client bundle's header.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientMeta {
    pub version: u32,
    pub model_name: String,
    pub config: LlamaConfig,
    pub key: KeyMeta,
    pub stages: Vec<StageRecord>,
    pub text: TextSpec,
    /// Layers `0..client_layers` run in plaintext on the client (a mitigation: the first
    /// node then never sees embedding rows); the shards cover the rest.
    #[serde(default)]
    pub client_layers: usize,
    /// The last `client_last_layers` layers also run in plaintext on the client (the last
    /// node's output is rotated back and finished here); bundles from before say nothing
    /// and mean 0.
    #[serde(default)]
    pub client_last_layers: usize,
    /// The shards' weight format (a [`ShardQuant`] name; bundles from before quantized
    /// shards say nothing and mean f32). With quantized shards the client's own tables are
    /// quantized too (see [`ClientModel::new`]).
    #[serde(default = "f32_name")]
    pub shard_dtype: String,
}

fn f32_name() -> String {
    ShardQuant::F32.to_string()
}

/// Layers the client runs itself, in plaintext: `0..first` before the first node and the
/// last `last` after the last node. The nodes' shards cover the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientLayers {
    pub first: usize,
    pub last: usize,
}

impl From<usize> for ClientLayers {
    /// `first` layers before the first node, none after the last.
    fn from(first: usize) -> Self {
        ClientLayers { first, last: 0 }
    }
}

impl ClientLayers {
    /// The layers the nodes serve, `first..n_layers - last`; an error unless they hold at
    /// least one.
    pub fn node_range(&self, n_layers: usize) -> Result<std::ops::Range<usize>, ModelError> {
        if self.first + self.last >= n_layers {
            return Err(ModelError::InvalidConfig(format!(
                "the client cannot run {} of the model's {n_layers} layers ({} first, {} last): leave at least one to the nodes",
                self.first + self.last,
                self.first,
                self.last
            )));
        }
        Ok(self.first..n_layers - self.last)
    }
}

/// The format of the client's tables (rotated embedding and head) when the shards are
/// quantized: 8 bits keep the head's rounding far below the shards' own.
pub const CLIENT_TABLE_TYPE: GgmlType = GgmlType::Q8_0;

/// The owner's secret: everything needed to generate with a deployment's shards.
#[derive(Debug, Clone)]
pub struct ClientBundle {
    pub meta: ClientMeta,
    pub key: ModelKey,
    /// `[vocab, d]`, plaintext.
    pub embedding: Matrix,
    /// Final norm gain `[d]`.
    pub final_norm: Vec<f32>,
    /// Output head `[d, vocab]`; `None` when tied to the embedding.
    pub output: Option<Matrix>,
    /// The plaintext layers `0..client_layers` the client runs itself.
    pub local_layers: Vec<LayerWeights>,
    /// The plaintext last `client_last_layers` layers, in order.
    pub tail_layers: Vec<LayerWeights>,
}

/// Container names of a local (plaintext) layer's tensors: `(name, shape)`.
fn local_tensors(l: usize, c: &LlamaConfig) -> [(String, Vec<usize>); 9] {
    let (d, f, q, kv) = (c.d_model, c.d_ff, c.q_dim(), c.kv_dim());
    let n = |s: &str| format!("local.blk.{l}.{s}");
    [
        (n("attn_norm"), vec![d]),
        (n("attn_q"), vec![d, q]),
        (n("attn_k"), vec![d, kv]),
        (n("attn_v"), vec![d, kv]),
        (n("attn_output"), vec![q, d]),
        (n("ffn_norm"), vec![d]),
        (n("ffn_gate"), vec![d, f]),
        (n("ffn_up"), vec![d, f]),
        (n("ffn_down"), vec![f, d]),
    ]
}

fn read_local_layer(
    c: &Container,
    l: usize,
    cfg: &LlamaConfig,
) -> Result<LayerWeights, ModelError> {
    let [an, q, k, v, o, fnorm, g, u, d] = local_tensors(l, cfg).map(|(name, shape)| {
        c.f32_shaped(&name, &shape)
            .map(|data| match shape.as_slice() {
                [rows, cols] => Matrix::new(*rows, *cols, data),
                _ => Matrix::new(1, data.len(), data),
            })
    });
    Ok(LayerWeights {
        attn_norm: an?.data,
        wq: q?,
        wk: k?,
        wv: v?,
        wo: o?,
        ffn_norm: fnorm?.data,
        w_gate: g?,
        w_up: u?,
        w_down: d?,
        extras: read_extras(c, "local.", l, cfg)?,
        post_norms: None,
    })
}

impl ClientMeta {
    /// The layers the client runs itself, at both ends.
    pub fn client_side(&self) -> ClientLayers {
        ClientLayers {
            first: self.client_layers,
            last: self.client_last_layers,
        }
    }
}

impl ClientBundle {
    /// Write with owner-only permissions (0600).
    pub fn write(&self, path: &Path) -> Result<(), ModelError> {
        let mut w = ContainerWriter::new(CLIENT_KIND, &())?;
        let key_meta = write_key(&self.key, &mut w);
        let c = &self.meta.config;
        w.add_f32(
            "token_embd",
            &[c.vocab_size, c.d_model],
            &self.embedding.data,
        );
        w.add_f32("output_norm", &[c.d_model], &self.final_norm);
        if let Some(o) = &self.output {
            w.add_f32("output", &[o.rows, o.cols], &o.data);
        }
        let tail_start = c.n_layers - self.tail_layers.len();
        let tail = self
            .tail_layers
            .iter()
            .enumerate()
            .map(|(i, w)| (tail_start + i, w));
        for (l, layer) in self.local_layers.iter().enumerate().chain(tail) {
            let values: [&[f32]; 9] = [
                &layer.attn_norm,
                &layer.wq.data,
                &layer.wk.data,
                &layer.wv.data,
                &layer.wo.data,
                &layer.ffn_norm,
                &layer.w_gate.data,
                &layer.w_up.data,
                &layer.w_down.data,
            ];
            for ((name, shape), v) in local_tensors(l, c).iter().zip(values) {
                w.add_f32(name, shape, v);
            }
            write_extras(&mut w, "local.", l, &layer.extras);
        }
        w.set_meta(&ClientMeta {
            key: key_meta,
            ..self.meta.clone()
        })?;
        w.write(path, true)
    }

    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let c = Container::open(path)?;
        if c.kind() != CLIENT_KIND {
            return Err(ModelError::Format(format!(
                "{} is a `{}` file, not a client bundle",
                path.display(),
                c.kind()
            )));
        }
        let meta: ClientMeta = c.meta()?;
        if meta.version != CLIENT_VERSION {
            return Err(ModelError::Format(format!(
                "client bundle version {} is not supported (this build reads {CLIENT_VERSION})",
                meta.version
            )));
        }
        meta.config.validate()?;
        let key = read_key(&c, &meta.key)?;
        key.check_fits(&meta.config)?;
        let cfg = &meta.config;
        let embedding = Matrix::new(
            cfg.vocab_size,
            cfg.d_model,
            c.f32_shaped("token_embd", &[cfg.vocab_size, cfg.d_model])?,
        );
        let final_norm = c.f32_shaped("output_norm", &[cfg.d_model])?;
        let output = if cfg.tied_embeddings {
            None
        } else {
            Some(Matrix::new(
                cfg.d_model,
                cfg.vocab_size,
                c.f32_shaped("output", &[cfg.d_model, cfg.vocab_size])?,
            ))
        };
        let nodes = meta
            .client_side()
            .node_range(cfg.n_layers)
            .map_err(|e| ModelError::Format(format!("the client bundle: {e}")))?;
        let local_layers = (0..nodes.start)
            .map(|l| read_local_layer(&c, l, cfg))
            .collect::<Result<_, _>>()?;
        let tail_layers = (nodes.end..cfg.n_layers)
            .map(|l| read_local_layer(&c, l, cfg))
            .collect::<Result<_, _>>()?;
        Ok(ClientBundle {
            meta,
            key,
            embedding,
            final_norm,
            output,
            local_layers,
            tail_layers,
        })
    }

    /// Check that a shard belongs to this deployment: same key, same model, and (when its
    /// content hash is given) the very shard this bundle was made with.
    pub fn verify_shard(
        &self,
        shard: &ShardMeta,
        content_sha256: Option<&str>,
    ) -> Result<(), ModelError> {
        let mine = &self.meta.key.fingerprint;
        if &shard.key_fingerprint != mine {
            return Err(ModelError::Shard(format!(
                "stage {} was encrypted with key {}, this client bundle holds key {}",
                shard.stage,
                short_fingerprint(&shard.key_fingerprint),
                short_fingerprint(mine)
            )));
        }
        if shard.config != self.meta.config {
            return Err(ModelError::Shard(format!(
                "stage {} is for another model configuration",
                shard.stage
            )));
        }
        let record = self
            .meta
            .stages
            .iter()
            .find(|s| s.stage == shard.stage && s.layers == shard.layers)
            .ok_or_else(|| {
                ModelError::Shard(format!(
                    "stage {} (layers {}..{}) is not part of this deployment",
                    shard.stage, shard.layers.0, shard.layers.1
                ))
            })?;
        if let Some(sha) = content_sha256 {
            if sha != record.shard_sha256 {
                return Err(ModelError::Shard(format!(
                    "stage {} has content hash {}, this deployment's is {}",
                    shard.stage,
                    &sha[..sha.len().min(16)],
                    &record.shard_sha256[..record.shard_sha256.len().min(16)]
                )));
            }
        }
        Ok(())
    }
}

/// The client's computations on a device. Products with the key are folded once into the
/// tables: `E' = E Q` and `W' = Q^T diag(gf) Wout`, so encoding is a row lookup and
/// decoding costs what the plaintext head costs. With client layers, encoding runs them in
/// plaintext on `E` and rotates their output by `Q` instead; with last client layers,
/// decoding rotates the last node's output back by `Q^T`, runs them in plaintext and applies
/// the plaintext head. With quantized shards both
/// tables are quantized to `CLIENT_TABLE_TYPE` and the head runs on the CPU's kernels:
/// in f32 the head alone would read more bytes per token than a 1B model's layers.
#[derive(Debug, Clone)]
pub struct ClientModel {
    embedding: TokenEmbedding,
    /// Plaintext layers `0..k`, their RoPE tables and `Q` (`[d, d]`).
    local: Option<LocalLayers>,
    /// Plaintext last layers, their RoPE tables and `Q^T`.
    tail: Option<LocalLayers>,
    norm: RmsNorm,
    /// `x -> x W'`, `[d, vocab]` (`W' = diag(gf) Wout`, unrotated, after last layers).
    head: Linear,
    pub config: LlamaConfig,
}

#[derive(Debug, Clone)]
struct LocalLayers {
    stage: Stage,
    rope: RopeTables,
    /// The rotation applied to the stage's output (`Q`) or input (`Q^T`).
    q: Tensor<2>,
}

/// The state of one sequence on the client: the KV caches of its first and last layers
/// (empty without them).
#[derive(Debug, Clone)]
pub struct ClientCache {
    first: KvCache,
    last: KvCache,
}

/// Plaintext layer `l` (`[in, out]` matrices, gains kept) in `CLIENT_TABLE_TYPE` blocks:
/// the shards' quantization, with the norm gains put back.
fn quantize_client_layer(
    w: &LayerWeights,
    l: usize,
    config: &LlamaConfig,
) -> Result<QuantLayer, ModelError> {
    Ok(QuantLayer {
        attn_norm: w.attn_norm.clone(),
        ffn_norm: w.ffn_norm.clone(),
        post_norms: w.post_norms.clone(),
        ..quantize_layer(w, l, config, CLIENT_TABLE_TYPE)?
    })
}

/// The client's plaintext layers `first..first + layers.len()` on `device`: as the shards
/// are stored (8-bit blocks on the CPU's kernels when they are quantized: in f32 a 1B
/// model's client layer would read 4x the bytes of a node's per token), with `rotation`.
fn local_layers(
    layers: &[LayerWeights],
    first: usize,
    rotation: Tensor<2>,
    cfg: &LlamaConfig,
    quantized: bool,
    precision: Precision,
    device: &Device,
) -> Result<Option<LocalLayers>, ModelError> {
    if layers.is_empty() {
        return Ok(None);
    }
    let stage = if quantized {
        let layers = layers
            .iter()
            .enumerate()
            .map(|(i, w)| quantize_client_layer(w, first + i, cfg))
            .collect::<Result<Vec<_>, _>>()?;
        Stage::from_quantized(first, &layers, cfg, precision, device)?
    } else {
        Stage::from_layers(first, layers, cfg, device)
    };
    Ok(Some(LocalLayers {
        stage,
        rope: RopeTables::new(cfg, device),
        q: rotation.to_device(device),
    }))
}

impl ClientModel {
    /// Fold the key into the tables (on the CPU backend, in f32) and place them on `device`;
    /// quantized shards' bundles get quantized tables, multiplied with 8-bit activations.
    pub fn new(bundle: &ClientBundle, device: &Device) -> Result<Self, ModelError> {
        Self::with_precision(bundle, device, Precision::Fast)
    }

    /// [`ClientModel::new`] with the precision of the quantized head's products.
    pub fn with_precision(
        bundle: &ClientBundle,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let quantized = bundle.meta.shard_dtype != ShardQuant::F32.as_str();
        let cfg = bundle.meta.config.clone();
        let cpu = Compute::cpu().device;
        let q = matrix_to_tensor(&to_f32(&bundle.key.q), &cpu);
        let e = matrix_to_tensor(&bundle.embedding, &cpu);
        let gf = vector_to_tensor(&bundle.final_norm, &cpu).unsqueeze_dim::<2>(1);
        let head = match &bundle.output {
            Some(o) => matrix_to_tensor(o, &cpu),
            None => e.clone().transpose(),
        } * gf;
        let local = |layers: &[LayerWeights], first: usize, rotation: Tensor<2>| {
            local_layers(layers, first, rotation, &cfg, quantized, precision, device)
        };
        let tail_start = cfg.n_layers - bundle.tail_layers.len();
        let tail = local(&bundle.tail_layers, tail_start, q.clone().transpose())?;
        // without last layers the head takes the rotated vector: fold `Q^T` into it
        let head = if tail.is_some() {
            head
        } else {
            q.clone().transpose().matmul(head)
        };
        let first = local(&bundle.local_layers, 0, q.clone())?;
        let table = if first.is_some() { e } else { e.matmul(q) };
        let (embedding, head) = if quantized {
            let quantize = |t: Tensor<2>, what: &str| -> Result<QMatrix, ModelError> {
                let [rows, cols] = t.dims();
                QMatrix::quantize(CLIENT_TABLE_TYPE, rows, cols, &tensor_to_vec(t)?).map_err(|e| {
                    ModelError::Shape(format!("cannot quantize the client's {what}: {e}"))
                })
            };
            let table = quantize(table, "embedding table")?;
            // `[vocab, d]`: one row per output, as the kernels take it
            let head = quantize(head.transpose(), "head")?;
            (
                TokenEmbedding::from_quantized(table, device).with_scale(cfg.embedding_scale()),
                Linear::quantized(vec![head], precision, device)?,
            )
        } else {
            (
                TokenEmbedding::from_tensor(table.to_device(device))
                    .with_scale(cfg.embedding_scale()),
                Linear::Dense(head.to_device(device)),
            )
        };
        Ok(ClientModel {
            embedding,
            local: first,
            tail,
            norm: RmsNorm::from_gain(None, f64::from(cfg.rms_eps), device),
            head,
            config: cfg,
        })
    }

    /// Bytes of the client's tables (embedding and head).
    pub fn table_bytes(&self) -> usize {
        self.embedding.byte_len() + self.head.weight_bytes()
    }

    /// Bytes the client holds for the model: its tables, and with client layers their
    /// matrices and the key `Q` (`[d, d]` f32) that rotates their output or input.
    pub fn weight_bytes(&self) -> usize {
        let layers = |l: &Option<LocalLayers>| {
            l.as_ref().map_or(0, |l| {
                l.stage.weight_bytes() + l.q.dims().iter().product::<usize>() * 4
            })
        };
        self.table_bytes() + layers(&self.local) + layers(&self.tail)
    }

    /// Layers the client runs itself before the first node.
    pub fn client_layers(&self) -> usize {
        self.local.as_ref().map_or(0, |l| l.stage.n_layers())
    }

    /// Layers the client runs itself after the last node.
    pub fn client_last_layers(&self) -> usize {
        self.tail.as_ref().map_or(0, |l| l.stage.n_layers())
    }

    /// The state of one sequence on the client.
    pub fn new_cache(&self, capacity: usize) -> ClientCache {
        let capacity = capacity.min(self.config.max_seq_len);
        ClientCache {
            first: KvCache::new(self.client_layers(), capacity),
            last: KvCache::new(self.client_last_layers(), capacity),
        }
    }

    /// Token ids → the first node's input, `[t, d]`: `E[id] Q`, or with client layers the
    /// residual stream after them, times `Q`. `cache` holds the sequence so far.
    pub fn encode(&self, ids: &[u32], cache: &mut ClientCache) -> Result<Tensor<2>, ModelError> {
        let x = self.embedding.forward(ids)?;
        match &self.local {
            None => Ok(x),
            Some(l) => Ok(run(l, x, &mut cache.first)?.matmul(l.q.clone())),
        }
    }

    /// The last stage's output for the new positions, `[t, d]` → logits: `[t, vocab]` if
    /// `all`, else `[1, vocab]` for the last position. With last client layers every new
    /// position runs through them (their cache needs each); without, only the rows whose
    /// logits are wanted reach the head.
    pub fn decode(
        &self,
        hidden: Tensor<2>,
        cache: &mut ClientCache,
        all: bool,
    ) -> Result<Tensor<2>, ModelError> {
        let x = match &self.tail {
            None => hidden,
            Some(l) => run(l, hidden.matmul(l.q.clone()), &mut cache.last)?,
        };
        let [t, _] = x.dims();
        let x = if all || t == 0 {
            x
        } else {
            x.narrow(0, t - 1, 1)
        };
        Ok(self.head.forward(self.norm.forward(x)))
    }
}

/// `x` through client layers `l`, growing `cache`.
fn run(l: &LocalLayers, x: Tensor<2>, cache: &mut KvCache) -> Result<Tensor<2>, ModelError> {
    l.stage
        .forward(vec![x], &mut [cache], &l.rope)?
        .pop()
        .ok_or_else(|| ModelError::Shape("the client layers returned nothing".into()))
}
