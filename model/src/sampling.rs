//! Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// How to pick tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); higher values flatten the distribution.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: no limit).
    pub top_p: f32,
    /// Seed of the random generator; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::Sampling(format!(
                "temperature must be a number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Sampling(format!(
                "top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// A token id with its logit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TokenLogit {
    pub id: u32,
    pub logit: f32,
}

/// The `k` highest logits, highest first (ties: lower id first).
pub fn top_logits(logits: &[f32], k: usize) -> Vec<TokenLogit> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    idx.select_nth_unstable_by(k - 1, cmp);
    idx.truncate(k);
    idx.sort_by(cmp);
    idx.into_iter()
        .map(|id| TokenLogit {
            id,
            logit: logits[id as usize],
        })
        .collect()
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws tokens according to [`SamplingParams`].
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, ModelError> {
        params.validate()?;
        let rng = match params.seed {
            Some(s) => ChaCha20Rng::seed_from_u64(s),
            None => ChaCha20Rng::from_entropy(),
        };
        Ok(Sampler { params, rng })
    }

    /// Pick the next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.temperature == 0.0 || logits.len() <= 1 {
            return argmax(logits);
        }
        let k = if p.top_k == 0 { logits.len() } else { p.top_k };
        let candidates = top_logits(logits, k);
        let max = f64::from(candidates[0].logit);
        let t = f64::from(p.temperature);
        let weights: Vec<f64> = candidates
            .iter()
            .map(|c| ((f64::from(c.logit) - max) / t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        // Top-p: the shortest prefix (by probability) reaching top_p, at least one token.
        let mut kept = 0;
        let mut mass = 0.0;
        for w in &weights {
            kept += 1;
            mass += w / total;
            if mass >= f64::from(p.top_p) {
                break;
            }
        }
        let kept_total: f64 = weights[..kept].iter().sum();
        let mut r = self.rng.gen::<f64>() * kept_total;
        for (c, w) in candidates.iter().zip(&weights[..kept]) {
            if r < *w {
                return c.id;
            }
            r -= w;
        }
        candidates[kept - 1].id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
        }
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::default()).expect("sampler");
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn top_logits_are_sorted_and_truncated() {
        let t = top_logits(&[0.5, 2.0, -1.0, 2.0, 1.0], 3);
        let ids: Vec<u32> = t.iter().map(|x| x.id).collect();
        assert_eq!(ids, [1, 3, 4]);
        assert_eq!(top_logits(&[1.0], 5).len(), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(params(5.0, 1, 1.0, 7)).expect("sampler");
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 0.1, 0.05]), 1);
        }
    }

    #[test]
    fn top_p_drops_the_unlikely_tail() {
        // probabilities ~ [0.84, 0.11, 0.04, 0.01]: top-p 0.9 keeps only the first two
        let logits = [4.0, 2.0, 1.0, -0.5];
        let mut s = Sampler::new(params(1.0, 0, 0.9, 3)).expect("sampler");
        for _ in 0..500 {
            assert!(s.sample(&logits) < 2);
        }
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let mut s = Sampler::new(params(1.0, 0, 1.0, 11)).expect("sampler");
        let n = 20_000;
        let ones = (0..n).filter(|_| s.sample(&logits) == 1).count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(0.8, 40, 0.95, seed)).expect("sampler");
            (0..30).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(Sampler::new(params(-1.0, 0, 1.0, 0)).is_err());
        assert!(Sampler::new(params(f32::NAN, 0, 1.0, 0)).is_err());
        assert!(Sampler::new(params(1.0, 0, 0.0, 0)).is_err());
        assert!(Sampler::new(params(1.0, 0, 1.5, 0)).is_err());
    }
}
