//! Running the whole plaintext model in this process.

use burn::tensor::Device;

use crate::cache::{KvCache, RopeTables};
use crate::generate::TokenModel;
use crate::nn::{tensor_to_vec, Llama};
use crate::{LlamaConfig, LlamaWeights, ModelError};

/// The plaintext model on one device with the state of one sequence.
#[derive(Debug)]
pub struct LocalModel {
    model: Llama,
    rope: RopeTables,
    cache: KvCache,
    config: LlamaConfig,
}

impl LocalModel {
    /// Upload `weights` to `device`; sequences may use up to `context` positions (capped by
    /// the model's own context length).
    pub fn new(weights: &LlamaWeights, device: &Device, context: Option<usize>) -> Self {
        let mut config = weights.config.clone();
        config.max_seq_len = context.map_or(config.max_seq_len, |c| c.min(config.max_seq_len));
        let model = Llama::from_weights(weights, device);
        let rope = RopeTables::new(&config, device);
        let cache = model.stage.new_cache(config.max_seq_len);
        LocalModel {
            model,
            rope,
            cache,
            config,
        }
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Forget the current sequence.
    pub fn reset(&mut self) {
        self.cache = self.model.stage.new_cache(self.config.max_seq_len);
    }

    /// Feed `ids` and return the logits of every new position, `[t][vocab]`.
    pub fn feed_all(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
        let logits = self.model.forward(ids, &mut self.cache, &self.rope, true)?;
        let flat = tensor_to_vec(logits)?;
        Ok(flat
            .chunks(self.config.vocab_size)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

impl TokenModel for LocalModel {
    fn context_len(&self) -> usize {
        self.config.max_seq_len
    }

    fn position(&self) -> usize {
        self.cache.len()
    }

    fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        let logits = self
            .model
            .forward(ids, &mut self.cache, &self.rope, false)?;
        tensor_to_vec(logits)
    }
}
