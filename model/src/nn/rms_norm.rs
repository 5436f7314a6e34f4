use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, Tensor};

use super::tensor_io::param1;

/// RMSNorm over the last dimension, with an optional gain.
#[derive(Config, Debug)]
pub struct RmsNormConfig {
    pub d_model: usize,
    #[config(default = 1e-5)]
    pub epsilon: f64,
    /// Whether the norm has a learned gain (encrypted shards fold it into the next matrix).
    #[config(default = true)]
    pub gain: bool,
}

impl RmsNormConfig {
    pub fn init(&self, device: &Device) -> RmsNorm {
        RmsNorm {
            gain: self
                .gain
                .then(|| Initializer::Ones.init([self.d_model], device)),
            epsilon: self.epsilon,
        }
    }
}

/// `rmsnorm(x) * g` with `rmsnorm(x) = x / sqrt(mean(x^2) + eps)`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// `[d]`, or `None` for a norm without gain.
    pub gain: Option<Param<Tensor<1>>>,
    pub epsilon: f64,
}

impl RmsNorm {
    /// A norm with the given gain (`None`: no gain).
    pub fn from_gain(gain: Option<&[f32]>, epsilon: f64, device: &Device) -> Self {
        RmsNorm {
            gain: gain.map(|g| param1(g, device)),
            epsilon,
        }
    }

    /// `x`: `[n, d]` → `[n, d]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let rms = (x.clone().square().mean_dim(1) + self.epsilon).sqrt();
        let y = x / rms;
        match &self.gain {
            Some(g) => y * g.val().unsqueeze::<2>(),
            None => y,
        }
    }
}
