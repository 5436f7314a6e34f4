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
        TokenEmbedding::from_tensor(
            Initializer::Normal {
                mean: 0.0,
                std: 1.0,
            }
            .init([self.vocab_size, self.d_model], device)
            .val(),
        )
    }
}

/// The embedding table `[vocab, d]`, with the factor its rows are multiplied by (Gemma's
/// `sqrt(d)`), if any.
#[derive(Debug, Clone)]
pub struct TokenEmbedding {
    table: Table,
    scale: Option<f32>,
}

/// A tensor, or the GGUF's quantized rows (only the rows looked up are dequantized).
#[derive(Debug, Clone)]
enum Table {
    Dense(Tensor<2>),
    Quant { table: QMatrix, device: Device },
}

impl TokenEmbedding {
    pub fn from_tensor(table: Tensor<2>) -> Self {
        TokenEmbedding {
            table: Table::Dense(table),
            scale: None,
        }
    }

    pub fn from_matrix(m: &Matrix, device: &Device) -> Self {
        Self::from_tensor(matrix_to_tensor(m, device))
    }

    /// A quantized `[vocab, d]` table whose rows go to `device`.
    pub fn from_quantized(table: QMatrix, device: &Device) -> Self {
        TokenEmbedding {
            table: Table::Quant {
                table,
                device: device.clone(),
            },
            scale: None,
        }
    }

    /// Multiply the rows looked up by `scale` (see [`crate::LlamaConfig::embedding_scale`]).
    pub fn with_scale(mut self, scale: Option<f32>) -> Self {
        self.scale = scale;
        self
    }

    pub fn vocab_size(&self) -> usize {
        match &self.table {
            Table::Dense(w) => w.dims()[0],
            Table::Quant { table, .. } => table.rows(),
        }
    }

    /// Bytes of the table.
    pub fn byte_len(&self) -> usize {
        match &self.table {
            Table::Dense(w) => w.dims().iter().product::<usize>() * 4,
            Table::Quant { table, .. } => table.byte_len(),
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
        let rows = match &self.table {
            Table::Dense(weight) => {
                let device = weight.device();
                let idx: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
                let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [ids.len()]), &device);
                weight.clone().select(0, idx)
            }
            Table::Quant { table, device } => {
                let d = table.cols();
                let mut rows = vec![0.0; ids.len() * d];
                for (&id, out) in ids.iter().zip(rows.chunks_exact_mut(d)) {
                    veil_kernels::dot::dequantize_row(
                        table.ggml_type(),
                        &table.row(id as usize),
                        out,
                    );
                }
                Tensor::from_data(TensorData::new(rows, [ids.len(), d]), device)
            }
        };
        Ok(match self.scale {
            Some(s) => rows.mul_scalar(s),
            None => rows,
        })
    }
}
