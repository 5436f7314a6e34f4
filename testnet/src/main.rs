//! `veil-testnet`: spins up a local Veil network, runs load and faults on it, and projects
//! its figures to larger networks.

mod cli;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use cli::{BenchArgs, ChaosArgs, Cli, Command, SimulateArgs, SoakArgs, Topology, UpArgs, WanArgs};
use veil_testnet::bench::{self, BenchOptions, BenchReport};
use veil_testnet::chaos::{self, ChaosOptions};
use veil_testnet::integrity::{self, IntegrityOptions};
use veil_testnet::network::LocalNetwork;
use veil_testnet::sim::{self, SimParams};
use veil_testnet::wan::ns::in_namespace;
use veil_testnet::{cleanup, report, up};

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VEIL_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,libp2p=warn,libp2p_kad=error,wgpu=warn,cubecl=warn",
        )
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
    let ns = network.client_namespace();
    let r = in_namespace(ns.as_deref(), || {
        if args.json {
            up::ask(
                &network,
                &args.prompt,
                args.max_tokens,
                network.privacy,
                &mut std::io::sink(),
            )
        } else {
            up::ask(
                &network,
                &args.prompt,
                args.max_tokens,
                network.privacy,
                &mut std::io::stdout(),
            )
        }
    })??;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("route: {}", r.route.join(" -> "));
        println!(
            "{} tokens: first after {:.2} s (nodes load their shards on first use), then {:.1} \
             tokens/s; {:.0} bytes on the wire per token",
            r.tokens, r.time_to_first_token_s, r.decode_tokens_per_s, r.bytes_per_token
        );
        match &r.masked {
            Some(m) => println!(
                "masked mode: the nodes received only uniformly random words ({} ops, {} \
                 failed checks, {} nodes caught); the client ran the rest and provided the \
                 masks: see SECURITY.md",
                m.ops,
                m.failed_checks,
                m.detections.len()
            ),
            None => println!(
                "the nodes received only hidden states rotated by key {}… (held by this \
                 client alone); with public weights like these a curious node can undo the \
                 rotation: see SECURITY.md",
                &r.key_fingerprint[..r.key_fingerprint.len().min(12)]
            ),
        }
    }
    if args.exit {
        return Ok(());
    }
    // kept until ctrl-c, which stops it with the nodes
    let _gateway = match args.serve {
        Some(port) => {
            let g = in_namespace(ns.as_deref(), || up::start_gateway(&network, port))??;
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
        let ns = network.client_namespace();
        let r = in_namespace(ns.as_deref(), || {
            integrity::run(&network, &opts, &args.net.model)
        })??;
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
    let ns = network.client_namespace();
    let r = in_namespace(ns.as_deref(), || {
        bench::run(&network, &opts, &args.net.model)
    })??;
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
    if args.victims == chaos::Victims::Relays && args.net.topology != Topology::Wan {
        bail!(
            "no node to kill: --victims relays needs --topology wan (on loopback every node \
             holds stages)"
        );
    }
    let mut network = args.net.start()?;
    let ns = network.client_namespace();
    let opts = ChaosOptions {
        sessions: args.sessions.max(1),
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens.max(1),
        rounds: args.rounds.max(1),
        kill_every: args.kill_every,
        down: args.down,
        seed: args.seed,
        victims: args.victims,
    };
    let r = in_namespace(ns.as_deref(), || chaos::run(&mut network, &opts))??;
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
            "error: no node was killed and restarted within the run; lower --kill-every or --down"
        );
    } else if !r.passed() {
        eprintln!("error: some completed outputs differ from the fault-free run");
    }
    Ok(r.passed())
}

fn run_soak(args: SoakArgs) -> Result<bool> {
    let limits = veil_testnet::soak::SoakLimits {
        memory_limit_mib: args.memory_limit_mib,
        max_disk_mib: args.max_disk_mib,
        rss_allowance_mib: args.rss_allowance_mib,
        ..Default::default()
    };
    if !(args.sample_every > 0.0 && args.sample_every.is_finite()) {
        bail!("--sample-every must be a positive number of seconds");
    }
    let mut options = args.net.options();
    options.node = limits.apply(options.node);
    let mut network = LocalNetwork::start(&options, &|m| tracing::info!("{m}"))?;
    let opts = veil_testnet::soak::SoakOptions {
        duration: args.duration,
        sessions: args.sessions,
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        sample_every: std::time::Duration::from_secs_f64(args.sample_every),
        abuse: !args.no_abuse,
        seed: args.seed,
        limits,
    };
    let ns = network.client_namespace();
    let r = in_namespace(ns.as_deref(), || {
        veil_testnet::soak::run(&mut network, &opts, &args.net.model)
    })??;
    drop(network);
    veil_testnet::soak::write(&r, &args.report)?;
    print!("{}", veil_testnet::soak::markdown(&r));
    eprintln!("report written to {}", args.report.display());
    if !r.passed() {
        eprintln!("error: the soak failed a check (see the table above)");
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
    if args.same_network {
        return simulate_same_network(&args);
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

/// `simulate --from bench.json --same-network`.
fn simulate_same_network(args: &SimulateArgs) -> Result<()> {
    let path = args.from.as_ref().context("--same-network needs --from")?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let r: BenchReport = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a bench --json file", path.display()))?;
    let Some((params, rows)) = veil_testnet::calibrate::same_network(&r, args.relay, args.routing)
    else {
        bail!(
            "{} has no simulator parameters: the bench ran with --no-baselines",
            path.display()
        );
    };
    if args.json {
        let json = serde_json::json!({"params": params, "results": rows});
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    println!(
        "{} on {} nodes ({} stages × {} replicas) {}, --relay {:?}:\n\n{}",
        r.model,
        r.nodes,
        r.stages,
        r.replicas,
        if r.wan.is_some() {
            "on the WAN"
        } else {
            "on loopback"
        },
        args.relay,
        veil_testnet::calibrate::table(&rows)
    );
    Ok(())
}

fn run_wan(a: WanArgs) -> Result<()> {
    let opts = a.shape.options();
    let net = veil_testnet::wan::up::WanNetwork::start(
        &opts,
        a.home_nodes,
        &veil_testnet::cluster::NodeSettings::default(),
    )?;
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
        Command::Soak(a) => run_soak(a),
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
