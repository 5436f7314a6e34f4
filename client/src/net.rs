//! Joining the network as a client: an async runtime on its own threads, an ephemeral
//! identity, the bootstrap peers, and the capacity ads they know.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use veil_protocol::ad::now_ms;
use veil_protocol::{network, AdBook, Event, Identity, Multiaddr, NetConfig, Network, PeerId};

/// Network options shared by every networked command.
#[derive(clap::Args, Debug, Clone)]
pub struct NetArgs {
    /// A peer to join the network through (repeatable); `/p2p/<id>` may be omitted.
    #[arg(long, env = "VEIL_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// Seconds to wait for any single request to a node.
    #[arg(long, default_value_t = 30)]
    pub request_timeout: u64,
}

/// A running client network.
pub struct Client {
    pub runtime: Runtime,
    pub network: Network,
    pub events: mpsc::Receiver<Event>,
    /// The bootstrap peers that answered.
    pub bootstrap_peers: Vec<PeerId>,
}

impl Client {
    /// Start the network and connect to every reachable bootstrap peer (at least one).
    pub fn connect(args: &NetArgs) -> Result<Self> {
        if args.bootstrap.is_empty() {
            bail!("no network to join: pass --bootstrap ADDR (or set VEIL_BOOTSTRAP)");
        }
        let addrs = args
            .bootstrap
            .iter()
            .map(|a| {
                a.parse::<Multiaddr>()
                    .with_context(|| format!("bad bootstrap address `{a}`"))
            })
            .collect::<Result<Vec<_>>>()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let config = NetConfig {
            serve: false,
            request_timeout: Duration::from_secs(args.request_timeout.max(1)),
            ..NetConfig::default()
        };
        let identity = Identity::generate();
        let (network, events, event_loop) = {
            let _guard = runtime.enter();
            network::new(&identity, &config)?
        };
        runtime.spawn(event_loop.run());
        // Listening gives the client's outbound connections a fixed local port, so a NAT
        // in front of it maps them to one public address that nodes behind NAT can punch a
        // hole to (DCUtR); nothing is served on these ports but libp2p's own protocols.
        for listen in ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"] {
            let addr: Multiaddr = listen.parse().expect("valid address");
            if let Err(e) = runtime.block_on(network.listen(addr)) {
                tracing::debug!("{e}; connections through a NAT stay relayed");
            }
        }
        let mut peers = Vec::new();
        let mut errors = Vec::new();
        for addr in addrs {
            let dial = network.dial(addr.clone());
            match runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), dial).await })
            {
                Ok(Ok(peer)) => peers.push(peer),
                Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
                Err(_) => errors.push(format!("{addr}: no answer within 10 s")),
            }
        }
        if peers.is_empty() {
            bail!("cannot reach any bootstrap peer ({})", errors.join("; "));
        }
        for e in errors {
            tracing::warn!("bootstrap {e}");
        }
        Ok(Client {
            runtime,
            network,
            events,
            bootstrap_peers: peers,
        })
    }

    /// A node's work counters.
    pub fn stats(&self, peer: PeerId) -> Result<veil_protocol::wire::NodeStats> {
        use veil_protocol::wire::{InferRequest, InferResponse};
        match self
            .runtime
            .block_on(self.network.infer(peer, InferRequest::Stats))?
        {
            InferResponse::Stats(s) => Ok(s),
            other => bail!("{peer}: unexpected answer to a stats request: {other:?}"),
        }
    }

    /// Verified capacity ads: the directories of the bootstrap peers, then gossip for up to
    /// `wait`, stopping early once `want` peers are known.
    pub fn discover(&mut self, wait: Duration, want: usize) -> AdBook {
        let mut book = AdBook::default();
        let add = |book: &mut AdBook, ad| match book.insert(ad, now_ms()) {
            Ok(_) => {}
            Err(e) => tracing::debug!("{e}"),
        };
        let network = self.network.clone();
        let peers = self.bootstrap_peers.clone();
        let events = &mut self.events;
        self.runtime.block_on(async {
            for peer in &peers {
                match network.directory(*peer).await {
                    Ok(ads) => ads.into_iter().for_each(|ad| add(&mut book, ad)),
                    Err(e) => tracing::warn!("directory of {peer}: {e}"),
                }
            }
            let deadline = tokio::time::Instant::now() + wait;
            while book.ads(now_ms()).len() < want {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(Some(Event::Ad { ad })) => add(&mut book, ad),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        });
        book
    }
}
