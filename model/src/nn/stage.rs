use std::sync::Arc;

use burn::tensor::{Device, Tensor};
use rayon::prelude::*;
use veil_kernels::Precision;

use super::attention::Segment;
use super::linear::Linear;
use super::probe::{NoProbe, Probe};
use super::Block;
use crate::cache::{KvCache, LayerKv, RopeTables};
use crate::masked::{MaskSeed, MaskedLinear, MaskedStats, Parties, StageOps, ACTIVATION_BITS};
use crate::qweights::QuantLayer;
use crate::{LayerWeights, LlamaConfig, ModelError};
use veil_kernels::ring::RingMatrix;

/// A contiguous range of decoder blocks: the unit a node serves. The plaintext model is
/// one stage with every layer.
#[derive(Debug, Clone)]
pub struct Stage {
    /// Index of the first block in the whole model.
    pub first_layer: usize,
    pub blocks: Vec<Block>,
}

/// Linear ops [`Stage::ring_ops`] rounds at once: each holds an f32 copy of its weights
/// while it is rounded (an 8B shape's gate and up: 470 MB), so a many-core node does not
/// hold one per core.
const ROUNDED_AT_ONCE: usize = 4;

impl Stage {
    /// Build from the host weights of layers `first_layer..first_layer + layers.len()`.
    pub fn from_layers(
        first_layer: usize,
        layers: &[LayerWeights],
        config: &LlamaConfig,
        device: &Device,
    ) -> Self {
        Stage {
            first_layer,
            blocks: layers
                .iter()
                .enumerate()
                .map(|(i, l)| Block::from_layer(l, first_layer + i, config, device))
                .collect(),
        }
    }

    /// Build from quantized layers, run on the CPU device `device`.
    pub fn from_quantized(
        first_layer: usize,
        layers: &[QuantLayer],
        config: &LlamaConfig,
        precision: Precision,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Ok(Stage {
            first_layer,
            blocks: layers
                .iter()
                .enumerate()
                .map(|(i, l)| Block::from_quantized(l, first_layer + i, config, precision, device))
                .collect::<Result<_, _>>()?,
        })
    }

    /// This stage with its quantized products at `precision`, sharing the weights (a node
    /// keeps one per precision its sessions ask for).
    pub fn with_precision(&self, precision: Precision) -> Stage {
        let mut stage = self.clone();
        for b in &mut stage.blocks {
            for l in b.linears_mut() {
                *l = l.with_precision(precision);
            }
        }
        stage
    }

