use crate::gguf::GgufError;

/// Errors of the model library. Every variant names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported architecture `{0}` (Veil runs {names})", names = crate::arch::Family::names())]
    UnsupportedArchitecture(String),
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{needed} tokens do not fit in the context of {capacity} tokens")]
    ContextOverflow { needed: usize, capacity: usize },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("backend: {0}")]
    Backend(String),
    #[error("invalid sampling parameters: {0}")]
    Sampling(String),
    #[error("key: {0}")]
    Key(String),
    #[error("shard: {0}")]
    Shard(String),
    #[error("file format: {0}")]
    Format(String),
    #[error("{0}")]
    Io(String),
}
