//! `veil-testnet`'s command line: every subcommand's options, and the network options they
//! share.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use veil_model::crypto::ShardQuant;
use veil_testnet::chaos;
use veil_testnet::cluster::{Byzantine, NodeSettings};
use veil_testnet::network::{LocalNetwork, NetworkOptions};
use veil_testnet::sim::{Relay, Routing};

#[derive(Parser, Debug)]
#[command(
    name = "veil-testnet",
    version,
    about = "Spin up a local Veil network, measure it, break it, and project it",
    long_about = "Starts veil-node processes on 127.0.0.1 (each with its own data directory and \
                  port), deploys an encrypted model across them and drives it in this process. \
                  Every process and temporary directory is removed on exit, error or ctrl-c.\n\n\
                  Models are taken from $VEIL_HOME (default ~/.veil) and fetched on first use."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Start a network, deploy the model, answer one prompt through it, stay up until ctrl-c.
    Up(UpArgs),
    /// Concurrent generations at 1, 2, 4 … S sessions, with single-process baselines.
    Bench(BenchArgs),
    /// Kill and restart random nodes while generating; check every output is unchanged.
    Chaos(ChaosArgs),
    /// Normal generations for a long while (--duration) with abusive peers at the same time,
    /// on nodes with tight limits; samples every node's memory, open files, disk and
    /// sessions, writes a report, and fails if a bound is crossed or an output changes.
    Soak(SoakArgs),
    /// Project throughput and latency to 10 … 1,000 nodes with a discrete-event model.
    Simulate(SimulateArgs),
    /// A wide-area network on this machine (network namespaces, NAT routers, links with
    /// delay and a rate; needs root), nodes on it, up until ctrl-c.
    Wan(WanArgs),
}

#[derive(Args, Debug)]
pub(crate) struct WanArgs {
    #[command(flatten)]
    pub(crate) shape: WanShape,
    /// Also start a node in each home network.
    #[arg(long)]
    pub(crate) home_nodes: bool,
}

/// The shape of a WAN topology.
#[derive(Args, Debug, Clone)]
pub(crate) struct WanShape {
    /// Home networks' NATs: eim (endpoint-independent: holes can be punched) or symmetric
    /// (only relays get through). `wan`: one home per entry; `--topology wan`: one per
    /// node, the kinds taken in turn.
    #[arg(long, value_delimiter = ',', default_value = "eim,symmetric")]
    pub(crate) homes: Vec<veil_testnet::wan::NatKind>,
    /// The client's NAT.
    #[arg(long, default_value = "eim")]
    pub(crate) client_nat: veil_testnet::wan::NatKind,
    /// One-way delay of each uplink in ms, or a range each link draws from (seeded).
    #[arg(long, default_value = "5-40", value_parser = veil_testnet::wan::up::parse_delay)]
    pub(crate) delay_ms: (u32, u32),
    /// The public hosts' uplinks (bootstrap and relay) instead [default: as --delay-ms];
    /// e.g. 1 for relays in a data centre.
    #[arg(long, value_parser = veil_testnet::wan::up::parse_delay)]
    pub(crate) public_delay_ms: Option<(u32, u32)>,
    /// Jitter of each uplink's delay, ms.
    #[arg(long, default_value_t = 1)]
    pub(crate) jitter_ms: u32,
    /// Rate of each uplink, each direction, Mbit/s.
    #[arg(long, default_value_t = 100)]
    pub(crate) rate_mbit: u32,
    /// Seed of the links' delays and jitter.
    #[arg(long, default_value_t = 7)]
    pub(crate) wan_seed: u64,
}

impl WanShape {
    pub(crate) fn options(&self) -> veil_testnet::wan::WanOptions {
        veil_testnet::wan::WanOptions {
            homes: self.homes.clone(),
            client_nat: self.client_nat,
            delay_ms: self.delay_ms,
            public_delay_ms: self.public_delay_ms,
            jitter_ms: self.jitter_ms,
            rate_mbit: self.rate_mbit,
            seed: self.wan_seed,
        }
    }
}

