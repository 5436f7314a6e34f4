//! Private models for the attacks: what the owner deploys when the attacker holds only the
//! public model it was derived from.
//!
//! - [`perturbed`]: Gaussian noise on every weight, embeddings included — the stand-in used
//!   since the first attack table. It moves every tensor, which real fine-tunes rarely do.
//! - [`finetuned`]: a LoRA-style update — a random rank-`r` product added to each attention
//!   and MLP projection, sized relative to the matrix, embeddings, norm gains and head left
//!   as they are. That is what a LoRA fine-tune (the common way to make a private variant of
//!   a public model) changes: its adapters sit on these projections, and the token table is
//!   frozen.
//! - [`lora_finetuned`]: a *trained* LoRA fine-tune on a private text (burn autodiff), the
//!   realistic private model that the random ones stand in for.

mod lora;

pub use lora::{lora_finetuned, LoraOptions, LoraReport, FINETUNE_TEXT};

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};

use crate::{LlamaWeights, Matrix, ModelBundle, ModelError, TextCodec};

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

/// `m + A B` with `A: [rows, rank]`, `B: [rank, cols]` Gaussian, scaled so that
/// `|A B|_F = rel |m|_F`.
fn low_rank_update(m: &Matrix, rank: usize, rel: f64, rng: &mut ChaCha20Rng) -> Matrix {
    let (rows, cols) = (m.rows, m.cols);
    let rank = rank.clamp(1, rows.min(cols));
    let normal = Normal::new(0.0, 1.0).expect("unit normal");
    let a: Vec<f64> = (0..rows * rank).map(|_| normal.sample(rng)).collect();
    let b: Vec<f64> = (0..rank * cols).map(|_| normal.sample(rng)).collect();
    let mut delta = vec![0f64; rows * cols];
    for r in 0..rows {
        let out = &mut delta[r * cols..(r + 1) * cols];
        for k in 0..rank {
            let x = a[r * rank + k];
            for (o, y) in out.iter_mut().zip(&b[k * cols..(k + 1) * cols]) {
                *o += x * y;
            }
        }
    }
    let size = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let base = size(&mut m.data.iter().map(|x| f64::from(*x)));
    let d = size(&mut delta.iter().copied());
    let scale = if d > 0.0 { rel * base / d } else { 0.0 };
    let mut out = m.clone();
    for (o, x) in out.data.iter_mut().zip(&delta) {
        *o += (x * scale) as f32;
    }
    out
}

/// A LoRA-style private variant of `base`: every attention and MLP projection gets a random
/// rank-`rank` update whose Frobenius norm is `rel` times the matrix's; embeddings, norm
/// gains and the head are `base`'s. `rel = 0` is an exact copy.
pub fn finetuned(
    base: &ModelBundle,
    rel: f64,
    rank: usize,
    seed: u64,
) -> Result<ModelBundle, ModelError> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut weights = base.weights.clone();
    if rel > 0.0 {
        for l in &mut weights.layers {
            for m in [
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.w_gate,
                &mut l.w_up,
                &mut l.w_down,
            ] {
                *m = low_rank_update(m, rank, rel, &mut rng);
            }
        }
    }
    Ok(ModelBundle {
        name: format!(
            "{} (private: rank-{rank} fine-tune of relative size {rel})",
            base.name
        ),
        weights,
        text: TextCodec::new(base.text.spec.clone())?,
    })
}

/// Where a fine-tune's update sits in the spectrum of the matrix it changes, for the seven
/// projections of `layer`: per matrix, the rank its largest singular value would take among
/// the public matrix's singular values (1: above them all) and its ratio to the largest.
/// Trained LoRA adapters add such "intruder dimensions" *high* in the spectrum (Shuttleworth
/// et al., arXiv 2410.21228); an update that ranks low moves the model less than they do.
pub fn update_spectrum(
    public: &LlamaWeights,
    tuned: &LlamaWeights,
    layer: usize,
) -> Result<Vec<(&'static str, usize, f64)>, ModelError> {
    let (p, t) = match (public.layers.get(layer), tuned.layers.get(layer)) {
        (Some(p), Some(t)) => (p, t),
        _ => return Err(ModelError::Shape(format!("no layer {layer}"))),
    };
    let pairs = [
        ("attn_q", &p.wq, &t.wq),
        ("attn_k", &p.wk, &t.wk),
        ("attn_v", &p.wv, &t.wv),
        ("attn_output", &p.wo, &t.wo),
        ("ffn_gate", &p.w_gate, &t.w_gate),
        ("ffn_up", &p.w_up, &t.w_up),
        ("ffn_down", &p.w_down, &t.w_down),
    ];
    Ok(pairs
        .into_iter()
        .map(|(name, a, b)| {
            let m = |data: Vec<f64>| nalgebra::DMatrix::from_row_slice(a.rows, a.cols, &data);
            let w = m(a.data.iter().map(|x| f64::from(*x)).collect());
            let delta = m(b
                .data
                .iter()
                .zip(&a.data)
                .map(|(x, y)| f64::from(x - y))
                .collect());
            let sw = w.singular_values();
            let top = delta.singular_values().max();
            let rank = 1 + sw.iter().filter(|s| **s > top).count();
            (name, rank, top / sw.max().max(f64::MIN_POSITIVE))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bigger_update_ranks_higher_in_the_spectrum() {
        let base = ModelBundle::tiny().expect("tiny");
        let small = finetuned(&base, 0.01, 2, 1).expect("small");
        let big = finetuned(&base, 0.5, 2, 1).expect("big");
        let s = update_spectrum(&base.weights, &small.weights, 1).expect("small");
        let b = update_spectrum(&base.weights, &big.weights, 1).expect("big");
        assert_eq!(s.len(), 7);
        for ((name, rs, xs), (_, rb, xb)) in s.iter().zip(&b) {
            assert!(
                rb < rs && xb > xs,
                "{name}: rank {rs} -> {rb}, ratio {xs} -> {xb}"
            );
        }
    }

    #[test]
    fn a_low_rank_update_has_the_asked_size_and_rank() {
        let m = Matrix::new(6, 5, (0..30).map(|i| (i as f32 * 0.37).sin()).collect());
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let u = low_rank_update(&m, 2, 0.1, &mut rng);
        let delta: Vec<f64> = u
            .data
            .iter()
            .zip(&m.data)
            .map(|(a, b)| f64::from(a - b))
            .collect();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let base: Vec<f64> = m.data.iter().map(|x| f64::from(*x)).collect();
        let ratio = norm(&delta) / norm(&base);
        assert!((ratio - 0.1).abs() < 1e-4, "{ratio}");
        let d = nalgebra::DMatrix::from_row_slice(6, 5, &delta);
        let s = d.singular_values();
        let big = s.iter().filter(|v| **v > 1e-5 * s[0]).count();
        assert_eq!(big, 2, "{s}");
    }

    #[test]
    fn a_finetune_keeps_the_token_table() {
        let base = ModelBundle::tiny().expect("tiny");
        let f = finetuned(&base, 0.05, 4, 1).expect("finetune");
        assert_eq!(f.weights.embedding.data, base.weights.embedding.data);
        assert_eq!(
            f.weights.layers[0].attn_norm,
            base.weights.layers[0].attn_norm
        );
        assert_ne!(f.weights.layers[0].wq.data, base.weights.layers[0].wq.data);
    }
}
