//! The Veil client as a library: what the `veil` command does, for other tools (the
//! testnet harness) to drive in process.

pub mod attack;
pub mod bench;
pub mod chat;
pub mod deploy;
pub mod deployment;
pub mod encrypt;
pub mod fetch;
pub mod generate;
pub mod home;
pub mod model_spec;
pub mod net;
pub mod peers;
pub mod perplexity;
pub mod progress;
pub mod proof;
pub mod remote;
pub mod serve;
pub mod synth;
pub mod verify;
