//! Veil's wire protocol: message types, libp2p behaviour and signed records.
//!
//! This crate is the home of everything that crosses the network. It knows nothing of
//! processes or command lines.

/// Version of the Veil protocol family; part of every libp2p protocol name.
pub const PROTOCOL_VERSION: &str = "0.1.0";

/// The libp2p protocol name of a Veil sub-protocol, e.g. `/veil/0.1.0/infer`.
pub fn protocol_name(sub: &str) -> String {
    format!("/veil/{PROTOCOL_VERSION}/{sub}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn protocol_names_carry_the_version() {
        assert_eq!(super::protocol_name("infer"), "/veil/0.1.0/infer");
    }
}
