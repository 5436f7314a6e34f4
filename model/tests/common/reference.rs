//! A deliberately naive f64 forward pass over host weights, written independently of the
//! burn model (loops, no fused matrices, RoPE by explicit pair rotation).

use veil_model::{LlamaWeights, Matrix};

fn rmsnorm(x: &[f64], gain: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter()
        .zip(gain)
        .map(|(v, g)| v * r * f64::from(*g))
        .collect()
}

fn vecmat(x: &[f64], m: &Matrix) -> Vec<f64> {
    let mut out = vec![0.0; m.cols];
    for (i, xi) in x.iter().enumerate() {
        for (o, w) in out.iter_mut().zip(m.row(i)) {
            *o += xi * f64::from(*w);
        }
    }
    out
}

fn rope(x: &mut [f64], pos: usize, base: f64) {
    let h = x.len();
    for j in 0..h / 2 {
        let theta = base.powf(-2.0 * j as f64 / h as f64) * pos as f64;
        let (s, c) = theta.sin_cos();
        let (a, b) = (x[2 * j], x[2 * j + 1]);
        x[2 * j] = a * c - b * s;
        x[2 * j + 1] = a * s + b * c;
    }
}

/// Logits of every position of `ids`, `[t][vocab]`.
pub fn logits(w: &LlamaWeights, ids: &[u32]) -> Vec<Vec<f64>> {
    let c = &w.config;
    let (h, heads, groups) = (c.head_dim, c.n_heads, c.n_kv_heads);
    let eps = f64::from(c.rms_eps);
    let base = f64::from(c.rope_theta);
    let mut xs: Vec<Vec<f64>> = ids
        .iter()
        .map(|&i| {
            w.embedding
                .row(i as usize)
                .iter()
                .map(|&v| f64::from(v))
                .collect()
        })
        .collect();
    for layer in &w.layers {
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        let mut qs = Vec::new();
        for (p, x) in xs.iter().enumerate() {
            let u = rmsnorm(x, &layer.attn_norm, eps);
            let mut q = vecmat(&u, &layer.wq);
            let mut k = vecmat(&u, &layer.wk);
            for hd in 0..heads {
                rope(&mut q[hd * h..(hd + 1) * h], p, base);
            }
            for g in 0..groups {
                rope(&mut k[g * h..(g + 1) * h], p, base);
            }
            qs.push(q);
            ks.push(k);
            vs.push(vecmat(&u, &layer.wv));
        }
        for (p, x) in xs.iter_mut().enumerate() {
            let mut a = vec![0.0; heads * h];
            for hd in 0..heads {
                let g = hd / (heads / groups);
                let q = &qs[p][hd * h..(hd + 1) * h];
                let scores: Vec<f64> = (0..=p)
                    .map(|s| {
                        let k = &ks[s][g * h..(g + 1) * h];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (h as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (s, es) in e.iter().enumerate() {
                    for d in 0..h {
                        a[hd * h + d] += es / z * vs[s][g * h + d];
                    }
                }
            }
            for (xi, o) in x.iter_mut().zip(vecmat(&a, &layer.wo)) {
                *xi += o;
            }
        }
        for x in xs.iter_mut() {
            let u = rmsnorm(x, &layer.ffn_norm, eps);
            let g = vecmat(&u, &layer.w_gate);
            let up = vecmat(&u, &layer.w_up);
            let hidden: Vec<f64> = g
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            for (xi, o) in x.iter_mut().zip(vecmat(&hidden, &layer.w_down)) {
                *xi += o;
            }
        }
    }
    let head = w.head();
    xs.iter()
        .map(|x| vecmat(&rmsnorm(x, &w.final_norm, eps), &head))
        .collect()
}
