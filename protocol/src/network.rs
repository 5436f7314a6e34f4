//! The network layer, after rust-libp2p's file-sharing example: a cloneable [`Network`]
//! handle sends commands over a bounded channel to an [`EventLoop`] that owns the swarm;
//! replies come back on oneshot channels, and what peers ask of us arrives as [`Event`]s on
//! another bounded channel.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::metrics::{Metrics, Recorder, Registry};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{gossipsub, identify, kad, noise, tcp, yamux, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};

use crate::ad::SignedAd;
use crate::behaviour::{ReachConfig, VeilBehaviour, VeilBehaviourEvent, ADS_TOPIC};
use crate::identity::Identity;
use crate::proof::{ProofNotice, ProofRequest, ProofResponse, PROOFS_TOPIC};
use crate::reach::{Reach, ReachStatus, RelayLimits};
use crate::wire::{
    DirectoryRequest, DirectoryResponse, InferRequest, InferResponse, UploadRequest, UploadResponse,
};
use crate::ProtocolError;

/// How a peer takes part in the network.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Nodes serve the DHT (Kademlia server mode); clients only query it.
    pub serve: bool,
    /// Every request fails after this long without a response.
    pub request_timeout: Duration,
    /// Connections without traffic close after this long (sessions idle between tokens).
    pub idle_timeout: Duration,
    /// Probe this peer's reachability with AutoNAT, and when it is private, reserve on
    /// relays (nodes; a client only dials).
    pub reachable: bool,
    /// Relay for others within these limits.
    pub relay: Option<RelayLimits>,
    /// Addresses the operator says this peer is reachable at (a forwarded port), used
    /// without AutoNAT's confirmation.
    pub external_addrs: Vec<Multiaddr>,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            serve: false,
            request_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(600),
            reachable: false,
            relay: None,
            external_addrs: Vec::new(),
        }
    }
}

/// What the network asks of the application.
#[derive(Debug)]
pub enum Event {
    InboundInfer {
        peer: PeerId,
        request: InferRequest,
        channel: ResponseChannel<InferResponse>,
    },
    InboundUpload {
        peer: PeerId,
        request: UploadRequest,
        channel: ResponseChannel<UploadResponse>,
    },
    InboundDirectory {
        peer: PeerId,
        channel: ResponseChannel<DirectoryResponse>,
    },
    InboundProof {
        peer: PeerId,
        request: ProofRequest,
        channel: ResponseChannel<ProofResponse>,
    },
    /// A capacity ad arrived by gossip (not yet verified).
    Ad {
        ad: SignedAd,
    },
    /// A fraud-proof notice arrived by gossip from `source` (the message's signed author).
    ProofNotice {
        notice: ProofNotice,
        source: Option<PeerId>,
    },
    PeerConnected(PeerId),
    PeerDisconnected(PeerId),
}

impl Event {
    /// What kind of event this is, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::InboundInfer { .. } => "an inference request",
            Event::InboundUpload { .. } => "an upload request",
            Event::InboundDirectory { .. } => "a directory request",
            Event::InboundProof { .. } => "a proof request",
            Event::Ad { .. } => "an ad",
            Event::ProofNotice { .. } => "a proof notice",
            Event::PeerConnected(_) => "a peer connection",
            Event::PeerDisconnected(_) => "a peer disconnection",
        }
    }
}

/// Events the application may leave unread before new ones are dropped.
pub const EVENT_QUEUE: usize = 256;

/// Addresses kept per peer from the application (see `EventLoop::given_addrs`).
const MAX_GIVEN_ADDRS: usize = 8;

type Reply<T> = oneshot::Sender<Result<T, ProtocolError>>;

