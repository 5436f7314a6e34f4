//! A node's or client's identity: one ed25519 secret from which both the record-signing key
//! (ed25519-dalek) and the libp2p keypair (and so the peer id) are derived.

use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use libp2p::identity::Keypair;
use libp2p::PeerId;

use crate::ProtocolError;

const HEADER: &str = "veil-ed25519-secret-v1";

/// An ed25519 identity.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
}

impl std::fmt::Debug for Identity {
    /// Prints the peer id, never the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.peer_id())
    }
}

impl Identity {
    /// A fresh identity from the OS's random source.
    pub fn generate() -> Self {
        Identity {
            signing: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    pub fn from_secret(secret: [u8; 32]) -> Self {
        Identity {
            signing: SigningKey::from_bytes(&secret),
        }
    }

    /// The libp2p keypair for the same secret.
    pub fn keypair(&self) -> Keypair {
        let mut secret = self.signing.to_bytes();
        // `ed25519_from_bytes` only fails on a wrong length, and ours is always 32.
        Keypair::ed25519_from_bytes(&mut secret).expect("32-byte ed25519 secret")
    }

    pub fn peer_id(&self) -> PeerId {
        self.keypair().public().to_peer_id()
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// Write the secret to `path` with owner-only permissions; refuses to overwrite.
    pub fn save(&self, path: &Path) -> Result<(), ProtocolError> {
        use std::io::Write;
        let io = |e: std::io::Error| ProtocolError::Io(format!("{}: {e}", path.display()));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(io)?;
        writeln!(f, "{HEADER}\n{}", hex::encode(self.signing.to_bytes())).map_err(io)?;
        f.sync_all().map_err(io)
    }

    pub fn load(path: &Path) -> Result<Self, ProtocolError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ProtocolError::Identity(format!("{}: {e}", path.display())))?;
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(ProtocolError::Identity(format!(
                "{} is not a Veil identity key",
                path.display()
            )));
        }
        let secret: [u8; 32] = lines
            .next()
            .and_then(|l| hex::decode(l.trim()).ok())
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                ProtocolError::Identity(format!("{} holds a malformed key", path.display()))
            })?;
        Ok(Self::from_secret(secret))
    }
}

/// The peer id that an ed25519 public key stands for.
pub fn peer_id_of(public_key: &[u8; 32]) -> Result<PeerId, ProtocolError> {
    let pk = libp2p::identity::ed25519::PublicKey::try_from_bytes(public_key)
        .map_err(|e| ProtocolError::BadAd(format!("bad public key: {e}")))?;
    Ok(libp2p::identity::PublicKey::from(pk).to_peer_id())
}

/// Check an ed25519 signature.
pub fn verify_signature(public_key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public_key) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(signature) else {
        return false;
    };
    key.verify(message, &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libp2p_and_dalek_keys_agree() {
        let id = Identity::generate();
        let from_public = peer_id_of(&id.public_key()).expect("peer id");
        assert_eq!(from_public, id.peer_id());
        let sig = id.sign(b"hello");
        assert!(verify_signature(&id.public_key(), b"hello", &sig));
        assert!(!verify_signature(&id.public_key(), b"hellO", &sig));
        // libp2p's own signature with the same secret verifies with dalek
        let sig2 = id.keypair().sign(b"hello").expect("sign");
        assert!(verify_signature(&id.public_key(), b"hello", &sig2));
    }

    #[test]
    fn save_and_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        let id = Identity::generate();
        id.save(&path).expect("save");
        assert!(id.save(&path).is_err(), "never overwrites a key");
        assert_eq!(Identity::load(&path).expect("load").peer_id(), id.peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "garbage").expect("write");
        assert!(Identity::load(&path).is_err());
        assert!(!format!("{id:?}").contains(&hex::encode(id.signing.to_bytes())));
    }
}
