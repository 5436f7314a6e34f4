use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::tensor_io::param2;
use crate::{Matrix, ModelError};

/// Token embedding table.
#[derive(Config, Debug)]
pub struct TokenEmbeddingConfig {
    pub vocab_size: usize,
    pub d_model: usize,
}

impl TokenEmbeddingConfig {
    pub fn init(&self, device: &Device) -> TokenEmbedding {
        TokenEmbedding {
            weight: Initializer::Normal {
                mean: 0.0,
                std: 1.0,
            }
            .init([self.vocab_size, self.d_model], device),
        }
    }
}

#[derive(Module, Debug)]
pub struct TokenEmbedding {
    /// `[vocab, d]`.
    pub weight: Param<Tensor<2>>,
}

impl TokenEmbedding {
    pub fn from_matrix(m: &Matrix, device: &Device) -> Self {
        TokenEmbedding {
            weight: param2(m, device),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `ids` (`t` tokens) → `[t, d]`. Fails on an id outside the vocabulary.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor<2>, ModelError> {
        let vocab = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ModelError::Shape(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let weight = self.weight.val();
        let device = weight.device();
        let idx: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [ids.len()]), &device);
        Ok(weight.select(0, idx))
    }
}