enum Command {
    Listen(Multiaddr, Reply<()>),
    Dial(Multiaddr, Reply<PeerId>),
    AddAddress(PeerId, Multiaddr),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    Publish(&'static str, Vec<u8>, Reply<()>),
    Infer(PeerId, InferRequest, Reply<InferResponse>),
    Upload(PeerId, UploadRequest, Reply<UploadResponse>),
    Directory(PeerId, Reply<DirectoryResponse>),
    Proof(PeerId, ProofRequest, Reply<ProofResponse>),
    RespondInfer(ResponseChannel<InferResponse>, InferResponse),
    RespondUpload(ResponseChannel<UploadResponse>, UploadResponse),
    RespondDirectory(ResponseChannel<DirectoryResponse>, DirectoryResponse),
    RespondProof(ResponseChannel<ProofResponse>, ProofResponse),
    Disconnect(PeerId),
    Reach(oneshot::Sender<ReachStatus>),
}

impl Command {
    /// The peer a request goes to (requests wait while a relayed connection to it closes).
    fn request_peer(&self) -> Option<PeerId> {
        match self {
            Command::Infer(p, ..)
            | Command::Upload(p, ..)
            | Command::Directory(p, ..)
            | Command::Proof(p, ..) => Some(*p),
            _ => None,
        }
    }
}

/// A cloneable handle on the network.
#[derive(Clone)]
pub struct Network {
    commands: mpsc::Sender<Command>,
    pub local_peer_id: PeerId,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Network({})", self.local_peer_id)
    }
}

fn closed() -> ProtocolError {
    ProtocolError::Network("the network event loop has stopped".into())
}

impl Network {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ProtocolError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// A question the event loop answers from its own state (no peer involved).
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ProtocolError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| closed())
    }

    async fn send(&self, command: Command) -> Result<(), ProtocolError> {
        self.commands.send(command).await.map_err(|_| closed())
    }

    pub async fn listen(&self, addr: Multiaddr) -> Result<(), ProtocolError> {
        self.call(|r| Command::Listen(addr, r)).await
    }

    /// Dial an address (with or without `/p2p/<id>`) and wait for the connection; returns
    /// the peer's id.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, ProtocolError> {
        self.call(|r| Command::Dial(addr, r)).await
    }

    /// Remember an address of a peer, for requests that dial it.
    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) -> Result<(), ProtocolError> {
        self.send(Command::AddAddress(peer, addr)).await
    }

    /// Where others may reach this peer: its listeners (relayed ones included) and the
    /// external addresses confirmed by AutoNAT or declared by the operator.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, ProtocolError> {
        self.ask(Command::ListenAddrs).await
    }

    /// Reachability: AutoNAT's verdict, relays, hole punches, relayed connections.
    pub async fn reach(&self) -> Result<ReachStatus, ProtocolError> {
        self.ask(Command::Reach).await
    }

    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, ProtocolError> {
        self.ask(Command::ConnectedPeers).await
    }

    /// Gossip a signed capacity ad.
    pub async fn publish_ad(&self, ad: &SignedAd) -> Result<(), ProtocolError> {
        let bytes = ad.to_bytes()?;
        self.call(|r| Command::Publish(ADS_TOPIC, bytes, r)).await
    }

    /// Gossip a fraud-proof notice (from the node that holds the proof).
    pub async fn publish_proof_notice(&self, notice: &ProofNotice) -> Result<(), ProtocolError> {
        let bytes = crate::codec::encode(notice)?;
        self.call(|r| Command::Publish(PROOFS_TOPIC, bytes, r))
            .await
    }

    /// A request of the proof protocol.
    pub async fn proof(
        &self,
        peer: PeerId,
        request: ProofRequest,
    ) -> Result<ProofResponse, ProtocolError> {
        self.call(|r| Command::Proof(peer, request, r)).await
    }

    pub async fn respond_proof(
        &self,
        channel: ResponseChannel<ProofResponse>,
        response: ProofResponse,
    ) -> Result<(), ProtocolError> {
        self.send(Command::RespondProof(channel, response)).await
    }

    pub async fn infer(
        &self,
        peer: PeerId,
        request: InferRequest,
    ) -> Result<InferResponse, ProtocolError> {
        redial(|| self.call(|r| Command::Infer(peer, request.clone(), r))).await
    }

    pub async fn upload(
        &self,
        peer: PeerId,
        request: UploadRequest,
    ) -> Result<UploadResponse, ProtocolError> {
        redial(|| self.call(|r| Command::Upload(peer, request.clone(), r))).await
    }

    /// The capacity ads a peer knows (each still to be verified).
    pub async fn directory(&self, peer: PeerId) -> Result<Vec<SignedAd>, ProtocolError> {
        let DirectoryResponse::Ads(ads) =
            redial(|| self.call(|r| Command::Directory(peer, r))).await?;
        Ok(ads)
    }

    pub async fn respond_infer(
        &self,
        channel: ResponseChannel<InferResponse>,
        response: InferResponse,
    ) -> Result<(), ProtocolError> {
        self.send(Command::RespondInfer(channel, response)).await
    }

    pub async fn respond_upload(
        &self,
        channel: ResponseChannel<UploadResponse>,
        response: UploadResponse,
    ) -> Result<(), ProtocolError> {
        self.send(Command::RespondUpload(channel, response)).await
    }

    pub async fn respond_directory(
        &self,
        channel: ResponseChannel<DirectoryResponse>,
        ads: Vec<SignedAd>,
    ) -> Result<(), ProtocolError> {
        self.send(Command::RespondDirectory(
            channel,
            DirectoryResponse::Ads(ads),
        ))
        .await
    }

    /// Close every connection to a peer (a misbehaving one).
    pub async fn disconnect(&self, peer: PeerId) -> Result<(), ProtocolError> {
        self.send(Command::Disconnect(peer)).await
    }
}

