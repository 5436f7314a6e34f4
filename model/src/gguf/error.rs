use std::path::PathBuf;

/// Everything that can be wrong with a GGUF file or with what a model asks of it.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file (magic bytes {found:?}, expected \"GGUF\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {0} (Veil reads versions 2 and 3)")]
    UnsupportedVersion(u32),
    #[error("GGUF file is truncated or corrupt: {0}")]
    Truncated(String),
    #[error("GGUF metadata key `{0}` is missing")]
    MissingKey(String),
    #[error("GGUF metadata key `{key}` has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("GGUF tensor `{0}` is missing")]
    MissingTensor(String),
    #[error(
        "GGUF tensor `{tensor}` has unsupported type {type_name} (supported: F32, F16, BF16, \
         Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)"
    )]
    UnsupportedTensorType { tensor: String, type_name: String },
    #[error(
        "GGUF tensor `{tensor}` has {elements} values, not a whole number of {type_name} \
         blocks of {block}"
    )]
    PartialBlock {
        tensor: String,
        type_name: String,
        elements: usize,
        block: usize,
    },
    #[error("GGUF tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
}
