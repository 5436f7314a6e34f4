//! `veil-testnet`: spins up a local Veil network, runs load and faults on it, and projects
//! its figures to larger networks.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use veil_model::crypto::ShardQuant;
use veil_testnet::bench::{self, BenchOptions, BenchReport};
use veil_testnet::chaos::{self, ChaosOptions};
use veil_testnet::cluster::{Byzantine, NodeSettings};
use veil_testnet::integrity::{self, IntegrityOptions};
use veil_testnet::network::{LocalNetwork, NetworkOptions};
use veil_testnet::sim::{self, Relay, Routing, SimParams};
use veil_testnet::{cleanup, report, up};

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
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a network, deploy the model, answer one prompt through it, stay up until ctrl-c.
    Up(UpArgs),
    /// Concurrent generations at 1, 2, 4 … S sessions, with single-process baselines.
    Bench(BenchArgs),
    /// Kill and restart random nodes while generating; check every output is unchanged.
    Chaos(ChaosArgs),
    /// Project throughput and latency to 10 … 1,000 nodes with a discrete-event model.
    Simulate(SimulateArgs),
    /// A wide-area network on this machine (network namespaces, NAT routers, links with
    /// delay and a rate; needs root), nodes on it, up until ctrl-c.
    Wan(WanArgs),
}

#[derive(Args, Debug)]
struct WanArgs {
    /// One home network per entry, behind a NAT of this kind: eim (endpoint-independent)
    /// or symmetric.
    #[arg(long, value_delimiter = ',', default_value = "eim,symmetric")]
    homes: Vec<veil_testnet::wan::NatKind>,
    /// The client's NAT.
    #[arg(long, default_value = "eim")]
    client_nat: veil_testnet::wan::NatKind,
    /// One-way delay of each uplink in ms, or a range each link draws from.
    #[arg(long, default_value = "5-40", value_parser = veil_testnet::wan::up::parse_delay)]
    delay_ms: (u32, u32),
    #[arg(long, default_value_t = 1)]
    jitter_ms: u32,
    #[arg(long, default_value_t = 100)]
    rate_mbit: u32,
    /// Also start a node in each home network.
    #[arg(long)]
    home_nodes: bool,
}

/// The network to start.
#[derive(Args, Debug, Clone)]
struct NetOpts {
    /// Node processes to start.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Model: smollm2, tiny, or a .gguf path.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Stages to split the model into [default: the number of nodes, at most 3].
    #[arg(long)]
    stages: Option<usize>,
    /// Nodes holding each stage (fewer if there are not enough nodes).
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// TCP port of the first node; the others take the next ones [default: any free ports].
    #[arg(long)]
    base_port: Option<u16>,
    /// Keep the nodes' data directories and logs after exit (the path is printed).
    #[arg(long)]
    keep: bool,
    /// Layers the client runs itself in plaintext before the first node (see SECURITY.md).
    #[arg(long, default_value_t = 0)]
    client_layers: usize,
    /// Make every node wait this long per forward pass, to mimic slower machines.
    #[arg(long, default_value_t = 0)]
    step_delay_ms: u64,
    /// The shards' weight format: q8_0 (default), q4_0, q4_k, or f32 (exact).
    #[arg(long, default_value = "q8_0", value_name = "FORMAT")]
    quant: ShardQuant,
    #[arg(long, value_name = "FILE|none", help = veil_client::encrypt::CALIBRATION_HELP)]
    calibration: Option<String>,
    /// Make the last K nodes byzantine: they corrupt answers on purpose (see --lie).
    #[arg(long, value_name = "K", default_value_t = 0)]
    byzantine: usize,
    /// How byzantine nodes lie: noise (a tenth of each row's RMS added), zeros, skip-layers
    /// (the input returned) or replay-stale (the previous answer repeated).
    #[arg(long, value_name = "MODE", default_value = "noise",
          value_parser = ["noise", "zeros", "skip-layers", "replay-stale"])]
    lie: String,
    /// Fraction of their answers byzantine nodes corrupt.
    #[arg(long, value_name = "R", default_value_t = 0.1,
          value_parser = veil_client::verify::parse_rate)]
    lie_rate: f64,
    /// The deployment's default verification rate (`veil deploy --verify`).
    #[arg(long, value_name = "RATE", value_parser = veil_client::verify::parse_rate)]
    verify: Option<f64>,
}

