//! A *trained* LoRA fine-tune: the private model a real owner would deploy.
//!
//! Rank-`r` adapters `W + (α/r)·A·B` on the seven attention and MLP projections of every
//! layer (`A` Gaussian, `B` zero at the start, as LoRA initialises them), trained with Adam
//! on next-token loss over a private text while the public weights, embeddings, norm gains
//! and head stay frozen. The forward pass is a plain Llama written on burn tensors on an
//! autodiff device, so that burn computes the adapters' gradients; it is checked against
//! the engine's own forward pass (`the_training_forward_pass_is_the_model`).
//!
//! The default text ([`FINETUNE_TEXT`]) is an invented water cooperative's operator
//! handbook: a small, private, domain-specific corpus, the kind of document an owner
//! adapts a public model to, and text neither the attack prompts nor the attacker's corpus
//! contain.

use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};

use crate::nn::{matrix_to_tensor, tensor_to_vec, vector_to_tensor};
use crate::{Family, LayerWeights, LlamaConfig, Matrix, ModelBundle, ModelError, TextCodec};

/// The private text the default fine-tune learns (5.5 kB, an invented operator handbook).
pub const FINETUNE_TEXT: &str = include_str!("finetune.txt");

/// How the adapters are trained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraOptions {
    /// Rank `r` of each adapter.
    pub rank: usize,
    /// `α`: the update is `(α/r)·A·B`.
    pub alpha: f64,
    /// Adam steps.
    pub steps: usize,
    /// Windows of the text per step.
    pub batch: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Adam's learning rate.
    pub lr: f64,
    pub seed: u64,
}

impl Default for LoraOptions {
    /// Common LoRA settings (rank 16, α = 2r) with a learning rate high enough to learn a
    /// small text in the steps two CPU cores afford.
    fn default() -> Self {
        LoraOptions {
            rank: 16,
            alpha: 32.0,
            steps: 60,
            batch: 4,
            seq_len: 64,
            lr: 1e-3,
            seed: 1,
        }
    }
}

/// What training did.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraReport {
    /// Tokens of the training text.
    pub tokens: usize,
    /// Mean next-token loss (nats) over the whole text before and after training.
    pub loss_before: f64,
    pub loss_after: f64,
    /// Mean over all adapted matrices of `|ΔW|_F / |W|_F`.
    pub relative_update: f64,
}

/// One projection's adapter, host-side with its Adam moments: `A: [in, r]`, `B: [r, out]`.
struct Adapter {
    a: Vec<f32>,
    b: Vec<f32>,
    rows: usize,
    cols: usize,
    moments: [Vec<f32>; 4],
}

impl Adapter {
    fn new(m: &Matrix, rank: usize, rng: &mut ChaCha20Rng) -> Self {
        // LoRA's initialisation: A ~ N(0, 1/in) (a Kaiming-like scale), B = 0, so training
        // starts from the public model exactly
        let normal = Normal::new(0.0, 1.0 / (m.rows as f64).sqrt()).expect("positive std");
        let a = (0..m.rows * rank)
            .map(|_| normal.sample(rng) as f32)
            .collect();
        let b = vec![0.0; rank * m.cols];
        let moments = [
            vec![0.0; m.rows * rank],
            vec![0.0; m.rows * rank],
            vec![0.0; rank * m.cols],
            vec![0.0; rank * m.cols],
        ];
        Adapter {
            a,
            b,
            rows: m.rows,
            cols: m.cols,
            moments,
        }
    }

    /// `ΔW = scale · A B`, `[in, out]`.
    fn delta(&self, rank: usize, scale: f32) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        for r in 0..self.rows {
            let row = &mut out[r * self.cols..(r + 1) * self.cols];
            for k in 0..rank {
                let x = self.a[r * rank + k] * scale;
                for (o, y) in row
                    .iter_mut()
                    .zip(&self.b[k * self.cols..(k + 1) * self.cols])
                {
                    *o += x * y;
                }
            }
        }
        out
    }
}

