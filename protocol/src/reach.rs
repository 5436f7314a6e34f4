//! Reachability, with libp2p's own parts: AutoNAT tells a node whether others can dial it;
//! a node that AutoNAT finds private (or that gets no verdict within 20 s) reserves a slot
//! on up to two relays it has reached (peers that offer Circuit Relay v2) and becomes
//! reachable at their `/p2p-circuit` addresses; when a peer connects through a relay, DCUtR punches a hole for a direct
//! connection, and once one is up the relayed connection is closed, as soon as no request
//! of ours is in flight on it (requests to that peer wait the few milliseconds until it has
//! closed, so none is lost or sent twice).
//!
//! [`Reach`] is the state the event loop keeps for this; [`ReachStatus`] is what the
//! application sees of it (a node's log and ad, the testnet's figures).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bincode::{Decode, Encode};
use libp2p::core::transport::ListenerId;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{autonat, dcutr, relay, Multiaddr, PeerId, Swarm};
use serde::{Deserialize, Serialize};

use crate::behaviour::VeilBehaviour;

/// What a relay grants; a node with `relay = true` serves with these.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayLimits {
    /// Peers that may hold a reservation at once, and per peer.
    pub max_reservations: usize,
    pub max_reservations_per_peer: usize,
    /// A reservation lasts this long unless renewed (clients renew at 3/4 of it).
    pub reservation_duration: Duration,
    /// Relayed connections at once, and per peer.
    pub max_circuits: usize,
    pub max_circuits_per_peer: usize,
    /// Each relayed connection is closed after this long or this many bytes.
    pub max_circuit_duration: Duration,
    pub max_circuit_bytes: u64,
}

impl Default for RelayLimits {
    /// libp2p's defaults, except for circuits: libp2p's per-circuit limits (2 minutes,
    /// 128 KiB) are meant only for hole punching, and a node behind a symmetric NAT serves
    /// through its relay for as long as a session lasts; and libp2p's 16 circuits, 4 per
    /// peer, refuse a client that deploys to more than four nodes behind one relay at once
    /// (one circuit each).
    fn default() -> Self {
        RelayLimits {
            max_reservations: 128,
            max_reservations_per_peer: 4,
            reservation_duration: Duration::from_secs(3600),
            max_circuits: 64,
            max_circuits_per_peer: 16,
            max_circuit_duration: Duration::from_secs(3600),
            max_circuit_bytes: 1 << 30,
        }
    }
}

impl RelayLimits {
    pub(crate) fn config(&self) -> relay::Config {
        relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            reservation_duration: self.reservation_duration,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.max_circuit_duration,
            max_circuit_bytes: self.max_circuit_bytes,
            ..relay::Config::default()
        }
    }
}

/// Whether other peers can dial this one, as AutoNAT found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, Encode, Decode)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    /// Not probed yet (or no peer could probe it).
    #[default]
    Unknown,
    /// Peers dialed back one of its addresses.
    Public,
    /// Peers could not dial it back: reachable only through a relay.
    Private,
}

impl std::fmt::Display for Reachability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reachability::Unknown => "unknown",
            Reachability::Public => "public",
            Reachability::Private => "private",
        })
    }
}

/// What the application sees of reachability.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReachStatus {
    pub reachability: Reachability,
    /// Addresses AutoNAT confirmed, or the operator declared.
    pub public_addrs: Vec<String>,
    /// Relays holding an accepted reservation for this peer.
    pub relays: Vec<String>,
    /// The `/p2p-circuit` addresses those reservations give.
    pub relayed_addrs: Vec<String>,
    /// Hole punches (DCUtR) that gave a direct connection, and that failed.
    pub hole_punches: u64,
    pub hole_punch_failures: u64,
    /// Connections open now, through a relay and direct.
    pub relayed_connections: usize,
    pub direct_connections: usize,
    /// As a relay: reservations and circuits accepted and refused since start.
    pub reservations_served: u64,
    pub reservations_refused: u64,
    pub circuits_served: u64,
    pub circuits_refused: u64,
}

