//! `veil attack`: run the attack suite against recorded node views of real encrypted
//! generations and print recovery rates with 95% confidence intervals.

mod masked;
mod prompts;
mod scenario;
mod uniformity;

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use std::collections::BTreeMap;

use veil_model::attack::inversion::{Corpus, InversionOptions, Inverter};
use veil_model::attack::sequential::SequentialOptions;
use veil_model::{Compute, ModelBundle};

use crate::model_spec::ModelSpec;
pub use prompts::PromptSet;
pub use scenario::{Outcome, Private, Recording, Scenario, Setup};

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
    /// Walk each session left to right: run the public model's candidate tokens through
    /// the node's layers and keep the one whose norms, attention scores and sorted gate
    /// values match what the node computed (works on any stage, behind client layers).
    Sequential(AttackArgs),
    /// Train a small network on the quantities the key leaves visible, computed with the
    /// public model over a text corpus (its own samples and the calibration text), and
    /// let it read each position's token from what the node computed.
    Inversion(AttackArgs),
    /// Every attack against public, private and fine-tuned models, dense and permutation
    /// keys, the client-layers mitigation and a middle stage: the table in SECURITY.md.
    Table(AttackArgs),
    /// Masked mode: record what a compute node receives, read the prompt from it with the
    /// strongest attack on the first layer (and, as a control, from the same integers
    /// without masks), and test every byte lane for uniformity.
    Masked(masked::MaskedArgs),
    /// Test what nodes recorded (`veil-testnet --record DIR`, a node's `record_payloads`)
    /// for uniformity, byte lane by byte lane: masked words pass, rotated states fail.
    Uniformity(uniformity::UniformityArgs),
}

/// Which key the owner uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum KeyKind {
    /// Veil's key: dense rotation, attention blocks, MLP permutation and scaling.
    Dense,
    /// Permutations only (hidden units, MLP units, heads), as in earlier schemes.
    Permutation,
}

/// The owner's models of `table`'s rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelKind {
    Public,
    Noise,
    Finetune,
    Lora,
}

impl ModelKind {
    fn of(p: Private) -> Self {
        match p {
            Private::Public => ModelKind::Public,
            Private::Noise(_) => ModelKind::Noise,
            Private::Finetune(..) => ModelKind::Finetune,
            Private::Lora(..) => ModelKind::Lora,
        }
    }
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
    /// Make the owner's model a LoRA-style fine-tune instead: a random low-rank update
    /// whose size is this fraction of each attention and MLP matrix (embeddings, norms and
    /// head stay public). 0: off.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub finetune: f64,
    /// Rank of the fine-tune's update (random or trained).
    #[arg(long, default_value_t = 16)]
    pub finetune_rank: usize,
    /// Make the owner's model a *trained* LoRA fine-tune instead: adapters of rank
    /// --finetune-rank on every attention and MLP projection, trained this many Adam steps
    /// (4 windows of 64 tokens each) on a private text the attacker never sees (an invented
    /// operator handbook); embeddings, norms and head stay public. 0: off.
    #[arg(long, default_value_t = 0)]
    pub lora_steps: usize,
    /// Training steps of the trained fine-tune in `table` (0: no such rows).
    #[arg(long, default_value_t = 60)]
    pub table_lora_steps: usize,
    /// Run only `table`'s rows of this owner's model (to refresh them without the rest).
    #[arg(long, value_enum)]
    pub only: Option<ModelKind>,
    /// Noise of the private model in `table`.
    #[arg(long, default_value_t = 0.05)]
    pub table_noise: f64,
    /// Size of the fine-tuned model in `table`.
    #[arg(long, default_value_t = 0.05)]
    pub table_finetune: f64,
    /// Sessions recorded (one prompt each, at most 24 general or 12 handbook prompts).
    #[arg(long, default_value_t = 24)]
    pub prompts: usize,
    /// What the users ask: general text, or the trained fine-tune's own domain (prompts
    /// from its private handbook, whose answers hold what only the fine-tune knows).
    #[arg(long, value_enum, default_value_t = PromptSet::General)]
    pub prompt_set: PromptSet,
    /// Tokens generated per session (the node sees all but the last).
    #[arg(long, default_value_t = 16)]
    pub gen_tokens: usize,
    /// Stages of the deployment.
    #[arg(long, default_value_t = 3)]
    pub stages: usize,
    /// The stage whose node attacks (0: the first; later stages receive the previous
    /// stage's output, which only the sequential attack uses).
    #[arg(long, default_value_t = 0)]
    pub stage: usize,
    /// The mitigation: the client runs this many layers itself, so the first node receives
    /// their output instead of embeddings (the attacker then matches against the public
    /// model's position-0 outputs of those layers).
    #[arg(long, default_value_t = 0)]
    pub client_layers: usize,
    /// The other end of the mitigation: the client also runs the model's last this many
    /// layers, so the last node serves a middle part of the model.
    #[arg(long, default_value_t = 0)]
    pub client_last_layers: usize,
    /// Client layers of the mitigation rows in `table` (first, and last for the rows of
    /// the last stage).
    #[arg(long, default_value_t = 1)]
    pub table_client_layers: usize,
    /// Layers of the node's shard whose observables the sequential attack compares.
    #[arg(long, default_value_t = 2)]
    pub seq_layers: usize,
    /// Candidates per position the sequential attack takes from the public model's
    /// prediction given the tokens recovered so far (where the node receives embeddings,
    /// 64 more from the whole-vocabulary prefilter). Behind client layers and on later
    /// stages the rate grows with it (SmolLM2, one client layer: 24% at 32, 59% at 128,
    /// 78% at 512); time grows more slowly.
    #[arg(long, default_value_t = 512)]
    pub seq_candidates: usize,
    /// Sequences the learned inversion's corpus takes from the public model's own samples
    /// (40 tokens each; besides the calibration text).
    #[arg(long, default_value_t = 160)]
    pub inversion_samples: usize,
    /// A smaller run for CI: 6 prompts, 8 tokens each, a smaller inversion corpus.
    #[arg(long)]
    pub quick: bool,
    /// Seed of the key and of the private model.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl AttackArgs {
    fn recording(&self) -> Recording {
        let (prompts, gen_tokens) = if self.quick {
            (self.prompts.min(6), self.gen_tokens.min(8))
        } else {
            (self.prompts, self.gen_tokens)
        };
        Recording {
            prompts,
            prompt_set: self.prompt_set,
            gen_tokens,
            stages: self.stages.max(1),
            seed: self.seed,
        }
    }

