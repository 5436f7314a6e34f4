//! A whole local network: node processes, a client joined to them, and a deployment of the
//! model across them. Starting checks the request first and stops everything it started if
//! any step fails; dropping the network kills every node and removes its files.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use veil_model::masked::Privacy;

use anyhow::{bail, Context, Result};
use veil_client::deploy::{deploy, DeployArgs};
use veil_client::deployment::Deployment;
use veil_client::model_spec::ModelSpec;
use veil_client::net::{Client, NetArgs};
use veil_model::crypto::ClientBundle;
use veil_model::crypto::ShardQuant;
use veil_model::TextCodec;

use crate::cluster::{start_nodes, NodeProcess, NodeSettings};
use crate::wan::ns::in_namespace;
use crate::wan::{Host, NatKind, Wan, WanOptions};

/// What to start.
#[derive(Debug, Clone)]
pub struct NetworkOptions {
    pub nodes: usize,
    /// `smollm2`, `tiny` or a `.gguf` path.
    pub model: String,
    /// Stages to split the model into (default: up to 3, at most one per node).
    pub stages: Option<usize>,
    /// Nodes per stage; fewer when there are not enough nodes.
    pub replicas: usize,
    pub node: NodeSettings,
    /// Keep the data directories (node logs, deployment) instead of removing them.
    pub keep: bool,
    /// Layers the client runs itself before the first node.
    pub client_layers: usize,
    /// Layers the client runs itself after the last node.
    pub client_last_layers: usize,
    /// The shards' weight format.
    pub quant: ShardQuant,
    /// With 4-bit shards: the calibration text's path, `none`, or the built-in text (`None`).
    pub calibration: Option<String>,
    /// The deployment's default verification rate (`veil deploy --verify`).
    pub verify: Option<f64>,
    /// Run on a wide-area network built on this machine (`--topology wan`, needs root)
    /// instead of loopback: each of the `nodes` in a home network of its own behind a NAT
    /// (the kinds of `homes` taken in turn), two more nodes on the public segment that
    /// bootstrap and relay but hold no stage, and the client behind its own NAT.
    pub wan: Option<WanOptions>,
    /// How clients of this testnet hide the nodes' inputs (rotated or masked).
    pub privacy: Privacy,
}

impl Default for NetworkOptions {
    fn default() -> Self {
        NetworkOptions {
            nodes: 3,
            model: "smollm2".into(),
            stages: None,
            replicas: 2,
            node: NodeSettings::default(),
            keep: false,
            client_layers: 0,
            client_last_layers: 0,
            quant: ShardQuant::default(),
            calibration: None,
            verify: None,
            wan: None,
            privacy: Privacy::Rotated,
        }
    }
}

impl NetworkOptions {
    /// The number of stages, checked against the nodes.
    pub fn stage_count(&self) -> Result<usize> {
        if self.nodes == 0 {
            bail!("--nodes must be at least 1");
        }
        let stages = self.stages.unwrap_or(self.nodes.min(3));
        if stages == 0 {
            bail!("--stages must be at least 1");
        }
        if stages > self.nodes {
            bail!(
                "{stages} stages need at least {stages} nodes, but --nodes is {}",
                self.nodes
            );
        }
        if self.replicas == 0 {
            bail!("--replicas must be at least 1");
        }
        if let Some(b) = &self.node.byzantine {
            if b.nodes >= self.nodes {
                bail!(
                    "--byzantine {} leaves no honest node among {}",
                    b.nodes,
                    self.nodes
                );
            }
        }
        Ok(stages)
    }
}

/// A running local network with the model deployed on it.
pub struct LocalNetwork {
    /// Dropped last: the nodes must stop before their directories go.
    pub nodes: Vec<NodeProcess>,
    pub bootstrap: String,
    pub deployment: Deployment,
    /// The deployment's secret client bundle.
    pub bundle: ClientBundle,
    pub text: TextCodec,
    /// The GGUF the model came from (`None` for `tiny`).
    pub model_path: Option<PathBuf>,
    pub stages: usize,
    pub deploy_s: f64,
    /// Where each node runs on the WAN (`None`: loopback here).
    pub hosts: Vec<Option<Host>>,
    /// The peer ids of the nodes that may hold stages (all of them on loopback; on the WAN,
    /// the nodes at home).
    pub serving: Vec<String>,
    /// How this testnet's clients hide the nodes' inputs.
    pub privacy: Privacy,
    root: Option<tempfile::TempDir>,
    root_path: PathBuf,
    /// Dropped after the nodes: their namespaces go last.
    pub wan: Option<Wan>,
}

