//! Capacity ads: what a node offers, signed with its identity, re-published periodically and
//! expiring. Clients keep only ads whose signature, signer and freshness check out, and never
//! go back to an older ad of the same peer (a replay).

use std::collections::HashMap;

use bincode::{Decode, Encode};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::identity::{peer_id_of, verify_signature, Identity};
use crate::ProtocolError;

const DOMAIN: &[u8] = b"veil-capacity-ad-v1";
/// Clock skew tolerated for timestamps from the future.
pub const MAX_SKEW_MS: u64 = 30_000;
/// Largest encoded ad accepted.
pub const MAX_AD_BYTES: usize = 64 << 10;

/// What a node offers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Encode, Decode)]
pub struct CapacityAd {
    pub peer_id: String,
    /// Multiaddrs the node may be reached at: its listeners, its public addresses and,
    /// behind a NAT, its `/p2p-circuit` addresses through relays.
    pub addrs: Vec<String>,
    /// Whether peers can dial the node directly, as AutoNAT found.
    pub reachability: crate::reach::Reachability,
    /// `wgpu` or `cpu`.
    pub backend: String,
    pub adapter: String,
    /// Memory the node can still give to shards and KV caches.
    pub free_memory_bytes: u64,
    /// Disk the node can still give to uploaded shards (its quota less what it holds).
    pub free_disk_bytes: u64,
    /// Matrix-product throughput measured at start (GFLOP/s).
    pub throughput_gflops: f64,
    /// Content hashes (hex SHA-256) of the shards the node holds.
    pub shards: Vec<String>,
    pub active_sessions: u32,
    pub max_sessions: u32,
    /// Veil version of the node.
    pub version: String,
    /// Unix time of signing, milliseconds.
    pub timestamp_ms: u64,
    /// Seconds after `timestamp_ms` when the ad expires.
    pub ttl_s: u32,
}

/// An encoded ad with its signer's public key and signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Encode, Decode)]
pub struct SignedAd {
    pub ad: Vec<u8>,
    pub public_key: [u8; 32],
    pub signature: Vec<u8>,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_AD_BYTES>()
}

fn signed_message(ad: &[u8]) -> Vec<u8> {
    [DOMAIN, ad].concat()
}

impl SignedAd {
    pub fn sign(ad: &CapacityAd, id: &Identity) -> Result<Self, ProtocolError> {
        let bytes = bincode::encode_to_vec(ad, config())
            .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        Ok(SignedAd {
            signature: id.sign(&signed_message(&bytes)).to_vec(),
            public_key: id.public_key(),
            ad: bytes,
        })
    }