/// A connection, as reachability needs to know it.
#[derive(Debug, Clone, Copy)]
struct Conn {
    peer: PeerId,
    relayed: bool,
    /// We dialed it (the dialer of a relayed connection closes it after an upgrade).
    dialer: bool,
}

/// How long a node waits for AutoNAT's verdict before it reserves on relays anyway.
const UNKNOWN_GRACE: Duration = Duration::from_secs(20);

/// How long a relay that refused or dropped us is left alone.
const RELAY_BACKOFF: Duration = Duration::from_secs(30);

/// The event loop's reachability state.
pub(crate) struct Reach {
    /// Reserve on relays when AutoNAT finds this peer private (nodes, not clients).
    auto_relay: bool,
    max_relays: usize,
    status: Reachability,
    /// Peers we dialed directly, at the address we reached them at.
    candidates: HashMap<PeerId, Multiaddr>,
    /// Peers whose identify says they offer relaying.
    offering: HashSet<PeerId>,
    /// Our reservations: the listener and whether the relay accepted.
    reservations: HashMap<PeerId, (ListenerId, bool)>,
    backoff: HashMap<PeerId, Instant>,
    conns: HashMap<ConnectionId, Conn>,
    /// Our requests awaiting an answer, per peer.
    inflight: HashMap<PeerId, usize>,
    /// Relayed connections we are closing after an upgrade, per peer.
    closing: HashMap<PeerId, HashSet<ConnectionId>>,
    started: Instant,
    warned_unreachable: bool,
    counters: ReachStatus,
}

pub(crate) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

impl Reach {
    pub(crate) fn new(auto_relay: bool) -> Self {
        Reach {
            auto_relay,
            max_relays: 2,
            status: Reachability::Unknown,
            candidates: HashMap::new(),
            offering: HashSet::new(),
            reservations: HashMap::new(),
            backoff: HashMap::new(),
            conns: HashMap::new(),
            inflight: HashMap::new(),
            closing: HashMap::new(),
            started: Instant::now(),
            warned_unreachable: false,
            counters: ReachStatus::default(),
        }
    }

    pub(crate) fn status(&self, swarm: &Swarm<VeilBehaviour>) -> ReachStatus {
        let mut s = self.counters.clone();
        s.reachability = self.status;
        // relayed connections being closed after an upgrade no longer count
        let closing =
            |id: &ConnectionId, c: &Conn| self.closing.get(&c.peer).is_some_and(|s| s.contains(id));
        let (relayed, direct): (Vec<&Conn>, Vec<&Conn>) = self
            .conns
            .iter()
            .filter(|(id, c)| !closing(id, c))
            .map(|(_, c)| c)
            .partition(|c| c.relayed);
        s.relayed_connections = relayed.len();
        s.direct_connections = direct.len();
        for a in swarm.external_addresses() {
            if is_relayed(a) {
                s.relayed_addrs.push(a.to_string());
            } else {
                s.public_addrs.push(a.to_string());
            }
        }
        s.relays = self
            .reservations
            .iter()
            .filter(|(_, (_, ok))| *ok)
            .map(|(p, _)| p.to_string())
            .collect();
        s.relays.sort();
        s
    }

    /// Whether requests to `peer` must wait: a relayed connection to it is closing.
    pub(crate) fn hold(&self, peer: &PeerId) -> bool {
        self.closing.get(peer).is_some_and(|c| !c.is_empty())
    }

    pub(crate) fn request_sent(&mut self, peer: PeerId) {
        *self.inflight.entry(peer).or_default() += 1;
    }

