//! The Llama-family decoder as burn modules.
//!
//! The modules are immutable once built; everything that changes while generating (the
//! KV cache) and the RoPE tables live in [`crate::cache`].

mod attention;
mod block;
mod embedding;
mod head;
mod head_norm;
mod linear;
mod llama;
mod mlp;
mod probe;
mod rms_norm;
mod stage;
mod tensor_io;

pub use attention::{Attention, AttentionConfig};
pub use block::{Block, BlockConfig};
pub use embedding::{TokenEmbedding, TokenEmbeddingConfig};
pub use head::{OutputHead, OutputHeadConfig};
pub use head_norm::HeadNorm;
pub use linear::{Linear, QuantLinear};
pub use llama::Llama;
pub use mlp::{Mlp, MlpConfig};
pub use probe::{NoProbe, Probe, Site};
pub use rms_norm::{RmsNorm, RmsNormConfig};
pub use stage::Stage;
pub use tensor_io::{matrix_to_tensor, tensor_to_vec, vector_to_tensor};
