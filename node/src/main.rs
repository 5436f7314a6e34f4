//! `veil-node`: the Veil node daemon. Holds encrypted shards and serves inference sessions
//! over libp2p. See `veil-node --help`.

mod config;
mod engine;
mod fair;
mod lie;
mod metrics;
mod proofs;
mod server;
mod store;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use veil_protocol::Identity;

use crate::config::{parse_config, NodeConfig, DEFAULT_CONFIG};
use crate::server::identity_path;

#[derive(Parser, Debug)]
#[command(
    name = "veil-node",
    version,
    about = "The Veil node daemon: holds encrypted model shards and serves inference sessions",
    long_about = "A Veil node joins a libp2p network, advertises its compute in signed capacity \
                  ads, accepts encrypted shards from model owners and runs inference sessions on \
                  them. It never sees a plaintext token, activation or logit.\n\n\
                  Start with `veil-node init`, then `veil-node run`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create an identity key and a commented configuration; print the peer id.
    Init {
        /// Directory for the key, the configuration and the shards [default: $VEIL_HOME/node].
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Join the network and serve until ctrl-c.
    Run {
        /// Data directory made by `init` (its node.toml is read if present).
        #[arg(long, conflicts_with = "config")]
        data_dir: Option<PathBuf>,
        /// A configuration file (its data_dir holds the key and shards).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen on this multiaddr instead of the configured ones (repeatable).
        #[arg(long)]
        listen: Vec<String>,
        /// Join through this peer (repeatable); `/p2p/<id>` may be omitted.
        #[arg(long)]
        bootstrap: Vec<String>,
    },
}

fn default_data_dir() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("VEIL_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home).join("node"));
    }
    let home = std::env::var_os("HOME").context("set HOME, VEIL_HOME or --data-dir")?;
    Ok(PathBuf::from(home).join(".veil").join("node"))
}

fn init(data_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let key = identity_path(data_dir);
    if key.exists() {
        let id = Identity::load(&key)?;
        bail!(
            "{} is already initialised (peer id {}); delete identity.key to start over",
            data_dir.display(),
            id.peer_id()
        );
    }
    let id = Identity::generate();
    id.save(&key)?;
    let config = data_dir.join("node.toml");
    if !config.exists() {
        std::fs::write(&config, DEFAULT_CONFIG)
            .with_context(|| format!("cannot write {}", config.display()))?;
    }
    tracing::info!("wrote {} and {}", key.display(), config.display());
    println!("{}", id.peer_id());
    Ok(())
}

fn load_config(data_dir: Option<PathBuf>, config: Option<PathBuf>) -> Result<NodeConfig> {
    let read = |path: &Path| -> Result<NodeConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        parse_config(&text, path.parent()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    };
    match (data_dir, config) {
        (_, Some(file)) => read(&file),
        (dir, None) => {
            let dir = match dir {
                Some(d) => d,
                None => default_data_dir()?,
            };
            let file = dir.join("node.toml");
            let mut c = if file.exists() {
                read(&file)?
            } else {
                NodeConfig::default()
            };
            c.data_dir = dir;
            Ok(c)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { data_dir } => init(&data_dir.map_or_else(default_data_dir, Ok)?),
        Command::Run {
            data_dir,
            config,
            listen,
            bootstrap,
        } => {
            let mut config = load_config(data_dir, config)?;
            if !listen.is_empty() {
                config.listen = listen;
            }
            config.bootstrap.extend(bootstrap);
            let key = identity_path(&config.data_dir);
            if !key.exists() {
                bail!(
                    "no identity in {}: run `veil-node init --data-dir {}` first",
                    config.data_dir.display(),
                    config.data_dir.display()
                );
            }
            let identity = Identity::load(&key)?;
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(server::run(config, identity))
        }
    }
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VEIL_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,wgpu=warn,cubecl=warn,naga=warn,libp2p=warn,libp2p_swarm=warn",
        )
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
