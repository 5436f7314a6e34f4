//! Running one shard: encrypted hidden states in, encrypted hidden states out. The same
//! code serves the local encrypted pipeline and a node.

use burn::tensor::{Device, Tensor, TensorData};

use crate::cache::{KvCache, RopeTables};
use veil_kernels::Precision;

use crate::crypto::{Shard, ShardLayers, ShardMeta};
use crate::masked::{MaskSeed, MaskedStats, Parties, StageOps};
use crate::nn::{tensor_to_vec, Probe, Stage};
use crate::ModelError;
use std::sync::Arc;
use veil_kernels::ring::RingMatrix;

/// A shard uploaded to a device, ready to serve sequences.
#[derive(Debug, Clone)]
pub struct StageRunner {
    meta: ShardMeta,
    stage: Stage,
    /// For a quantized shard, the same stage with f32 activations, for the sequences that
    /// ask for them (see [`StageRunner::forward_with`]); it shares the weights.
    exact: Option<Stage>,
    rope: RopeTables,
    device: Device,
}

impl StageRunner {
    /// A quantized shard runs with 8-bit activations ([`Precision::Fast`]).
    pub fn new(shard: &Shard, device: &Device) -> Result<Self, ModelError> {
        Self::with_precision(shard, device, Precision::Fast)
    }

    /// `precision` applies to quantized shards: their matrix products run on the CPU's
    /// quantized kernels whatever `device` is (f32 shards run on `device`).
    pub fn with_precision(
        shard: &Shard,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let config = &shard.meta.config;
        let first = shard.meta.layers.0;
        let (stage, exact) = match &shard.layers {
            ShardLayers::F32(layers) => (Stage::from_layers(first, layers, config, device), None),
            ShardLayers::Quant(layers) => {
                let stage = Stage::from_quantized(first, layers, config, precision, device)?;
                let exact = stage.with_precision(Precision::Exact);
                (stage, Some(exact))
            }
        };
        Ok(StageRunner {
            stage,
            exact,
            rope: RopeTables::new(config, device),
            meta: shard.meta.clone(),
            device: device.clone(),
        })
    }

    pub fn meta(&self) -> &ShardMeta {
        &self.meta
    }

    /// The shard's linear ops as integers (see [`Stage::ring_ops`]) at the runner's
    /// precision: what the client of a masked session holds.
    pub fn ring_ops(&self) -> Result<StageOps, ModelError> {
        self.ring_ops_with(false)
    }

    /// [`Self::ring_ops`]; with `exact`, those of a session that asked for f32
    /// activations (a quantized shard's wide integers) whatever precision the runner was
    /// built with, as [`Self::forward_with`]: what a node serving masked sessions
    /// multiplies.
    pub fn ring_ops_with(&self, exact: bool) -> Result<StageOps, ModelError> {
        match &self.exact {
            Some(e) if exact => e.ring_ops(),
            _ => self.stage.ring_ops(),
        }
    }

    /// This runner in masked mode (see [`Stage::masked`]) with its [`Self::ring_ops`]
    /// `ops`, its products computed by `parties`; the shard's weights stay shared.
    pub fn masked(
        &self,
        ops: &[(u64, Arc<RingMatrix>)],
        seed: &Arc<MaskSeed>,
        stats: &Arc<MaskedStats>,
        parties: &Parties,
        rng: &mut impl rand::Rng,
    ) -> Result<Self, ModelError> {
        Ok(StageRunner {
            meta: self.meta.clone(),
            stage: self
                .stage
                .masked_from(ops, seed, stats, rng)?
                .with_parties(parties),
            exact: None,
            rope: self.rope.clone(),
            device: self.device.clone(),
        })
    }

    /// A cache for one sequence of at most `capacity` positions (capped by the model).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        self.stage
            .new_cache(capacity.min(self.meta.config.max_seq_len))
    }

    /// `hidden[i]`: `[t_i, d]` new positions of sequence `i` (cache `caches[i]`).
    pub fn forward(
        &self,
        hidden: Vec<Tensor<2>>,
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Tensor<2>>, ModelError> {
        self.forward_with(hidden, caches, false)
    }

    /// [`StageRunner::forward`]; with `exact`, a quantized shard's products keep f32
    /// activations ([`Precision::Exact`]) whatever precision the runner was built with.
    pub fn forward_with(
        &self,
        hidden: Vec<Tensor<2>>,
        caches: &mut [&mut KvCache],
        exact: bool,
    ) -> Result<Vec<Tensor<2>>, ModelError> {
        let stage = match &self.exact {
            Some(e) if exact => e,
            _ => &self.stage,
        };
        // on the pool's threads: the quantized products inside are parallel
        veil_kernels::on_workers(|| stage.forward(hidden, caches, &self.rope))
    }

    /// [`StageRunner::forward`], showing every tensor the stage computes to `probe`.
    pub fn forward_probed(
        &self,
        hidden: Vec<Tensor<2>>,
        caches: &mut [&mut KvCache],
        probe: &mut dyn Probe,
    ) -> Result<Vec<Tensor<2>>, ModelError> {
        self.stage.forward_probed(hidden, caches, &self.rope, probe)
    }

    /// Host-memory version of [`StageRunner::forward`] for callers that hold bytes (a
    /// node): each input is `t * d` floats, row-major. Rejects ragged or non-finite input.
    pub fn forward_host(
        &self,
        inputs: &[&[f32]],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.forward_host_with(inputs, caches, false)
    }

    /// [`StageRunner::forward_host`] with f32 activations if `exact` (see
    /// [`StageRunner::forward_with`]).
    pub fn forward_host_with(
        &self,
        inputs: &[&[f32]],
        caches: &mut [&mut KvCache],
        exact: bool,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let d = self.meta.config.d_model;
        let mut tensors = Vec::with_capacity(inputs.len());
        for x in inputs {
            if x.is_empty() || x.len() % d != 0 {
                return Err(ModelError::Shape(format!(
                    "{} values are not whole rows of width {d}",
                    x.len()
                )));
            }
            if x.iter().any(|v| !v.is_finite()) {
                return Err(ModelError::Shape(
                    "hidden states contain NaN or infinity".into(),
                ));
            }
            let t = x.len() / d;
            tensors.push(Tensor::from_data(
                TensorData::new(x.to_vec(), [t, d]),
                &self.device,
            ));
        }
        // read back on the thread that computed: wgpu (cubecl) queues work per thread, and a
        // read from another thread does not wait for it (it returned stale values)
        let stage = match &self.exact {
            Some(e) if exact => e,
            _ => &self.stage,
        };
        veil_kernels::on_workers(|| {
            stage
                .forward(tensors, caches, &self.rope)?
                .into_iter()
                .map(tensor_to_vec)
                .collect()
        })
    }
}