impl std::fmt::Debug for LocalNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNetwork")
            .field("nodes", &self.nodes.len())
            .field("deployment", &self.deployment.id)
            .finish()
    }
}

/// Progress messages while the network comes up.
pub type Say<'a> = &'a (dyn Fn(&str) + Sync);

impl LocalNetwork {
    /// Check the options, resolve (fetch) the model, start the nodes, wait for their ads
    /// and deploy the model. On any error every started node is stopped.
    pub fn start(opts: &NetworkOptions, say: Say<'_>) -> Result<Self> {
        let stages = opts.stage_count()?;
        let spec = ModelSpec::parse(&opts.model)?;
        say("resolving the model");
        let model_path = spec
            .path()
            .with_context(|| format!("cannot get model `{}`", opts.model))?;
        let root = tempfile::Builder::new()
            .prefix("veil-testnet-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let root_path = root.path().to_path_buf();
        crate::cleanup::add_dir(root_path.clone());
        // The deployment record and its secret bundle live with the testnet, not in the
        // user's VEIL_HOME (models stay there: they were resolved above).
        std::env::set_var("VEIL_HOME", root_path.join("client"));
        // declared first, dropped last: the nodes stop before their namespaces go
        let (wan, nodes, hosts) = match &opts.wan {
            None => {
                say(&format!("starting {} nodes", opts.nodes));
                let nodes = start_nodes(&root_path, opts.nodes, &opts.node)?;
                let hosts = vec![None; nodes.len()];
                (None, nodes, hosts)
            }
            Some(w) => {
                let w = wan_for(w, opts.nodes);
                say(&format!(
                    "building a WAN: {} home networks behind NATs ({}), the client behind \
                     its own, links of {}-{} ms",
                    w.homes.len(),
                    nat_names(&w.homes),
                    w.delay_ms.0,
                    w.delay_ms.1
                ));
                let wan = Wan::build(&w)?;
                say(&format!(
                    "starting 2 public nodes (bootstrap, relays) and {} at home",
                    opts.nodes
                ));
                let (nodes, hosts) =
                    crate::wan::up::start_nodes(&root_path, &wan, true, &opts.node)?;
                let hosts = hosts.into_iter().map(Some).collect();
                (Some(wan), nodes, hosts)
            }
        };
        let serving: Vec<String> = nodes
            .iter()
            .zip(&hosts)
            .filter(|(_, h)| h.as_ref().is_none_or(|h| h.nat.is_some()))
            .map(|(n, _)| n.peer_id.clone())
            .collect();
        let bootstrap = nodes[0]
            .addr
            .clone()
            .context("the first node has no address")?;
        let client_ns = wan.as_ref().map(|w| w.client.ns.clone());
        let (deployment, deploy_s) = in_namespace(client_ns.as_deref(), || -> Result<_> {
            say("waiting for every node's capacity ad");
            wait_for_ads(&bootstrap, nodes.len(), Duration::from_secs(180))?;
            if wan.is_some() {
                say("waiting until every node at home can be reached (through a relay)");
                wait_until_reachable(&bootstrap, &serving, Duration::from_secs(120))?;
            }
            say("encrypting and deploying the model");
            let started = Instant::now();
            let model = match &model_path {
                Some(p) => p.display().to_string(),
                None => "tiny".to_string(),
            };
            deploy(&DeployArgs {
                net: net_args(&bootstrap),
                model,
                stages: Some(stages),
                replicas: opts.replicas.min(opts.nodes),
                max_len: 1024,
                client_layers: opts.client_layers,
                client_last_layers: opts.client_last_layers,
                quant: opts.quant,
                calibration: opts.calibration.clone(),
                repair: None,
                // every node's ad is already known
                wait: 1,
                verify: opts.verify,
                privacy: Some(opts.privacy),
                nodes: if wan.is_some() {
                    serving.clone()
                } else {
                    Vec::new()
                },
            })
            .context("deployment failed")
            .map(|d| (d, started.elapsed().as_secs_f64()))
        })??;
        let bundle = ClientBundle::read(&Deployment::dir(&deployment.id)?.join("client.veil"))?;
        let text = TextCodec::new(bundle.meta.text.clone())?;
        let root = if opts.keep {
            let _ = root.keep();
            crate::cleanup::remove_dir(&root_path);
            None
        } else {
            Some(root)
        };
        Ok(LocalNetwork {
            nodes,
            bootstrap,
            deployment,
            bundle,
            text,
            model_path,
            stages,
            deploy_s,
            hosts,
            serving,
            root,
            root_path,
            wan,
            privacy: opts.privacy,
        })
    }

    /// The namespace the client must run in (`None`: here, on loopback); see
    /// [`in_namespace`].
    pub fn client_namespace(&self) -> Option<String> {
        self.wan.as_ref().map(|w| w.client.ns.clone())
    }

    /// The fewest replicas any stage of the deployment has.
    pub fn min_replicas(&self) -> usize {
        self.deployment
            .stages
            .iter()
            .map(|s| s.replicas.len())
            .min()
            .unwrap_or(0)
    }

    /// Network options for a client of this network.
    pub fn net_args(&self) -> NetArgs {
        net_args(&self.bootstrap)
    }

    /// Where the nodes' data directories and the deployment live.
    pub fn root(&self) -> &Path {
        &self.root_path
    }

    /// The directory of the deployment (its secret bundle and shards).
    pub fn deployment_dir(&self) -> Result<PathBuf> {
        Deployment::dir(&self.deployment.id)
    }

    /// Stop every node gracefully (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        for n in &mut self.nodes {
            n.stop(Duration::from_secs(5));
        }
    }
}

