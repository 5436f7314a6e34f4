//! Sequential vocabulary matching on everything the key leaves visible (after "Hidden No
//! More", arXiv 2505.18332). The node runs its shard over what it received and keeps, per
//! position, the observables of its first few layers ([`super::features`]). The attacker
//! then walks each session left to right: for position `i`, given the tokens it has already
//! recovered, it runs every candidate token through the public model up to the same layers
//! (the client's layers and the stages before included), computes the same observables,
//! and keeps the candidate that explains the node's best. Candidates are the public model's
//! most likely next tokens and, when the node receives embeddings, the best of the whole
//! vocabulary by a cheap prediction of its first layer's scores ([`super::prefilter`]).
//!
//! It needs no key and no decryption, so a key per deployment or per session changes
//! nothing; what defeats it is a model whose computation the public one does not predict.

use std::collections::BTreeSet;

use burn::tensor::{Device, Tensor, TensorData};

use super::features::{FeatureProbe, Features};
use super::prefilter::Prefilter;
use super::view::SessionView;
use super::NodeView;
use crate::cache::{KvCache, RopeTables};
use crate::nn::{tensor_to_vec, Llama, Stage};
use crate::{LlamaWeights, ModelError, StageRunner};

/// Options of the attack.
#[derive(Debug, Clone, Copy)]
pub struct SequentialOptions {
    /// Layers of the node's shard whose observables are compared.
    pub layers: usize,
    /// Candidates per position from the public model's next-token prediction.
    pub lm_candidates: usize,
    /// Candidates per position from the whole-vocabulary prefilter (only when the node
    /// receives embeddings: [`Prefilter`]).
    pub norm_candidates: usize,
}

impl Default for SequentialOptions {
    fn default() -> Self {
        SequentialOptions {
            layers: 2,
            lm_candidates: 512,
            norm_candidates: 64,
        }
    }
}

/// What the attack found.
#[derive(Debug, Clone)]
pub struct SequentialResult {
    /// One guess per received row, per session.
    pub guesses: Vec<Vec<u32>>,
    /// Positions whose true token was among the candidates tried.
    pub truth_in_candidates: usize,
    /// The baseline that looks at nothing the node sees: per session, the public model's
    /// most likely token at each position given the *true* tokens before it (position 0:
    /// the BOS token).
    pub prior_only: Vec<Vec<u32>>,
}

/// The public model, ready to be queried.
struct Attacker {
    model: Llama,
    /// Layers `0..first + layers` of the public model (what a candidate runs through).
    prefix: Stage,
    rope: RopeTables,
    heads: usize,
    first: usize,
    layers: usize,
    bos: Option<u32>,
    /// Where the node receives embeddings: the whole-vocabulary prefilter.
    prefilter: Option<Prefilter>,
}

