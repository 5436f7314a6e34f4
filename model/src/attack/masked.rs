//! Attacks on what a compute node sees in masked mode: the words `u = x + r (mod 2^32)`.
//!
//! - [`Recorder`]: a compute party that keeps every request it serves (op, mask address,
//!   words), as a node would see them.
//! - [`uniformity`]: a chi-square test of each byte lane of the words against the uniform
//!   distribution.
//! - [`embedding_match`]: the strongest attack on the first layer's inputs. The query|key|
//!   value op of layer 0 receives, for every position, the quantized `RMSNorm(E[token]) ⊙
//!   g`; the attacker reads the words as signed integers and picks the public embedding row
//!   whose normed vector is closest in angle. On the unmasked integers (the control) this
//!   reads the prompt; on masked words it is left with chance.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::Rate;
use crate::masked::{
    ComputeParty, LocalParty, MaskParty, MaskSeed, Parties, PartyError, SplitParties,
};
use crate::{LocalModel, ModelError, QuantWeights};

/// One request a compute node served.
#[derive(Debug, Clone)]
pub struct Served {
    pub op: u64,
    /// The mask address of its first position (the client's running count per op).
    pub first: u64,
    pub n: usize,
    pub words: Vec<u32>,
}

/// A compute party that records every request before answering it.
#[derive(Debug)]
pub struct Recorder<P> {
    inner: P,
    next: Mutex<HashMap<u64, u64>>,
    served: Mutex<Vec<Served>>,
}

impl<P: ComputeParty> Recorder<P> {
    pub fn new(inner: P) -> Self {
        Recorder {
            inner,
            next: Mutex::new(HashMap::new()),
            served: Mutex::new(Vec::new()),
        }
    }

    /// Everything served so far, in order.
    pub fn served(&self) -> Vec<Served> {
        self.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl<P: ComputeParty> ComputeParty for Recorder<P> {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn products(&self, op: u64, words: &[u32], n: usize) -> Result<Vec<u32>, PartyError> {
        let first = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let at = next.entry(op).or_insert(0);
            let first = *at;
            *at += n as u64;
            first
        };
        self.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Served {
                op,
                first,
                n,
                words: words.to_vec(),
            });
        self.inner.products(op, words, n)
    }
}

/// A recorder in front of a compute node in this process.
pub type LocalRecorder = Recorder<LocalParty>;

/// `model` (masked) with its compute node replaced by a [`Recorder`] and its mask
/// provider by a [`LocalParty`]; returns the recorder and the session's seed too.
pub fn recording(
    model: LocalModel,
) -> Result<(LocalModel, Arc<LocalRecorder>, Arc<MaskSeed>), ModelError> {
    let (ops, seed) = model.masked_ops();
    let seed = seed.ok_or_else(|| ModelError::InvalidConfig("the model is not masked".into()))?;
    let ops = Arc::new(ops);
    let recorder = Arc::new(Recorder::new(LocalParty::new("node", ops.clone(), None)));
    let split = Arc::new(SplitParties::new(
        vec![recorder.clone() as Arc<dyn ComputeParty>],
        vec![Arc::new(LocalParty::new("provider", ops, Some(seed.clone()))) as Arc<dyn MaskParty>],
    ));
    Ok((model.with_parties(&Parties::Split(split)), recorder, seed))
}

/// Layer 0's query|key|value inputs, one word vector per position in the order served:
/// as the node received them, and without their masks (the control).
pub fn layer0_inputs(served: &[Served], seed: &MaskSeed) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let (mut masked, mut plain) = (Vec::new(), Vec::new());
    for s in served.iter().filter(|s| s.op == 0) {
        let cols = s.words.len() / s.n.max(1);
        let clear = unmasked(s, seed);
        for p in 0..s.n {
            masked.push(s.words[p * cols..(p + 1) * cols].to_vec());
            plain.push(clear[p * cols..(p + 1) * cols].to_vec());
        }
    }
    (masked, plain)
}

