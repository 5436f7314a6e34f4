//! The Veil test network: local node processes, load and fault injection on them, the
//! measurements made there, and a simulation that projects them to larger networks.

pub mod bench;
pub mod calibrate;
pub mod chaos;
pub mod cleanup;
pub mod cluster;
pub mod gateway_bench;
pub mod integrity;
pub mod load;
pub mod network;
pub mod report;
pub mod sim;
pub mod soak;
pub mod stats;
pub mod up;
pub mod wan;