    fn sequential(&self) -> SequentialOptions {
        SequentialOptions {
            layers: self.seq_layers.max(1),
            lm_candidates: self.seq_candidates,
            ..SequentialOptions::default()
        }
    }

    fn inversion(&self) -> InversionOptions {
        let d = InversionOptions::default();
        InversionOptions {
            samples: if self.quick {
                self.inversion_samples.min(32)
            } else {
                self.inversion_samples
            },
            epochs: if self.quick { 15 } else { d.epochs },
            seed: self.seed ^ 0x1e4,
            ..d
        }
    }

    fn private(&self) -> Result<Private> {
        let rank = self.finetune_rank.max(1);
        let chosen: Vec<Private> = [
            (self.private_noise > 0.0).then_some(Private::Noise(self.private_noise)),
            (self.finetune > 0.0).then_some(Private::Finetune(self.finetune, rank)),
            (self.lora_steps > 0).then_some(Private::Lora(self.lora_steps, rank)),
        ]
        .into_iter()
        .flatten()
        .collect();
        match chosen[..] {
            [] => Ok(Private::Public),
            [one] => Ok(one),
            _ => bail!(
                "--private-noise, --finetune and --lora-steps make different private models: pick one"
            ),
        }
    }
}

/// Which attacks a table scenario runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Attacks {
    /// The four attacks on the first stage's inputs, the sequential one and the learned
    /// inversion.
    All,
    /// The four without the invariant ones (those ignore the key: their rows for a
    /// permutation key would repeat the dense key's).
    TableOnly,
    /// The sequential attack and the learned inversion.
    Sequential,
}

/// Inverters trained for this run, one per layer range of a watched node, on one corpus.
struct Inverters<'a> {
    public: &'a ModelBundle,
    opts: InversionOptions,
    corpus: Option<Corpus>,
    trained: BTreeMap<(usize, usize), Inverter>,
}

impl<'a> Inverters<'a> {
    fn new(public: &'a ModelBundle, opts: InversionOptions) -> Self {
        Inverters {
            public,
            opts,
            corpus: None,
            trained: BTreeMap::new(),
        }
    }

    fn for_node(&mut self, layers: (usize, usize)) -> Result<&Inverter> {
        let device = Compute::cpu().device;
        if !self.trained.contains_key(&layers) {
            if self.corpus.is_none() {
                let started = std::time::Instant::now();
                let c = Corpus::build(self.public, self.opts, &device)?;
                tracing::info!(
                    "inversion corpus: {} sequences, {} tokens in {:.1} s",
                    c.sequences.len(),
                    c.tokens(),
                    started.elapsed().as_secs_f64()
                );
                self.corpus = Some(c);
            }
            let corpus = self.corpus.as_ref().expect("built above");
            let started = std::time::Instant::now();
            let inverter = Inverter::train(self.public, corpus, layers, self.opts, &device)?;
            tracing::info!(
                "inverter for layers {}..{} trained in {:.1} s",
                layers.0,
                layers.1,
                started.elapsed().as_secs_f64()
            );
            self.trained.insert(layers, inverter);
        }
        Ok(&self.trained[&layers])
    }
}

