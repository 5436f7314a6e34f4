//! Equivariant encryption of a Llama-family model (see `shared/design` and SECURITY.md):
//! keys, the weight transforms, shards and client bundles, and the encrypted pipeline.

mod client;
mod encrypt;
mod key;
mod key_io;
pub mod linalg;
mod pipeline;
mod shard;
mod transform;

pub use client::{ClientBundle, ClientCache, ClientLayers, ClientMeta, ClientModel, StageRecord};
pub use encrypt::{
    calibrates, client_path, encrypt_model, encrypt_model_quant, encrypt_model_split,
    encrypt_model_with, shard_path, Encrypted,
};
pub use key::{short_fingerprint, HeadKey, KeyOptions, KeyShape, LayerKey, ModelKey};
pub use key_io::KeyMeta;
pub use pipeline::EncryptedLocal;
pub use shard::{
    quantize_layer, quantize_layer_calibrated, Shard, ShardLayers, ShardMeta, ShardQuant,
};
pub use transform::{check_coverage, encrypt_layer, encrypt_layers, plan_stages};
