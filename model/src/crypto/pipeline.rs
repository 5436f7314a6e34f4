//! Encrypted generation in one process: client encode → every stage → client decode.

use std::time::{Duration, Instant};

use std::sync::Arc;

use burn::tensor::Device;
use rand::SeedableRng;
use veil_kernels::ring::RingMatrix;
use veil_kernels::Precision;

use super::client::{ClientBundle, ClientCache, ClientModel};
use super::shard::Shard;
use super::transform::check_coverage;
use crate::cache::KvCache;
use crate::generate::TokenModel;
use crate::masked::{MaskSeed, MaskedStats, Parties, StageOps};
use crate::nn::tensor_to_vec;
use crate::stage_runner::StageRunner;
use crate::ModelError;

/// The client and all stage runners of a deployment on one device, with one sequence.
#[derive(Debug, Clone)]
pub struct EncryptedLocal {
    client: ClientModel,
    client_cache: ClientCache,
    stages: Vec<StageRunner>,
    caches: Vec<KvCache>,
    context: usize,
    /// Wall time spent in the client's own work (encoding, client layers, head) since the
    /// last [`EncryptedLocal::take_client_time`].
    client_time: Duration,
}

impl EncryptedLocal {
    /// Check the shards against the client bundle (key, model, coverage) and upload all.
    /// Quantized shards run with 8-bit activations.
    pub fn new(
        bundle: &ClientBundle,
        shards: &[Shard],
        device: &Device,
        context: Option<usize>,
    ) -> Result<Self, ModelError> {
        Self::with_precision(bundle, shards, device, context, Precision::Fast)
    }

    /// [`EncryptedLocal::new`] with the precision of quantized shards' products.
    pub fn with_precision(
        bundle: &ClientBundle,
        shards: &[Shard],
        device: &Device,
        context: Option<usize>,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        for s in shards {
            bundle.verify_shard(&s.meta, None)?;
        }
        let config = &bundle.meta.config;
        let nodes = bundle.meta.client_side().node_range(config.n_layers)?;
        check_coverage(
            shards.iter().map(|s| s.meta.layer_range()).collect(),
            nodes.start,
            nodes.end,
        )?;
        let mut ordered: Vec<&Shard> = shards.iter().collect();
        ordered.sort_by_key(|s| s.meta.layers.0);
        let context = context.map_or(config.max_seq_len, |c| c.min(config.max_seq_len));
        let stages: Vec<StageRunner> = ordered
            .iter()
            .map(|s| StageRunner::with_precision(s, device, precision))
            .collect::<Result<_, _>>()?;
        let caches = stages.iter().map(|s| s.new_cache(context)).collect();
        let client = ClientModel::with_precision(bundle, device, precision)?;
        Ok(EncryptedLocal {
            client_cache: client.new_cache(context),
            client,
            stages,
            caches,
            context,
            client_time: Duration::ZERO,
        })
    }

    /// This pipeline in masked mode (`crate::masked`), with a fresh mask seed for the
    /// session: every stage's linear ops run on masked words, computed by the parties that
    /// `parties` names for each stage (given its runner, the integer weights of its ops and
    /// the seed); the client checks every product. The sequence starts over.
    pub fn masked(
        &self,
        ops: &[StageOps],
        stats: &Arc<MaskedStats>,
        mut parties: impl FnMut(
            &StageRunner,
            &[(u64, Arc<RingMatrix>)],
            &Arc<MaskSeed>,
        ) -> Result<Parties, ModelError>,
    ) -> Result<Self, ModelError> {
        let seed = Arc::new(MaskSeed::random());
        let mut rng = rand_chacha::ChaCha20Rng::from_entropy();
        if ops.len() != self.stages.len() {
            return Err(ModelError::Shape(format!(
                "integer weights for {} stages, not {}",
                ops.len(),
                self.stages.len()
            )));
        }
        let stages = self
            .stages
            .iter()
            .zip(ops)
            .map(|(s, ops)| {
                let p = parties(s, ops, &seed)?;
                s.masked(ops, &seed, stats, &p, &mut rng)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut masked = EncryptedLocal {
            stages,
            ..self.clone()
        };
        masked.reset();
        Ok(masked)
    }

    /// Every stage's linear ops as integers ([`StageRunner::ring_ops`]), in order: what
    /// [`Self::masked`] takes, the same for every session.
    pub fn ring_ops(&self) -> Result<Vec<StageOps>, ModelError> {
        self.stages.iter().map(StageRunner::ring_ops).collect()
    }

    /// Forget the current sequence.
    pub fn reset(&mut self) {
        self.client_cache = self.client.new_cache(self.context);
        self.caches = self
            .stages
            .iter()
            .map(|s| s.new_cache(self.context))
            .collect();
    }

    fn run(&mut self, ids: &[u32], all: bool) -> Result<burn::tensor::Tensor<2>, ModelError> {
        if ids.is_empty() {
            return Err(ModelError::Shape("no tokens to run".into()));
        }
        let started = Instant::now();
        let mut x = self.client.encode(ids, &mut self.client_cache)?;
        self.client_time += started.elapsed();
        for (stage, cache) in self.stages.iter().zip(self.caches.iter_mut()) {
            x = stage
                .forward(vec![x], &mut [cache])?
                .pop()
                .ok_or_else(|| ModelError::Shape("a stage returned nothing".into()))?;
        }
        let started = Instant::now();
        let logits = self.client.decode(x, &mut self.client_cache, all)?;
        self.client_time += started.elapsed();
        Ok(logits)
    }

    /// The client's side of the deployment.
    pub fn client(&self) -> &ClientModel {
        &self.client
    }

    /// Wall time the client's own work took since the last call (or since construction):
    /// what client layers add to each token. Exact on the CPU backend, whose operations
    /// run as they are issued; on wgpu, kernels queued by the client may finish later.
    pub fn take_client_time(&mut self) -> Duration {
        std::mem::take(&mut self.client_time)
    }

    /// Feed `ids` and return the logits of every new position, `[t][vocab]`.
    pub fn feed_all(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
        let vocab = self.client.config.vocab_size;
        let flat = veil_kernels::on_workers(|| tensor_to_vec(self.run(ids, true)?))?;
        Ok(flat.chunks(vocab).map(<[f32]>::to_vec).collect())
    }
}

impl TokenModel for EncryptedLocal {
    fn context_len(&self) -> usize {
        self.context
    }

    fn position(&self) -> usize {
        self.caches.first().map_or(0, KvCache::len)
    }

    fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        veil_kernels::on_workers(|| tensor_to_vec(self.run(ids, false)?))
    }
}
