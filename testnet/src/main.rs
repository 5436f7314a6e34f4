//! `veil-testnet`: spins up a local Veil network and measures it. Not functional yet.

use clap::Parser;

/// Local Veil test networks (not part of this build yet).
#[derive(Parser, Debug)]
#[command(name = "veil-testnet", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("veil-testnet needs veil-node networking, which this build does not have yet")
}
