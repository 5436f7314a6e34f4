//! Learned inversion: a small network trained to read tokens from what a node sees.
//!
//! The attacker runs the public model over a text corpus — the calibration text and text
//! the public model itself samples — and computes, at every position, the quantities the
//! key leaves visible to the node that serves layers `first..first + layers`
//! ([`super::features`]): residual norms, sorted gate pre-activations and per-head
//! attention-score statistics sorted across heads, all unchanged by the key. A one-hidden-
//! layer network ([`net::Mlp`]) learns the token from them. The node then computes the same
//! quantities on its own shard over what it received, and the network reads them position
//! by position — no candidates, no left-to-right search, no decryption.
//!
//! Against the public model it reads what its corpus taught it (frequent tokens most);
//! against a private model it shows how far a model trained on the public model's features
//! carries over to a model it has never seen.

pub mod net;

use std::collections::BTreeMap;

use burn::tensor::Device;

use super::features::{FeatureProbe, Features};
use super::sequential::observe;
use super::NodeView;
use crate::cache::RopeTables;
use crate::nn::{tensor_to_vec, Llama, Stage};
use crate::sampling::Sampler;
use crate::{ModelBundle, ModelError, SamplingParams, StageRunner};
use net::{Mlp, TrainOptions};

/// Order statistics of the sorted gate pre-activations kept per layer.
const GATE_QUANTILES: usize = 16;

/// Options of the attack.
#[derive(Debug, Clone, Copy)]
pub struct InversionOptions {
    /// Layers of the node's shard whose observables the network reads.
    pub layers: usize,
    /// Sequences the public model samples for the training corpus (besides the
    /// calibration text).
    pub samples: usize,
    /// Tokens per sampled sequence (and per calibration chunk).
    pub sample_len: usize,
    /// Hidden units of the network.
    pub hidden: usize,
    /// Passes over the corpus.
    pub epochs: usize,
    pub seed: u64,
}

impl Default for InversionOptions {
    fn default() -> Self {
        InversionOptions {
            layers: 4,
            samples: 160,
            sample_len: 40,
            hidden: 256,
            epochs: 40,
            seed: 7,
        }
    }
}

/// The attacker's training text: token sequences, each starting as a session does (with
/// BOS when the tokenizer adds one).
#[derive(Debug, Clone)]
pub struct Corpus {
    pub sequences: Vec<Vec<u32>>,
}

impl Corpus {
    /// The calibration text in chunks of `sample_len`, and `samples` sequences the public
    /// model samples (temperature 1, top 40) from BOS.
    pub fn build(
        public: &ModelBundle,
        opts: InversionOptions,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let len = opts.sample_len.max(2);
        let t = &public.text.tokenizer;
        let bos = t.bos.filter(|_| t.add_bos);
        let mut sequences = Vec::new();
        let text = public
            .text
            .tokenizer
            .encode(crate::calibrate::DEFAULT_TEXT, false)?;
        for chunk in text.chunks(len) {
            let mut s: Vec<u32> = bos.into_iter().collect();
            s.extend_from_slice(chunk);
            sequences.push(s);
        }
        let model = Llama::from_weights(&public.weights, device);
        let rope = RopeTables::new(&public.weights.config, device);
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 40,
            top_p: 1.0,
            seed: Some(opts.seed),
        })?;
        // the start of a sequence without BOS: a token of the calibration text
        let starts: Vec<u32> = text.iter().copied().step_by(7).collect();
        if bos.is_none() && starts.is_empty() && opts.samples > 0 {
            return Err(ModelError::InvalidConfig(
                "the model has no BOS token and the calibration text no tokens to start samples from".into(),
            ));
        }
        for batch_start in (0..opts.samples).step_by(32) {
            let b = (opts.samples - batch_start).min(32);
            let mut seqs: Vec<Vec<u32>> = (0..b)
                .map(|k| match bos {
                    Some(bos) => vec![bos],
                    None => vec![starts[(batch_start + k) % starts.len()]],
                })
                .collect();
            let mut caches: Vec<_> = (0..b).map(|_| model.stage.new_cache(len + 2)).collect();
            for _ in 1..len {
                let xs = seqs
                    .iter()
                    .map(|s| model.embedding.forward(&s[s.len() - 1..]))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut refs: Vec<_> = caches.iter_mut().collect();
                let out = model.stage.forward(xs, &mut refs, &rope)?;
                for (s, x) in seqs.iter_mut().zip(out) {
                    let logits = tensor_to_vec(model.head.forward(x))?;
                    s.push(sampler.sample(&logits));
                }
            }
            sequences.extend(seqs);
        }
        Ok(Corpus { sequences })
    }

    pub fn tokens(&self) -> usize {
        self.sequences.iter().map(Vec::len).sum()
    }
}

