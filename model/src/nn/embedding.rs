use burn::config::Config;
use burn::nn::Initializer;
use burn::tensor::{Device, Int, Tensor, TensorData};
use veil_kernels::QMatrix;

use super::tensor_io::matrix_to_tensor;
use crate::{Matrix, ModelError};

/// Token embedding table.
#[derive(Config, Debug)]
pub struct TokenEmbeddingConfig {
    pub vocab_size: usize,
    pub d_model: usize,
}

impl TokenEmbeddingConfig {
    pub fn init(&self, device: &Device) -> TokenEmbedding {
        TokenEmbedding::Dense(
            Initializer::Normal {
                mean: 0.0,
                std: 1.0,
            }
            .init([self.vocab_size, self.d_model], device)
            .val(),
        )
    }
}

/// The embedding table `[vocab, d]`: a tensor, or the GGUF's quantized rows (only the
/// rows looked up are dequantized).
#[derive(Debug, Clone)]
pub enum TokenEmbedding {
    Dense(Tensor<2>),
    Quant { table: QMatrix, device: Device },
}

impl TokenEmbedding {
    pub fn from_matrix(m: &Matrix, device: &Device) -> Self {
        TokenEmbedding::Dense(matrix_to_tensor(m, device))
    }

    /// A quantized `[vocab, d]` table whose rows go to `device`.
    pub fn from_quantized(table: QMatrix, device: &Device) -> Self {
        TokenEmbedding::Quant {
            table,
            device: device.clone(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            TokenEmbedding::Dense(w) => w.dims()[0],
            TokenEmbedding::Quant { table, .. } => table.rows(),
        }
    }

    /// Bytes of the table.
    pub fn byte_len(&self) -> usize {
        match self {
            TokenEmbedding::Dense(w) => w.dims().iter().product::<usize>() * 4,
            TokenEmbedding::Quant { table, .. } => table.byte_len(),
        }
    }

    /// `ids` → `[t, d]`.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor<2>, ModelError> {
        let vocab = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ModelError::Shape(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        match self {
            TokenEmbedding::Dense(weight) => {
                let device = weight.device();
                let idx: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
                let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [ids.len()]), &device);
                Ok(weight.clone().select(0, idx))
            }
            TokenEmbedding::Quant { table, device } => {
                let d = table.cols();
                let mut rows = vec![0.0; ids.len() * d];
                for (&id, out) in ids.iter().zip(rows.chunks_exact_mut(d)) {
                    veil_kernels::dot::dequantize_row(
                        table.ggml_type(),
                        &table.row(id as usize),
                        out,
                    );
                }
                Ok(Tensor::from_data(
                    TensorData::new(rows, [ids.len(), d]),
                    device,
                ))
            }
        }
    }
}
