//! Perplexity as llama.cpp's `llama-perplexity` measures it, and how closely one model
//! follows another on the same text (top-1 agreement, KL divergence).
//!
//! The text's tokens are cut into chunks of `ctx`; each chunk is run from an empty cache
//! (its first token replaced by BOS when the model adds one), and only the second half of
//! each chunk is scored, so that every scored token sees at least `ctx / 2` tokens before
//! it: token `j + 1` is scored with the logits after token `j`, for `j` in
//! `ctx / 2 .. ctx - 1`.

use std::time::Instant;

use serde::Serialize;

use crate::crypto::EncryptedLocal;
use crate::{LocalModel, ModelError};

/// A model that scores a whole sequence from an empty state.
pub trait SequenceModel {
    /// Forget the current sequence.
    fn reset(&mut self);
    /// Feed `ids` and return the logits after each of them, `[t][vocab]`.
    fn feed_all(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>, ModelError>;
}

impl SequenceModel for LocalModel {
    fn reset(&mut self) {
        LocalModel::reset(self)
    }
    fn feed_all(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
        LocalModel::feed_all(self, ids)
    }
}

impl SequenceModel for EncryptedLocal {
    fn reset(&mut self) {
        EncryptedLocal::reset(self)
    }
    fn feed_all(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
        EncryptedLocal::feed_all(self, ids)
    }
}

/// Smallest chunk accepted (three tokens scored per chunk).
pub const MIN_CTX: usize = 8;

/// One model's perplexity on a text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Perplexity {
    /// `exp` of the mean negative log-likelihood.
    pub perplexity: f64,
    /// Standard error of the perplexity (from the spread of the per-token NLL, as
    /// llama.cpp prints it after `±`).
    pub stderr: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub mean_nll: f64,
    /// Seconds spent running the model.
    pub seconds: f64,
}

/// How closely a model follows a reference on the same scored positions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Agreement {
    /// Share of scored positions where both models' most likely next token is the same.
    pub top1: f64,
    /// Mean KL divergence of the model's next-token distribution from the reference's
    /// (nats per position).
    pub mean_kl: f64,
}

/// Perplexity of a model on a text, and optionally of a reference and the agreement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerplexityReport {
    /// Tokens per chunk.
    pub ctx: usize,
    pub chunks: usize,
    /// Tokens scored per model (`chunks * (ctx - 1 - ctx / 2)`).
    pub scored: usize,
    /// Tokens of the text (the last partial chunk is not used).
    pub text_tokens: usize,
    pub model: Perplexity,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<Perplexity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement: Option<Agreement>,
}

impl PerplexityReport {
    /// Model perplexity over reference perplexity.
    pub fn ratio(&self) -> Option<f64> {
        self.reference
            .as_ref()
            .map(|r| self.model.perplexity / r.perplexity)
    }
}

/// Log-softmax of `logits` in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    logits.iter().map(|&l| l as f64 - log_z).collect()
}

