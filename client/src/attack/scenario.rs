//! One attack scenario — an owner's model, key and deployment, the node watched — and the
//! attacks run on what that node recorded.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use veil_model::attack::invariants::{self, InvariantOptions};
use veil_model::attack::inversion::Inverter;
use veil_model::attack::key_recovery::{decrypt_and_match, recover_q, relative_error};
use veil_model::attack::private::{lora_finetuned, update_spectrum, LoraOptions, FINETUNE_TEXT};
use veil_model::attack::sequential::{self, SequentialOptions};
use veil_model::attack::{
    finetuned, norms, perturbed, position0_table, record_views, sorted_coords, Deployment,
    NodeView, Rate,
};
use veil_model::crypto::{KeyOptions, KeyShape, ModelKey};
use veil_model::{Compute, LlamaWeights, Matrix, ModelBundle, TextCodec};

use super::{KeyKind, PromptSet};

/// The owner's model, as the attacker's public model relates to it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "size", rename_all = "lowercase")]
pub enum Private {
    /// The owner deploys the public model itself.
    Public,
    /// Gaussian noise of this size (relative to each tensor's RMS) on every weight.
    Noise(f64),
    /// A LoRA-style update of this relative size on every projection; embeddings kept.
    Finetune(f64, usize),
    /// A LoRA fine-tune trained this many steps with adapters of this rank on a private
    /// text ([`lora_finetuned`]).
    Lora(usize, usize),
}

impl fmt::Display for Private {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Private::Public => write!(f, "public"),
            Private::Noise(n) => write!(f, "private (+{n} noise)"),
            Private::Finetune(s, r) => write!(f, "private (rank-{r} fine-tune, {s})"),
            Private::Lora(steps, r) => write!(f, "private (rank-{r} LoRA, {steps} trained steps)"),
        }
    }
}

/// Log where an update of `public` sits in its matrices' spectrum (the middle layer).
fn log_spectrum(public: &ModelBundle, tuned: &ModelBundle) -> Result<()> {
    let layer = public.weights.config.n_layers / 2;
    let spectrum = update_spectrum(&public.weights, &tuned.weights, layer)?;
    let ranks: Vec<String> = spectrum
        .iter()
        .map(|(name, rank, ratio)| format!("{name} #{rank} ({ratio:.2} of σ1)"))
        .collect();
    tracing::info!(
        "fine-tune, layer {layer}: the update's largest singular value would rank {}",
        ranks.join(", ")
    );
    Ok(())
}

/// LoRA fine-tunes trained in this process, by steps, rank and seed: a table trains each
/// once.
static TRAINED: Mutex<BTreeMap<(usize, usize, u64), LlamaWeights>> = Mutex::new(BTreeMap::new());

/// `public` fine-tuned by `steps` of LoRA training of rank `rank` on the private text.
fn trained_lora(public: &ModelBundle, steps: usize, rank: usize, seed: u64) -> Result<ModelBundle> {
    let key = (steps, rank, seed);
    let name = format!(
        "{} (private: rank-{rank} LoRA, {steps} trained steps)",
        public.name
    );
    let cached = TRAINED
        .lock()
        .map_err(|_| anyhow::anyhow!("a panic poisoned the cache of trained fine-tunes"))?
        .get(&key)
        .cloned();
    if let Some(weights) = cached {
        return Ok(ModelBundle {
            name,
            weights,
            text: TextCodec::new(public.text.spec.clone())?,
        });
    }
    let opts = LoraOptions {
        rank,
        alpha: 2.0 * rank as f64,
        steps,
        seed,
        ..LoraOptions::default()
    };
    let started = Instant::now();
    let (tuned, report) = lora_finetuned(public, FINETUNE_TEXT, opts, &mut |step, loss| {
        if step == 1 || step % 10 == 0 {
            tracing::info!(
                "LoRA training step {step}/{steps}: loss {loss:.3} ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
    })?;
    tracing::info!(
        "LoRA fine-tune: {} tokens of private text, loss {:.3} -> {:.3} nats/token, updates {:.3} of each matrix (Frobenius), trained in {:.0} s",
        report.tokens,
        report.loss_before,
        report.loss_after,
        report.relative_update,
        started.elapsed().as_secs_f64()
    );
    log_spectrum(public, &tuned)?;
    TRAINED
        .lock()
        .map_err(|_| anyhow::anyhow!("a panic poisoned the cache of trained fine-tunes"))?
        .insert(key, tuned.weights.clone());
    Ok(tuned)
}

/// What the owner deploys and which node is watched.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub key: KeyKind,
    pub private: Private,
    pub client_layers: usize,
    /// Layers the client runs after the last node.
    pub client_last_layers: usize,
    /// The watched node's stage (0: the first).
    pub stage: usize,
}

/// One attack's outcome in one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub attack: &'static str,
    pub key: KeyKind,
    /// The noise of a [`Private::Noise`] model, else 0.
    pub private_noise: f64,
    pub model: Private,
    pub client_layers: usize,
    pub client_last_layers: usize,
    /// The watched node's stage.
    pub stage: usize,
    pub rate: Rate,
    /// The rate of guessing at random.
    pub chance: f64,
    /// The rate of always guessing the most frequent true token (the best blind guess).
    pub majority: f64,
    /// For the sequential attack: the public model's own prediction of each token from
    /// the true tokens before it, without looking at anything the node sees.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prior_only: Option<Rate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

pub struct Scenario<'a> {
    public: &'a ModelBundle,
    setup: Setup,
    /// What received vectors are matched against: the public embeddings, or with client
    /// layers the public model's position-0 outputs of those layers.
    table: Option<Matrix>,
    view: NodeView,
    key_q: nalgebra::DMatrix<f64>,
}

