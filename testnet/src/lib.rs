//! The Veil test network: local node processes and the measurements made on them.

pub mod cluster;