/// Where the testnet's nodes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Topology {
    /// Every node and the client on 127.0.0.1.
    Loopback,
    /// A wide-area network on this machine (needs root): each node in a home network of
    /// its own behind a NAT, two public nodes that bootstrap and relay, the client behind
    /// its own NAT, links with the delay, jitter and rate of the --homes … --rate-mbit
    /// options.
    Wan,
}

/// The network to start.
#[derive(Args, Debug, Clone)]
pub(crate) struct NetOpts {
    /// Node processes to start.
    #[arg(long, default_value_t = 3)]
    pub(crate) nodes: usize,
    /// Model: smollm2, tiny, or a .gguf path.
    #[arg(long, default_value = "smollm2")]
    pub(crate) model: String,
    /// Stages to split the model into [default: the number of nodes, at most 3].
    #[arg(long)]
    pub(crate) stages: Option<usize>,
    /// Nodes holding each stage (fewer if there are not enough nodes).
    #[arg(long, default_value_t = 2)]
    pub(crate) replicas: usize,
    /// TCP port of the first node; the others take the next ones [default: any free ports].
    #[arg(long)]
    pub(crate) base_port: Option<u16>,
    /// Keep the nodes' data directories and logs after exit (the path is printed).
    #[arg(long)]
    pub(crate) keep: bool,
    /// Layers the client runs itself in plaintext before the first node (see SECURITY.md).
    #[arg(long, default_value_t = 0)]
    pub(crate) client_layers: usize,
    /// Layers the client runs itself in plaintext after the last node (see SECURITY.md).
    #[arg(long, default_value_t = 0)]
    pub(crate) client_last_layers: usize,
    /// Make every node wait this long per forward pass, to mimic slower machines.
    #[arg(long, default_value_t = 0)]
    pub(crate) step_delay_ms: u64,
    /// The shards' weight format: q8_0 (default), q4_0, q4_k, or f32 (exact).
    #[arg(long, default_value = "q8_0", value_name = "FORMAT")]
    pub(crate) quant: ShardQuant,
    #[arg(long, value_name = "FILE|none", help = veil_client::encrypt::CALIBRATION_HELP)]
    pub(crate) calibration: Option<String>,
    /// Make the last K nodes byzantine: they corrupt answers on purpose (see --lie).
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub(crate) byzantine: usize,
    /// How byzantine nodes lie: noise (a tenth of each row's RMS added), zeros, skip-layers
    /// (the input returned) or replay-stale (the previous answer repeated).
    #[arg(long, value_name = "MODE", default_value = "noise",
          value_parser = ["noise", "zeros", "skip-layers", "replay-stale"])]
    pub(crate) lie: String,
    /// Fraction of their answers byzantine nodes corrupt.
    #[arg(long, value_name = "R", default_value_t = 0.1,
          value_parser = veil_client::verify::parse_rate)]
    pub(crate) lie_rate: f64,
    /// The deployment's default verification rate (`veil deploy --verify`).
    #[arg(long, value_name = "RATE", value_parser = veil_client::verify::parse_rate)]
    pub(crate) verify: Option<f64>,
    /// Where the nodes run: loopback, or a WAN with NATs, relays and link delays.
    #[arg(long, value_enum, default_value_t = Topology::Loopback)]
    pub(crate) topology: Topology,
    /// How the clients hide the nodes' inputs: rotated (the key folded into the shards) or
    /// masked (the nodes compute only the linear ops, on uniformly random words; the
    /// client runs the rest and provides the masks; see SECURITY.md, "Masked mode").
    #[arg(long, default_value = "rotated", value_name = "MODE")]
    pub(crate) privacy: veil_model::masked::Privacy,
    /// Each node writes every activation payload it receives, as received, to
    /// DIR/<node>/<n>.bin (rotated hidden states as f32, masked words as u32, little-endian):
    /// what curious operators would keep. `veil attack uniformity DIR` tests them.
    #[arg(long, value_name = "DIR")]
    pub(crate) record: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub(crate) wan: WanShape,
}

