use burn::tensor::{Device, Tensor, TensorData};

use crate::arch::PairMap;

/// RMSNorm over each head of queries or keys, followed by a [`PairMap`] (Qwen 3's
/// `attn_q_norm` / `attn_k_norm`; in an encrypted shard the map also carries the head key).
#[derive(Debug, Clone)]
pub struct HeadNorm {
    /// `[heads, h]`.
    diag: Tensor<2>,
    /// `[heads, h]`; `None` when all zero (a plaintext gain).
    cross: Option<Tensor<2>>,
    epsilon: f64,
}

impl HeadNorm {
    /// The norm of `heads` heads of width `h` with the pair map `map` (`[heads * h]`).
    pub fn new(map: &PairMap, heads: usize, h: usize, epsilon: f64, device: &Device) -> Self {
        let table = |v: &[f32]| Tensor::from_data(TensorData::new(v.to_vec(), [heads, h]), device);
        HeadNorm {
            diag: table(&map.diag),
            cross: map
                .cross
                .iter()
                .any(|&c| c != 0.0)
                .then(|| table(&map.cross)),
            epsilon,
        }
    }

    /// `x`: `[t, heads, h]` → `[t, heads, h]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [t, heads, h] = x.dims();
        let rms = (x.clone().square().mean_dim(2) + self.epsilon).sqrt();
        let y = x / rms;
        let scaled = y.clone() * self.diag.clone().unsqueeze::<3>();
        match &self.cross {
            None => scaled,
            Some(cross) => {
                // each pair's members swapped: (y[2j+1], y[2j])
                let swapped = y
                    .reshape([t, heads, h / 2, 2])
                    .flip([3])
                    .reshape([t, heads, h]);
                scaled + swapped * cross.clone().unsqueeze::<3>()
            }
        }
    }
}