    /// Every linear op of this stage as integers per row, as wide as
    /// [`ACTIVATION_BITS`]-bit activations allow modulo 2^32: what a node serving masked
    /// ops multiplies. Op `k` of layer `l` is op `4 l + k` (query, key and value; output;
    /// gate and up; down). Deterministic: the client and every node holding the same
    /// weights get the same integers; stored as each op's precision asks
    /// ([`Linear::ring_format`]). Up to [`ROUNDED_AT_ONCE`] ops are rounded at once,
    /// each on its own (so the integers do not depend on the threads), each holding an f32
    /// copy of its weights meanwhile.
    pub fn ring_ops(&self) -> Result<StageOps, ModelError> {
        let linears: Vec<(u64, &Linear)> = self
            .blocks
            .iter()
            .enumerate()
            .flat_map(|(i, b)| {
                let layer = (self.first_layer + i) as u64;
                b.linears()
                    .into_iter()
                    .enumerate()
                    .map(move |(k, l)| (4 * layer + k as u64, l))
            })
            .collect();
        let round = |&(op, l): &(u64, &Linear)| {
            let w = l.rows_f32()?;
            let format = l.ring_format();
            Ok((
                op,
                Arc::new(MaskedLinear::ring(&w, ACTIVATION_BITS, op, format)?),
            ))
        };
        let threads = rayon::current_num_threads().min(ROUNDED_AT_ONCE);
        match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
            Ok(pool) => pool.install(|| linears.par_iter().map(round).collect()),
            // no threads to spare: one op at a time
            Err(_) => linears.iter().map(round).collect(),
        }
    }

    /// This stage in masked mode (`crate::masked`): each block's four linear ops as
    /// [`Self::ring_ops`], computed on masked words with both parties in this process.
    /// Each op's Freivalds secret is drawn from `rng`.
    pub fn masked(
        &self,
        seed: &Arc<MaskSeed>,
        stats: &Arc<MaskedStats>,
        rng: &mut impl rand::Rng,
    ) -> Result<Stage, ModelError> {
        self.masked_from(&self.ring_ops()?, seed, stats, rng)
    }

    /// [`Self::masked`] with the stage's [`Self::ring_ops`] already computed (they are
    /// the same for every session).
    pub fn masked_from(
        &self,
        ops: &[(u64, Arc<RingMatrix>)],
        seed: &Arc<MaskSeed>,
        stats: &Arc<MaskedStats>,
        rng: &mut impl rand::Rng,
    ) -> Result<Stage, ModelError> {
        let mut ops = ops.iter().cloned();
        let mut stage = self.clone();
        for b in &mut stage.blocks {
            for l in b.linears_mut() {
                let (op, w) = ops
                    .next()
                    .ok_or_else(|| ModelError::Shape("a linear op without weights".into()))?;
                let check = Arc::new(crate::masked::Freivalds::new(&w, rng));
                *l = Linear::Masked(MaskedLinear::new(w, op, seed.clone(), check, stats.clone()));
            }
        }
        Ok(stage)
    }

    /// Every masked op of this stage (see [`Self::masked`]): its number and weights.
    pub fn masked_ops(&self) -> Vec<(u64, Arc<RingMatrix>)> {
        self.blocks
            .iter()
            .flat_map(Block::linears)
            .filter_map(|l| match l {
                Linear::Masked(m) => Some((m.op(), m.weights_arc().clone())),
                _ => None,
            })
            .collect()
    }

    /// The session's mask seed, if this stage is masked.
    pub fn mask_seed(&self) -> Option<Arc<MaskSeed>> {
        self.blocks.first().and_then(|b| match &b.attention.wqkv {
            Linear::Masked(m) => Some(m.seed().clone()),
            _ => None,
        })
    }

    /// This masked stage with its products computed by `parties`.
    pub fn with_parties(&self, parties: &Parties) -> Stage {
        let mut stage = self.clone();
        for b in &mut stage.blocks {
            for l in b.linears_mut() {
                if let Linear::Masked(m) = l {
                    *l = Linear::Masked(m.with_parties(parties.clone()));
                }
            }
        }
        stage
    }

    pub fn n_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Bytes of the blocks' matrices (norm gains and biases are negligible beside them).
    pub fn weight_bytes(&self) -> usize {
        self.blocks
            .iter()
            .flat_map(Block::linears)
            .map(|l| l.weight_bytes())
            .sum()
    }

    /// A fresh cache for one sequence of at most `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.blocks.len(), capacity)
    }

    /// Run every block over several sequences at once.
    ///
    /// `hidden[i]`: `[t_i, d]` new positions of sequence `i`, whose cache is `caches[i]`.
    /// The matrix products of all sequences run as one `[sum t_i, d]` batch; attention runs
    /// per sequence. Returns `[t_i, d]` per sequence; caches grow by `t_i`.
    pub fn forward(
        &self,
        hidden: Vec<Tensor<2>>,
        caches: &mut [&mut KvCache],
        rope: &RopeTables,
    ) -> Result<Vec<Tensor<2>>, ModelError> {
        self.forward_probed(hidden, caches, rope, &mut NoProbe)
    }

    /// [`Stage::forward`], showing every intermediate tensor to `probe`.
    pub fn forward_probed(
        &self,
        hidden: Vec<Tensor<2>>,
        caches: &mut [&mut KvCache],
        rope: &RopeTables,
        probe: &mut dyn Probe,
    ) -> Result<Vec<Tensor<2>>, ModelError> {
        if hidden.len() != caches.len() {
            return Err(ModelError::Shape(format!(
                "{} inputs for {} caches",
                hidden.len(),
                caches.len()
            )));
        }
        let mut segments = Vec::with_capacity(hidden.len());
        let mut row = 0;
        for (h, cache) in hidden.iter().zip(caches.iter()) {
            let [t, _] = h.dims();
            if cache.layers.len() != self.blocks.len() {
                return Err(ModelError::Shape(format!(
                    "cache has {} layers, stage has {}",
                    cache.layers.len(),
                    self.blocks.len()
                )));
            }
            cache.check_room(t)?;
            if cache.len() + t > rope.max_len() {
                return Err(ModelError::ContextOverflow {
                    needed: cache.len() + t,
                    capacity: rope.max_len(),
                });
            }
            segments.push(Segment {
                row,
                len: t,
                start: cache.len(),
            });
            row += t;
        }
        let mut x = if hidden.len() == 1 {
            hidden.into_iter().next().expect("one input")
        } else {
            Tensor::cat(hidden, 0)
        };
        for (l, block) in self.blocks.iter().enumerate() {
            let mut layer_caches: Vec<&mut LayerKv> =
                caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            x = block.forward(
                x,
                &segments,
                &mut layer_caches,
                rope,
                self.first_layer + l,
                probe,
            );
        }
        for (cache, seg) in caches.iter_mut().zip(&segments) {
            cache.advance(seg.len);
        }
        if segments.len() == 1 {
            return Ok(vec![x]);
        }
        Ok(segments
            .iter()
            .map(|s| x.clone().narrow(0, s.row, s.len))
            .collect())
    }
}
