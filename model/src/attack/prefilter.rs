//! A whole-vocabulary prefilter for the sequential attack on a node that receives token
//! embeddings. There, a token's query and key in the node's first layer depend on the token
//! alone (and RoPE on its position), so the scores the node computes at position `i` — its
//! query against its own key and against the keys of the tokens before it — can be
//! predicted for every vocabulary token at once with the public weights: one product per
//! position. Heads are compared sorted (the key permutes them), with the input norm beside.
//! The best few hundred tokens then go through the exact comparison.

use burn::tensor::{Device, Tensor};

use super::features::Features;
use crate::cache::{KvCache, RopeTables};
use crate::nn::{matrix_to_tensor, tensor_to_vec, RmsNorm};
use crate::{LlamaWeights, ModelError};

/// Previous positions whose scores are compared (the most recent ones).
const WINDOW: usize = 8;

pub struct Prefilter {
    /// `[G, r V, h]` queries of every token before RoPE, grouped by the kv head they read
    /// (`r = H / G` query heads per group).
    queries: Tensor<3>,
    /// `[1, 1, h]`: 1 on the first and -1 on the second dimension of each RoPE pair
    /// (adjacent dimensions): conjugating a rotation by it inverts the rotation.
    flip: Tensor<3>,
    /// `[V, H]` each token's score against its own key (RoPE cancels).
    own: Tensor<2>,
    /// `[V]` embedding norms.
    norms: Tensor<1>,
    heads: usize,
    groups: usize,
    head_dim: usize,
    /// The layer the scores come from.
    layer: usize,
}

impl Prefilter {
    /// Queries and keys of every token in layer 0 of `w`.
    pub fn new(w: &LlamaWeights, device: &Device) -> Result<Self, ModelError> {
        let c = &w.config;
        let (v, d, heads, groups, h) =
            (c.vocab_size, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim);
        let layer = &w.layers[0];
        let e = matrix_to_tensor(&w.embedding, device);
        let norms = e.clone().powi_scalar(2).sum_dim(1).sqrt().reshape([v]);
        let u = RmsNorm::from_gain(Some(&layer.attn_norm), f64::from(c.rms_eps), device)
            .forward(e.reshape([v, d]));
        let q = u.clone().matmul(matrix_to_tensor(&layer.wq, device));
        let k = u.matmul(matrix_to_tensor(&layer.wk, device));
        let queries = q.reshape([v, heads, h]);
        let r = heads / groups.max(1);
        let grouped = queries
            .clone()
            .reshape([v, groups, r, h])
            .permute([1, 2, 0, 3])
            .reshape([groups, r * v, h]);
        let flip: Vec<f32> = (0..h)
            .map(|j| if j % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let flip = Tensor::<1>::from_floats(flip.as_slice(), device).reshape([1, 1, h]);
        // each query head against its kv head's key of the same token
        let keys = k
            .reshape([v, groups, 1, h])
            .repeat_dim(2, r)
            .reshape([v, heads, h]);
        let own = (queries.clone() * keys).sum_dim(2).reshape([v, heads]) / (h as f64).sqrt();
        Ok(Prefilter {
            queries: grouped,
            flip,
            own,
            norms,
            heads,
            groups,
            head_dim: h,
            layer: 0,
        })
    }

    /// The `k` tokens whose predicted observables at position `i` (after the prefix whose
    /// keys `cache` holds) are nearest `observed`'s first layer, nearest first.
    pub fn nearest(
        &self,
        i: usize,
        cache: &KvCache,
        rope: &RopeTables,
        observed: &Features,
        k: usize,
    ) -> Result<Vec<u32>, ModelError> {
        let Some(obs) = observed.layers.first() else {
            return Ok(Vec::new());
        };
        let (heads, groups, h) = (self.heads, self.groups, self.head_dim);
        let [_, rv, _] = self.queries.dims();
        let v = rv / (heads / groups.max(1));
        let device = self.queries.device();
        let lo = i.saturating_sub(WINDOW);
        let w = i - lo;
        // predicted scores, [V, H, w + 1]: the window's keys, then the token's own
        let mut columns = vec![];
        if w > 0 {
            let keys = cache.layers[self.layer]
                .keys
                .clone()
                .ok_or_else(|| ModelError::Shape("no keys cached".into()))?
                .narrow(1, lo, w); // [G, w, h], key j rotated by R_j
                                   // R_i q . R_j k = q . R_i^T R_j k: turn the few keys back by i instead of
                                   // turning every token's query (R^T = F R F, F the flip)
            let turned = rope.apply(
                (keys * self.flip.clone()).reshape([1, groups * w, h]),
                i,
                self.layer,
            );
            let keys = turned.reshape([groups, w, h]) * self.flip.clone();
            let s = self.queries.clone().matmul(keys.swap_dims(1, 2)) / (h as f64).sqrt(); // [G, r V, w]
            columns.push(s.reshape([heads, v, w]).swap_dims(0, 1)); // [V, H, w]
        }
        columns.push(self.own.clone().reshape([v, heads, 1]));
        let predicted = Tensor::cat(columns, 2).sort(1);
        // observed, [H, w + 1] with the same columns
        let mut o = Vec::with_capacity(heads * (w + 1));
        for row in obs.heads.iter().take(heads) {
            o.extend_from_slice(&row[lo..=i]);
        }
        let observed_scores =
            Tensor::<2>::from_data(burn::tensor::TensorData::new(o, [heads, w + 1]), &device)
                .sort(0);
        let scale = observed_scores
            .clone()
            .powi_scalar(2)
            .sum_dim(0)
            .clamp_min(1e-6)
            .reshape([1, 1, w + 1]);
        let cost = ((predicted - observed_scores.reshape([1, heads, w + 1])).powi_scalar(2)
            / scale)
            .sum_dim(1)
            .sum_dim(2)
            .reshape([v]);
        let n = f64::from(obs.norms[0]).max(1e-6);
        let cost = cost + ((self.norms.clone() - n) / n).powi_scalar(2);
        let cost = tensor_to_vec(cost)?;
        Ok(super::sequential::top_k_smallest(&cost, k))
    }
}
