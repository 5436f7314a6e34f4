//! `veil`: the Veil client. Fetches models, runs them locally, and (with a network)
//! deploys encrypted shards and generates through them.

use veil_client::{
    attack, bench, chat, deploy, encrypt, fetch, generate, peers, perplexity, proof, serve, synth,
};

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "veil",
    version,
    about = "Private LLM inference on untrusted machines",
    long_about = "Veil splits a model's layers across peer nodes that hold encrypted shards, so \
                  that no node sees a plaintext input, activation or output.\n\n\
                  Models: `smollm2` (SmolLM2-135M-Instruct, fetched on first use), `gemma3` \
                  (Gemma 3 270M, fetched on first use; runs in plaintext only, `--local`), \
                  `tiny` (a small random model for tests) or a path to a .gguf file.\n\
                  Models are cached under $VEIL_HOME (default ~/.veil)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage model files.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Generate text from a prompt, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Encrypt a model with a fresh key into node shards and a secret client bundle.
    Encrypt(encrypt::EncryptArgs),
    /// List the nodes of a network (verified capacity ads).
    Peers(peers::PeersArgs),
    /// Encrypt a model and place its shards on the network's nodes.
    Deploy(deploy::DeployArgs),
    /// Talk to a deployment interactively.
    Chat(chat::ChatArgs),
    /// An OpenAI-compatible HTTP gateway (/v1/chat/completions, /v1/completions,
    /// /v1/models, /health) to a deployment, or to a local model.
    Serve(serve::ServeArgs),
    /// Perplexity of a model on a text (llama.cpp's definition) and, with --encrypted, of
    /// its encrypted pipeline beside it, with their top-1 agreement.
    Perplexity(perplexity::PerplexityArgs),
    /// Measure prompt and decode speed and peak memory on each backend.
    Bench(bench::BenchArgs),
    /// Attack what a node sees (recorded from real encrypted generations) and report how
    /// much of the text each attack recovers.
    Attack {
        #[command(subcommand)]
        command: attack::AttackCommand,
    },
    /// Check a fraud proof (written when a node is caught answering wrongly): its receipts,
    /// then the answers against the stage recomputed from its shard. Exit 0: the node is
    /// proven to have lied; 1: the proof is rejected or the answers are right; 2: genuine
    /// receipts, but no shard to recompute with.
    VerifyProof(proof::VerifyProofArgs),
    #[command(hide = true)]
    BenchChild(bench::ChildArgs),
}

#[derive(Subcommand, Debug)]
enum ModelCommand {
    /// Download a model into the cache (checking its sha256) and print its path.
    Fetch {
        /// Model to fetch: smollm2 or gemma3.
        #[arg(default_value = "smollm2")]
        name: String,
    },
    /// Write a random-weight GGUF of a real model's shape (Llama 3.2 1B/3B, Llama 3.1 8B,
    /// SmolLM2, Qwen 2.5 0.5B, Qwen 3 0.6B/8B) with SmolLM2's tokenizer: for speed and memory studies at sizes no package
    /// ships. llama.cpp loads it too.
    Synth(synth::SynthArgs),
}

fn init_logging() {
    // a client uses no DHT (kad takes no peers in clients), so kad's "no known peers" at
    // start is noise
    let filter = tracing_subscriber::EnvFilter::try_from_env("VEIL_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,wgpu=warn,cubecl=warn,naga=warn,libp2p=warn,libp2p_swarm=warn,libp2p_kad=error",
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Model {
            command: ModelCommand::Fetch { name },
        } => {
            let path = fetch::fetch_named(&name)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Model {
            command: ModelCommand::Synth(args),
        } => synth::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Encrypt(args) => encrypt::run(args),
        Command::Peers(args) => peers::run(args),
        Command::Deploy(args) => deploy::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Attack { command } => attack::run(command),
        Command::BenchChild(args) => bench::run_child(args),
        Command::Serve(args) => serve::run(args),
        Command::VerifyProof(args) => match proof::run(args)? {
            0 => Ok(()),
            code => std::process::exit(code),
        },
    }
}

fn main() -> ExitCode {
    init_logging();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
