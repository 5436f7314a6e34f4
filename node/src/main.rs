//! `veil-node`: the Veil node daemon. It will hold encrypted shards and serve inference
//! sessions over libp2p; this build only identifies itself.

use clap::Parser;

/// The Veil node daemon (networking is not part of this build yet).
#[derive(Parser, Debug)]
#[command(name = "veil-node", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("veil-node cannot join a network yet: this build has no networking")
}