/// Owns the swarm; run it with [`EventLoop::run`].
pub struct EventLoop {
    swarm: Swarm<VeilBehaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    pending_dial: HashMap<ConnectionId, Reply<PeerId>>,
    pending_infer: HashMap<OutboundRequestId, Reply<InferResponse>>,
    pending_upload: HashMap<OutboundRequestId, Reply<UploadResponse>>,
    pending_directory: HashMap<OutboundRequestId, Reply<DirectoryResponse>>,
    pending_proof: HashMap<OutboundRequestId, Reply<ProofResponse>>,
    serve: bool,
    reach: Reach,
    /// Requests waiting for a relayed connection to their peer to close.
    held: HashMap<PeerId, Vec<Command>>,
    /// Addresses the application gave for a peer (from its signed ad or a deployment
    /// record), passed with every request to it: libp2p forgets an address after one failed
    /// dial (a relay refusing a circuit for a moment), and the peer would then be tried at
    /// its other addresses only, for good.
    given_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// libp2p's own metrics (connections, kad, gossipsub, identify, ping), when asked for.
    metrics: Option<Metrics>,
}

/// Build the swarm (TCP with noise and yamux, and QUIC) and the handle.
pub fn new(
    identity: &Identity,
    config: &NetConfig,
) -> Result<(Network, mpsc::Receiver<Event>, EventLoop), ProtocolError> {
    new_with_metrics(identity, config, None)
}

