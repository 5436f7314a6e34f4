//! Recorded node views: real encrypted generations, and what the first stage's node
//! received during them (every input is `E[token] Q`, the client's encoding of the token
//! it feeds).

use burn::tensor::Device;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};

use crate::crypto::{encrypt_model_split, ClientModel, EncryptedLocal, ModelKey, Shard};
use crate::nn::tensor_to_vec;
use crate::{
    generate, GenerateParams, LlamaWeights, Matrix, ModelBundle, ModelError, SamplingParams,
    TextCodec,
};

/// What the first stage's node received in one session, and the truth to score against.
#[derive(Debug, Clone)]
pub struct SessionView {
    /// `[n, d]`: one encrypted input row per fed token.
    pub received: Vec<f32>,
    /// The token behind each row (never seen by the node).
    pub truth: Vec<u32>,
    pub prompt_len: usize,
}

/// A node's view: its shard (the first stage's) and its sessions.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub shard: Shard,
    pub d_model: usize,
    pub sessions: Vec<SessionView>,
}

impl NodeView {
    /// Score per-session guesses (one per received row) against the truth.
    pub fn score(&self, guesses: &[Vec<u32>]) -> super::Rate {
        let rates: Vec<super::Rate> = self
            .sessions
            .iter()
            .zip(guesses)
            .map(|(s, g)| super::Rate::score(g, &s.truth))
            .collect();
        super::Rate::sum(&rates)
    }

    /// Received rows of every session, as `(session, position)` slices.
    pub fn rows(&self) -> impl Iterator<Item = (usize, usize, &[f32])> {
        let d = self.d_model;
        self.sessions.iter().enumerate().flat_map(move |(s, v)| {
            (0..v.truth.len()).map(move |i| (s, i, super::row(&v.received, d, i)))
        })
    }
}

/// How the owner deploys.
#[derive(Debug, Clone, Copy)]
pub struct Deployment {
    pub stages: usize,
    /// Layers the client runs itself (the mitigation); the first node serves the next ones.
    pub client_layers: usize,
}

/// Encrypt `owner` with `key` as `deployment` says, generate greedily from every prompt
/// through the encrypted pipeline, and return what the first stage's node received.
pub fn record_views(
    owner: &ModelBundle,
    key: ModelKey,
    deployment: Deployment,
    prompts: &[Vec<u32>],
    gen_tokens: usize,
    device: &Device,
) -> Result<NodeView, ModelError> {
    let e = encrypt_model_split(
        owner,
        key,
        deployment.stages,
        deployment.client_layers,
        &mut |_, _| {},
    )?;
    let mut pipeline = EncryptedLocal::new(&e.client, &e.shards, device, None)?;
    let client = ClientModel::new(&e.client, device)?;
    let params = GenerateParams {
        max_tokens: gen_tokens.max(1),
        sampling: SamplingParams::default(),
        top_logits: 0,
    };
    let mut sessions = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        pipeline.reset();
        let g = generate(
            &mut pipeline,
            &owner.text.tokenizer,
            prompt,
            &params,
            &mut |_| {},
        )?;
        // the node receives the prompt, then every sampled token but the last
        let mut fed = prompt.clone();
        fed.extend_from_slice(&g.tokens[..g.tokens.len().saturating_sub(1)]);
        let mut cache = client.new_cache(fed.len());
        let received = tensor_to_vec(client.encode(&fed, &mut cache)?)?;
        sessions.push(SessionView {
            received,
            truth: fed,
            prompt_len: prompt.len(),
        });
    }
    let shard = e
        .shards
        .into_iter()
        .min_by_key(|s| s.meta.layers.0)
        .ok_or_else(|| ModelError::Shape("no shard".into()))?;
    Ok(NodeView {
        d_model: owner.weights.config.d_model,
        shard,
        sessions,
    })
}

fn perturb_values(values: &mut [f32], rel: f64, rng: &mut ChaCha20Rng) {
    if rel == 0.0 {
        return;
    }
    let n = values.len().max(1) as f64;
    let rms = (values.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / n).sqrt();
    if let Ok(noise) = Normal::new(0.0, rel * rms) {
        for v in values.iter_mut() {
            *v += noise.sample(rng) as f32;
        }
    }
}

fn perturb_matrix(m: &Matrix, rel: f64, rng: &mut ChaCha20Rng) -> Matrix {
    let mut out = m.clone();
    perturb_values(&mut out.data, rel, rng);
    out
}

/// A "private" model: `base` with Gaussian noise of `rel` times each tensor's RMS added to
/// every weight (embeddings, norms, matrices, head) — a stand-in for a secret fine-tune the
/// attacker does not have. `rel = 0` is an exact copy.
pub fn perturbed(base: &ModelBundle, rel: f64, seed: u64) -> Result<ModelBundle, ModelError> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let w = &base.weights;
    let mut layers = w.layers.clone();
    for l in &mut layers {
        for m in [
            &mut l.wq,
            &mut l.wk,
            &mut l.wv,
            &mut l.wo,
            &mut l.w_gate,
            &mut l.w_up,
            &mut l.w_down,
        ] {
            *m = perturb_matrix(m, rel, &mut rng);
        }
        perturb_values(&mut l.attn_norm, rel, &mut rng);
        perturb_values(&mut l.ffn_norm, rel, &mut rng);
    }
    let mut final_norm = w.final_norm.clone();
    perturb_values(&mut final_norm, rel, &mut rng);
    let weights = LlamaWeights {
        config: w.config.clone(),
        embedding: perturb_matrix(&w.embedding, rel, &mut rng),
        layers,
        final_norm,
        output: w.output.as_ref().map(|o| perturb_matrix(o, rel, &mut rng)),
    };
    Ok(ModelBundle {
        name: format!("{} (private: +{rel} relative noise)", base.name),
        weights,
        text: TextCodec::new(base.text.spec.clone())?,
    })
}