/// Adam on a flat parameter with moments `m`, `v` at step `t` (from 1).
fn adam(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], t: usize, lr: f64) {
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let (c1, c2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
    for i in 0..p.len() {
        let gi = f64::from(g[i]);
        let mi = b1 * f64::from(m[i]) + (1.0 - b1) * gi;
        let vi = b2 * f64::from(v[i]) + (1.0 - b2) * gi * gi;
        m[i] = mi as f32;
        v[i] = vi as f32;
        p[i] -= (lr * (mi / c1) / ((vi / c2).sqrt() + eps)) as f32;
    }
}

/// The public weights on the autodiff device (constants: no gradients).
struct Frozen {
    embedding: Tensor<2>,
    head: Tensor<2>,
    final_norm: Tensor<1>,
    layers: Vec<FrozenLayer>,
    /// `[n, h]` cos and sin of every position, each pair's value repeated twice.
    cos: Tensor<2>,
    sin: Tensor<2>,
}

struct FrozenLayer {
    attn_norm: Tensor<1>,
    ffn_norm: Tensor<1>,
    /// q, k, v, o, gate, up, down: `[in, out]`.
    mats: Vec<Tensor<2>>,
}

fn projections(l: &LayerWeights) -> [&Matrix; 7] {
    [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
}

/// The trainer: frozen public weights and the adapters.
struct Lora<'a> {
    config: &'a LlamaConfig,
    frozen: Frozen,
    adapters: Vec<[Adapter; 7]>,
    opts: LoraOptions,
    device: Device,
}

impl<'a> Lora<'a> {
    fn new(base: &'a ModelBundle, opts: LoraOptions) -> Result<Self, ModelError> {
        let w = &base.weights;
        let c = &w.config;
        let plain = c.family == Family::Llama
            && c.sliding_window.is_none()
            && w.layers
                .iter()
                .all(|l| l.extras == Default::default() && l.post_norms.is_none());
        if !plain {
            return Err(ModelError::InvalidConfig(format!(
                "the trained fine-tune trains plain Llama blocks only; this {:?} model has \
                 biases, per-head norms, post-norms or sliding windows",
                c.family
            )));
        }
        let device = Device::flex().autodiff();
        let n = opts.seq_len.max(2);
        let (h, theta) = (c.head_dim, f64::from(c.rope_theta));
        let (mut cos, mut sin) = (Vec::with_capacity(n * h), Vec::with_capacity(n * h));
        for p in 0..n {
            for j in 0..h / 2 {
                let factor = c
                    .rope_freq_factors
                    .as_ref()
                    .map_or(1.0, |f| f64::from(f[j]));
                let (s, co) =
                    (p as f64 * theta.powf(-2.0 * j as f64 / h as f64) / factor).sin_cos();
                cos.extend([co as f32; 2]);
                sin.extend([s as f32; 2]);
            }
        }
        let head = w.output.clone().unwrap_or_else(|| w.embedding.transpose());
        let frozen = Frozen {
            embedding: matrix_to_tensor(&w.embedding, &device),
            head: matrix_to_tensor(&head, &device),
            final_norm: vector_to_tensor(&w.final_norm, &device),
            layers: w
                .layers
                .iter()
                .map(|l| FrozenLayer {
                    attn_norm: vector_to_tensor(&l.attn_norm, &device),
                    ffn_norm: vector_to_tensor(&l.ffn_norm, &device),
                    mats: projections(l)
                        .iter()
                        .map(|m| matrix_to_tensor(m, &device))
                        .collect(),
                })
                .collect(),
            cos: Tensor::from_data(TensorData::new(cos, [n, h]), &device),
            sin: Tensor::from_data(TensorData::new(sin, [n, h]), &device),
        };
        let mut rng = ChaCha20Rng::seed_from_u64(opts.seed);
        let adapters = w
            .layers
            .iter()
            .map(|l| projections(l).map(|m| Adapter::new(m, opts.rank, &mut rng)))
            .collect();
        Ok(Lora {
            config: c,
            frozen,
            adapters,
            opts,
            device,
        })
    }

    fn scale(&self) -> f32 {
        (self.opts.alpha / self.opts.rank as f64) as f32
    }

    fn rms_norm(&self, x: Tensor<2>, gain: &Tensor<1>) -> Tensor<2> {
        let eps = f64::from(self.config.rms_eps);
        let rms = x.clone().powi_scalar(2).mean_dim(1).add_scalar(eps).sqrt();
        x.div(rms).mul(gain.clone().unsqueeze::<2>())
    }

    /// RoPE on `x: [b, heads, t, h]` (pairs are adjacent columns).
    fn rope(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, heads, t, h] = x.dims();
        let cos = self
            .frozen
            .cos
            .clone()
            .narrow(0, 0, t)
            .reshape([1, 1, t, h]);
        let sin = self
            .frozen
            .sin
            .clone()
            .narrow(0, 0, t)
            .reshape([1, 1, t, h]);
        // (x R)[2j] = -x[2j+1], (x R)[2j+1] = x[2j]
        let pairs = x.clone().reshape([b, heads, t, h / 2, 2]);
        let even = pairs.clone().narrow(4, 0, 1);
        let odd = pairs.narrow(4, 1, 1);
        let rotated = Tensor::cat(vec![odd.neg(), even], 4).reshape([b, heads, t, h]);
        x.mul(cos.expand([b, heads, t, h]))
            .add(rotated.mul(sin.expand([b, heads, t, h])))
    }

    /// Next-token log-probabilities of `windows` (`b` windows of `t` tokens): `[b t, vocab]`,
    /// with the adapters `params` (`A`, `B` of each projection, on the autodiff device).
    ///
    /// # Shapes
    /// - windows: `b` slices of `t` ids
    /// - returns: `[b t, vocab]`
    fn log_probs(&self, windows: &[&[u32]], params: &[[(Tensor<2>, Tensor<2>); 7]]) -> Tensor<2> {
        let c = self.config;
        let (b, t) = (windows.len(), windows[0].len());
        let (heads, groups, h) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let ids: Vec<i64> = windows
            .iter()
            .flat_map(|w| w.iter().map(|&i| i64::from(i)))
            .collect();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [b * t]), &self.device);
        let mut x = self.frozen.embedding.clone().select(0, ids);
        let mut mask = vec![0f32; t * t];
        for i in 0..t {
            for j in i + 1..t {
                mask[i * t + j] = -1e9;
            }
        }
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [t, t]), &self.device)
            .reshape([1, 1, t, t])
            .expand([b, heads, t, t]);
        let scale = self.scale();
        for (layer, lp) in self.frozen.layers.iter().zip(params) {
            let proj = |u: Tensor<2>, i: usize| {
                let (a, bb) = &lp[i];
                u.clone()
                    .matmul(layer.mats[i].clone())
                    .add(u.matmul(a.clone()).matmul(bb.clone()).mul_scalar(scale))
            };
            let u = self.rms_norm(x.clone(), &layer.attn_norm);
            let split = |y: Tensor<2>, n: usize| y.reshape([b, t, n, h]).swap_dims(1, 2);
            let q = self.rope(split(proj(u.clone(), 0), heads));
            let k = self.rope(split(proj(u.clone(), 1), groups));
            let v = split(proj(u, 2), groups);
            let r = heads / groups;
            let widen = |y: Tensor<4>| {
                y.unsqueeze_dim::<5>(2)
                    .expand([b, groups, r, t, h])
                    .reshape([b, heads, t, h])
            };
            let (k, v) = (widen(k), widen(v));
            let scores = q
                .matmul(k.swap_dims(2, 3))
                .mul_scalar(1.0 / (h as f64).sqrt())
                .add(mask.clone());
            let mixed = softmax(scores, 3)
                .matmul(v)
                .swap_dims(1, 2)
                .reshape([b * t, heads * h]);
            x = x.add(proj(mixed, 3));
            let u = self.rms_norm(x.clone(), &layer.ffn_norm);
            let gated = silu(proj(u.clone(), 4)).mul(proj(u, 5));
            x = x.add(proj(gated, 6));
        }
        let x = self.rms_norm(x, &self.frozen.final_norm);
        log_softmax(x.matmul(self.frozen.head.clone()), 1)
    }

    /// The adapters as tensors on the autodiff device, tracked when `grad`.
    fn params(&self, grad: bool) -> Vec<[(Tensor<2>, Tensor<2>); 7]> {
        let r = self.opts.rank;
        let t = |data: &[f32], shape: [usize; 2]| {
            let x = Tensor::<2>::from_data(TensorData::new(data.to_vec(), shape), &self.device);
            if grad {
                x.require_grad()
            } else {
                x
            }
        };
        self.adapters
            .iter()
            .map(|l| {
                std::array::from_fn(|i| {
                    let ad = &l[i];
                    (t(&ad.a, [ad.rows, r]), t(&ad.b, [r, ad.cols]))
                })
            })
            .collect()
    }

    /// Mean negative log-likelihood of each window's tokens after its first.
    fn loss(&self, windows: &[&[u32]], params: &[[(Tensor<2>, Tensor<2>); 7]]) -> Tensor<1> {
        let (b, t) = (windows.len(), windows[0].len());
        let targets: Vec<i64> = windows
            .iter()
            .flat_map(|w| w[1..].iter().map(|&i| i64::from(i)).chain([0]))
            .collect();
        let weights: Vec<f32> = (0..b)
            .flat_map(|_| (0..t).map(|i| if i + 1 < t { 1.0 } else { 0.0 }))
            .collect();
        let targets =
            Tensor::<2, Int>::from_data(TensorData::new(targets, [b * t, 1]), &self.device);
        let weights = Tensor::<2>::from_data(TensorData::new(weights, [b * t, 1]), &self.device);
        let picked = self.log_probs(windows, params).gather(1, targets);
        picked
            .mul(weights)
            .sum()
            .neg()
            .div_scalar((b * (t - 1)) as f64)
    }

    /// Mean loss over the whole of `ids`, in consecutive windows.
    fn text_loss(&self, ids: &[u32]) -> Result<f64, ModelError> {
        let params = self.params(false);
        let t = self.opts.seq_len.max(2);
        let (mut total, mut n) = (0.0, 0usize);
        for w in ids.chunks(t).filter(|w| w.len() >= 2) {
            let l = tensor_to_vec(self.loss(&[w], &params))?[0];
            total += f64::from(l) * (w.len() - 1) as f64;
            n += w.len() - 1;
        }
        Ok(total / n.max(1) as f64)
    }

    fn step(&mut self, windows: &[&[u32]], step: usize) -> Result<f64, ModelError> {
        let params = self.params(true);
        let loss = self.loss(windows, &params);
        let grads = loss.backward();
        let value = f64::from(tensor_to_vec(loss)?[0]);
        let lr = self.opts.lr;
        for (layer, lp) in self.adapters.iter_mut().zip(&params) {
            for (ad, (a, b)) in layer.iter_mut().zip(lp) {
                let missing = || ModelError::Backend("an adapter got no gradient".into());
                let ga = tensor_to_vec(a.grad(&grads).ok_or_else(missing)?)?;
                let gb = tensor_to_vec(b.grad(&grads).ok_or_else(missing)?)?;
                let [ma, va, mb, vb] = &mut ad.moments;
                adam(&mut ad.a, &ga, ma, va, step, lr);
                adam(&mut ad.b, &gb, mb, vb, step, lr);
            }
        }
        Ok(value)
    }
}

