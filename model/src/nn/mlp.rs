use burn::config::Config;
use burn::tensor::activation::{silu, tanh};
use burn::tensor::{Device, Tensor, TensorData};
use veil_kernels::glu::{gated, Gate};
use veil_kernels::{Precision, QMatrix};

use super::linear::Linear;
use super::probe::{tap, Probe, Site};
use crate::{Activation, Matrix, ModelError};

/// Gated feed-forward block (SwiGLU or GeGLU).
#[derive(Config, Debug)]
pub struct MlpConfig {
    pub d_model: usize,
    pub d_ff: usize,
    /// The gate's activation.
    #[config(default = "Activation::Silu")]
    pub activation: Activation,
}

impl MlpConfig {
    pub fn init(&self, device: &Device) -> Mlp {
        Mlp {
            w_gate_up: Linear::random(self.d_model, 2 * self.d_ff, device),
            w_down: Linear::random(self.d_ff, self.d_model, device),
            d_ff: self.d_ff,
            activation: self.activation,
        }
    }
}

/// `(act(u Wg) * (u Wu)) Wd`, with gate and up fused into one `[d, 2f]` product.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub w_gate_up: Linear,
    pub w_down: Linear,
    pub d_ff: usize,
    pub activation: Activation,
}

/// GELU's tanh approximation, `x/2 (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`, as Gemma
/// (and llama.cpp's `gelu`) use it.
fn gelu_tanh(x: Tensor<2>) -> Tensor<2> {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    // x³ as two products: `powi_scalar` calls `powf` per element on the CPU
    let cube = x.clone() * x.clone() * x.clone();
    let inner = (x.clone() + cube.mul_scalar(0.044_715)).mul_scalar(SQRT_2_OVER_PI);
    (tanh(inner).add_scalar(1.0) * x).mul_scalar(0.5)
}

impl Mlp {
    /// Build from `[d, f]` gate, `[d, f]` up and `[f, d]` down matrices.
    pub fn from_matrices(
        config: &MlpConfig,
        gate: &Matrix,
        up: &Matrix,
        down: &Matrix,
        device: &Device,
    ) -> Self {
        Mlp {
            w_gate_up: Linear::dense(&Matrix::hcat(&[gate, up]), device),
            w_down: Linear::dense(down, device),
            d_ff: gate.cols,
            activation: config.activation,
        }
    }

    /// Build from quantized `[f, d]` gate, `[f, d]` up and `[d, f]` down matrices (GGUF's
    /// layout), run on the CPU device `device`.
    pub fn from_quantized(
        config: &MlpConfig,
        [gate, up, down]: [QMatrix; 3],
        precision: Precision,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let d_ff = gate.rows();
        Ok(Mlp {
            w_gate_up: Linear::quantized(vec![gate, up], precision, device)?,
            w_down: Linear::quantized(vec![down], precision, device)?,
            d_ff,
            activation: config.activation,
        })
    }

    /// `u`: `[n, d]` → `[n, d]`.
    pub fn forward(&self, u: Tensor<2>, layer: usize, probe: &mut dyn Probe) -> Tensor<2> {
        let gu = self.w_gate_up.forward(u);
        let [n, _] = gu.dims();
        let device = gu.device();
        if !probe.active() && device == Device::flex() {
            // On the CPU, one pass over host memory instead of a tensor operation per step
            // of the formula (and libm's tanhf per element for GELU).
            let host = gu
                .into_data()
                .try_into_vec::<f32>()
                .expect("a CPU tensor of f32 reads back");
            let gate = match self.activation {
                Activation::Silu => Gate::Silu,
                Activation::GeluTanh => Gate::GeluTanh,
            };
            let hidden = gated(&host, self.d_ff, gate);
            let hidden = Tensor::from_data(TensorData::new(hidden, [n, self.d_ff]), &device);
            return self.w_down.forward(hidden);
        }
        let gate = gu.clone().slice([0..n, 0..self.d_ff]);
        let up = gu.slice([0..n, self.d_ff..2 * self.d_ff]);
        tap(probe, layer, Site::Gate, &gate);
        tap(probe, layer, Site::Up, &up);
        let gate = match self.activation {
            Activation::Silu => silu(gate),
            Activation::GeluTanh => gelu_tanh(gate),
        };
        let hidden = gate * up;
        tap(probe, layer, Site::Hidden, &hidden);
        self.w_down.forward(hidden)
    }
}
