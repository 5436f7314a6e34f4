//! Linear maps `x -> x W`: as a burn tensor on any device (f32, the encrypted shards and
//! the GPU), or as the GGUF's own quantized blocks, multiplied on the CPU by veil-kernels
//! without ever being dequantized as a whole.

use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use veil_kernels::{matmul_fused, Precision, QMatrix};

use super::tensor_io::{matrix_to_tensor, tensor_to_vec};
use crate::masked::{MaskedLinear, RingFormat};
use crate::{Matrix, ModelError};

/// `x -> x W`.
#[derive(Debug, Clone)]
pub enum Linear {
    /// `W` as an `[in, out]` tensor.
    Dense(Tensor<2>),
    /// `W` in GGML blocks, on the CPU.
    Quant(QuantLinear),
    /// `W` as integers per row, multiplied on masked words (masked mode).
    Masked(MaskedLinear),
}

/// Quantized matrices of the same width whose outputs sit side by side: one projection,
/// or a fused query/key/value or gate/up projection (computed in one pass).
#[derive(Debug, Clone)]
pub struct QuantLinear {
    parts: Arc<[QMatrix]>,
    d_out: usize,
    precision: Precision,
    device: Device,
}

impl Linear {
    /// `W` (`[in, out]`) uploaded to `device`.
    pub fn dense(w: &Matrix, device: &Device) -> Self {
        Linear::Dense(matrix_to_tensor(w, device))
    }

    /// A random `[d_in, d_out]` map (burn's default initialiser for linear layers).
    pub fn random(d_in: usize, d_out: usize, device: &Device) -> Self {
        let init = burn::nn::Initializer::KaimingUniform {
            gain: 1.0 / 3.0f64.sqrt(),
            fan_out_only: false,
        };
        Linear::Dense(
            init.init_with([d_in, d_out], Some(d_in), Some(d_out), device)
                .val(),
        )
    }

    /// The matrices `parts` (each `[out_i, in]`, GGUF's layout) side by side, on the CPU
    /// device `device`. Those not yet interleaved for the fast kernels are, if their format
    /// allows it (a copy: matrices read from a file come interleaved already).
    pub fn quantized(
        parts: Vec<QMatrix>,
        precision: Precision,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let Some(first) = parts.first() else {
            return Err(ModelError::Shape("a linear map needs a matrix".into()));
        };
        if parts.iter().any(|p| p.cols() != first.cols()) {
            return Err(ModelError::Shape(
                "fused matrices must have the same width".into(),
            ));
        }
        Ok(Linear::Quant(QuantLinear {
            d_out: parts.iter().map(QMatrix::rows).sum(),
            parts: parts.into_iter().map(QMatrix::pack).collect(),
            precision,
            device: device.clone(),
        }))
    }

    /// This map with its quantized products at `precision` (the weights are shared; a
    /// dense map is unchanged).
    pub fn with_precision(&self, precision: Precision) -> Linear {
        match self {
            Linear::Dense(_) | Linear::Masked(_) => self.clone(),
            Linear::Quant(q) => Linear::Quant(QuantLinear {
                precision,
                ..q.clone()
            }),
        }
    }

    /// Output width.
    /// How masked mode stores this op's integer weights: blocked for a quantized op with
    /// 8-bit activations (the default precision), two bytes a weight otherwise.
    pub fn ring_format(&self) -> RingFormat {
        match self {
            Linear::Quant(q) => RingFormat::for_precision(q.precision),
            Linear::Dense(_) | Linear::Masked(_) => RingFormat::Wide,
        }
    }

    pub fn d_out(&self) -> usize {
        match self {
            Linear::Dense(w) => w.dims()[1],
            Linear::Quant(q) => q.d_out,
            Linear::Masked(m) => m.d_out(),
        }
    }

    /// `x`: `[n, in]` → `[n, out]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Linear::Dense(w) => x.matmul(w.clone()),
            Linear::Quant(q) => {
                let [n, _] = x.dims();
                // A quantized map only ever lives on the CPU backend, whose tensors are
                // host memory: reading one back cannot fail.
                let host = x
                    .into_data()
                    .try_into_vec::<f32>()
                    .expect("a CPU tensor of f32 reads back");
                let mut out = vec![0.0; n * q.d_out];
                let parts: Vec<&QMatrix> = q.parts.iter().collect();
                matmul_fused(&parts, &host, n, &mut out, q.precision);
                Tensor::from_data(TensorData::new(out, [n, q.d_out]), &q.device)
            }
            Linear::Masked(m) => {
                let [n, _] = x.dims();
                let device = x.device();
                let host = tensor_to_vec(x).expect("a masked model's tensors read back");
                let out = m.forward(&host, n);
                Tensor::from_data(TensorData::new(out, [n, m.d_out()]), &device)
            }
        }
    }

    /// `W` as f32 rows (`[out, in]`, dequantized where it is quantized): what masked mode
    /// rounds to integers.
    pub fn rows_f32(&self) -> Result<Matrix, ModelError> {
        match self {
            Linear::Dense(w) => {
                let [d_in, d_out] = w.dims();
                let host = tensor_to_vec(w.clone())?;
                let mut rows = vec![0f32; d_in * d_out];
                for (i, row) in host.chunks_exact(d_out.max(1)).enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        rows[j * d_in + i] = v;
                    }
                }
                Ok(Matrix::new(d_out, d_in, rows))
            }
            Linear::Quant(q) => {
                let cols = q.parts.first().map_or(0, QMatrix::cols);
                let mut rows = Vec::with_capacity(q.d_out * cols);
                for p in q.parts.iter() {
                    rows.extend(p.dequantize());
                }
                Ok(Matrix::new(q.d_out, cols, rows))
            }
            Linear::Masked(_) => Err(ModelError::Shape(
                "a masked map keeps only its integers".into(),
            )),
        }
    }

    /// Bytes of weights this map holds (shared with the file for quantized ones).
    pub fn weight_bytes(&self) -> usize {
        match self {
            Linear::Dense(w) => w.dims().iter().product::<usize>() * 4,
            Linear::Quant(q) => q.parts.iter().map(QMatrix::byte_len).sum(),
            Linear::Masked(m) => m.weights().byte_len(),
        }
    }
}