    /// Check the signature, that the signer is the peer the ad names, and freshness at
    /// `now_ms`. Returns the ad and its signer.
    pub fn verify(&self, now_ms: u64) -> Result<(PeerId, CapacityAd), ProtocolError> {
        let bad = |m: String| ProtocolError::BadAd(m);
        if !verify_signature(&self.public_key, &signed_message(&self.ad), &self.signature) {
            return Err(bad("the signature does not verify".into()));
        }
        let (ad, used): (CapacityAd, usize) = bincode::decode_from_slice(&self.ad, config())
            .map_err(|e| bad(format!("undecodable: {e}")))?;
        if used != self.ad.len() {
            return Err(bad("trailing bytes".into()));
        }
        let signer = peer_id_of(&self.public_key)?;
        if ad.peer_id != signer.to_string() {
            return Err(bad(format!(
                "signed by {signer} but claims to be {}",
                ad.peer_id
            )));
        }
        if ad.timestamp_ms > now_ms + MAX_SKEW_MS {
            return Err(bad(format!(
                "dated {} ms in the future",
                ad.timestamp_ms - now_ms
            )));
        }
        if now_ms > ad.timestamp_ms + u64::from(ad.ttl_s) * 1000 {
            return Err(bad(format!(
                "expired {} s ago",
                (now_ms - ad.timestamp_ms) / 1000 - u64::from(ad.ttl_s)
            )));
        }
        Ok((signer, ad))
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        bincode::encode_to_vec(self, config()).map_err(|e| ProtocolError::Malformed(e.to_string()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let (ad, _): (SignedAd, usize) = bincode::decode_from_slice(bytes, config())
            .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        Ok(ad)
    }
}

/// The latest verified ad of every peer.
#[derive(Debug, Default, Clone)]
pub struct AdBook {
    ads: HashMap<PeerId, (CapacityAd, SignedAd)>,
}

impl AdBook {
    /// Verify and keep `signed`; refuses forged, stale and replayed (not newer) ads.
    pub fn insert(&mut self, signed: SignedAd, now_ms: u64) -> Result<PeerId, ProtocolError> {
        let (peer, ad) = signed.verify(now_ms)?;
        if let Some((old, _)) = self.ads.get(&peer) {
            if ad.timestamp_ms <= old.timestamp_ms {
                return Err(ProtocolError::BadAd(format!(
                    "replayed: not newer than the ad already held for {peer}"
                )));
            }
        }
        self.ads.insert(peer, (ad, signed));
        Ok(peer)
    }

    /// Drop expired ads.
    pub fn prune(&mut self, now_ms: u64) {
        self.ads
            .retain(|_, (ad, _)| now_ms <= ad.timestamp_ms + u64::from(ad.ttl_s) * 1000);
    }

    /// Fresh ads, by peer id.
    pub fn ads(&self, now_ms: u64) -> Vec<(PeerId, CapacityAd)> {
        let mut out: Vec<_> = self
            .ads
            .iter()
            .filter(|(_, (ad, _))| now_ms <= ad.timestamp_ms + u64::from(ad.ttl_s) * 1000)
            .map(|(p, (ad, _))| (*p, ad.clone()))
            .collect();
        out.sort_by_key(|(p, _)| p.to_string());
        out
    }

    /// The signed forms, to pass on to others (who verify them again).
    pub fn signed(&self) -> Vec<SignedAd> {
        self.ads.values().map(|(_, s)| s.clone()).collect()
    }

    pub fn get(&self, peer: &PeerId) -> Option<&CapacityAd> {
        self.ads.get(peer).map(|(ad, _)| ad)
    }

    pub fn len(&self) -> usize {
        self.ads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ads.is_empty()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ad(id: &Identity, ts: u64) -> CapacityAd {
        CapacityAd {
            peer_id: id.peer_id().to_string(),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            reachability: Default::default(),
            backend: "cpu".into(),
            adapter: "flex".into(),
            free_memory_bytes: 1 << 30,
            free_disk_bytes: 1 << 30,
            throughput_gflops: 12.5,
            shards: vec!["ab".repeat(32)],
            active_sessions: 0,
            max_sessions: 16,
            version: "0.1.0".into(),
            timestamp_ms: ts,
            ttl_s: 60,
        }
    }

    #[test]
    fn a_signed_ad_verifies_and_round_trips() {
        let id = Identity::generate();
        let s = SignedAd::sign(&ad(&id, 1_000_000), &id).expect("sign");
        let back = SignedAd::from_bytes(&s.to_bytes().expect("bytes")).expect("decode");
        let (peer, got) = back.verify(1_000_500).expect("verify");
        assert_eq!(peer, id.peer_id());
        assert_eq!(got, ad(&id, 1_000_000));
    }

    #[test]
    fn forged_stale_and_replayed_ads_are_rejected() {
        let id = Identity::generate();
        let other = Identity::generate();
        let t = 10_000_000;
        // tampered content
        let mut s = SignedAd::sign(&ad(&id, t), &id).expect("sign");
        let n = s.ad.len();
        s.ad[n - 1] ^= 1;
        assert!(s.verify(t).is_err());
        // signed by one peer, claiming to be another
        let s = SignedAd::sign(&ad(&id, t), &other).expect("sign");
        let e = s.verify(t).expect_err("impersonation").to_string();
        assert!(e.contains("claims to be"), "{e}");
        // expired, and from the future
        let s = SignedAd::sign(&ad(&id, t), &id).expect("sign");
        assert!(s
            .verify(t + 61_000)
            .expect_err("stale")
            .to_string()
            .contains("expired"));
        assert!(s
            .verify(t - 60_000)
            .expect_err("future")
            .to_string()
            .contains("future"));
        // replay: the same or an older ad after a newer one
        let mut book = AdBook::default();
        book.insert(SignedAd::sign(&ad(&id, t + 5), &id).expect("sign"), t + 5)
            .expect("fresh");
        let e = book
            .insert(s.clone(), t + 5)
            .expect_err("older")
            .to_string();
        assert!(e.contains("replayed"), "{e}");
        let again = SignedAd::sign(&ad(&id, t + 5), &id).expect("sign");
        assert!(
            book.insert(again, t + 6).is_err(),
            "same timestamp is a replay"
        );
        assert_eq!(book.ads(t + 6).len(), 1);
        book.prune(t + 100_000);
        assert!(book.is_empty());
    }

    #[test]
    fn garbage_bytes_are_an_error() {
        assert!(SignedAd::from_bytes(&[0xff; 10]).is_err());
        assert!(SignedAd::from_bytes(&[]).is_err());
        let huge_len = [0xfc, 0xff, 0xff, 0xff, 0x7f];
        assert!(SignedAd::from_bytes(&huge_len).is_err());
    }
}