impl NetOpts {
    fn options(&self) -> NetworkOptions {
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
                ..NodeSettings::default()
            },
            keep: self.keep,
            client_layers: self.client_layers,
            quant: self.quant,
            calibration: self.calibration.clone(),
            verify: self.verify,
        }
    }

    fn start(&self) -> Result<LocalNetwork> {
        LocalNetwork::start(&self.options(), &|m| tracing::info!("{m}"))
    }
}

#[derive(Args, Debug)]
struct UpArgs {
    #[command(flatten)]
    net: NetOpts,
    /// The prompt to answer (chat-templated).
    #[arg(
        long,
        default_value = "What is the capital of France? Answer in one sentence."
    )]
    prompt: String,
    /// Most tokens of the answer.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Stop after the answer instead of keeping the network up.
    #[arg(long)]
    exit: bool,
    /// Keep an OpenAI-compatible gateway (`veil serve`) to the deployment up on
    /// 127.0.0.1:PORT (0: any free port); its URL is printed.
    #[arg(long, value_name = "PORT", conflicts_with = "exit")]
    serve: Option<u16>,
    /// Print one JSON object (answer, route, speed) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    net: NetOpts,
    /// Most concurrent sessions (the bench also runs 1, 2, 4 … below it).
    #[arg(long, default_value_t = 4)]
    sessions: usize,
    /// Prompt length of every session, in tokens.
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Tokens each session generates.
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Skip the single-process plaintext and encrypted baselines.
    #[arg(long)]
    no_baselines: bool,
    /// Also run every level through an OpenAI-compatible gateway (`veil serve`) and report
    /// its tokens/s against the in-process client's, the time to first token it adds, and
    /// its memory per idle connection.
    #[arg(long)]
    gateway: bool,
    /// Write the full results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write bench.md, bench.json and SVG charts into this directory.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// The verification rates to compare (0 is the cost baseline), one round of --trials
    /// generations each, in this order (repeat a rate to see the spread) [default with
    /// --byzantine: 0,0.05,0.2,1]. Given without --byzantine, every node is honest and the
    /// bench measures what checking alone costs.
    #[arg(long, value_delimiter = ',', value_parser = veil_client::verify::parse_rate)]
    verify_rates: Option<Vec<f64>>,
    /// With --byzantine: generations per verification rate (run --sessions at a time).
    #[arg(long, default_value_t = 16)]
    trials: usize,
}

#[derive(Args, Debug)]
struct ChaosArgs {
    #[command(flatten)]
    net: NetOpts,
    /// Seconds between node kills.
    #[arg(long, default_value_t = 4.0)]
    kill_every: f64,
    /// Seconds a killed node stays down before it restarts.
    #[arg(long, default_value_t = 1.0)]
    down: f64,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 2)]
    sessions: usize,
    /// Generations each session runs one after the other.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value_t = 16)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 48)]
    gen_tokens: usize,
    /// Seed of the choice of victims.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct SimulateArgs {
    /// Node counts to project.
    #[arg(long, value_delimiter = ',', default_value = "10,30,100,300,1000")]
    nodes: Vec<usize>,
    /// Concurrent sessions per node.
    #[arg(long, default_value_t = 1.0)]
    sessions_per_node: f64,
    /// Take the per-layer costs and hop overhead from a `bench --json` file.
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,
    /// Layers each node holds.
    #[arg(long, default_value_t = 10)]
    layers_per_node: usize,
    /// One-way client-node latency range in ms (uniform per pair).
    #[arg(long, value_delimiter = ',', num_args = 2, default_values_t = [5.0, 40.0])]
    latency_ms: Vec<f64>,
    /// Node speed spread: speeds are exp(N(0, sigma)).
    #[arg(long, default_value_t = 0.5)]
    speed_sigma: f64,
    /// How clients choose among a stage's replicas.
    #[arg(long, value_enum, default_value_t = Routing::LeastLoaded)]
    routing: Routing,
    /// Who forwards hidden states between stages.
    #[arg(long, value_enum, default_value_t = Relay::Client)]
    relay: Relay,
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Simulated seconds (the first sixth is warm-up).
    #[arg(long, default_value_t = 120.0)]
    duration: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VEIL_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,libp2p=warn,wgpu=warn,cubecl=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .compact()
        .init();
}

