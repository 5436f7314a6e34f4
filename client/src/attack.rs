//! `veil attack`: run the attack suite against recorded node views of real encrypted
//! generations and print recovery rates with 95% confidence intervals.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use veil_model::attack::invariants::{self, InvariantOptions};
use veil_model::attack::key_recovery::{decrypt_and_match, recover_q, relative_error};
use veil_model::attack::{
    norms, perturbed, position0_table, record_views, sorted_coords, Deployment, NodeView, Rate,
};
use veil_model::crypto::{KeyOptions, KeyShape, ModelKey};
use veil_model::{Compute, Matrix, ModelBundle};

use crate::model_spec::ModelSpec;

/// Raw prompts (no chat template, so that first tokens vary).
const PROMPTS: [&str; 24] = [
    "The history of the Roman Empire",
    "Photosynthesis converts light into",
    "My favourite recipe for bread",
    "In 1969 the first humans",
    "Quantum computers differ from",
    "Dear hiring manager, I am writing",
    "A haiku about the autumn rain",
    "Water boils at a temperature of",
    "Once upon a time in a small village",
    "The stock market fell sharply",
    "Kubernetes schedules containers",
    "Why do cats purr when",
    "Shakespeare wrote many plays",
    "Electric cars are becoming",
    "Please summarise the following email",
    "Mount Everest is the highest",
    "def fibonacci(n):",
    "Translate into French: good morning",
    "Coffee beans are roasted",
    "The patient reported chest pain",
    "Ancient Egyptians built pyramids",
    "Machine learning models need data",
    "Jupiter has dozens of moons",
    "Hello! Could you help me plan",
];

#[derive(Subcommand, Debug)]
pub enum AttackCommand {
    /// Solve the residual key from a shard with the public weights, decrypt the tokens.
    KeyRecovery(AttackArgs),
    /// Match the norm of each session's first received vector against the embedding table.
    FirstToken(AttackArgs),
    /// Match every token from key-invariant quantities (norms, Gram matrices).
    VocabMatch(AttackArgs),
    /// Match sorted coordinates (defeats permutation-only keys).
    SortedCoords(AttackArgs),
    /// Every attack against public and private models, dense and permutation keys: the
    /// table in SECURITY.md.
    Table(AttackArgs),
}

/// Which key the owner uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum KeyKind {
    /// Veil's key: dense rotation, attention blocks, MLP permutation and scaling.
    Dense,
    /// Permutations only (hidden units, MLP units, heads), as in earlier schemes.
    Permutation,
}

#[derive(Args, Debug, Clone)]
pub struct AttackArgs {
    /// The public model the attacker has: smollm2, tiny, or a .gguf path.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    #[arg(long, value_enum, default_value_t = KeyKind::Dense)]
    pub key: KeyKind,
    /// Make the owner's model private: add Gaussian noise of this size (relative to each
    /// tensor's RMS) to every weight, which the attacker does not have. 0: public model.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub private_noise: f64,
    /// Noise of the private model in `table`.
    #[arg(long, default_value_t = 0.05)]
    pub table_noise: f64,
    /// Sessions recorded (one prompt each, at most 24).
    #[arg(long, default_value_t = 24)]
    pub prompts: usize,
    /// Tokens generated per session (the node sees all but the last).
    #[arg(long, default_value_t = 16)]
    pub gen_tokens: usize,
    /// Stages of the deployment (the attacked node holds the first).
    #[arg(long, default_value_t = 3)]
    pub stages: usize,
    /// The mitigation: the client runs this many layers itself, so the first node receives
    /// their output instead of embeddings (the attacker then matches against the public
    /// model's position-0 outputs of those layers).
    #[arg(long, default_value_t = 0)]
    pub client_layers: usize,
    /// Client layers of the mitigation rows in `table`.
    #[arg(long, default_value_t = 1)]
    pub table_client_layers: usize,
    /// Seed of the key and of the private noise.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One attack's outcome in one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub attack: &'static str,
    pub key: KeyKind,
    pub private_noise: f64,
    pub client_layers: usize,
    pub rate: Rate,
    /// The rate of guessing at random.
    pub chance: f64,
    /// The rate of always guessing the most frequent true token (the best blind guess).
    pub majority: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

struct Scenario<'a> {
    public: &'a ModelBundle,
    client_layers: usize,
    /// What received vectors are matched against: the public embeddings, or with client
    /// layers the public model's position-0 outputs of those layers.
    table: Matrix,
    view: NodeView,
    key_q: nalgebra::DMatrix<f64>,
    key: KeyKind,
    noise: f64,
}