    pub(crate) fn request_done(&mut self, peer: PeerId, swarm: &mut Swarm<VeilBehaviour>) {
        if let Some(n) = self.inflight.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.inflight.remove(&peer);
                self.close_relayed_if_direct(peer, swarm);
            }
        }
    }

    pub(crate) fn connected(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        endpoint: &ConnectedPoint,
        swarm: &mut Swarm<VeilBehaviour>,
    ) {
        let relayed = endpoint.is_relayed();
        self.conns.insert(
            id,
            Conn {
                peer,
                relayed,
                dialer: endpoint.is_dialer(),
            },
        );
        if let ConnectedPoint::Dialer { address, .. } = endpoint {
            // a relay we dial directly may serve us later (its identify says whether)
            if !relayed {
                let addr: Multiaddr = address
                    .iter()
                    .filter(|p| !matches!(p, Protocol::P2p(_)))
                    .collect();
                self.candidates.entry(peer).or_insert(addr);
            }
        }
        if !relayed {
            self.close_relayed_if_direct(peer, swarm);
        }
    }

    /// A connection closed; returns the peer whose held requests may now go.
    pub(crate) fn closed(&mut self, id: ConnectionId) -> Option<PeerId> {
        let conn = self.conns.remove(&id)?;
        let closing = self.closing.get_mut(&conn.peer)?;
        closing.remove(&id);
        if closing.is_empty() {
            self.closing.remove(&conn.peer);
            return Some(conn.peer);
        }
        None
    }

    /// With a direct connection to `peer` and nothing of ours in flight, close the relayed
    /// connections we dialed to it.
    fn close_relayed_if_direct(&mut self, peer: PeerId, swarm: &mut Swarm<VeilBehaviour>) {
        if self.inflight.contains_key(&peer) {
            return;
        }
        let direct = self.conns.values().any(|c| c.peer == peer && !c.relayed);
        if !direct {
            return;
        }
        let closing = self.closing.entry(peer).or_default();
        for (id, c) in &self.conns {
            if c.peer == peer && c.relayed && c.dialer && !closing.contains(id) {
                // a connection already closing reports its close all the same
                tracing::debug!("direct connection to {peer}: closing the relayed one");
                swarm.close_connection(*id);
                closing.insert(*id);
            }
        }
        if closing.is_empty() {
            self.closing.remove(&peer);
        }
    }

    /// A peer said what it supports: remember it as a relay if it offers relaying.
    pub(crate) fn identified(
        &mut self,
        peer: PeerId,
        protocols: &[libp2p::StreamProtocol],
        swarm: &mut Swarm<VeilBehaviour>,
    ) {
        if !protocols.contains(&relay::HOP_PROTOCOL_NAME) {
            self.offering.remove(&peer);
            return;
        }
        self.offering.insert(peer);
        // only relays we reached directly: we know an address of theirs that works
        if self.candidates.contains_key(&peer) && self.auto_relay {
            tracing::debug!("{peer} offers relaying");
            self.reserve(swarm);
        }
    }

    /// Whether to hold reservations: once AutoNAT says private, or when it has given no
    /// verdict for a while (no peer could probe). Not before: a relay keeps a slot until
    /// the reservation expires or the connection closes, so a node that reserved and then
    /// turned out public would hold a slot a node at home needs (a test caught that).
    fn wants_relays(&self) -> bool {
        self.auto_relay
            && match self.status {
                Reachability::Private => true,
                Reachability::Unknown => self.started.elapsed() > UNKNOWN_GRACE,
                Reachability::Public => false,
            }
    }

    /// Keep up to `max_relays` reservations while [`Self::wants_relays`].
    pub(crate) fn reserve(&mut self, swarm: &mut Swarm<VeilBehaviour>) {
        if !self.wants_relays() {
            return;
        }
        let now = Instant::now();
        self.backoff.retain(|_, until| *until > now);
        let offering: Vec<(PeerId, Multiaddr)> = self
            .candidates
            .iter()
            .filter(|(p, _)| {
                self.offering.contains(p)
                    && !self.reservations.contains_key(p)
                    && !self.backoff.contains_key(p)
                    && swarm.is_connected(p)
            })
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        for (relay, addr) in offering {
            if self.reservations.len() >= self.max_relays {
                break;
            }
            let circuit = addr.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
            match swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    tracing::debug!("asking {relay} for a relay reservation");
                    self.reservations.insert(relay, (id, false));
                }
                Err(e) => {
                    tracing::warn!("cannot reserve on the relay at {circuit}: {e}");
                    self.backoff.insert(relay, now + RELAY_BACKOFF);
                }
            }
        }
    }

    pub(crate) fn autonat(&mut self, event: autonat::Event, swarm: &mut Swarm<VeilBehaviour>) {
        let autonat::Event::StatusChanged { new, .. } = event else {
            return;
        };
        self.status = match &new {
            autonat::NatStatus::Public(addr) => {
                tracing::info!("reachable: peers dialed this node back at {addr}");
                Reachability::Public
            }
            autonat::NatStatus::Private => {
                tracing::info!(
                    "not reachable from outside (peers could not dial this node back); \
                     serving through relays"
                );
                Reachability::Private
            }
            autonat::NatStatus::Unknown => Reachability::Unknown,
        };
        if self.status == Reachability::Public {
            for (relay, (id, _)) in self.reservations.drain() {
                tracing::debug!("public: giving up the reservation on {relay}");
                swarm.remove_listener(id);
            }
        } else {
            self.reserve(swarm);
        }
    }

    pub(crate) fn relay_client(&mut self, event: relay::client::Event) {
        if let relay::client::Event::ReservationReqAccepted {
            relay_peer_id,
            renewal,
            ..
        } = event
        {
            if let Some((_, ok)) = self.reservations.get_mut(&relay_peer_id) {
                *ok = true;
            }
            if !renewal {
                tracing::info!("reachable through the relay {relay_peer_id}");
            }
        }
    }

    /// A listener closed: if it was a reservation, the relay refused or went away.
    pub(crate) fn listener_closed(
        &mut self,
        id: ListenerId,
        reason: &Result<(), impl std::fmt::Display>,
    ) {
        let Some(relay) = self
            .reservations
            .iter()
            .find(|(_, (l, _))| *l == id)
            .map(|(p, _)| *p)
        else {
            return;
        };
        self.reservations.remove(&relay);
        self.backoff.insert(relay, Instant::now() + RELAY_BACKOFF);
        match reason {
            Err(e) => tracing::warn!("the relay {relay} refused or dropped our reservation: {e}"),
            Ok(()) => tracing::debug!("the reservation on {relay} ended"),
        }
    }

    pub(crate) fn relay_server(&mut self, event: &relay::Event) {
        #[allow(deprecated)]
        match event {
            relay::Event::ReservationReqAccepted { src_peer_id, .. } => {
                self.counters.reservations_served += 1;
                tracing::debug!("relaying for {src_peer_id}");
            }
            relay::Event::ReservationReqDenied {
                src_peer_id,
                status,
            } => {
                self.counters.reservations_refused += 1;
                tracing::info!("refused to relay for {src_peer_id}: {status:?}");
            }
            relay::Event::CircuitReqAccepted { .. } => self.counters.circuits_served += 1,
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status,
            } => {
                self.counters.circuits_refused += 1;
                tracing::info!(
                    "refused to relay a connection from {src_peer_id} to {dst_peer_id}: {status:?}"
                );
            }
            _ => {}
        }
    }

    pub(crate) fn dcutr(&mut self, event: dcutr::Event) {
        match event.result {
            Ok(_) => {
                self.counters.hole_punches += 1;
                tracing::debug!("hole punched to {}", event.remote_peer_id);
            }
            Err(e) => {
                self.counters.hole_punch_failures += 1;
                tracing::debug!("no hole punched to {}: {e}", event.remote_peer_id);
            }
        }
    }

    /// Periodically: retry relays, and say so once when nobody can reach this node.
    pub(crate) fn tick(&mut self, swarm: &mut Swarm<VeilBehaviour>) {
        self.reserve(swarm);
        let relayed = self.reservations.values().any(|(_, ok)| *ok);
        if self.auto_relay
            && self.status == Reachability::Private
            && !relayed
            && !self.warned_unreachable
            && self.started.elapsed() > Duration::from_secs(30)
        {
            tracing::warn!(
                "this node cannot be reached: peers cannot dial it and no relay holds a \
                 reservation for it (forward a port and set `external_addresses`, or join \
                 through a node with `relay = true`)"
            );
            self.warned_unreachable = true;
        }
        if relayed {
            self.warned_unreachable = false;
        }
    }
}