fn run_up(args: UpArgs) -> Result<()> {
    let network = args.net.start()?;
    let mut stdout = std::io::stdout();
    let r = if args.json {
        up::ask(
            &network,
            &args.prompt,
            args.max_tokens,
            &mut std::io::sink(),
        )?
    } else {
        up::ask(&network, &args.prompt, args.max_tokens, &mut stdout)?
    };
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("route: {}", r.route.join(" -> "));
        println!(
            "{} tokens: first after {:.2} s (nodes load their shards on first use), then {:.1} \
             tokens/s; {:.0} bytes on the wire per token",
            r.tokens, r.time_to_first_token_s, r.decode_tokens_per_s, r.bytes_per_token
        );
        println!(
            "the nodes received only hidden states rotated by key {}… (held by this client \
             alone); with public weights like these a curious node can undo the rotation: \
             see SECURITY.md",
            &r.key_fingerprint[..r.key_fingerprint.len().min(12)]
        );
    }
    if args.exit {
        return Ok(());
    }
    // kept until ctrl-c, which stops it with the nodes
    let _gateway = match args.serve {
        Some(port) => {
            let g = up::start_gateway(&network, port)?;
            println!(
                "OpenAI-compatible gateway: {}/v1 (the key stays in this process tree), e.g.\n  \
                 curl -s {}/v1/chat/completions -H 'Content-Type: application/json' -d \
                 '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'",
                g.url, g.url
            );
            Some(g)
        }
        None => None,
    };
    let _ = writeln!(std::io::stderr(), "{}", up::usage_hint(&network));
    loop {
        // ctrl-c is handled by the signal thread, which cleans up and exits.
        std::thread::park();
    }
}

fn run_bench(args: BenchArgs) -> Result<()> {
    if args.sessions == 0 || args.gen_tokens == 0 {
        bail!("--sessions and --gen-tokens must be at least 1");
    }
    let network = args.net.start()?;
    if args.net.byzantine > 0 || args.verify_rates.is_some() {
        // measure verification instead of throughput
        let liars = network
            .nodes
            .iter()
            .rev()
            .take(args.net.byzantine)
            .map(|n| n.peer_id.clone())
            .collect();
        let opts = IntegrityOptions {
            rates: args
                .verify_rates
                .clone()
                .unwrap_or_else(|| vec![0.0, 0.05, 0.2, 1.0]),
            trials: args.trials.max(1),
            sessions: args.sessions,
            prompt_tokens: args.prompt_tokens,
            gen_tokens: args.gen_tokens,
            liars,
            lie: args.net.lie.clone(),
            lie_rate: args.net.lie_rate,
        };
        let r = integrity::run(&network, &opts, &args.net.model)?;
        drop(network);
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_vec_pretty(&r)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        print!("{}", integrity::markdown(&r));
        return Ok(());
    }
    let opts = BenchOptions {
        sessions: args.sessions,
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        no_baselines: args.no_baselines,
        gateway: args.gateway,
    };
    let r = bench::run(&network, &opts, &args.net.model)?;
    drop(network);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&r)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(dir) = &args.report {
        report::write(&r, dir)?;
        tracing::info!("report written to {}", dir.display());
    }
    print!("{}", report::markdown(&r));
    Ok(())
}

