use burn::config::Config;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use veil_kernels::{Precision, QMatrix};

use super::head_norm::HeadNorm;
use super::linear::Linear;
use super::probe::{tap, Probe, Site};
use super::tensor_io::vector_to_tensor;
use crate::cache::{LayerKv, RopeTables};
use crate::{AttnExtras, Matrix, ModelError};

/// Grouped-query attention with rotary embeddings.
#[derive(Config, Debug)]
pub struct AttentionConfig {
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Epsilon of the per-head query/key norms (families that have them).
    #[config(default = 1e-5)]
    pub rms_eps: f64,
    /// Keys each query sees (itself included) on a sliding-window layer; `None`: all.
    pub window: Option<usize>,
}

impl AttentionConfig {
    pub fn init(&self, device: &Device) -> Attention {
        let (q, kv) = (
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        Attention {
            wqkv: Linear::random(self.d_model, q + 2 * kv, device),
            wo: Linear::random(q, self.d_model, device),
            bias: None,
            qk_norm: None,
            window: self.window,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

/// Query, key and value projections fused into one `[d, (H + 2G) h]` product.
#[derive(Debug, Clone)]
pub struct Attention {
    pub wqkv: Linear,
    pub wo: Linear,
    /// `[(H + 2G) h]`, added to the fused projection (Qwen 2).
    pub bias: Option<Tensor<1>>,
    /// Per-head norms of queries and keys before RoPE (Qwen 3).
    pub qk_norm: Option<(HeadNorm, HeadNorm)>,
    /// Keys each query sees (itself included) on a sliding-window layer; `None`: all.
    pub window: Option<usize>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Where one sequence's rows sit in a batch, and its first position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First row of the sequence in the batched `[n, d]` input.
    pub row: usize,
    /// Rows (new positions) of this sequence.
    pub len: usize,
    /// Absolute position of the first new row (= tokens already cached).
    pub start: usize,
}

impl Attention {
    /// Build from `[d, H h]`, `[d, G h]`, `[d, G h]` and `[H h, d]` matrices and the
    /// family's extras.
    pub fn from_matrices(
        config: &AttentionConfig,
        [wq, wk, wv, wo]: [&Matrix; 4],
        extras: &AttnExtras,
        device: &Device,
    ) -> Self {
        let wqkv = Linear::dense(&Matrix::hcat(&[wq, wk, wv]), device);
        Self::with_extras(config, wqkv, Linear::dense(wo, device), extras, device)
    }

    /// The attention of the projections `wqkv` and `wo` with the family's `extras`.
    fn with_extras(
        config: &AttentionConfig,
        wqkv: Linear,
        wo: Linear,
        extras: &AttnExtras,
        device: &Device,
    ) -> Self {
        let (h, eps) = (config.head_dim, config.rms_eps);
        Attention {
            wqkv,
            wo,
            bias: (!extras.qkv_bias.is_empty()).then(|| vector_to_tensor(&extras.qkv_bias, device)),
            qk_norm: extras.qk_norm.as_ref().map(|n| {
                (
                    HeadNorm::new(&n.q, config.n_heads, h, eps, device),
                    HeadNorm::new(&n.k, config.n_kv_heads, h, eps, device),
                )
            }),
            window: config.window,
            n_heads: config.n_heads,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
        }
    }

    /// Build from quantized `[H h, d]`, `[G h, d]`, `[G h, d]` and `[d, H h]` matrices
    /// (GGUF's layout), run on the CPU device `device`.
    pub fn from_quantized(
        config: &AttentionConfig,
        [wq, wk, wv, wo]: [QMatrix; 4],
        extras: &AttnExtras,
        precision: Precision,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Ok(Self::with_extras(
            config,
            Linear::quantized(vec![wq, wk, wv], precision, device)?,
            Linear::quantized(vec![wo], precision, device)?,
            extras,
            device,
        ))
    }

    /// `u`: normalised input `[n, d]`, rows of several sequences laid out by `segments`;
    /// `caches[i]` is this layer's cache of `segments[i]`, extended in place.
    /// Returns `[n, d]`.
    pub fn forward(
        &self,
        u: Tensor<2>,
        segments: &[Segment],
        caches: &mut [&mut LayerKv],
        rope: &RopeTables,
        layer: usize,
        probe: &mut dyn Probe,
    ) -> Tensor<2> {
        let (heads, groups, h) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (q_w, kv_w) = (heads * h, groups * h);
        let qkv = self.wqkv.forward(u);
        let qkv = match &self.bias {
            Some(b) => qkv + b.clone().unsqueeze::<2>(),
            None => qkv,
        };
        let mut outputs = Vec::with_capacity(segments.len());
        for (seg, cache) in segments.iter().zip(caches.iter_mut()) {
            let rows = qkv.clone().narrow(0, seg.row, seg.len);
            let t = seg.len;
            let q = rows.clone().slice([0..t, 0..q_w]).reshape([t, heads, h]);
            let k = rows
                .clone()
                .slice([0..t, q_w..q_w + kv_w])
                .reshape([t, groups, h]);
            let v = rows
                .slice([0..t, q_w + kv_w..q_w + 2 * kv_w])
                .reshape([t, groups, h]);
            let (q, k) = match &self.qk_norm {
                Some((qn, kn)) => (qn.forward(q), kn.forward(k)),
                None => (q, k),
            };
            let q = rope.apply(q, seg.start, layer);
            let k = rope.apply(k, seg.start, layer);
            if probe.active() {
                probe.record(layer, Site::Query, q.clone().reshape([t, q_w]));
                probe.record(layer, Site::Key, k.clone().reshape([t, kv_w]));
                probe.record(layer, Site::Value, v.clone().reshape([t, kv_w]));
            }
            let (keys, values) = cache.append(k.swap_dims(0, 1), v.swap_dims(0, 1));
            outputs.push(self.attend(q, keys, values, seg.start, layer, probe));
        }
        let out = if outputs.len() == 1 {
            outputs.pop().expect("one output")
        } else {
            Tensor::cat(outputs, 0)
        };
        tap(probe, layer, Site::AttnMix, &out);
        self.wo.forward(out)
    }

    /// `q`: `[t, H, h]` at positions `start..start+t`; `keys`, `values`: `[G, s, h]` with
    /// `s = start + t`. Returns `[t, H h]`.
    fn attend(
        &self,
        q: Tensor<3>,
        keys: Tensor<3>,
        values: Tensor<3>,
        start: usize,
        layer: usize,
        probe: &mut dyn Probe,
    ) -> Tensor<2> {
        let [t, heads, h] = q.dims();
        if t > 1 && !probe.active() && q.device() == Device::flex() {
            // On the CPU, each row as the decode step at its position computes it (over
            // exactly the keys it sees, no mask): a row's answer then does not depend on how
            // many rows share its step, so a verifier's catch-up in one prefill reproduces a
            // node's step-by-step answers to the bit (`model/tests/integrity.rs`). It also
            // skips the masked half of a prompt's scores. (On wgpu, one launch per row would
            // cost more than it saves; a GPU's answers are compared with a tolerance.)
            let rows: Vec<Tensor<2>> = (0..t)
                .map(|i| {
                    let seen = start + i + 1;
                    self.attend(
                        q.clone().narrow(0, i, 1),
                        keys.clone().narrow(1, 0, seen),
                        values.clone().narrow(1, 0, seen),
                        start + i,
                        layer,
                        probe,
                    )
                })
                .collect();
            return Tensor::cat(rows, 0);
        }
        // A sliding window: no row of this call sees a key before `lo`.
        let lo = self.window.map_or(0, |w| (start + 1).saturating_sub(w));
        let (keys, values) = if lo > 0 {
            let s = keys.dims()[1];
            (keys.narrow(1, lo, s - lo), values.narrow(1, lo, s - lo))
        } else {
            (keys, values)
        };
        let [groups, s, _] = keys.dims();
        let r = heads / groups;
        // Query heads g*r .. g*r+r read kv head g: group them as [G, r t, h].
        let q = q.swap_dims(0, 1).reshape([groups, r * t, h]);
        let scale = 1.0 / (h as f64).sqrt();
        let mut scores = q.matmul(keys.swap_dims(1, 2)) * scale;
        if probe.active() {
            probe.record(layer, Site::Scores, scores.clone().reshape([heads * t, s]));
        }
        if t > 1 {
            let mask = causal_mask(t, s, start, lo, self.window, &scores.device());
            scores = (scores.reshape([groups, r, t, s]) + mask).reshape([groups, r * t, s]);
        }
        let probs = softmax(scores, 2);
        if probe.active() {
            probe.record(layer, Site::Probs, probs.clone().reshape([heads * t, s]));
        }
        probs
            .matmul(values)
            .reshape([heads, t, h])
            .swap_dims(0, 1)
            .reshape([t, heads * h])
    }
}

/// `[1, 1, t, s]` additive mask: query `i` (position `start + i`) sees the keys at positions
/// `lo + j` with `lo + j <= start + i`, and within `window` of it (itself included).
fn causal_mask(
    t: usize,
    s: usize,
    start: usize,
    lo: usize,
    window: Option<usize>,
    device: &Device,
) -> Tensor<4> {
    let mut data = vec![0.0f32; t * s];
    for i in 0..t {
        let p = start + i;
        for j in 0..s {
            let k = lo + j;
            if k > p || window.is_some_and(|w| p - k >= w) {
                data[i * s + j] = -1e30;
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [1, 1, t, s]), device)
}
