//! Veil's CPU kernels, below the model: GGML's tensor block formats (dequantization
//! bit-exact with ggml, quantization), and — on top of them — quantized matrix products.
//! Nothing here knows of burn, files or processes.
//!
//! Layout, as in ggml and candle's `quantized`: one file per block format under
//! [`mod@format`], each with a portable reference that the fast paths are tested against;
//! [`pack`] interleaves the rows of the common formats for the fastest kernels.

pub mod act;
pub mod cpu;
pub mod dot;
pub mod format;
pub mod glu;
pub mod matmul;
pub mod pack;
pub mod ring;

pub use cpu::Isa;
pub use format::{GgmlType, QuantizeError};
pub use matmul::{matmul_fused, on_workers, Bytes, MatrixError, Precision, QMatrix};