/// `base` fine-tuned on `text` with trained LoRA adapters merged into its weights, and what
/// training did. `progress` hears `(step, loss)` after every step.
pub fn lora_finetuned(
    base: &ModelBundle,
    text: &str,
    opts: LoraOptions,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<(ModelBundle, LoraReport), ModelError> {
    let ids = base.text.encode_prompt(text)?;
    let opts = LoraOptions {
        seq_len: opts
            .seq_len
            .clamp(2, base.weights.config.max_seq_len.max(2)),
        ..opts
    };
    let t = opts.seq_len;
    if ids.len() < t + 1 {
        return Err(ModelError::Shape(format!(
            "the fine-tune text has {} tokens; it needs more than a window of {t}",
            ids.len()
        )));
    }
    if opts.rank == 0 || opts.batch == 0 {
        return Err(ModelError::Shape(
            "rank and batch must be at least 1".into(),
        ));
    }
    let mut lora = Lora::new(base, opts)?;
    let loss_before = lora.text_loss(&ids)?;
    let mut rng = ChaCha20Rng::seed_from_u64(opts.seed ^ 0x10a);
    for step in 1..=opts.steps {
        let starts: Vec<usize> = (0..opts.batch)
            .map(|_| rng.gen_range(0..=ids.len() - t))
            .collect();
        let windows: Vec<&[u32]> = starts.iter().map(|&s| &ids[s..s + t]).collect();
        let loss = lora.step(&windows, step)?;
        progress(step, loss);
    }
    let loss_after = lora.text_loss(&ids)?;
    let scale = lora.scale();
    let mut weights = base.weights.clone();
    let mut rel = Vec::new();
    for (l, ads) in weights.layers.iter_mut().zip(&lora.adapters) {
        let mats = [
            &mut l.wq,
            &mut l.wk,
            &mut l.wv,
            &mut l.wo,
            &mut l.w_gate,
            &mut l.w_up,
            &mut l.w_down,
        ];
        for (m, ad) in mats.into_iter().zip(ads) {
            let delta = ad.delta(opts.rank, scale);
            let norm = |v: &mut dyn Iterator<Item = f32>| {
                v.map(|x| f64::from(x).powi(2)).sum::<f64>().sqrt()
            };
            let base_norm = norm(&mut m.data.iter().copied());
            rel.push(norm(&mut delta.iter().copied()) / base_norm.max(f64::MIN_POSITIVE));
            for (w, d) in m.data.iter_mut().zip(&delta) {
                *w += d;
            }
        }
    }
    let report = LoraReport {
        tokens: ids.len(),
        loss_before,
        loss_after,
        relative_update: rel.iter().sum::<f64>() / rel.len().max(1) as f64,
    };
    let bundle = ModelBundle {
        name: format!(
            "{} (private: rank-{} LoRA trained {} steps)",
            base.name, opts.rank, opts.steps
        ),
        weights,
        text: TextCodec::new(base.text.spec.clone())?,
    };
    Ok((bundle, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalModel;

    #[test]
    fn the_training_forward_pass_is_the_model() {
        let base = ModelBundle::tiny().expect("tiny");
        let opts = LoraOptions {
            seq_len: 12,
            ..LoraOptions::default()
        };
        let lora = Lora::new(&base, opts).expect("lora");
        let ids: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 50).collect();
        let got = tensor_to_vec(lora.log_probs(&[&ids], &lora.params(false))).expect("read");
        let mut model = LocalModel::new(&base.weights, &Device::flex(), None);
        let logits = model.feed_all(&ids).expect("logits");
        let vocab = logits[0].len();
        for (p, row) in logits.iter().enumerate() {
            let max = row.iter().cloned().fold(f32::MIN, f32::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
            for (i, x) in row.iter().enumerate() {
                let want = x - lse;
                let have = got[p * vocab + i];
                assert!(
                    (want - have).abs() < 1e-3,
                    "pos {p} id {i}: {have} vs {want}"
                );
            }
        }
    }

    #[test]
    fn training_lowers_the_loss_on_its_text_and_changes_only_the_projections() {
        let base = ModelBundle::tiny().expect("tiny");
        let opts = LoraOptions {
            rank: 4,
            alpha: 8.0,
            steps: 30,
            batch: 2,
            seq_len: 16,
            lr: 1e-2,
            seed: 3,
        };
        let mut seen = 0;
        let (tuned, report) =
            lora_finetuned(&base, FINETUNE_TEXT, opts, &mut |_, _| seen += 1).expect("train");
        assert_eq!(seen, 30);
        assert!(
            report.loss_after < report.loss_before - 0.1,
            "{} -> {}",
            report.loss_before,
            report.loss_after
        );
        assert!(report.relative_update > 0.0);
        let (p, t) = (&base.weights, &tuned.weights);
        assert_eq!(p.embedding, t.embedding);
        assert_eq!(p.final_norm, t.final_norm);
        for (a, b) in p.layers.iter().zip(&t.layers) {
            assert_eq!(a.attn_norm, b.attn_norm);
            assert_ne!(a.w_up, b.w_up);
        }
    }

    #[test]
    fn families_with_extras_are_refused_and_llama3_trains() {
        use crate::tiny::TinyVariant;
        let opts = LoraOptions {
            steps: 1,
            seq_len: 8,
            ..LoraOptions::default()
        };
        let qwen = ModelBundle::tiny_variant(TinyVariant::Qwen2).expect("qwen2");
        let err = lora_finetuned(&qwen, FINETUNE_TEXT, opts, &mut |_, _| {}).expect_err("refused");
        assert!(err.to_string().contains("plain Llama"), "{err}");
        let llama3 = ModelBundle::tiny_variant(TinyVariant::Llama3).expect("llama3");
        lora_finetuned(&llama3, FINETUNE_TEXT, opts, &mut |_, _| {}).expect("llama3 trains");
    }

    #[test]
    fn a_text_shorter_than_a_window_is_refused() {
        let base = ModelBundle::tiny().expect("tiny");
        let err = lora_finetuned(&base, "too short", LoraOptions::default(), &mut |_, _| {})
            .expect_err("refused");
        assert!(err.to_string().contains("tokens"), "{err}");
    }
}