/// Run the attack on every session of `view`, whose node serves layers
/// `view.shard.meta.layers`, with `public` as the attacker's model. `bos`: the token every
/// session starts with, when the tokenizer adds one.
pub fn guess(
    view: &NodeView,
    public: &LlamaWeights,
    bos: Option<u32>,
    opts: SequentialOptions,
    device: &Device,
) -> Result<SequentialResult, ModelError> {
    let (first, end) = view.shard.meta.layers;
    let layers = opts.layers.clamp(1, end - first);
    let model = Llama::from_weights(public, device);
    let prefix = Stage {
        first_layer: 0,
        blocks: model.stage.blocks[..first + layers].to_vec(),
    };
    let attacker = Attacker {
        rope: RopeTables::new(&public.config, device),
        heads: public.config.n_heads,
        first,
        layers,
        bos,
        prefilter: if first == 0 {
            Some(Prefilter::new(public, device)?)
        } else {
            None
        },
        model,
        prefix,
    };
    let runner = StageRunner::new(&view.shard, device)?;
    let mut result = SequentialResult {
        guesses: Vec::new(),
        truth_in_candidates: 0,
        prior_only: Vec::new(),
    };
    let observed: Vec<Vec<Features>> = view
        .sessions
        .iter()
        .map(|session| {
            let layers = (attacker.first, attacker.layers, attacker.heads);
            observe(&runner, session, view.d_model, layers, device)
        })
        .collect::<Result<_, _>>()?;
    // Nothing predicts the first token without BOS or prefilter: its observables depend
    // on it alone, so one pass over the vocabulary serves every session.
    let prefiltered = attacker.prefilter.is_some() && opts.norm_candidates > 0;
    let firsts = if attacker.bos.is_none() && !prefiltered {
        let starts: Vec<&Features> = observed.iter().filter_map(|o| o.first()).collect();
        Some(attacker.sweep(&starts)?)
    } else {
        None
    };
    for (s, (session, observed)) in view.sessions.iter().zip(&observed).enumerate() {
        let n = session.truth.len();
        let mut guesses = Vec::with_capacity(n);
        let mut lm_cache = attacker.model.stage.new_cache(n + 1);
        let mut prefix_cache = attacker.prefix.new_cache(n + 1);
        let mut next: Vec<u32> = Vec::new();
        for (i, obs) in observed.iter().enumerate() {
            let best = match (&firsts, i) {
                (Some(f), 0) => {
                    result.truth_in_candidates += 1; // the whole vocabulary was tried
                    f[s]
                }
                _ => {
                    let candidates = attacker.candidates(i, &next, &prefix_cache, obs, opts)?;
                    if candidates.contains(&session.truth[i]) {
                        result.truth_in_candidates += 1;
                    }
                    attacker.best(&candidates, &prefix_cache, i, obs)?
                }
            };
            guesses.push(best);
            // grow the recovered prefix by the guess
            let x = attacker.model.embedding.forward(&[best])?;
            attacker
                .prefix
                .forward(vec![x], &mut [&mut prefix_cache], &attacker.rope)?;
            let logits = attacker
                .model
                .forward(&[best], &mut lm_cache, &attacker.rope, false)?;
            next = top_k(&tensor_to_vec(logits)?, opts.lm_candidates);
        }
        tracing::debug!(session = s, "sequential attack: {guesses:?}");
        result.guesses.push(guesses);
        result.prior_only.push(attacker.prior_only(&session.truth)?);
    }
    Ok(result)
}

/// The node's observables at every position of one session: its shard run over what it
/// received, in one pass. `(first, layers, heads)`: the layers probed, the query heads.
pub(crate) fn observe(
    runner: &StageRunner,
    session: &SessionView,
    d: usize,
    (first, layers, heads): (usize, usize, usize),
    device: &Device,
) -> Result<Vec<Features>, ModelError> {
    let n = session.truth.len();
    let x = Tensor::<2>::from_data(TensorData::new(session.received.clone(), [n, d]), device);
    let mut cache = runner.new_cache(n);
    let mut probe = FeatureProbe::new(first, layers);
    runner.forward_probed(vec![x], &mut [&mut cache], &mut probe)?;
    probe
        .features(&[(n, 0)], heads)
        .map_err(ModelError::Shape)?
        .pop()
        .ok_or_else(|| ModelError::Shape("no features".into()))
}

impl Attacker {
    /// Tokens to try at position `i`.
    fn candidates(
        &self,
        i: usize,
        next: &[u32],
        cache: &KvCache,
        observed: &Features,
        opts: SequentialOptions,
    ) -> Result<Vec<u32>, ModelError> {
        let mut set: BTreeSet<u32> = next.iter().copied().collect();
        if i == 0 {
            set.extend(self.bos);
        }
        if let Some(p) = &self.prefilter {
            set.extend(p.nearest(i, cache, &self.rope, observed, opts.norm_candidates)?);
        }
        Ok(set.into_iter().collect())
    }