/// Recording options shared by every scenario of a run.
#[derive(Debug, Clone, Copy)]
pub struct Recording {
    pub prompts: usize,
    pub prompt_set: PromptSet,
    pub gen_tokens: usize,
    pub stages: usize,
    pub seed: u64,
}

impl<'a> Scenario<'a> {
    /// Make the owner's model, encrypt and deploy it, generate from every prompt and keep
    /// what the watched node received.
    pub fn record(public: &'a ModelBundle, setup: Setup, rec: Recording) -> Result<Self> {
        let n_layers = public.weights.config.n_layers;
        if setup.client_layers + setup.client_last_layers >= n_layers {
            bail!("--client-layers and --client-last-layers must leave at least one of the model's {n_layers} layers to the nodes");
        }
        if setup.stage >= rec.stages.max(1) {
            bail!(
                "--stage {} is not a stage of a {}-stage deployment",
                setup.stage,
                rec.stages.max(1)
            );
        }
        let seed = rec.seed ^ 0x5eed;
        let owner = match setup.private {
            Private::Public => perturbed(public, 0.0, seed)?,
            Private::Noise(n) => perturbed(public, n, seed)?,
            Private::Finetune(s, r) => {
                let tuned = finetuned(public, s, r, seed)?;
                log_spectrum(public, &tuned)?;
                tuned
            }
            Private::Lora(steps, r) => trained_lora(public, steps, r, seed)?,
        };
        let model_key = ModelKey::generate(
            KeyShape::of(&owner.weights.config),
            KeyOptions {
                permutation_only: setup.key == KeyKind::Permutation,
                ..KeyOptions::default()
            },
            &mut ChaCha20Rng::seed_from_u64(rec.seed),
        );
        let key_q = model_key.q.clone();
        let texts = rec.prompt_set.prompts();
        let n = rec.prompts.clamp(1, texts.len());
        let prompts: Vec<Vec<u32>> = texts[..n]
            .iter()
            .map(|p| owner.text.prompt_tokens(p, true))
            .collect::<std::result::Result<_, _>>()?;
        let started = Instant::now();
        let deployment = Deployment {
            stages: rec.stages.max(1),
            client_layers: setup.client_layers,
            client_last_layers: setup.client_last_layers,
            observed_stage: setup.stage,
        };
        let device = Compute::cpu().device;
        let view = record_views(
            &owner,
            model_key,
            deployment,
            &prompts,
            rec.gen_tokens,
            &device,
        )?;
        tracing::info!(
            "recorded {} sessions ({} received vectors) on the node of stage {} (layers {}..{}) in {:.1} s ({:?} key, {}, {} client layers first, {} last)",
            view.sessions.len(),
            view.sessions.iter().map(|s| s.truth.len()).sum::<usize>(),
            setup.stage,
            view.shard.meta.layers.0,
            view.shard.meta.layers.1,
            started.elapsed().as_secs_f64(),
            setup.key,
            setup.private,
            setup.client_layers,
            setup.client_last_layers,
        );
        for (i, s) in view.sessions.iter().enumerate() {
            tracing::debug!(
                "session {i} as the node received it: {:?}",
                owner.text.tokenizer.decode(&s.truth)
            );
        }
        // the tables match the first stage's inputs; a later stage's are not token-wise
        let table = if setup.stage > 0 {
            None
        } else if setup.client_layers == 0 {
            Some(public.weights.embedding.clone())
        } else {
            Some(position0_table(
                &public.weights,
                setup.client_layers,
                &device,
            )?)
        };
        Ok(Scenario {
            public,
            setup,
            table,
            view,
            key_q,
        })
    }

    /// The share of the most frequent token among the `first_only` or all received tokens.
    fn majority(&self, first_only: bool) -> f64 {
        let mut counts = std::collections::HashMap::new();
        let mut n = 0usize;
        for s in &self.view.sessions {
            let take = if first_only { 1 } else { s.truth.len() };
            for t in s.truth.iter().take(take) {
                *counts.entry(*t).or_insert(0usize) += 1;
                n += 1;
            }
        }
        counts.values().copied().max().unwrap_or(0) as f64 / n.max(1) as f64
    }

