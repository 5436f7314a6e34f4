use burn::config::Config;
use burn::nn::Initializer;
use burn::tensor::{Device, Tensor};
use veil_kernels::{Precision, QMatrix};

use super::linear::Linear;
use super::{RmsNorm, RmsNormConfig};
use crate::{Matrix, ModelError};

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
            weight: Linear::Dense(
                Initializer::Normal {
                    mean: 0.0,
                    std: 1.0 / (self.d_model as f64).sqrt(),
                }
                .init([self.d_model, self.vocab_size], device)
                .val(),
            ),
        }
    }
}

/// `logits = (rmsnorm(x) * gf) Wout`.
#[derive(Debug, Clone)]
pub struct OutputHead {
    pub norm: RmsNorm,
    /// `[d, vocab]`.
    pub weight: Linear,
}

impl OutputHead {
    pub fn from_weights(gain: &[f32], weight: &Matrix, eps: f64, device: &Device) -> Self {
        OutputHead {
            norm: RmsNorm::from_gain(Some(gain), eps, device),
            weight: Linear::dense(weight, device),
        }
    }

    /// The final norm and a quantized `[vocab, d]` head (GGUF's layout; for a tied model
    /// the embedding table itself), run on the CPU device `device`.
    pub fn from_quantized(
        gain: &[f32],
        weight: QMatrix,
        eps: f64,
        precision: Precision,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Ok(OutputHead {
            norm: RmsNorm::from_gain(Some(gain), eps, device),
            weight: Linear::quantized(vec![weight], precision, device)?,
        })
    }

    /// `x`: `[n, d]` → logits `[n, vocab]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.weight.forward(self.norm.forward(x))
    }
}
