use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, Tensor};

use super::tensor_io::param2;
use super::{RmsNorm, RmsNormConfig};
use crate::Matrix;

/// Final norm and output projection.
#[derive(Config, Debug)]
pub struct OutputHeadConfig {
    pub d_model: usize,
    pub vocab_size: usize,
    #[config(default = 1e-5)]
    pub rms_eps: f64,
}

impl OutputHeadConfig {
    pub fn init(&self, device: &Device) -> OutputHead {
        OutputHead {
            norm: RmsNormConfig::new(self.d_model)
                .with_epsilon(self.rms_eps)
                .init(device),
            weight: Initializer::Normal {
                mean: 0.0,
                std: 1.0 / (self.d_model as f64).sqrt(),
            }
            .init([self.d_model, self.vocab_size], device),
        }
    }
}

/// `logits = (rmsnorm(x) * gf) Wout`.
#[derive(Module, Debug)]
pub struct OutputHead {
    pub norm: RmsNorm,
    /// `[d, vocab]`.
    pub weight: Param<Tensor<2>>,
}

impl OutputHead {
    pub fn from_weights(gain: &[f32], weight: &Matrix, eps: f64, device: &Device) -> Self {
        OutputHead {
            norm: RmsNorm::from_gain(Some(gain), eps, device),
            weight: param2(weight, device),
        }
    }

    /// `x`: `[n, d]` → logits `[n, vocab]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.norm.forward(x).matmul(self.weight.val())
    }
}