/// [`new`], recording libp2p's own metrics (swarm connections, Kademlia, gossipsub, identify,
/// ping) into `registry` under the `libp2p` prefix when one is given.
pub fn new_with_metrics(
    identity: &Identity,
    config: &NetConfig,
    registry: Option<&mut Registry>,
) -> Result<(Network, mpsc::Receiver<Event>, EventLoop), ProtocolError> {
    let net = |e: String| ProtocolError::Network(e);
    let request_timeout = config.request_timeout;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity.keypair())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| net(e.to_string()))?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| net(e.to_string()))?
        .with_behaviour(|key, relay_client| {
            let reach = ReachConfig {
                autonat: config.reachable,
                relay: config.relay.clone(),
            };
            VeilBehaviour::new(key, relay_client, request_timeout, &reach)
                .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        })
        .map_err(|e| net(e.to_string()))?
        .with_swarm_config(|c| {
            // Every request opens a stream whose protocol is negotiated first; lazily, the
            // request follows the proposal at once instead of a round trip later (Veil's
            // peers all speak the same protocols). On a wide-area link that round trip was
            // half the time of each stage's step.
            c.with_idle_connection_timeout(config.idle_timeout)
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    swarm.behaviour_mut().kad.set_mode(Some(if config.serve {
        kad::Mode::Server
    } else {
        kad::Mode::Client
    }));
    for addr in &config.external_addrs {
        swarm.add_external_address(addr.clone());
    }
    for topic in [ADS_TOPIC, PROOFS_TOPIC] {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&gossipsub::IdentTopic::new(topic))
            .map_err(|e| net(e.to_string()))?;
    }
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
    let handle = Network {
        commands: cmd_tx,
        local_peer_id: *swarm.local_peer_id(),
    };
    let event_loop = EventLoop {
        swarm,
        commands: cmd_rx,
        events: ev_tx,
        pending_dial: HashMap::new(),
        pending_infer: HashMap::new(),
        pending_upload: HashMap::new(),
        pending_directory: HashMap::new(),
        pending_proof: HashMap::new(),
        serve: config.serve,
        reach: Reach::new(config.reachable),
        held: HashMap::new(),
        given_addrs: HashMap::new(),
        metrics: registry.map(Metrics::new),
    };
    Ok((handle, ev_rx, event_loop))
}

/// Times a request that failed only for want of a connection is sent again.
const REDIALS: u32 = 2;

/// Run `send` again (up to [`REDIALS`] times, 250 ms apart and more) while it fails only
/// because no connection to the peer could be made. libp2p fails every request waiting
/// for a peer when any dial to it fails: a hole punch to an address behind a NAT, say,
/// while the dial through a relay that would have carried the request is still under way.
async fn redial<T, F>(mut send: impl FnMut() -> F) -> Result<T, ProtocolError>
where
    F: std::future::Future<Output = Result<T, ProtocolError>>,
{
    let dial_failed = request_response::OutboundFailure::DialFailure.to_string();
    let mut tries = 0;
    loop {
        match send().await {
            Err(ProtocolError::Request { reason, .. })
                if reason == dial_failed && tries < REDIALS =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(250 * u64::from(tries))).await;
            }
            r => return r,
        }
    }
}

fn request_error(peer: &PeerId, e: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::Request {
        peer: peer.to_string(),
        reason: e.to_string(),
    }
}

