//! Recorded node views: real encrypted generations, and what the first stage's node
//! received during them (every input is `E[token] Q`, the client's encoding of the token
//! it feeds).

use burn::tensor::Device;

use crate::crypto::{
    encrypt_model_split, ClientLayers, ClientModel, EncryptedLocal, ModelKey, Shard,
};
use crate::nn::tensor_to_vec;
use crate::StageRunner;
use crate::{generate, GenerateParams, ModelBundle, ModelError, SamplingParams};

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
    /// Layers the client runs itself after the last node (the other end of the mitigation).
    pub client_last_layers: usize,
    /// The stage whose node is watched (0: the first, which receives the client's
    /// encoding; later ones receive the previous stage's output).
    pub observed_stage: usize,
}

/// Encrypt `owner` with `key` as `deployment` says, generate greedily from every prompt
/// through the encrypted pipeline, and return what the observed stage's node received.
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
        ClientLayers {
            first: deployment.client_layers,
            last: deployment.client_last_layers,
        },
        &mut |_, _| {},
    )?;
    if deployment.observed_stage >= e.shards.len() {
        return Err(ModelError::Shape(format!(
            "stage {} observed, the deployment has {}",
            deployment.observed_stage,
            e.shards.len()
        )));
    }
    let mut pipeline = EncryptedLocal::new(&e.client, &e.shards, device, None)?;
    let mut shards = e.shards.clone();
    shards.sort_by_key(|s| s.meta.layers.0);
    let before: Vec<StageRunner> = shards[..deployment.observed_stage]
        .iter()
        .map(|s| StageRunner::new(s, device))
        .collect::<Result<_, _>>()?;
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
        let mut x = client.encode(&fed, &mut cache)?;
        for runner in &before {
            let mut c = runner.new_cache(fed.len());
            x = runner
                .forward(vec![x], &mut [&mut c])?
                .pop()
                .ok_or_else(|| ModelError::Shape("no stage output".into()))?;
        }
        let received = tensor_to_vec(x)?;
        sessions.push(SessionView {
            received,
            truth: fed,
            prompt_len: prompt.len(),
        });
    }
    let shard = shards.swap_remove(deployment.observed_stage);
    Ok(NodeView {
        d_model: owner.weights.config.d_model,
        shard,
        sessions,
    })
}