fn scenario<'a>(
    public: &'a ModelBundle,
    args: &AttackArgs,
    key: KeyKind,
    noise: f64,
    client_layers: usize,
) -> Result<Scenario<'a>> {
    if client_layers >= public.weights.config.n_layers {
        bail!(
            "--client-layers must be below the model's {} layers",
            public.weights.config.n_layers
        );
    }
    let n = args.prompts.clamp(1, PROMPTS.len());
    let owner = perturbed(public, noise, args.seed ^ 0x5eed)?;
    let model_key = ModelKey::generate(
        KeyShape::of(&owner.weights.config),
        KeyOptions {
            permutation_only: key == KeyKind::Permutation,
            ..KeyOptions::default()
        },
        &mut ChaCha20Rng::seed_from_u64(args.seed),
    );
    let key_q = model_key.q.clone();
    let prompts: Vec<Vec<u32>> = PROMPTS[..n]
        .iter()
        .map(|p| owner.text.prompt_tokens(p, true))
        .collect::<std::result::Result<_, _>>()?;
    let started = Instant::now();
    let deployment = Deployment {
        stages: args.stages.max(1),
        client_layers,
    };
    let view = record_views(
        &owner,
        model_key,
        deployment,
        &prompts,
        args.gen_tokens,
        &Compute::cpu().device,
    )?;
    tracing::info!(
        "recorded {} sessions ({} received vectors) on the first node in {:.1} s ({key:?} key, noise {noise}, {client_layers} client layers)",
        view.sessions.len(),
        view.sessions.iter().map(|s| s.truth.len()).sum::<usize>(),
        started.elapsed().as_secs_f64()
    );
    let table = if client_layers == 0 {
        public.weights.embedding.clone()
    } else {
        position0_table(&public.weights, client_layers, &Compute::cpu().device)?
    };
    Ok(Scenario {
        public,
        client_layers,
        table,
        view,
        key_q,
        key,
        noise,
    })
}

/// The share of the most frequent token among the `first_only` or all received tokens.
fn majority(view: &NodeView, first_only: bool) -> f64 {
    let mut counts = std::collections::HashMap::new();
    let mut n = 0usize;
    for s in &view.sessions {
        let take = if first_only { 1 } else { s.truth.len() };
        for t in s.truth.iter().take(take) {
            *counts.entry(*t).or_insert(0usize) += 1;
            n += 1;
        }
    }
    counts.values().copied().max().unwrap_or(0) as f64 / n.max(1) as f64
}

fn outcome(s: &Scenario<'_>, attack: &'static str, rate: Rate, detail: Option<String>) -> Outcome {
    let first_only = attack.starts_with("first token");
    Outcome {
        majority: majority(&s.view, first_only),
        attack,
        key: s.key,
        private_noise: s.noise,
        client_layers: s.client_layers,
        rate,
        chance: 1.0 / s.public.weights.config.vocab_size as f64,
        detail,
    }
}

fn key_recovery(s: &Scenario<'_>) -> Result<Outcome> {
    let shard_layers = s.view.shard.layers.f32().ok_or_else(|| {
        anyhow::anyhow!(
            "key recovery reads f32 shards (the attack suite encrypts with --quant f32)"
        )
    })?;
    let est = recover_q(&shard_layers[0], &s.public.weights.layers[s.client_layers])?;
    let err = relative_error(&est.q, &s.key_q);
    let guesses = decrypt_and_match(&s.view, &est.q, &s.table, &Compute::cpu().device)?;
    Ok(outcome(
        s,
        "key recovery (Procrustes), all tokens",
        s.view.score(&guesses),
        Some(format!(
            "key error ‖Q_est − Q‖/‖Q‖ = {err:.2e}; {:.1}% of gate columns explained",
            est.explained * 100.0
        )),
    ))
}

