//! Running the whole plaintext model in this process.

use std::sync::Arc;

use burn::tensor::Device;
use rand::SeedableRng;

use crate::cache::{KvCache, RopeTables};
use crate::generate::TokenModel;
use crate::masked::{MaskSeed, MaskedStats, Parties};
use crate::nn::{tensor_to_vec, Llama};
use crate::qweights::QuantWeights;
use crate::{LlamaConfig, LlamaWeights, ModelError};
use std::collections::HashMap;
use veil_kernels::ring::RingMatrix;

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

    /// The model on its GGUF's quantized blocks, multiplied on the CPU by veil-kernels
    /// (`device` must be the CPU backend's): `Fast` quantizes the activations to 8 bits as
    /// llama.cpp does, `Exact` keeps them f32.
    pub fn quantized(
        weights: &QuantWeights,
        device: &Device,
        context: Option<usize>,
        precision: veil_kernels::Precision,
    ) -> Result<Self, ModelError> {
        let mut config = weights.config.clone();
        config.max_seq_len = context.map_or(config.max_seq_len, |c| c.min(config.max_seq_len));
        let model = Llama::from_quantized(weights, precision, device)?;
        let rope = RopeTables::new(&config, device);
        let cache = model.stage.new_cache(config.max_seq_len);
        Ok(LocalModel {
            model,
            rope,
            cache,
            config,
        })
    }

    /// This model in masked mode with a fresh mask seed, both parties in this process
    /// (`crate::masked`): the linear ops run as integers per row on masked words, the
    /// rest as before. `stats` collects where the time goes and what the checks found.
    pub fn masked(self, stats: &Arc<MaskedStats>) -> Result<Self, ModelError> {
        let seed = Arc::new(MaskSeed::random());
        let mut rng = rand_chacha::ChaCha20Rng::from_entropy();
        let stage = self.model.stage.masked(&seed, stats, &mut rng)?;
        let cache = stage.new_cache(self.config.max_seq_len);
        Ok(LocalModel {
            model: Llama {
                stage,
                ..self.model
            },
            cache,
            ..self
        })
    }

    /// A masked model's ops (number → integer weights) and mask seed: what its parties
    /// hold. Empty and `None` for a model that is not masked.
    pub fn masked_ops(&self) -> (HashMap<u64, Arc<RingMatrix>>, Option<Arc<MaskSeed>>) {
        (
            self.model.stage.masked_ops().into_iter().collect(),
            self.model.stage.mask_seed(),
        )
    }

    /// This masked model with its products computed by `parties` (the sequence so far is
    /// kept).
    pub fn with_parties(self, parties: &Parties) -> Self {
        let stage = self.model.stage.with_parties(parties);
        LocalModel {
            model: Llama {
                stage,
                ..self.model
            },
            ..self
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
        let (model, cache, rope) = (&self.model, &mut self.cache, &self.rope);
        // read back on the computing thread (see `StageRunner::forward_host_with`)
        let flat =
            veil_kernels::on_workers(|| tensor_to_vec(model.forward(ids, cache, rope, true)?))?;
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
        let (model, cache, rope) = (&self.model, &mut self.cache, &self.rope);
        veil_kernels::on_workers(|| tensor_to_vec(model.forward(ids, cache, rope, false)?))
    }
}