/// How the network did on corpus text it was not trained on.
#[derive(Debug, Clone, Copy)]
pub struct TrainReport {
    pub positions: usize,
    pub classes: usize,
    /// Held-out corpus positions read right, and their number.
    pub validation: (usize, usize),
}

/// A network trained to read tokens from the observables of layers
/// `first..first + layers`.
pub struct Inverter {
    first: usize,
    layers: usize,
    heads: usize,
    mean: Vec<f32>,
    std: Vec<f32>,
    /// The token of each class.
    classes: Vec<u32>,
    net: Mlp,
    pub report: TrainReport,
}

impl Inverter {
    /// Train on `corpus` run through the public model, for a node that serves layers
    /// `first..end` (the network reads at most `opts.layers` of them). Every tenth sequence is held out to report how well the network
    /// generalizes on the public model's own text.
    pub fn train(
        public: &ModelBundle,
        corpus: &Corpus,
        (first, end): (usize, usize),
        opts: InversionOptions,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let c = &public.weights.config;
        if first >= end || end > c.n_layers {
            return Err(ModelError::Shape(format!(
                "layers {first}..{end} are not layers of the {}-layer public model",
                c.n_layers
            )));
        }
        let layers = opts.layers.clamp(1, end - first);
        let model = Llama::from_weights(&public.weights, device);
        let prefix = Stage {
            first_layer: 0,
            blocks: model.stage.blocks[..first + layers].to_vec(),
        };
        let rope = RopeTables::new(c, device);
        let (mut train, mut held) = (Vec::new(), Vec::new());
        for (k, seq) in corpus.sequences.iter().enumerate() {
            let x = model.embedding.forward(seq)?;
            let mut cache = prefix.new_cache(seq.len());
            let mut probe = FeatureProbe::new(first, layers);
            prefix.forward_probed(vec![x], &mut [&mut cache], &rope, &mut probe)?;
            let feats = probe
                .features(&[(seq.len(), 0)], c.n_heads)
                .map_err(ModelError::Shape)?
                .pop()
                .unwrap_or_default();
            let rows = feats
                .iter()
                .enumerate()
                .map(|(i, f)| (vectorize(f, i), seq[i]));
            if k % 10 == 9 {
                held.extend(rows);
            } else {
                train.extend(rows);
            }
        }
        if train.is_empty() {
            return Err(ModelError::Shape("the corpus is empty".into()));
        }
        let dim = train[0].0.len();
        let (mean, std) = moments(train.iter().map(|r| r.0.as_slice()), dim);
        let mut ids: BTreeMap<u32, usize> = BTreeMap::new();
        for (_, t) in &train {
            let next = ids.len();
            ids.entry(*t).or_insert(next);
        }
        let mut classes = vec![0u32; ids.len()];
        for (t, i) in &ids {
            classes[*i] = *t;
        }
        let x: Vec<f32> = train
            .iter()
            .flat_map(|r| standardize(&r.0, &mean, &std))
            .collect();
        let labels: Vec<usize> = train.iter().map(|r| ids[&r.1]).collect();
        let net = Mlp::train(
            &x,
            &labels,
            dim,
            classes.len(),
            TrainOptions {
                hidden: opts.hidden,
                epochs: opts.epochs,
                batch: 128,
                learning_rate: 1e-3,
                seed: opts.seed,
            },
            device,
        )?;
        let mut inverter = Inverter {
            first,
            layers,
            heads: c.n_heads,
            mean,
            std,
            classes,
            net,
            report: TrainReport {
                positions: train.len(),
                classes: ids.len(),
                validation: (0, held.len()),
            },
        };
        let rows: Vec<Vec<f32>> = held.iter().map(|r| r.0.clone()).collect();
        let read = inverter.read(&rows, device)?;
        inverter.report.validation.0 = read.iter().zip(&held).filter(|(g, r)| **g == r.1).count();
        tracing::info!(
            "inverter for layers {first}..{}: {} positions, {} tokens, {} of {} held-out positions read",
            first + layers,
            inverter.report.positions,
            inverter.report.classes,
            inverter.report.validation.0,
            inverter.report.validation.1
        );
        Ok(inverter)
    }

    /// One guess per received row, per session of `view`.
    pub fn guess(&self, view: &NodeView, device: &Device) -> Result<Vec<Vec<u32>>, ModelError> {
        let (first, end) = view.shard.meta.layers;
        if first != self.first || end - first < self.layers {
            return Err(ModelError::Shape(format!(
                "the inverter reads layers {}..{}, the node serves {first}..{end}",
                self.first,
                self.first + self.layers
            )));
        }
        let runner = StageRunner::new(&view.shard, device)?;
        view.sessions
            .iter()
            .map(|session| {
                let feats = observe(
                    &runner,
                    session,
                    view.d_model,
                    (self.first, self.layers, self.heads),
                    device,
                )?;
                let rows: Vec<Vec<f32>> = feats
                    .iter()
                    .enumerate()
                    .map(|(i, f)| vectorize(f, i))
                    .collect();
                self.read(&rows, device)
            })
            .collect()
    }

