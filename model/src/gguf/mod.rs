//! GGUF v3 files: metadata by key, tensor directory, and dequantisation to f32.
//!
//! The format is read without memory-mapping: the whole file is loaded once and every
//! offset is bounds-checked, so a truncated or corrupt file is an error, never a panic.

mod error;
mod reader;
mod value;
mod writer;

pub use error::GgufError;
pub use reader::{GgufFile, TensorInfo};
pub use value::MetaValue;
pub use veil_kernels::GgmlType;
pub use writer::{GgufStream, GgufWriter, TensorSpec};

#[cfg(test)]
mod tests;