impl EventLoop {
    /// Run until every [`Network`] handle is dropped.
    pub async fn run(mut self) {
        let mut bootstrap = tokio::time::interval(Duration::from_secs(30));
        let mut reach = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event).await,
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => return,
                },
                _ = reach.tick() => self.reach.tick(&mut self.swarm),
                _ = bootstrap.tick() => {
                    if self.serve {
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                }
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        if let Some(peer) = command.request_peer() {
            if self.reach.hold(&peer) {
                self.held.entry(peer).or_default().push(command);
                return;
            }
            self.reach.request_sent(peer);
        }
        let swarm = &mut self.swarm;
        match command {
            Command::Listen(addr, reply) => {
                let r = swarm.listen_on(addr.clone()).map(|_| ()).map_err(|e| {
                    ProtocolError::Network(format!("cannot listen on {addr}: {}", chain(&e)))
                });
                let _ = reply.send(r);
            }
            Command::Dial(addr, reply) => {
                let opts = match addr.iter().last() {
                    Some(Protocol::P2p(peer)) => DialOpts::peer_id(peer)
                        .addresses(vec![addr.clone()])
                        .build(),
                    _ => DialOpts::unknown_peer_id().address(addr.clone()).build(),
                };
                let id = opts.connection_id();
                match swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dial.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ProtocolError::Network(format!(
                            "cannot dial {addr}: {e}"
                        ))));
                    }
                }
            }
            Command::AddAddress(peer, addr) => {
                let given = self.given_addrs.entry(peer).or_default();
                if !given.contains(&addr) {
                    // the newest first, a few per peer
                    given.insert(0, addr.clone());
                    given.truncate(MAX_GIVEN_ADDRS);
                }
                swarm.add_peer_address(peer, addr.clone());
                if self.serve {
                    swarm.behaviour_mut().kad.add_address(&peer, addr);
                }
            }
            Command::ListenAddrs(reply) => {
                let mut addrs: Vec<Multiaddr> = swarm.listeners().cloned().collect();
                for a in swarm.external_addresses() {
                    if !addrs.contains(a) {
                        addrs.push(a.clone());
                    }
                }
                let _ = reply.send(addrs);
            }
            Command::Reach(reply) => {
                let _ = reply.send(self.reach.status(swarm));
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(swarm.connected_peers().copied().collect());
            }
            Command::Publish(topic, bytes, reply) => {
                let r = match swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(gossipsub::IdentTopic::new(topic), bytes)
                {
                    Ok(_) | Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => Ok(()),
                    Err(e) => Err(ProtocolError::Network(format!(
                        "cannot publish on {topic}: {e}"
                    ))),
                };
                let _ = reply.send(r);
            }
            Command::Infer(peer, req, reply) => {
                let addrs = self.given_addrs.get(&peer).cloned().unwrap_or_default();
                let id = swarm
                    .behaviour_mut()
                    .infer
                    .send_request_with_addresses(&peer, req, addrs);
                self.pending_infer.insert(id, reply);
            }
            Command::Upload(peer, req, reply) => {
                let addrs = self.given_addrs.get(&peer).cloned().unwrap_or_default();
                let id = swarm
                    .behaviour_mut()
                    .upload
                    .send_request_with_addresses(&peer, req, addrs);
                self.pending_upload.insert(id, reply);
            }
            Command::Directory(peer, reply) => {
                let addrs = self.given_addrs.get(&peer).cloned().unwrap_or_default();
                let id = swarm.behaviour_mut().directory.send_request_with_addresses(
                    &peer,
                    DirectoryRequest::Ads,
                    addrs,
                );
                self.pending_directory.insert(id, reply);
            }
            Command::Proof(peer, req, reply) => {
                let addrs = self.given_addrs.get(&peer).cloned().unwrap_or_default();
                let id = swarm
                    .behaviour_mut()
                    .proofs
                    .send_request_with_addresses(&peer, req, addrs);
                self.pending_proof.insert(id, reply);
            }
            Command::RespondProof(ch, resp) => {
                let _ = swarm.behaviour_mut().proofs.send_response(ch, resp);
            }
            Command::RespondInfer(ch, resp) => {
                let _ = swarm.behaviour_mut().infer.send_response(ch, resp);
            }
            Command::RespondUpload(ch, resp) => {
                let _ = swarm.behaviour_mut().upload.send_response(ch, resp);
            }
            Command::RespondDirectory(ch, resp) => {
                let _ = swarm.behaviour_mut().directory.send_response(ch, resp);
            }
            Command::Disconnect(peer) => {
                let _ = swarm.disconnect_peer_id(peer);
            }
        }
    }

    /// Hand `event` to the application without waiting: the swarm must keep running (and
    /// this process's own requests keep being answered) while the application is busy, e.g.
    /// encrypting a model for minutes while ads keep arriving by gossip. When the application
    /// has [`EVENT_QUEUE`] events unread, new ones are dropped: ads and peer notices come
    /// again, and a dropped inbound request's peer gets an error instead of an answer.
    fn emit(&mut self, event: Event) {
        match self.events.try_send(event) {
            Ok(()) => {}
            // The application went away: nothing left to deliver to.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                tracing::debug!(
                    "the application has {EVENT_QUEUE} events unread; dropping {}",
                    event.kind()
                );
            }
        }
    }

    async fn on_swarm_event(&mut self, event: SwarmEvent<VeilBehaviourEvent>) {
        if let Some(m) = &self.metrics {
            m.record(&event);
            if let SwarmEvent::Behaviour(e) = &event {
                match e {
                    VeilBehaviourEvent::Identify(e) => m.record(e),
                    VeilBehaviourEvent::Kad(e) => m.record(e),
                    VeilBehaviourEvent::Gossipsub(e) => m.record(e),
                    VeilBehaviourEvent::Ping(e) => m.record(e),
                    VeilBehaviourEvent::Relay(e) => m.record(e),
                    VeilBehaviourEvent::Dcutr(e) => m.record(e),
                    _ => {}
                }
            }
        }
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("listening on {address}/p2p/{}", self.swarm.local_peer_id());
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                if let Some(reply) = self.pending_dial.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    self.swarm.add_peer_address(peer_id, address.clone());
                }
                self.reach
                    .connected(connection_id, peer_id, &endpoint, &mut self.swarm);
                tracing::debug!("connected to {peer_id}");
                self.emit(Event::PeerConnected(peer_id));
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                if let Some(reply) = self.pending_dial.remove(&connection_id) {
                    let _ =
                        reply.send(Err(ProtocolError::Network(format!("dial failed: {error}"))));
                }
                tracing::debug!("dial to {peer_id:?} failed: {error}");
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                if let Some(peer) = self.reach.closed(connection_id) {
                    for command in self.held.remove(&peer).unwrap_or_default() {
                        self.on_command(command);
                    }
                }
                if num_established == 0 {
                    tracing::debug!("disconnected from {peer_id}");
                    self.emit(Event::PeerDisconnected(peer_id));
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => self.reach.listener_closed(listener_id, &reason),
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event).await,
            _ => {}
        }
    }

    async fn on_behaviour_event(&mut self, event: VeilBehaviourEvent) {
        match event {
            VeilBehaviourEvent::Identify(
                identify::Event::Received { peer_id, info, .. }
                | identify::Event::Pushed { peer_id, info, .. },
            ) => {
                self.reach
                    .identified(peer_id, &info.protocols, &mut self.swarm);
                // only peers serving the DHT enter its routing table (not clients)
                let kad = crate::protocol_name("kad");
                let dht = info.protocols.iter().any(|p| p.as_ref() == kad);
                for addr in info.listen_addrs {
                    // a relayed address only through the relay it names (the relay client
                    // dials it); identify's list is the peer's own claim
                    if is_dialable(&addr) {
                        self.swarm.add_peer_address(peer_id, addr.clone());
                        if self.serve && dht {
                            self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                        }
                    }
                }
            }
            VeilBehaviourEvent::Gossipsub(gossipsub::Event::Message { message, .. }) => {
                if message.topic == gossipsub::IdentTopic::new(PROOFS_TOPIC).hash() {
                    match crate::codec::decode::<ProofNotice>(&message.data, 4096) {
                        Ok(notice) => self.emit(Event::ProofNotice {
                            notice,
                            source: message.source,
                        }),
                        Err(e) => {
                            tracing::debug!(
                                "undecodable proof notice from {:?}: {e}",
                                message.source
                            )
                        }
                    }
                    return;
                }
                match SignedAd::from_bytes(&message.data) {
                    Ok(ad) => self.emit(Event::Ad { ad }),
                    Err(e) => tracing::debug!("undecodable ad from {:?}: {e}", message.source),
                }
            }
            VeilBehaviourEvent::Infer(e) => {
                let inbound = |peer, request, channel| Event::InboundInfer {
                    peer,
                    request,
                    channel,
                };
                let e = on_exchange(e, &mut self.pending_infer, inbound, ("inference", true));
                self.after_exchange(e);
            }
            VeilBehaviourEvent::Upload(e) => {
                let inbound = |peer, request, channel| Event::InboundUpload {
                    peer,
                    request,
                    channel,
                };
                let e = on_exchange(e, &mut self.pending_upload, inbound, ("upload", true));
                self.after_exchange(e);
            }
            VeilBehaviourEvent::Directory(e) => {
                let inbound = |peer, _, channel| Event::InboundDirectory { peer, channel };
                let e = on_exchange(
                    e,
                    &mut self.pending_directory,
                    inbound,
                    ("directory", false),
                );
                self.after_exchange(e);
            }
            VeilBehaviourEvent::Proofs(e) => {
                let inbound = |peer, request, channel| Event::InboundProof {
                    peer,
                    request,
                    channel,
                };
                let e = on_exchange(e, &mut self.pending_proof, inbound, ("proof", false));
                self.after_exchange(e);
            }
            VeilBehaviourEvent::Autonat(e) => self.reach.autonat(e, &mut self.swarm),
            VeilBehaviourEvent::RelayClient(e) => self.reach.relay_client(e),
            VeilBehaviourEvent::Relay(e) => self.reach.relay_server(&e),
            VeilBehaviourEvent::Dcutr(e) => self.reach.dcutr(e),
            _ => {}
        }
    }

    fn after_exchange(&mut self, (event, done): (Option<Event>, Option<PeerId>)) {
        if let Some(peer) = done {
            self.reach.request_done(peer, &mut self.swarm);
        }
        if let Some(e) = event {
            self.emit(e);
        }
    }
}