/// The words of `s` with their masks taken away: what an unmasked integer channel would
/// carry (the control; an attacker has no seed).
pub fn unmasked(s: &Served, seed: &MaskSeed) -> Vec<u32> {
    let cols = s.words.len() / s.n.max(1);
    let mut r = vec![0u32; s.words.len()];
    seed.fill(s.op, s.first, s.n, cols, &mut r);
    s.words
        .iter()
        .zip(&r)
        .map(|(&u, &r)| u.wrapping_sub(r))
        .collect()
}

/// A chi-square test of one byte lane against the uniform distribution.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LaneTest {
    /// Byte 0 is the least significant.
    pub lane: usize,
    /// The statistic, with 255 degrees of freedom.
    pub chi2: f64,
    /// The probability of a statistic at least this large from uniform bytes.
    pub p: f64,
}

/// Each byte lane of `words` against the uniform distribution.
pub fn uniformity(words: &[u32]) -> [LaneTest; 4] {
    std::array::from_fn(|lane| {
        let mut counts = [0u64; 256];
        for w in words {
            counts[((w >> (8 * lane)) & 0xff) as usize] += 1;
        }
        let expected = words.len() as f64 / 256.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected.max(f64::MIN_POSITIVE))
            .sum();
        LaneTest {
            lane,
            chi2,
            p: chi2_sf(chi2, 255.0),
        }
    })
}

/// `P(X ≥ x)` for a chi-square variable with `k` degrees of freedom, by the
/// Wilson–Hilferty cube-root normal approximation (within about 1e-3 for `k` in the
/// hundreds).
fn chi2_sf(x: f64, k: f64) -> f64 {
    let v = 2.0 / (9.0 * k);
    let z = ((x / k).powf(1.0 / 3.0) - (1.0 - v)) / v.sqrt();
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The complementary error function (Numerical Recipes' Chebyshev fit, relative error
/// below 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// Match each position's layer-0 query|key|value input (`inputs`, one vector of words per
/// position, read as signed integers) against every token's `E[t] ⊙ g / rms`, and score
/// the best match against `truth`.
pub fn embedding_match(w: &QuantWeights, inputs: &[Vec<u32>], truth: &[u32]) -> Rate {
    let d = w.config.d_model;
    let table = w.embedding.dequantize();
    let gain = &w.layers[0].attn_norm;
    // unit vectors of the normed, scaled embeddings (the norm's scale drops out)
    let candidates: Vec<f32> = table
        .par_chunks_exact(d)
        .flat_map_iter(|row| {
            let v: Vec<f32> = row.iter().zip(gain).map(|(e, g)| e * g).collect();
            let n = v
                .iter()
                .map(|x| x * x)
                .sum::<f32>()
                .sqrt()
                .max(f32::MIN_POSITIVE);
            v.into_iter().map(move |x| x / n)
        })
        .collect();
    let guesses: Vec<u32> = inputs
        .par_iter()
        .map(|words| {
            let x: Vec<f32> = words.iter().map(|&u| u as i32 as f32).collect();
            candidates
                .chunks_exact(d)
                .enumerate()
                .map(|(t, c)| (t, c.iter().zip(&x).map(|(a, b)| a * b).sum::<f32>()))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(0, |(t, _)| t as u32)
        })
        .collect();
    Rate::score(&guesses, truth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chi_square_tail_is_right() {
        // the regularized upper incomplete gamma Q(255/2, x/2), by its series
        for (x, want) in [
            (255.0, 0.48822),
            (300.0, 0.027728),
            (347.0, 1.0978e-4),
            (200.0, 0.99543),
        ] {
            let got = chi2_sf(x, 255.0);
            assert!(
                (got - want).abs() < 1e-3 + 0.1 * want,
                "{x}: {got} vs {want}"
            );
        }
        // bytes that are not uniform fail
        let skewed: Vec<u32> = (0..1u32 << 14).map(|i| i % 200).collect();
        assert!(uniformity(&skewed)[0].p < 1e-6);
    }
}
