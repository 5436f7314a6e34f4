use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};

use super::probe::{tap, Probe, Site};
use super::tensor_io::param2;
use crate::Matrix;

/// SwiGLU feed-forward block.
#[derive(Config, Debug)]
pub struct MlpConfig {
    pub d_model: usize,
    pub d_ff: usize,
}

impl MlpConfig {
    pub fn init(&self, device: &Device) -> Mlp {
        Mlp {
            w_gate_up: LinearConfig::new(self.d_model, 2 * self.d_ff)
                .with_bias(false)
                .init(device),
            w_down: LinearConfig::new(self.d_ff, self.d_model)
                .with_bias(false)
                .init(device),
            d_ff: self.d_ff,
        }
    }
}

/// `(silu(u Wg) * (u Wu)) Wd`, with gate and up fused into one `[d, 2f]` product.
#[derive(Module, Debug)]
pub struct Mlp {
    pub w_gate_up: Linear,
    pub w_down: Linear,
    pub d_ff: usize,
}

impl Mlp {
    /// Build from `[d, f]` gate, `[d, f]` up and `[f, d]` down matrices.
    pub fn from_matrices(gate: &Matrix, up: &Matrix, down: &Matrix, device: &Device) -> Self {
        Mlp {
            w_gate_up: Linear {
                weight: param2(&Matrix::hcat(&[gate, up]), device),
                bias: None,
            },
            w_down: Linear {
                weight: param2(down, device),
                bias: None,
            },
            d_ff: gate.cols,
        }
    }

    /// `u`: `[n, d]` → `[n, d]`.
    pub fn forward(&self, u: Tensor<2>, layer: usize, probe: &mut dyn Probe) -> Tensor<2> {
        let gu = self.w_gate_up.forward(u);
        let [n, _] = gu.dims();
        let gate = gu.clone().slice([0..n, 0..self.d_ff]);
        let up = gu.slice([0..n, self.d_ff..2 * self.d_ff]);
        tap(probe, layer, Site::Gate, &gate);
        tap(probe, layer, Site::Up, &up);
        let hidden = silu(gate) * up;
        tap(probe, layer, Site::Hidden, &hidden);
        self.w_down.forward(hidden)
    }
}