impl Drop for LocalNetwork {
    fn drop(&mut self) {
        self.stop();
        crate::cleanup::remove_dir(&self.root_path);
        if self.root.is_none() {
            tracing::info!("kept the testnet files in {}", self.root_path.display());
        }
    }
}

pub fn net_args(bootstrap: &str) -> NetArgs {
    NetArgs {
        bootstrap: vec![bootstrap.to_string()],
        request_timeout: 30,
    }
}

/// The WAN for `nodes` nodes at home: one home network each, NAT kinds from `w.homes` in
/// turn (endpoint-independent when it names none).
fn wan_for(w: &WanOptions, nodes: usize) -> WanOptions {
    let kinds = if w.homes.is_empty() {
        vec![NatKind::EndpointIndependent]
    } else {
        w.homes.clone()
    };
    WanOptions {
        homes: (0..nodes).map(|i| kinds[i % kinds.len()]).collect(),
        ..w.clone()
    }
}

fn nat_names(kinds: &[NatKind]) -> String {
    let eim = kinds
        .iter()
        .filter(|k| **k == NatKind::EndpointIndependent)
        .count();
    format!(
        "{eim} endpoint-independent, {} symmetric",
        kinds.len() - eim
    )
}

/// Wait until every peer of `peers` advertises a way to reach it: AutoNAT found it public,
/// or it holds a relay reservation (a `/p2p-circuit` address).
pub fn wait_until_reachable(bootstrap: &str, peers: &[String], limit: Duration) -> Result<()> {
    let start = Instant::now();
    let mut client = Client::connect(&net_args(bootstrap))?;
    loop {
        let ads = client
            .discover(Duration::from_secs(1), usize::MAX)
            .ads(veil_protocol::ad::now_ms());
        let reachable = |peer: &String| {
            ads.iter().any(|(_, ad)| {
                &ad.peer_id == peer
                    && (ad.reachability == veil_protocol::reach::Reachability::Public
                        || ad.addrs.iter().any(|a| a.contains("/p2p-circuit")))
            })
        };
        let missing: Vec<&String> = peers.iter().filter(|p| !reachable(p)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!(
                "{} nodes still advertise no way to reach them after {limit:?} (no relay \
                 reservation): {missing:?}",
                missing.len()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Wait until a client sees `n` verified capacity ads.
pub fn wait_for_ads(bootstrap: &str, n: usize, limit: Duration) -> Result<()> {
    let start = Instant::now();
    let mut client = Client::connect(&net_args(bootstrap))?;
    loop {
        let seen = client
            .discover(Duration::from_secs(2), n)
            .ads(veil_protocol::ad::now_ms())
            .len();
        if seen >= n {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("only {seen} of {n} nodes published a capacity ad within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}