fn argmax(v: &[f64]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Running sums of a model's per-token NLL.
#[derive(Default)]
struct Nll {
    sum: f64,
    sum_sq: f64,
    n: usize,
    seconds: f64,
}

impl Nll {
    fn add(&mut self, nll: f64) {
        self.sum += nll;
        self.sum_sq += nll * nll;
        self.n += 1;
    }

    fn finish(&self) -> Perplexity {
        let n = self.n as f64;
        let mean = self.sum / n;
        let var = (self.sum_sq / n - mean * mean).max(0.0);
        let ppl = mean.exp();
        Perplexity {
            perplexity: ppl,
            stderr: if self.n > 1 {
                ppl * (var / (n - 1.0)).sqrt()
            } else {
                0.0
            },
            mean_nll: mean,
            seconds: self.seconds,
        }
    }
}

/// Score `tokens` (the whole text, BOS included if the model adds one) in chunks of `ctx`
/// with `model`, and with `reference` on the same chunks if given; `bos` replaces each
/// chunk's first token. `progress(done, chunks)` is called after each chunk.
pub fn perplexity(
    model: &mut dyn SequenceModel,
    mut reference: Option<&mut dyn SequenceModel>,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PerplexityReport, ModelError> {
    if ctx < MIN_CTX {
        return Err(ModelError::InvalidConfig(format!(
            "a chunk of {ctx} tokens is too short; use at least {MIN_CTX}"
        )));
    }
    let chunks = tokens.len() / ctx;
    if chunks == 0 {
        return Err(ModelError::InvalidConfig(format!(
            "the text has {} tokens, fewer than one chunk of {ctx}; give a longer text or a \
             shorter context",
            tokens.len()
        )));
    }
    let first = ctx / 2;
    let (mut m, mut r) = (Nll::default(), Nll::default());
    let (mut same, mut kl_sum) = (0usize, 0f64);
    for c in 0..chunks {
        let mut ids = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(b) = bos {
            ids[0] = b;
        }
        let targets = &tokens[c * ctx + first + 1..(c + 1) * ctx];
        let run = |model: &mut dyn SequenceModel, acc: &mut Nll| {
            let start = Instant::now();
            model.reset();
            let logits = model.feed_all(&ids)?;
            acc.seconds += start.elapsed().as_secs_f64();
            if logits.len() != ids.len() {
                return Err(ModelError::Shape(format!(
                    "{} logit rows for {} tokens",
                    logits.len(),
                    ids.len()
                )));
            }
            let rows: Vec<Vec<f64>> = logits[first..ctx - 1]
                .iter()
                .map(|l| log_softmax(l))
                .collect();
            for (row, &t) in rows.iter().zip(targets) {
                let lp = row.get(t as usize).ok_or_else(|| {
                    ModelError::Shape(format!("token {t} is outside the vocabulary"))
                })?;
                acc.add(-lp);
            }
            Ok(rows)
        };
        let lm = run(model, &mut m)?;
        if let Some(reference) = reference.as_deref_mut() {
            let lr = run(reference, &mut r)?;
            for (a, b) in lm.iter().zip(&lr) {
                same += usize::from(argmax(a) == argmax(b));
                // KL(reference ‖ model) = Σ p_ref (log p_ref − log p_model)
                kl_sum += b
                    .iter()
                    .zip(a)
                    .map(|(&lb, &la)| lb.exp() * (lb - la))
                    .sum::<f64>();
            }
        }
        progress(c + 1, chunks);
    }
    let scored = m.n;
    Ok(PerplexityReport {
        ctx,
        chunks,
        scored,
        text_tokens: tokens.len(),
        model: m.finish(),
        reference: (r.n > 0).then(|| r.finish()),
        agreement: (r.n > 0).then(|| Agreement {
            top1: same as f64 / scored as f64,
            mean_kl: kl_sum / scored as f64,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model whose next-token distribution is fixed: `probs` after every token.
    struct Fixed {
        logits: Vec<f32>,
        calls: usize,
    }

    impl SequenceModel for Fixed {
        fn reset(&mut self) {}
        fn feed_all(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
            self.calls += 1;
            Ok(vec![self.logits.clone(); ids.len()])
        }
    }

    #[test]
    fn uniform_model_has_the_vocabulary_as_perplexity() {
        let mut m = Fixed {
            logits: vec![0.5; 10],
            calls: 0,
        };
        let tokens: Vec<u32> = (0..40).map(|i| i % 10).collect();
        let mut seen = Vec::new();
        let r = perplexity(&mut m, None, &tokens, 16, None, &mut |d, n| {
            seen.push((d, n))
        })
        .expect("ppl");
        assert_eq!((r.chunks, r.scored), (2, 2 * 7));
        assert_eq!(seen, vec![(1, 2), (2, 2)]);
        assert!((r.model.perplexity - 10.0).abs() < 1e-9);
        assert!(r.model.stderr < 1e-9);
        assert!(r.reference.is_none() && r.agreement.is_none());
    }

    #[test]
    fn scores_the_second_half_of_each_chunk_against_the_next_token() {
        // the model is sure of token 3; the text is 3 only where it is scored
        let mut logits = vec![-30.0f32; 5];
        logits[3] = 30.0;
        let mut m = Fixed { logits, calls: 0 };
        let ctx = 8;
        let mut tokens = vec![0u32; 2 * ctx];
        for c in 0..2 {
            for j in ctx / 2 + 1..ctx {
                tokens[c * ctx + j] = 3;
            }
        }
        let r = perplexity(&mut m, None, &tokens, ctx, None, &mut |_, _| ()).expect("ppl");
        assert!((r.model.perplexity - 1.0).abs() < 1e-9, "{r:?}");
        // one unscored position wrong would not matter; one scored position wrong does
        tokens[ctx - 1] = 0;
        let r = perplexity(&mut m, None, &tokens, ctx, None, &mut |_, _| ()).expect("ppl");
        assert!(r.model.perplexity > 100.0, "{r:?}");
    }

    #[test]
    fn agreement_with_a_reference() {
        let mut a = Fixed {
            logits: vec![1.0, 2.0, 0.0],
            calls: 0,
        };
        let mut same = Fixed {
            logits: vec![1.0, 2.0, 0.0],
            calls: 0,
        };
        let tokens = vec![1u32; 32];
        let r =
            perplexity(&mut a, Some(&mut same), &tokens, 16, None, &mut |_, _| ()).expect("ppl");
        let g = r.agreement.as_ref().expect("agreement");
        assert_eq!(g.top1, 1.0);
        assert!(g.mean_kl.abs() < 1e-12);
        assert!((r.ratio().expect("ratio") - 1.0).abs() < 1e-12);
        let mut other = Fixed {
            logits: vec![3.0, 2.0, 0.0],
            calls: 0,
        };
        let r =
            perplexity(&mut a, Some(&mut other), &tokens, 16, None, &mut |_, _| ()).expect("ppl");
        let g = r.agreement.expect("agreement");
        assert_eq!(g.top1, 0.0);
        assert!(g.mean_kl > 0.1);
        assert_eq!(other.calls, 2);
    }

    #[test]
    fn too_short_a_text_or_context_is_an_error() {
        let mut m = Fixed {
            logits: vec![0.0; 4],
            calls: 0,
        };
        let err = perplexity(&mut m, None, &[1; 10], 16, None, &mut |_, _| ()).expect_err("error");
        assert!(err.to_string().contains("10 tokens"), "{err}");
        let err = perplexity(&mut m, None, &[1; 10], 4, None, &mut |_, _| ()).expect_err("error");
        assert!(err.to_string().contains("at least 8"), "{err}");
    }
}
