//! The libp2p behaviour of a Veil peer: identify, Kademlia (server mode on nodes),
//! gossipsub for capacity ads and fraud-proof notices, request-response for inference,
//! shard upload, the ad directory and fraud proofs, ping, and reachability (AutoNAT on
//! nodes, the relay client everywhere, the relay server where configured, DCUtR).

use std::time::Duration;

use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    autonat, dcutr, gossipsub, identify, identity::Keypair, kad, ping, relay, request_response,
    StreamProtocol,
};

use crate::codec::BincodeCodec;
use crate::proof::{ProofRequest, ProofResponse, MAX_PROOF_BYTES};
use crate::reach::RelayLimits;
use crate::wire::{
    DirectoryRequest, DirectoryResponse, InferRequest, InferResponse, UploadRequest, UploadResponse,
};
use crate::{protocol_name, PROTOCOL_VERSION};

/// Gossipsub topic of capacity ads.
pub const ADS_TOPIC: &str = "veil/ads/1";

/// Size limits of each protocol, per direction.
pub mod limits {
    /// Inference: a prefill of up to 8192 positions of width 1024, f32.
    pub const INFER: usize = 36 << 20;
    /// Upload chunks carry at most [`UPLOAD_CHUNK`](super::UPLOAD_CHUNK) bytes.
    pub const UPLOAD_REQUEST: usize = super::UPLOAD_CHUNK + (64 << 10);
    pub const UPLOAD_RESPONSE: usize = 64 << 10;
    pub const DIRECTORY_REQUEST: usize = 1 << 10;
    pub const DIRECTORY_RESPONSE: usize = 8 << 20;
    /// Fraud proofs travel whole, one per message.
    pub const PROOF: usize = super::MAX_PROOF_BYTES + (64 << 10);
}

/// Bytes per shard-upload chunk.
pub const UPLOAD_CHUNK: usize = 4 << 20;

pub type InferCodec = BincodeCodec<InferRequest, InferResponse>;
pub type UploadCodec = BincodeCodec<UploadRequest, UploadResponse>;
pub type DirectoryCodec = BincodeCodec<DirectoryRequest, DirectoryResponse>;
pub type ProofCodec = BincodeCodec<ProofRequest, ProofResponse>;

#[derive(NetworkBehaviour)]
pub struct VeilBehaviour {
    pub identify: identify::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub gossipsub: gossipsub::Behaviour,
    pub infer: request_response::Behaviour<InferCodec>,
    pub upload: request_response::Behaviour<UploadCodec>,
    pub directory: request_response::Behaviour<DirectoryCodec>,
    pub proofs: request_response::Behaviour<ProofCodec>,
    pub ping: ping::Behaviour,
    /// Dialing and listening through relays.
    pub relay_client: relay::client::Behaviour,
    /// Relaying for others (`relay = true` on a node).
    pub relay: Toggle<relay::Behaviour>,
    pub dcutr: dcutr::Behaviour,
    /// Nodes probe their own reachability and probe others'; clients do neither.
    pub autonat: Toggle<autonat::Behaviour>,
}

/// What the reachability parts of a [`VeilBehaviour`] do.
#[derive(Debug, Clone, Default)]
pub struct ReachConfig {
    /// Run AutoNAT (nodes).
    pub autonat: bool,
    /// Relay for others, within these limits.
    pub relay: Option<RelayLimits>,
}

fn autonat_config() -> autonat::Config {
    autonat::Config {
        // a node at home should be serving within seconds, not minutes
        boot_delay: Duration::from_secs(2),
        retry_interval: Duration::from_secs(15),
        refresh_interval: Duration::from_secs(300),
        throttle_server_period: Duration::from_secs(5),
        timeout: Duration::from_secs(15),
        confidence_max: 2,
        // Veil's testnets and LANs use private addresses; a server dials back only the
        // address it observed the asking peer at, so it cannot be aimed elsewhere
        only_global_ips: false,
        ..autonat::Config::default()
    }
}

impl VeilBehaviour {
    /// `request_timeout` bounds every request (a stalled peer cannot hold one forever).
    pub fn new(
        key: &Keypair,
        relay_client: relay::client::Behaviour,
        request_timeout: Duration,
        reach: &ReachConfig,
    ) -> Result<Self, String> {
        let peer_id = key.public().to_peer_id();
        let rr = |name: &str| {
            (
                [(
                    StreamProtocol::try_from_owned(protocol_name(name))
                        .expect("valid protocol name"),
                    request_response::ProtocolSupport::Full,
                )],
                request_response::Config::default().with_request_timeout(request_timeout),
            )
        };
        let (p, c) = rr("infer");
        let infer = request_response::Behaviour::with_codec(
            InferCodec::new(limits::INFER, limits::INFER),
            p,
            c,
        );
        let (p, c) = rr("shard");
        let upload = request_response::Behaviour::with_codec(
            UploadCodec::new(limits::UPLOAD_REQUEST, limits::UPLOAD_RESPONSE),
            p,
            c,
        );
        let (p, c) = rr("directory");
        let directory = request_response::Behaviour::with_codec(
            DirectoryCodec::new(limits::DIRECTORY_REQUEST, limits::DIRECTORY_RESPONSE),
            p,
            c,
        );
        let (p, c) = rr("proof");
        let proofs = request_response::Behaviour::with_codec(
            ProofCodec::new(limits::PROOF, limits::PROOF),
            p,
            c,
        );
        let gossip_config = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(Duration::from_secs(1))
            .validation_mode(gossipsub::ValidationMode::Strict)
            .max_transmit_size(crate::ad::MAX_AD_BYTES * 2)
            .build()
            .map_err(|e| e.to_string())?;
        let gossipsub = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip_config,
        )?;
        let mut kad_config = kad::Config::new(
            StreamProtocol::try_from_owned(protocol_name("kad")).expect("valid protocol name"),
        );
        kad_config.set_query_timeout(Duration::from_secs(30));
        if !reach.autonat {
            // a client (the nodes run AutoNAT) neither serves the DHT nor asks it: learning
            // peers from it would make kad dial them at addresses it cannot reach (a node's
            // address inside its home network), and libp2p fails every request waiting for
            // a peer when any dial to it fails
            kad_config.set_kbucket_inserts(kad::BucketInserts::Manual);
            kad_config.set_periodic_bootstrap_interval(None);
        }
        let kad =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        Ok(VeilBehaviour {
            identify: identify::Behaviour::new(identify::Config::new(
                format!("/veil/{PROTOCOL_VERSION}"),
                key.public(),
            )),
            kad,
            gossipsub,
            infer,
            upload,
            directory,
            proofs,
            ping: ping::Behaviour::default(),
            relay_client,
            relay: Toggle::from(
                reach
                    .relay
                    .as_ref()
                    .map(|limits| relay::Behaviour::new(peer_id, limits.config())),
            ),
            dcutr: dcutr::Behaviour::new(peer_id),
            autonat: Toggle::from(
                reach
                    .autonat
                    .then(|| autonat::Behaviour::new(peer_id, autonat_config())),
            ),
        })
    }
}
