//! The model owner's side: the secret client bundle (key, embeddings, final norm, head,
//! tokenizer) and the client computations around the nodes: encode a token into the key's
//! basis, and decode the last stage's output into logits.

use std::path::Path;

use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::key::{short_fingerprint, ModelKey};
use super::key_io::{read_key, write_key, KeyMeta};
use super::linalg::to_f32;
use super::shard::ShardMeta;
use crate::container::{Container, ContainerWriter};
use crate::nn::{matrix_to_tensor, vector_to_tensor, RmsNorm, TokenEmbedding};
use crate::text::TextSpec;
use crate::{Compute, LlamaConfig, Matrix, ModelError};

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
}

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
        Ok(ClientBundle {
            meta,
            key,
            embedding,
            final_norm,
            output,
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
/// decoding costs what the plaintext head costs.
#[derive(Debug, Clone)]
pub struct ClientModel {
    embedding: TokenEmbedding,
    norm: RmsNorm,
    /// `[d, vocab]`.
    head: Tensor<2>,
    pub config: LlamaConfig,
}

impl ClientModel {
    /// Fold the key into the tables (on the CPU backend, in f32) and place them on `device`.
    pub fn new(bundle: &ClientBundle, device: &Device) -> Self {
        let cfg = bundle.meta.config.clone();
        let cpu = Compute::cpu().device;
        let q = matrix_to_tensor(&to_f32(&bundle.key.q), &cpu);
        let e = matrix_to_tensor(&bundle.embedding, &cpu);
        let embed_rot = e.clone().matmul(q.clone());
        let gf = vector_to_tensor(&bundle.final_norm, &cpu).unsqueeze_dim::<2>(1);
        let head = match &bundle.output {
            Some(o) => matrix_to_tensor(o, &cpu),
            None => e.transpose(),
        };
        let head_rot = q.transpose().matmul(head * gf);
        ClientModel {
            embedding: TokenEmbedding {
                weight: burn::module::Param::from_tensor(embed_rot.to_device(device)),
            },
            norm: RmsNorm::from_gain(None, f64::from(cfg.rms_eps), device),
            head: head_rot.to_device(device),
            config: cfg,
        }
    }

    /// Token ids → the first stage's input `x'_0 = E[id] Q`, `[t, d]`.
    pub fn encode(&self, ids: &[u32]) -> Result<Tensor<2>, ModelError> {
        self.embedding.forward(ids)
    }

    /// The last stage's output `[n, d]` → logits `[n, vocab]`.
    pub fn decode(&self, hidden: Tensor<2>) -> Tensor<2> {
        self.norm.forward(hidden).matmul(self.head.clone())
    }
}