fn table_setups(args: &AttackArgs) -> Vec<(Setup, Attacks)> {
    let setup = |key, private, client_layers, stage| Setup {
        key,
        private,
        client_layers,
        client_last_layers: 0,
        stage,
    };
    let noise = Private::Noise(args.table_noise);
    let finetune = Private::Finetune(args.table_finetune, args.finetune_rank.max(1));
    // the trained fine-tune joins the rows where attacks read something: the first stage,
    // behind client layers and the middle stage
    let trained: Vec<Private> = (args.table_lora_steps > 0)
        .then_some(Private::Lora(
            args.table_lora_steps,
            args.finetune_rank.max(1),
        ))
        .into_iter()
        .collect();
    let mut out = vec![];
    for private in [Private::Public, noise, finetune] {
        out.push((setup(KeyKind::Dense, private, 0, 0), Attacks::All));
    }
    for &private in &trained {
        out.push((setup(KeyKind::Dense, private, 0, 0), Attacks::All));
    }
    for private in [Private::Public, noise] {
        out.push((
            setup(KeyKind::Permutation, private, 0, 0),
            Attacks::TableOnly,
        ));
    }
    if args.table_client_layers > 0 {
        let k = args.table_client_layers;
        out.push((setup(KeyKind::Dense, Private::Public, k, 0), Attacks::All));
        for private in [noise, finetune].into_iter().chain(trained.iter().copied()) {
            out.push((setup(KeyKind::Dense, private, k, 0), Attacks::Sequential));
        }
    }
    if args.stages > 1 {
        for private in [Private::Public, noise, finetune]
            .into_iter()
            .chain(trained.iter().copied())
        {
            out.push((setup(KeyKind::Dense, private, 0, 1), Attacks::Sequential));
        }
    }
    if args.stages > 2 {
        // the last node, then the same node when the client runs the last layers
        let last = args.stages - 1;
        for tail in [0, args.table_client_layers] {
            for private in [Private::Public, noise, finetune] {
                let mut s = setup(KeyKind::Dense, private, 0, last);
                s.client_last_layers = tail;
                out.push((s, Attacks::Sequential));
            }
        }
    }
    if let Some(only) = args.only {
        out.retain(|(s, _)| ModelKind::of(s.private) == only);
    }
    out
}

fn print(outcomes: &[Outcome], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(outcomes)?);
        return Ok(());
    }
    println!(
        "| attack | key | model | node | recovered (95% CI, trials) | random guess | most frequent token |"
    );
    println!("|---|---|---|---|---|---|---|");
    for o in outcomes {
        let mut node = format!("stage {}", o.stage);
        if o.client_layers > 0 {
            node.push_str(&format!(", after {} client layer(s)", o.client_layers));
        }
        if o.client_last_layers > 0 {
            node.push_str(&format!(
                ", before {} client layer(s) at the end",
                o.client_last_layers
            ));
        }
        println!(
            "| {} | {:?} | {} | {node} | {} | {:.4}% | {:.1}% |",
            o.attack,
            o.key,
            o.model,
            o.rate,
            o.chance * 100.0,
            o.majority * 100.0
        );
        if let Some(d) = &o.detail {
            println!("|   ↳ {d} | | | | | | |");
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
        | AttackCommand::Sequential(a)
        | AttackCommand::Inversion(a)
        | AttackCommand::Table(a) => a.clone(),
        AttackCommand::Masked(a) => return masked::run(a),
        AttackCommand::Uniformity(a) => return uniformity::run(a),
    };
    for (name, v) in [
        ("--private-noise", args.private_noise),
        ("--table-noise", args.table_noise),
        ("--finetune", args.finetune),
        ("--table-finetune", args.table_finetune),
    ] {
        if !(0.0..=10.0).contains(&v) {
            bail!("{name} must be between 0 and 10 (a size relative to the weights), not {v}");
        }
    }
    if args.only.is_some() && !matches!(command, AttackCommand::Table(_)) {
        bail!("--only picks rows of `veil attack table`; the other attacks run one model (--private-noise, --finetune or --lora-steps)");
    }
    let public = ModelSpec::parse(&args.model)?.load()?;
    let rec = args.recording();
    let seq = args.sequential();
    let mut inverters = Inverters::new(&public, args.inversion());
    let outcomes = match command {
        AttackCommand::Table(_) => {
            let mut all = Vec::new();
            for (setup, attacks) in table_setups(&args) {
                let s = Scenario::record(&public, setup, rec)?;
                if attacks != Attacks::Sequential {
                    all.push(s.first_token()?);
                    all.push(s.vocab_match()?);
                    all.push(s.key_recovery()?);
                    all.push(s.sorted()?);
                }
                if attacks != Attacks::TableOnly {
                    all.push(s.sequential(seq)?);
                    all.push(s.inversion(inverters.for_node(s.node_layers())?)?);
                }
            }
            all
        }
        other => {
            let setup = Setup {
                key: args.key,
                private: args.private()?,
                client_layers: args.client_layers,
                client_last_layers: args.client_last_layers,
                stage: args.stage,
            };
            let s = Scenario::record(&public, setup, rec)?;
            vec![match other {
                AttackCommand::KeyRecovery(_) => s.key_recovery()?,
                AttackCommand::FirstToken(_) => s.first_token()?,
                AttackCommand::VocabMatch(_) => s.vocab_match()?,
                AttackCommand::SortedCoords(_) => s.sorted()?,
                AttackCommand::Inversion(_) => s.inversion(inverters.for_node(s.node_layers())?)?,
                _ => s.sequential(seq)?,
            }]
        }
    };
    print(&outcomes, args.json)
}