fn first_token(s: &Scenario<'_>) -> Outcome {
    let guesses = norms::guess(&s.view, &s.table);
    let hits = s
        .view
        .sessions
        .iter()
        .zip(&guesses)
        .filter(|(v, g)| g.first() == v.truth.first())
        .count();
    outcome(
        s,
        "first token by norm",
        Rate::new(hits, s.view.sessions.len()),
        None,
    )
}

fn vocab_match(s: &Scenario<'_>) -> Outcome {
    let guesses = invariants::guess(&s.view, &s.table, InvariantOptions::default());
    outcome(
        s,
        "all tokens by norms + Gram matrix",
        s.view.score(&guesses),
        None,
    )
}

fn sorted(s: &Scenario<'_>) -> Outcome {
    let guesses = sorted_coords::guess(&s.view, &s.table);
    outcome(
        s,
        "all tokens by sorted coordinates",
        s.view.score(&guesses),
        None,
    )
}

fn print(outcomes: &[Outcome], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(outcomes)?);
        return Ok(());
    }
    println!(
        "| attack | key | model | recovered (95% CI, trials) | random guess | most frequent token |"
    );
    println!("|---|---|---|---|---|---|");
    for o in outcomes {
        let mut model = if o.private_noise > 0.0 {
            format!("private (+{} noise)", o.private_noise)
        } else {
            "public".to_string()
        };
        if o.client_layers > 0 {
            model.push_str(&format!(", {} client layer(s)", o.client_layers));
        }
        println!(
            "| {} | {:?} | {model} | {} | {:.4}% | {:.1}% |",
            o.attack,
            o.key,
            o.rate,
            o.chance * 100.0,
            o.majority * 100.0
        );
        if let Some(d) = &o.detail {
            println!("|   ↳ {d} | | | | | |");
        }
    }
    Ok(())
}

pub fn run(command: AttackCommand) -> Result<()> {
    let args = match &command {
        AttackCommand::KeyRecovery(a)
        | AttackCommand::FirstToken(a)
        | AttackCommand::VocabMatch(a)
        | AttackCommand::SortedCoords(a)
        | AttackCommand::Table(a) => a.clone(),
    };
    if !(0.0..=10.0).contains(&args.private_noise) || !(0.0..=10.0).contains(&args.table_noise) {
        bail!("noise levels must be between 0 and 10");
    }
    let public = ModelSpec::parse(&args.model)?.load()?;
    let outcomes = match command {
        AttackCommand::Table(_) => {
            let mut all = Vec::new();
            let mut scenarios = vec![];
            for key in [KeyKind::Dense, KeyKind::Permutation] {
                for noise in [0.0, args.table_noise] {
                    scenarios.push((key, noise, 0));
                }
            }
            if args.table_client_layers > 0 {
                scenarios.push((KeyKind::Dense, 0.0, args.table_client_layers));
            }
            for (key, noise, layers) in scenarios {
                let s = scenario(&public, &args, key, noise, layers)?;
                all.push(first_token(&s));
                all.push(vocab_match(&s));
                all.push(key_recovery(&s)?);
                all.push(sorted(&s));
            }
            all
        }
        other => {
            let s = scenario(
                &public,
                &args,
                args.key,
                args.private_noise,
                args.client_layers,
            )?;
            vec![match other {
                AttackCommand::KeyRecovery(_) => key_recovery(&s)?,
                AttackCommand::FirstToken(_) => first_token(&s),
                AttackCommand::VocabMatch(_) => vocab_match(&s),
                _ => sorted(&s),
            }]
        }
    };
    print(&outcomes, args.json)
}