    /// The candidate whose observables at position `i`, after the recovered prefix in
    /// `cache`, are nearest `observed`.
    fn best(
        &self,
        candidates: &[u32],
        cache: &KvCache,
        i: usize,
        observed: &Features,
    ) -> Result<u32, ModelError> {
        if candidates.is_empty() {
            return Ok(0);
        }
        let mut best = (f64::INFINITY, candidates[0]);
        for chunk in candidates.chunks(64) {
            for (c, f) in chunk.iter().zip(self.features(chunk, cache, i)?) {
                let dist = f.distance(observed);
                if dist < best.0 {
                    best = (dist, *c);
                }
            }
        }
        Ok(best.1)
    }

    /// Observables of each of `tokens` at position `i`, after the prefix in `cache`.
    fn features(
        &self,
        tokens: &[u32],
        cache: &KvCache,
        i: usize,
    ) -> Result<Vec<Features>, ModelError> {
        let x = self.model.embedding.forward(tokens)?;
        let xs: Vec<Tensor<2>> = (0..tokens.len())
            .map(|k| x.clone().narrow(0, k, 1))
            .collect();
        let mut caches: Vec<KvCache> = tokens.iter().map(|_| cache.clone()).collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let mut probe = FeatureProbe::new(self.first, self.layers);
        self.prefix
            .forward_probed(xs, &mut refs, &self.rope, &mut probe)?;
        let segments = vec![(1usize, i); tokens.len()];
        Ok(probe
            .features(&segments, self.heads)
            .map_err(ModelError::Shape)?
            .into_iter()
            .filter_map(|mut f| f.pop())
            .collect())
    }

    /// For each of `observed` (first positions), the vocabulary token that explains it
    /// best: one pass over the whole vocabulary.
    fn sweep(&self, observed: &[&Features]) -> Result<Vec<u32>, ModelError> {
        let vocab: Vec<u32> = (0..self.model.embedding.vocab_size() as u32).collect();
        let empty = self.prefix.new_cache(1);
        let mut best = vec![(f64::INFINITY, 0u32); observed.len()];
        for chunk in vocab.chunks(64) {
            for (c, f) in chunk.iter().zip(self.features(chunk, &empty, 0)?) {
                for (b, o) in best.iter_mut().zip(observed) {
                    let dist = f.distance(o);
                    if dist < b.0 {
                        *b = (dist, *c);
                    }
                }
            }
        }
        Ok(best.into_iter().map(|b| b.1).collect())
    }

    /// The public model's most likely token at each position given the true prefix.
    fn prior_only(&self, truth: &[u32]) -> Result<Vec<u32>, ModelError> {
        let mut out = Vec::with_capacity(truth.len());
        out.push(self.bos.unwrap_or(0));
        if truth.len() > 1 {
            let mut cache = self.model.stage.new_cache(truth.len());
            let logits =
                self.model
                    .forward(&truth[..truth.len() - 1], &mut cache, &self.rope, true)?;
            let [rows, vocab] = logits.dims();
            let data = tensor_to_vec(logits)?;
            out.extend((0..rows).map(|r| top_k(&data[r * vocab..(r + 1) * vocab], 1)[0]));
        }
        Ok(out)
    }
}

/// The ids of the `k` smallest values, smallest first.
pub(crate) fn top_k_smallest(values: &[f32], k: usize) -> Vec<u32> {
    let negated: Vec<f32> = values.iter().map(|v| -v).collect();
    top_k(&negated, k)
}

/// The ids of the `k` largest values, largest first.
fn top_k(values: &[f32], k: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..values.len() as u32).collect();
    let k = k.min(ids.len());
    if k == 0 {
        return Vec::new();
    }
    ids.select_nth_unstable_by(k - 1, |a, b| {
        values[*b as usize].total_cmp(&values[*a as usize])
    });
    ids.truncate(k);
    ids.sort_by(|a, b| values[*b as usize].total_cmp(&values[*a as usize]));
    ids
}

#[cfg(test)]
mod tests {
    use super::top_k;

    #[test]
    fn top_k_is_largest_first() {
        assert_eq!(top_k(&[0.1, 3.0, -1.0, 2.0], 2), vec![1, 3]);
        assert_eq!(top_k(&[0.1], 4), vec![0]);
    }
}
