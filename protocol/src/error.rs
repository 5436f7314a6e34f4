/// Errors of the protocol library.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{0}")]
    Io(String),
    #[error("identity key: {0}")]
    Identity(String),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("capacity ad rejected: {0}")]
    BadAd(String),
    #[error("receipt rejected: {0}")]
    BadReceipt(String),
    #[error("network: {0}")]
    Network(String),
    #[error("request to {peer} failed: {reason}")]
    Request { peer: String, reason: String },
}