/// One event of a request-response protocol: a response or failure completes our pending
/// request (and gives its peer back); a request from a peer becomes the application's
/// event (`inbound`).
fn on_exchange<Req, Resp>(
    event: request_response::Event<Req, Resp>,
    pending: &mut HashMap<OutboundRequestId, Reply<Resp>>,
    inbound: impl FnOnce(PeerId, Req, ResponseChannel<Resp>) -> Event,
    (protocol, warn): (&str, bool),
) -> (Option<Event>, Option<PeerId>) {
    match event {
        request_response::Event::Message { peer, message, .. } => match message {
            request_response::Message::Request {
                request, channel, ..
            } => return (Some(inbound(peer, request, channel)), None),
            request_response::Message::Response {
                request_id,
                response,
            } => {
                if let Some(r) = pending.remove(&request_id) {
                    let _ = r.send(Ok(response));
                    return (None, Some(peer));
                }
            }
        },
        request_response::Event::OutboundFailure {
            peer,
            request_id,
            error,
            ..
        } => {
            if let Some(r) = pending.remove(&request_id) {
                let _ = r.send(Err(request_error(&peer, error)));
                return (None, Some(peer));
            }
        }
        // what an operator should see (a peer sending garbage) is a warning
        request_response::Event::InboundFailure { peer, error, .. } if warn => {
            tracing::warn!("bad {protocol} request from {peer}: {error}");
        }
        request_response::Event::InboundFailure { peer, error, .. } => {
            tracing::debug!("bad {protocol} request from {peer}: {error}");
        }
        request_response::Event::ResponseSent { .. } => {}
    }
    (None, None)
}

/// Whether an address is worth dialing (not an unspecified listen address).
fn is_dialable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// An error and its sources, joined (libp2p's transport errors keep the cause in `source`).
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.retain(|p| !p.is_empty());
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An application busy for minutes (encrypting a model while ads keep arriving) must
    /// not stall the swarm: handing it events never waits, and its own calls are answered.
    #[tokio::test]
    async fn a_full_event_queue_drops_events_instead_of_stalling_the_swarm() {
        let (network, mut events, mut event_loop) =
            new(&Identity::generate(), &NetConfig::default()).expect("network");
        let peer = PeerId::random();
        for _ in 0..EVENT_QUEUE + 100 {
            event_loop.emit(Event::PeerConnected(peer));
        }
        tokio::spawn(event_loop.run());
        let peers = tokio::time::timeout(Duration::from_secs(10), network.connected_peers())
            .await
            .expect("the event loop answers with its event queue full")
            .expect("peers");
        assert!(peers.is_empty());
        let mut queued = 0;
        while let Ok(e) = events.try_recv() {
            assert!(matches!(e, Event::PeerConnected(p) if p == peer));
            queued += 1;
        }
        assert_eq!(queued, EVENT_QUEUE);
    }
}
