use burn::tensor::{Device, Tensor};
use veil_kernels::Precision;

use super::{
    BlockConfig, OutputHead, OutputHeadConfig, Stage, TokenEmbedding, TokenEmbeddingConfig,
};
use crate::cache::{KvCache, RopeTables};
use crate::qweights::QuantWeights;
use crate::{LlamaConfig, LlamaWeights, ModelError};

/// The whole plaintext model: embedding, every block as one stage, and the head.
#[derive(Debug, Clone)]
pub struct Llama {
    pub embedding: TokenEmbedding,
    pub stage: Stage,
    pub head: OutputHead,
}

impl LlamaConfig {
    /// A randomly initialised model of this shape (burn's initialisers).
    pub fn init(&self, device: &Device) -> Llama {
        Llama {
            embedding: TokenEmbeddingConfig::new(self.vocab_size, self.d_model)
                .init(device)
                .with_scale(self.embedding_scale()),
            stage: Stage {
                first_layer: 0,
                blocks: (0..self.n_layers)
                    .map(|l| BlockConfig::from_llama(self, l).init(device))
                    .collect(),
            },
            head: OutputHeadConfig::new(self.d_model, self.vocab_size)
                .with_rms_eps(f64::from(self.rms_eps))
                .init(device),
        }
    }
}

impl Llama {
    /// Upload host weights to `device`.
    pub fn from_weights(w: &LlamaWeights, device: &Device) -> Self {
        let c = &w.config;
        Llama {
            embedding: TokenEmbedding::from_matrix(&w.embedding, device)
                .with_scale(c.embedding_scale()),
            stage: Stage::from_layers(0, &w.layers, c, device),
            head: OutputHead::from_weights(&w.final_norm, &w.head(), f64::from(c.rms_eps), device),
        }
    }

    /// The model on the GGUF's own quantized blocks, on the CPU device `device`: nothing
    /// is dequantized but the embedding rows looked up.
    pub fn from_quantized(
        w: &QuantWeights,
        precision: Precision,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let c = &w.config;
        Ok(Llama {
            embedding: TokenEmbedding::from_quantized(w.embedding.clone(), device)
                .with_scale(c.embedding_scale()),
            stage: Stage::from_quantized(0, &w.layers, c, precision, device)?,
            head: OutputHead::from_quantized(
                &w.final_norm,
                w.head().clone(),
                f64::from(c.rms_eps),
                precision,
                device,
            )?,
        })
    }

    /// Feed `ids` (new tokens of one sequence) through the model.
    ///
    /// Returns logits `[t, vocab]` for every new position if `all_logits`, else `[1, vocab]`
    /// for the last one (the head is the most expensive single product).
    pub fn forward(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        rope: &RopeTables,
        all_logits: bool,
    ) -> Result<Tensor<2>, ModelError> {
        if ids.is_empty() {
            return Err(ModelError::Shape("no tokens to run".into()));
        }
        let x = self.embedding.forward(ids)?;
        let mut out = self.stage.forward(vec![x], &mut [cache], rope)?;
        let x = out.pop().expect("one output per input");
        let x = if all_logits {
            x
        } else {
            let t = ids.len();
            x.narrow(0, t - 1, 1)
        };
        Ok(self.head.forward(x))
    }
}