    fn outcome(&self, attack: &'static str, rate: Rate, detail: Option<String>) -> Outcome {
        let first_only = attack.starts_with("first token");
        Outcome {
            majority: self.majority(first_only),
            attack,
            key: self.setup.key,
            private_noise: match self.setup.private {
                Private::Noise(n) => n,
                _ => 0.0,
            },
            model: self.setup.private,
            client_layers: self.setup.client_layers,
            client_last_layers: self.setup.client_last_layers,
            stage: self.setup.stage,
            rate,
            chance: 1.0 / self.public.weights.config.vocab_size as f64,
            prior_only: None,
            detail,
        }
    }

    fn table(&self, attack: &str) -> Result<&Matrix> {
        match &self.table {
            Some(t) => Ok(t),
            None => bail!(
                "{attack} matches the first stage's inputs against a token table; the node of stage {} receives another stage's output (use the sequential attack)",
                self.setup.stage
            ),
        }
    }

    pub fn key_recovery(&self) -> Result<Outcome> {
        let table = self.table("key recovery")?;
        let shard_layers = self.view.shard.layers.f32().ok_or_else(|| {
            anyhow::anyhow!(
                "key recovery reads f32 shards (the attack suite encrypts with --quant f32)"
            )
        })?;
        let first = self.view.shard.meta.layers.0;
        let est = recover_q(&shard_layers[0], &self.public.weights.layers[first])?;
        let err = relative_error(&est.q, &self.key_q);
        let guesses = decrypt_and_match(&self.view, &est.q, table, &Compute::cpu().device)?;
        Ok(self.outcome(
            "key recovery (Procrustes), all tokens",
            self.view.score(&guesses),
            Some(format!(
                "key error ‖Q_est − Q‖/‖Q‖ = {err:.2e}; {:.1}% of gate columns explained",
                est.explained * 100.0
            )),
        ))
    }

    pub fn first_token(&self) -> Result<Outcome> {
        let guesses = norms::guess(&self.view, self.table("first token by norm")?);
        let hits = self
            .view
            .sessions
            .iter()
            .zip(&guesses)
            .filter(|(v, g)| g.first() == v.truth.first())
            .count();
        Ok(self.outcome(
            "first token by norm",
            Rate::new(hits, self.view.sessions.len()),
            None,
        ))
    }

    pub fn vocab_match(&self) -> Result<Outcome> {
        let guesses = invariants::guess(
            &self.view,
            self.table("the Gram-matrix attack")?,
            InvariantOptions::default(),
        );
        Ok(self.outcome(
            "all tokens by norms + Gram matrix",
            self.view.score(&guesses),
            None,
        ))
    }

    pub fn sorted(&self) -> Result<Outcome> {
        let guesses = sorted_coords::guess(&self.view, self.table("sorted coordinates")?);
        Ok(self.outcome(
            "all tokens by sorted coordinates",
            self.view.score(&guesses),
            None,
        ))
    }

    /// The layers the watched node serves, `first..end`.
    pub fn node_layers(&self) -> (usize, usize) {
        self.view.shard.meta.layers
    }

    /// Log (debug) what `attack` read of each session, as text.
    fn log_guesses(&self, attack: &str, guesses: &[Vec<u32>]) {
        for (i, g) in guesses.iter().enumerate() {
            tracing::debug!(
                "session {i} as the {attack} read it: {:?}",
                self.public.text.tokenizer.decode(g)
            );
        }
    }

    pub fn inversion(&self, inverter: &Inverter) -> Result<Outcome> {
        let started = Instant::now();
        let guesses = inverter.guess(&self.view, &Compute::cpu().device)?;
        self.log_guesses("learned inversion", &guesses);
        let rate = self.view.score(&guesses);
        tracing::info!(
            "learned inversion: {rate} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let r = inverter.report;
        Ok(self.outcome(
            "all tokens by learned inversion",
            rate,
            Some(format!(
                "network trained on {} positions of public-model text ({} distinct tokens); on held-out public-model text: {}",
                r.positions,
                r.classes,
                Rate::new(r.validation.0, r.validation.1)
            )),
        ))
    }

    pub fn sequential(&self, opts: SequentialOptions) -> Result<Outcome> {
        let started = Instant::now();
        let t = &self.public.text.tokenizer;
        let r = sequential::guess(
            &self.view,
            &self.public.weights,
            t.bos.filter(|_| t.add_bos),
            opts,
            &Compute::cpu().device,
        )?;
        self.log_guesses("sequential attack", &r.guesses);
        let rate = self.view.score(&r.guesses);
        let total: usize = self.view.sessions.iter().map(|s| s.truth.len()).sum();
        tracing::info!(
            "sequential attack: {rate} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let mut o = self.outcome(
            "all tokens by sequential matching of invariants",
            rate,
            Some(format!(
                "true token among the candidates at {:.1}% of positions; the public model alone (true prefix): {}",
                100.0 * r.truth_in_candidates as f64 / total.max(1) as f64,
                self.view.score(&r.prior_only)
            )),
        );
        o.prior_only = Some(self.view.score(&r.prior_only));
        Ok(o)
    }
}