impl NetOpts {
    pub(crate) fn options(&self) -> NetworkOptions {
        NetworkOptions {
            nodes: self.nodes,
            model: self.model.clone(),
            stages: self.stages,
            replicas: self.replicas,
            node: NodeSettings {
                base_port: self.base_port.unwrap_or(0),
                step_delay_ms: self.step_delay_ms,
                byzantine: (self.byzantine > 0).then(|| Byzantine {
                    nodes: self.byzantine,
                    mode: self.lie.clone(),
                    rate: self.lie_rate,
                }),
                record_payloads: self.record.clone(),
                ..NodeSettings::default()
            },
            keep: self.keep,
            client_layers: self.client_layers,
            client_last_layers: self.client_last_layers,
            quant: self.quant,
            calibration: self.calibration.clone(),
            verify: self.verify,
            wan: (self.topology == Topology::Wan).then(|| self.wan.options()),
            privacy: self.privacy,
        }
    }

    pub(crate) fn start(&self) -> Result<LocalNetwork> {
        LocalNetwork::start(&self.options(), &|m| tracing::info!("{m}"))
    }
}

#[derive(Args, Debug)]
pub(crate) struct UpArgs {
    #[command(flatten)]
    pub(crate) net: NetOpts,
    /// The prompt to answer (chat-templated).
    #[arg(
        long,
        default_value = "What is the capital of France? Answer in one sentence."
    )]
    pub(crate) prompt: String,
    /// Most tokens of the answer.
    #[arg(long, default_value_t = 64)]
    pub(crate) max_tokens: usize,
    /// Stop after the answer instead of keeping the network up.
    #[arg(long)]
    pub(crate) exit: bool,
    /// Keep an OpenAI-compatible gateway (`veil serve`) to the deployment up on
    /// 127.0.0.1:PORT (0: any free port); its URL is printed.
    #[arg(long, value_name = "PORT", conflicts_with = "exit")]
    pub(crate) serve: Option<u16>,
    /// Print one JSON object (answer, route, speed) instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) net: NetOpts,
    /// Most concurrent sessions (the bench also runs 1, 2, 4 … below it).
    #[arg(long, default_value_t = 4)]
    pub(crate) sessions: usize,
    /// Prompt length of every session, in tokens.
    #[arg(long, default_value_t = 32)]
    pub(crate) prompt_tokens: usize,
    /// Tokens each session generates.
    #[arg(long, default_value_t = 32)]
    pub(crate) gen_tokens: usize,
    /// Skip the single-process plaintext and encrypted baselines.
    #[arg(long)]
    pub(crate) no_baselines: bool,
    /// Also run every level through an OpenAI-compatible gateway (`veil serve`) and report
    /// its tokens/s against the in-process client's, the time to first token it adds, and
    /// its memory per idle connection.
    #[arg(long)]
    pub(crate) gateway: bool,
    /// Write the full results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub(crate) json: Option<PathBuf>,
    /// Write bench.md, bench.json and SVG charts into this directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) report: Option<PathBuf>,
    /// The verification rates to compare (0 is the cost baseline), one round of --trials
    /// generations each, in this order (repeat a rate to see the spread) [default with
    /// --byzantine: 0,0.05,0.2,1]. Given without --byzantine, every node is honest and the
    /// bench measures what checking alone costs.
    #[arg(long, value_delimiter = ',', value_parser = veil_client::verify::parse_rate)]
    pub(crate) verify_rates: Option<Vec<f64>>,
    /// With --byzantine: generations per verification rate (run --sessions at a time).
    #[arg(long, default_value_t = 16)]
    pub(crate) trials: usize,
}