fn run_chaos(args: ChaosArgs) -> Result<bool> {
    if args.net.replicas < 2 || args.net.nodes < 2 {
        tracing::warn!("with one replica per stage, every kill fails the generations using it");
    }
    let mut network = args.net.start()?;
    let r = chaos::run(
        &mut network,
        &ChaosOptions {
            sessions: args.sessions.max(1),
            prompt_tokens: args.prompt_tokens,
            gen_tokens: args.gen_tokens.max(1),
            rounds: args.rounds.max(1),
            kill_every: args.kill_every,
            down: args.down,
            seed: args.seed,
        },
    )?;
    drop(network);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&r)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("{}", r.summary());
    for e in &r.errors {
        println!("  failed: {e}");
    }
    if r.kills.is_empty() {
        eprintln!(
            "error: the run ended before the first kill; raise --rounds or lower --kill-every"
        );
    } else if !r.passed() {
        eprintln!("error: some completed outputs differ from the fault-free run");
    }
    Ok(r.passed())
}

fn run_simulate(args: SimulateArgs) -> Result<()> {
    let mut base = SimParams {
        layers_per_node: args.layers_per_node,
        latency_ms: (args.latency_ms[0], args.latency_ms[1]),
        speed_sigma: args.speed_sigma,
        routing: args.routing,
        relay: args.relay,
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        duration_s: args.duration,
        warmup_s: args.duration / 6.0,
        seed: args.seed,
        ..SimParams::default()
    };
    if base.latency_ms.0 < 0.0 || base.latency_ms.1 < base.latency_ms.0 {
        bail!("--latency-ms takes MIN,MAX with 0 <= MIN <= MAX");
    }
    if let Some(path) = &args.from {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let r: BenchReport = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a bench --json file", path.display()))?;
        base = r.sim_params(&base);
        tracing::info!(
            "from {}: pass {:.3} ms/layer, {:.4} ms/row/layer, hop {:.2} ms",
            path.display(),
            base.pass_ms_per_layer,
            base.row_ms_per_layer,
            base.hop_overhead_ms
        );
    }
    let results = sim::sweep(&base, &args.nodes, args.sessions_per_node);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"params": base, "results": results}))?
        );
        return Ok(());
    }
    println!(
        "| nodes | stages × replicas | sessions | tokens/s | per session | per-token p50 / p95 / p99 ms | TTFT p50 ms | node busy mean / max |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} × {} | {} | {:.0} | {:.1} | {:.0} / {:.0} / {:.0} | {:.0} | {:.0}% / {:.0}% |",
            r.nodes,
            r.stages,
            r.replicas,
            r.sessions,
            r.tokens_per_s,
            r.per_session_tokens_per_s,
            r.per_token.p50_ms,
            r.per_token.p95_ms,
            r.per_token.p99_ms,
            r.time_to_first_token.p50_ms,
            r.mean_utilisation * 100.0,
            r.max_utilisation * 100.0
        );
    }
    Ok(())
}

fn run_wan(a: WanArgs) -> Result<()> {
    let opts = veil_testnet::wan::WanOptions {
        homes: a.homes,
        client_nat: a.client_nat,
        delay_ms: a.delay_ms,
        jitter_ms: a.jitter_ms,
        rate_mbit: a.rate_mbit,
        ..Default::default()
    };
    let net =
        veil_testnet::wan::up::WanNetwork::start(&opts, a.home_nodes, &NodeSettings::default())?;
    print!("{}", net.describe());
    eprintln!("\nctrl-c removes everything");
    // ctrl-c is handled by the signal thread, which cleans up and exits
    loop {
        std::thread::park();
    }
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Simulate(_)) {
        cleanup::install_signal_handler();
    }
    let result = match cli.command {
        Command::Up(a) => run_up(a).map(|()| true),
        Command::Bench(a) => run_bench(a).map(|()| true),
        Command::Chaos(a) => run_chaos(a),
        Command::Simulate(a) => run_simulate(a).map(|()| true),
        Command::Wan(a) => run_wan(a).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            cleanup::clean_everything();
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