    /// The network's token for each feature row.
    fn read(&self, rows: &[Vec<f32>], device: &Device) -> Result<Vec<u32>, ModelError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let dim = self.mean.len();
        let x: Vec<f32> = rows
            .iter()
            .flat_map(|r| standardize(r, &self.mean, &self.std))
            .collect();
        let logits = self.net.logits(&x, dim, device)?;
        let c = self.classes.len();
        Ok(logits
            .chunks(c)
            .map(|row| {
                let best = (0..c)
                    .max_by(|a, b| row[*a].total_cmp(&row[*b]))
                    .unwrap_or(0);
                self.classes[best]
            })
            .collect())
    }
}

/// The fixed-width, key-invariant description of one position: `ln(1 + i)`, then per layer
/// the logs of the five norms, [`GATE_QUANTILES`] order statistics of the sorted gate
/// values, and five statistics of every head's score row (own score, maximum, mean, score
/// of position 0, entropy of its softmax), each sorted across heads since the key permutes
/// them.
pub fn vectorize(f: &Features, position: usize) -> Vec<f32> {
    let mut v = vec![(1.0 + position as f32).ln()];
    for l in &f.layers {
        v.extend(l.norms.iter().map(|n| n.max(1e-6).ln()));
        let g = &l.gate;
        for q in 0..GATE_QUANTILES {
            let i = q * g.len().saturating_sub(1) / (GATE_QUANTILES - 1);
            v.push(g.get(i).copied().unwrap_or(0.0));
        }
        let mut stats: [Vec<f32>; 5] = Default::default();
        for row in &l.heads {
            let last = row.last().copied().unwrap_or(0.0);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mean = row.iter().sum::<f32>() / row.len().max(1) as f32;
            let z: f32 = row.iter().map(|s| (s - max).exp()).sum();
            let entropy = -row
                .iter()
                .map(|s| {
                    let p = (s - max).exp() / z;
                    p * p.max(1e-12).ln()
                })
                .sum::<f32>();
            for (s, x) in stats.iter_mut().zip([
                last,
                max,
                mean,
                row.first().copied().unwrap_or(0.0),
                entropy,
            ]) {
                s.push(x);
            }
        }
        for mut s in stats {
            s.sort_by(f32::total_cmp);
            v.extend(s);
        }
    }
    v
}

/// Per-column mean and standard deviation (floored, so that constant columns stay finite).
fn moments<'a>(rows: impl Iterator<Item = &'a [f32]> + Clone, dim: usize) -> (Vec<f32>, Vec<f32>) {
    let mut n = 0f64;
    let mut sum = vec![0f64; dim];
    let mut sq = vec![0f64; dim];
    for r in rows {
        n += 1.0;
        for (j, x) in r.iter().enumerate().take(dim) {
            sum[j] += f64::from(*x);
            sq[j] += f64::from(*x).powi(2);
        }
    }
    let n = n.max(1.0);
    let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
    let std = sum
        .iter()
        .zip(&sq)
        .map(|(s, q)| ((q / n - (s / n).powi(2)).max(0.0).sqrt().max(1e-4)) as f32)
        .collect();
    (mean, std)
}

fn standardize<'a>(
    row: &'a [f32],
    mean: &'a [f32],
    std: &'a [f32],
) -> impl Iterator<Item = f32> + 'a {
    row.iter()
        .zip(mean)
        .zip(std)
        .map(|((x, m), s)| ((x - m) / s).clamp(-20.0, 20.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attack::features::LayerFeatures;

    #[test]
    fn the_description_ignores_the_head_and_unit_order() {
        let layer = |heads: Vec<Vec<f32>>, gate: Vec<f32>| Features {
            layers: vec![LayerFeatures {
                norms: [1.0, 2.0, 3.0, 4.0, 5.0],
                heads,
                gate,
            }],
        };
        let a = layer(vec![vec![0.5, 1.0], vec![2.0, -1.0]], vec![-1.0, 0.0, 3.0]);
        let b = layer(vec![vec![2.0, -1.0], vec![0.5, 1.0]], vec![-1.0, 0.0, 3.0]);
        assert_eq!(vectorize(&a, 1), vectorize(&b, 1));
        let c = layer(vec![vec![2.0, -1.0], vec![0.5, 1.5]], vec![-1.0, 0.0, 3.0]);
        assert_ne!(vectorize(&a, 1), vectorize(&c, 1));
        assert_eq!(vectorize(&a, 1).len(), 1 + 5 + GATE_QUANTILES + 5 * 2);
    }
}
