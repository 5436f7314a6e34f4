//! Veil's model library: a Llama-family decoder in burn, GGUF loading, tokenizer, chat
//! templates and sampling. It knows nothing of processes, networks or command lines.

pub mod arch;
pub mod attack;
pub mod bundle;
pub mod cache;
pub mod calibrate;
pub mod chat;
pub mod config;
pub mod container;
pub mod crypto;
pub mod device;
mod error;
pub mod generate;
pub mod gguf;
pub mod integrity;
pub mod masked;
pub mod matrix;
pub mod nn;
pub mod perplexity;
pub mod qweights;
pub mod runner;
pub mod sampling;
pub mod source;
pub mod stage_runner;
pub mod synth;
pub mod text;
pub mod tiny;
pub mod tokenizer;
pub mod weights;

pub use arch::{Activation, AttnExtras, Family, PostNorms};
pub use bundle::{ModelBundle, QuantBundle};
pub use config::LlamaConfig;
pub use device::{BackendKind, Compute};
pub use error::ModelError;
pub use generate::{generate, GenerateParams, Generation, StopReason, TokenModel};
pub use matrix::Matrix;
pub use qweights::{QuantLayer, QuantWeights};
pub use runner::LocalModel;
pub use sampling::{SamplingParams, TokenLogit};
pub use source::{PlainModel, PlainWeights};
pub use stage_runner::StageRunner;
pub use text::{TextCodec, TextSpec};
pub use veil_kernels::Precision;
pub use weights::{LayerWeights, LlamaWeights};
