//! Mutable inference state kept apart from the immutable model: RoPE tables (shared by all
//! sequences) and per-sequence KV caches.

use burn::tensor::{Device, Tensor, TensorData};

use crate::{LlamaConfig, ModelError};

/// Precomputed rotary-embedding tables for the GGUF (adjacent-pair) layout.
///
/// `rope(x)[2j] = x[2j] cos(p t_j) - x[2j+1] sin(p t_j)` and
/// `rope(x)[2j+1] = x[2j] sin(p t_j) + x[2j+1] cos(p t_j)` with `t_j = base^(-2j/h)`,
/// computed as `x * cos + (x R) * sin` where `R` maps `x` to `(-x1, x0)` pairwise. With
/// frequency factors (Llama 3.1), `t_j` is divided by factor `j`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// `[max_len, h]`: `cos(p t_j)` repeated for both members of pair `j`.
    cos: Tensor<2>,
    /// `[max_len, h]`.
    sin: Tensor<2>,
    /// `[h, h]`: the pairwise quarter turn `R`.
    rot: Tensor<2>,
    head_dim: usize,
    max_len: usize,
}

impl RopeTables {
    pub fn new(config: &LlamaConfig, device: &Device) -> Self {
        let (h, n) = (config.head_dim, config.max_seq_len);
        let mut cos = Vec::with_capacity(n * h);
        let mut sin = Vec::with_capacity(n * h);
        let base = f64::from(config.rope_theta);
        for p in 0..n {
            for j in 0..h / 2 {
                let factor = config
                    .rope_freq_factors
                    .as_ref()
                    .map_or(1.0, |f| f64::from(f[j]));
                let theta = base.powf(-2.0 * j as f64 / h as f64) / factor;
                let (s, c) = (p as f64 * theta).sin_cos();
                cos.extend([c as f32, c as f32]);
                sin.extend([s as f32, s as f32]);
            }
        }
        let mut rot = vec![0.0f32; h * h];
        for j in 0..h / 2 {
            // (x R)[2j] = -x[2j+1]; (x R)[2j+1] = x[2j]
            rot[(2 * j + 1) * h + 2 * j] = -1.0;
            rot[(2 * j) * h + 2 * j + 1] = 1.0;
        }
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, [n, h]), device),
            sin: Tensor::from_data(TensorData::new(sin, [n, h]), device),
            rot: Tensor::from_data(TensorData::new(rot, [h, h]), device),
            head_dim: h,
            max_len: n,
        }
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Rotate `x`: `[t, heads, h]` holding positions `start..start + t`.
    pub fn apply(&self, x: Tensor<3>, start: usize) -> Tensor<3> {
        let [t, heads, h] = x.dims();
        debug_assert_eq!(h, self.head_dim);
        let cos = self.cos.clone().narrow(0, start, t).reshape([t, 1, h]);
        let sin = self.sin.clone().narrow(0, start, t).reshape([t, 1, h]);
        let turned = x
            .clone()
            .reshape([t * heads, h])
            .matmul(self.rot.clone())
            .reshape([t, heads, h]);
        x * cos + turned * sin
    }
}

/// Keys and values of one layer for one sequence, post-RoPE: `[G, len, h]` each.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    pub keys: Option<Tensor<3>>,
    pub values: Option<Tensor<3>>,
}

impl LayerKv {
    /// Append `[G, t, h]` keys and values; returns all keys and values so far.
    pub fn append(&mut self, k: Tensor<3>, v: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        let keys = match self.keys.take() {
            Some(old) => Tensor::cat(vec![old, k], 1),
            None => k,
        };
        let values = match self.values.take() {
            Some(old) => Tensor::cat(vec![old, v], 1),
            None => v,
        };
        self.keys = Some(keys.clone());
        self.values = Some(values.clone());
        (keys, values)
    }
}

/// The KV cache of one sequence over a contiguous range of layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for `n_layers` layers holding at most `capacity` positions.
    pub fn new(n_layers: usize, capacity: usize) -> Self {
        KvCache {
            layers: vec![LayerKv::default(); n_layers],
            len: 0,
            capacity,
        }
    }

    /// Positions already stored (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Check that `t` more positions fit.
    pub fn check_room(&self, t: usize) -> Result<(), ModelError> {
        if self.len + t > self.capacity {
            return Err(ModelError::ContextOverflow {
                needed: self.len + t,
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    /// Record that `t` positions were appended to every layer.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
