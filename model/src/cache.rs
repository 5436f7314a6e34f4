//! Mutable inference state kept apart from the immutable model: RoPE tables (shared by all
//! sequences) and per-sequence KV caches.

use burn::tensor::{Device, Tensor, TensorData};

use crate::{LlamaConfig, ModelError};

/// Precomputed rotary-embedding tables for the GGUF (adjacent-pair) layout.
///
/// `rope(x)[2j] = x[2j] cos(p t_j) - x[2j+1] sin(p t_j)` and
/// `rope(x)[2j+1] = x[2j] sin(p t_j) + x[2j+1] cos(p t_j)` with `t_j = base^(-2j/h)`,
/// computed as `x * cos + (x R) * sin` where `R` maps `x` to `(-x1, x0)` pairwise. With
/// frequency factors (Llama 3.1), `t_j` is divided by factor `j`. Layers may have bases of
/// their own (Gemma 3's sliding-window layers): one table per base.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// Per distinct base, `[max_len, h]` `cos(p t_j)` and `sin(p t_j)`, each repeated for
    /// both members of pair `j`.
    tables: Vec<(Tensor<2>, Tensor<2>)>,
    /// The table of each layer of the model (by absolute index).
    layer_table: Vec<usize>,
    /// `[h, h]`: the pairwise quarter turn `R`.
    rot: Tensor<2>,
    head_dim: usize,
    max_len: usize,
}

impl RopeTables {
    pub fn new(config: &LlamaConfig, device: &Device) -> Self {
        let (h, n) = (config.head_dim, config.max_seq_len);
        let mut bases: Vec<f32> = Vec::new();
        let layer_table = (0..config.n_layers)
            .map(|l| {
                let base = config.layer_rope_theta(l);
                match bases.iter().position(|b| b.to_bits() == base.to_bits()) {
                    Some(i) => i,
                    None => {
                        bases.push(base);
                        bases.len() - 1
                    }
                }
            })
            .collect();
        let table = |base: f32| {
            let mut cos = Vec::with_capacity(n * h);
            let mut sin = Vec::with_capacity(n * h);
            let base = f64::from(base);
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
            (
                Tensor::from_data(TensorData::new(cos, [n, h]), device),
                Tensor::from_data(TensorData::new(sin, [n, h]), device),
            )
        };
        let mut rot = vec![0.0f32; h * h];
        for j in 0..h / 2 {
            // (x R)[2j] = -x[2j+1]; (x R)[2j+1] = x[2j]
            rot[(2 * j + 1) * h + 2 * j] = -1.0;
            rot[(2 * j) * h + 2 * j + 1] = 1.0;
        }
        RopeTables {
            tables: bases.into_iter().map(table).collect(),
            layer_table,
            rot: Tensor::from_data(TensorData::new(rot, [h, h]), device),
            head_dim: h,
            max_len: n,
        }
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Rotate `x`: `[t, heads, h]` holding positions `start..start + t` of layer `layer`.
    pub fn apply(&self, x: Tensor<3>, start: usize, layer: usize) -> Tensor<3> {
        let [t, heads, h] = x.dims();
        debug_assert_eq!(h, self.head_dim);
        let (cos, sin) = &self.tables[self.layer_table.get(layer).copied().unwrap_or(0)];
        let cos = cos.clone().narrow(0, start, t).reshape([t, 1, h]);
        let sin = sin.clone().narrow(0, start, t).reshape([t, 1, h]);
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
