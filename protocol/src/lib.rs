//! Veil's wire protocol: message types and their codec, the libp2p behaviour and network
//! event loop, identities and signed capacity ads. It knows nothing of processes, files of
//! models or command lines.

pub mod ad;
pub mod behaviour;
pub mod codec;
mod error;
pub mod identity;
pub mod network;
pub mod proof;
pub mod reach;
pub mod receipt;
pub mod wire;

pub use ad::{AdBook, CapacityAd, SignedAd};
pub use error::ProtocolError;
pub use identity::Identity;
pub use network::{Event, NetConfig, Network};
pub use proof::{FraudProof, ProofNotice};
pub use reach::{ReachStatus, Reachability, RelayLimits};
pub use receipt::{InputChain, Receipt, Statement};

/// Version of the Veil protocol family; part of every libp2p protocol name.
pub const PROTOCOL_VERSION: &str = "0.1.0";

/// The libp2p protocol name of a Veil sub-protocol, e.g. `/veil/0.1.0/infer`.
pub fn protocol_name(sub: &str) -> String {
    format!("/veil/{PROTOCOL_VERSION}/{sub}")
}

pub use libp2p::{Multiaddr, PeerId};

#[cfg(test)]
mod tests {
    #[test]
    fn protocol_names_carry_the_version() {
        assert_eq!(super::protocol_name("infer"), "/veil/0.1.0/infer");
    }
}