#[derive(Args, Debug)]
pub(crate) struct ChaosArgs {
    #[command(flatten)]
    pub(crate) net: NetOpts,
    /// Seconds between node kills.
    #[arg(long, default_value_t = 4.0)]
    pub(crate) kill_every: f64,
    /// Seconds a killed node stays down before it restarts.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) down: f64,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 2)]
    pub(crate) sessions: usize,
    /// Generations each session runs one after the other, at least: more rounds follow
    /// until a node has been killed and restarted during the run (on a fast machine the
    /// first rounds may end before the first kill), for up to --kill-every + --down + 120 s.
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    #[arg(long, default_value_t = 16)]
    pub(crate) prompt_tokens: usize,
    #[arg(long, default_value_t = 48)]
    pub(crate) gen_tokens: usize,
    /// Seed of the choice of victims.
    #[arg(long, default_value_t = 7)]
    pub(crate) seed: u64,
    /// Which nodes may be killed: all, serving (holding stages) or relays (on the WAN, the
    /// public nodes that bootstrap and relay).
    #[arg(long, value_enum, default_value_t = chaos::Victims::All)]
    pub(crate) victims: chaos::Victims,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub(crate) json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct SoakArgs {
    #[command(flatten)]
    pub(crate) net: NetOpts,
    /// How long to soak: seconds, or with a unit (90s, 30m, 2h).
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub(crate) duration: std::time::Duration,
    /// Normal sessions generating at once.
    #[arg(long, default_value_t = 2)]
    pub(crate) sessions: usize,
    #[arg(long, default_value_t = 16)]
    pub(crate) prompt_tokens: usize,
    #[arg(long, default_value_t = 24)]
    pub(crate) gen_tokens: usize,
    /// Seconds between samples of every node.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) sample_every: f64,
    /// No abusive peers: the same soak, calm (for comparison).
    #[arg(long)]
    pub(crate) no_abuse: bool,
    /// The nodes' memory_limit_mib (resident memory may exceed it by --rss-allowance-mib).
    #[arg(long, default_value_t = 2048)]
    pub(crate) memory_limit_mib: u64,
    /// The nodes' max_disk_mib.
    #[arg(long, default_value_t = 512)]
    pub(crate) max_disk_mib: u64,
    /// What a node process may take beyond memory_limit_mib (runtime, network, scratch).
    #[arg(long, default_value_t = 512)]
    pub(crate) rss_allowance_mib: u64,
    /// Seed of the abusers.
    #[arg(long, default_value_t = 7)]
    pub(crate) seed: u64,
    /// Write soak.md, soak.json and SVG charts of memory and disk into this directory.
    #[arg(long, value_name = "DIR", default_value = "soak-report")]
    pub(crate) report: PathBuf,
}

/// `90`, `90s`, `30m`, `2h`.
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 90s, 30m or 2h"))?;
    let scale = match unit {
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit `{other}` in `{s}`: use s, m or h")),
    };
    if !(n > 0.0 && (n * scale).is_finite()) {
        return Err(format!("`{s}` must be a positive duration"));
    }
    Ok(std::time::Duration::from_secs_f64(n * scale))
}

#[derive(Args, Debug)]
pub(crate) struct SimulateArgs {
    /// Node counts to project.
    #[arg(long, value_delimiter = ',', default_value = "10,30,100,300,1000")]
    pub(crate) nodes: Vec<usize>,
    /// Concurrent sessions per node.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) sessions_per_node: f64,
    /// Take the per-layer costs and hop overhead from a `bench --json` file.
    #[arg(long, value_name = "FILE")]
    pub(crate) from: Option<PathBuf>,
    /// With --from: simulate the bench's own network (its stages, replicas, links and
    /// relays, as the bench did beside its measurement) at its session counts, with this
    /// run's --relay and --routing, and print the measured figures beside; --nodes and the
    /// other shape options are not used.
    #[arg(long, requires = "from")]
    pub(crate) same_network: bool,
    /// Layers each node holds.
    #[arg(long, default_value_t = 10)]
    pub(crate) layers_per_node: usize,
    /// One-way client-node latency range in ms (uniform per pair).
    #[arg(long, value_delimiter = ',', num_args = 2, default_values_t = [5.0, 40.0])]
    pub(crate) latency_ms: Vec<f64>,
    /// Node speed spread: speeds are exp(N(0, sigma)).
    #[arg(long, default_value_t = 0.5)]
    pub(crate) speed_sigma: f64,
    /// How clients choose among a stage's replicas.
    #[arg(long, value_enum, default_value_t = Routing::LeastLoaded)]
    pub(crate) routing: Routing,
    /// Who forwards hidden states between stages.
    #[arg(long, value_enum, default_value_t = Relay::Client)]
    pub(crate) relay: Relay,
    #[arg(long, default_value_t = 32)]
    pub(crate) prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub(crate) gen_tokens: usize,
    /// Simulated seconds (the first sixth is warm-up).
    #[arg(long, default_value_t = 120.0)]
    pub(crate) duration: f64,
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}
