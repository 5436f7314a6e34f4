//! Each equation of the design note, checked numerically on the tiny config with the
//! key's dense matrices (an independent path from the transform's pairwise updates).

mod common;

use nalgebra::{DMatrix, DVector};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use veil_model::crypto::linalg::{scale_rows, to_f64};
use veil_model::crypto::{encrypt_layer, KeyOptions, KeyShape, LayerKey, ModelKey};
use veil_model::{LayerWeights, LlamaConfig, ModelBundle};

struct Fixture {
    config: LlamaConfig,
    plain: LayerWeights,
    enc: LayerWeights,
    key: LayerKey,
    q: DMatrix<f64>,
    x: DMatrix<f64>,
}

fn fixture() -> Fixture {
    let b = ModelBundle::tiny().expect("tiny");
    let config = b.weights.config.clone();
    let key = ModelKey::generate(
        KeyShape::of(&config),
        KeyOptions::default(),
        &mut ChaCha20Rng::seed_from_u64(7),
    );
    let layer = 1;
    let plain = b.weights.layers[layer].clone();
    let enc = encrypt_layer(&plain, &key.layers[layer], &key.q, &config);
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let x = DMatrix::from_fn(5, config.d_model, |_, _| {
        rand::Rng::gen_range(&mut rng, -2.0..2.0)
    });
    Fixture {
        config,
        plain,
        enc,
        key: key.layers[layer].clone(),
        q: key.q,
        x,
    }
}

fn rmsnorm(x: &DMatrix<f64>, eps: f64) -> DMatrix<f64> {
    let mut out = x.clone();
    for mut row in out.row_iter_mut() {
        let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
        row /= (ms + eps).sqrt();
    }
    out
}

/// Right-multiplication matrix of RoPE at position `pos` (adjacent pairs).
fn rope(h: usize, pos: f64, base: f64) -> DMatrix<f64> {
    let mut r = DMatrix::zeros(h, h);
    for j in 0..h / 2 {
        let (s, c) = (pos * base.powf(-2.0 * j as f64 / h as f64)).sin_cos();
        r[(2 * j, 2 * j)] = c;
        r[(2 * j, 2 * j + 1)] = s;
        r[(2 * j + 1, 2 * j)] = -s;
        r[(2 * j + 1, 2 * j + 1)] = c;
    }
    r
}

fn max_diff(a: &DMatrix<f64>, b: &DMatrix<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    (a - b).abs().max()
}

/// Encrypted weights are stored in f32: equalities hold to f32 rounding, relative to the
/// magnitude of the values compared.
const F32_REL: f64 = 2e-6;

fn close(a: &DMatrix<f64>, b: &DMatrix<f64>) -> bool {
    max_diff(a, b) <= F32_REL * b.abs().max().max(1.0) * (b.ncols() as f64).sqrt()
}

/// Plaintext column block of encrypted query head `i` (heads are permuted with their group).
fn plain_q_head(f: &Fixture, i: usize) -> usize {
    let r = f.config.group_size();
    f.key.head_perm[i / r] as usize * r + i % r
}

#[test]
fn rmsnorm_commutes_with_the_rotation_and_folds_the_gain() {
    let f = fixture();
    let eps = f64::from(f.config.rms_eps);
    let xq = &f.x * &f.q;
    assert!(max_diff(&rmsnorm(&xq, eps), &(rmsnorm(&f.x, eps) * &f.q)) < 1e-12);
    // rmsnorm(x Q) (Q^T diag(g) W) = (rmsnorm(x) * g) W
    let folded = rmsnorm(&xq, eps)
        * (f.q.transpose() * scale_rows(&to_f64(&f.plain.w_gate), &f.plain.ffn_norm));
    let plain = scale_rows(&rmsnorm(&f.x, eps).transpose(), &f.plain.ffn_norm).transpose()
        * to_f64(&f.plain.w_gate);
    assert!(max_diff(&folded, &plain) < 1e-9);
}

#[test]
fn rope_commutes_with_the_attention_blocks() {
    let f = fixture();
    let h = f.config.head_dim;
    for hk in &f.key.heads {
        let a = hk.a();
        for pos in [0.0, 1.0, 17.0, 511.0] {
            let r = rope(h, pos, f64::from(f.config.rope_theta));
            assert!(
                max_diff(&(&a * &r), &(&r * &a)) < 1e-12,
                "A R = R A at {pos}"
            );
        }
        // A^-T has the same rotation and the inverse scale
        let inv_t = a.clone().try_inverse().expect("invertible").transpose();
        assert!(max_diff(&(&a * inv_t.transpose()), &DMatrix::identity(h, h)) < 1e-12);
    }
}

#[test]
fn attention_scores_are_unchanged() {
    let f = fixture();
    let (h, eps) = (f.config.head_dim, f64::from(f.config.rms_eps));
    let base = f64::from(f.config.rope_theta);
    let u = scale_rows(&rmsnorm(&f.x, eps).transpose(), &f.plain.attn_norm).transpose();
    let u_enc = rmsnorm(&(&f.x * &f.q), eps);
    let (q, k) = (&u * to_f64(&f.plain.wq), &u * to_f64(&f.plain.wk));
    let (q2, k2) = (&u_enc * to_f64(&f.enc.wq), &u_enc * to_f64(&f.enc.wk));
    let r = f.config.group_size();
    for i in 0..f.config.n_heads {
        let (pi, g2) = (plain_q_head(&f, i), i / r);
        let pg = pi / r;
        for (pq, pk) in [(3.0, 1.0), (4.0, 4.0), (9.0, 2.0)] {
            let row = |m: &DMatrix<f64>, t: usize, col: usize, pos: f64| {
                m.view((t, col * h), (1, h)).into_owned() * rope(h, pos, base)
            };
            let plain = row(&q, 3, pi, pq).dot(&row(&k, 1, pg, pk));
            let enc = row(&q2, 3, i, pq).dot(&row(&k2, 1, g2, pk));
            assert!(
                (plain - enc).abs() < 1e-5 * plain.abs().max(1.0),
                "head {i}: {plain} vs {enc}"
            );
        }
        // and the encrypted query itself is not the plaintext one
        assert!(
            max_diff(
                &q2.columns(i * h, h).into_owned(),
                &q.columns(pi * h, h).into_owned()
            ) > 1e-2
        );
    }
}

#[test]
fn values_and_output_projection_return_to_the_residual_basis() {
    let f = fixture();
    let (h, eps, r) = (
        f.config.head_dim,
        f64::from(f.config.rms_eps),
        f.config.group_size(),
    );
    let u = scale_rows(&rmsnorm(&f.x, eps).transpose(), &f.plain.attn_norm).transpose();
    let u_enc = rmsnorm(&(&f.x * &f.q), eps);
    let (v, v2) = (&u * to_f64(&f.plain.wv), &u_enc * to_f64(&f.enc.wv));
    // v' = v C per head
    for g in 0..f.config.n_kv_heads {
        let pg = f.key.head_perm[g] as usize;
        let expected = v.columns(pg * h, h) * f.key.heads[pg].c();
        assert!(close(&v2.columns(g * h, h).into_owned(), &expected));
    }
    // any attention mix a of the values: a' Wo' = a Wo Q
    let probs = DMatrix::from_fn(2, 5, |i, j| ((i * 5 + j) as f64 * 0.37).sin().abs() + 0.1);
    let mut a = DMatrix::zeros(2, f.config.n_heads * h);
    let mut a2 = a.clone();
    for i in 0..f.config.n_heads {
        let pi = plain_q_head(&f, i);
        a.columns_mut(pi * h, h)
            .copy_from(&(&probs * v.columns((pi / r) * h, h)));
        a2.columns_mut(i * h, h)
            .copy_from(&(&probs * v2.columns((i / r) * h, h)));
    }
    let plain = a * to_f64(&f.plain.wo) * &f.q;
    let enc = a2 * to_f64(&f.enc.wo);
    assert!(close(&enc, &plain));
}

#[test]
fn mlp_permutation_and_scaling() {
    let f = fixture();
    let eps = f64::from(f.config.rms_eps);
    let u = scale_rows(&rmsnorm(&f.x, eps).transpose(), &f.plain.ffn_norm).transpose();
    let u_enc = rmsnorm(&(&f.x * &f.q), eps);
    let n = f.config.d_ff;
    let mut p = DMatrix::zeros(n, n);
    for (j, &src) in f.key.mlp_perm.iter().enumerate() {
        p[(src as usize, j)] = 1.0;
    }
    let d = DMatrix::from_diagonal(&DVector::from_vec(f.key.mlp_scale.clone()));
    let gate = &u * to_f64(&f.plain.w_gate);
    let up = &u * to_f64(&f.plain.w_up);
    assert!(
        close(&(&u_enc * to_f64(&f.enc.w_gate)), &(&gate * &p)),
        "u' Wg' = (u Wg) P"
    );
    assert!(
        close(&(&u_enc * to_f64(&f.enc.w_up)), &(&up * &p * &d)),
        "u' Wu' = (u Wu) P D"
    );
    let silu = |m: &DMatrix<f64>| m.map(|v| v / (1.0 + (-v).exp()));
    let hidden = silu(&gate).component_mul(&up);
    let hidden2 =
        silu(&(&u_enc * to_f64(&f.enc.w_gate))).component_mul(&(&u_enc * to_f64(&f.enc.w_up)));
    let plain = hidden * to_f64(&f.plain.w_down) * &f.q;
    let enc = hidden2 * to_f64(&f.enc.w_down);
    assert!(close(&enc, &plain), "mlp'(x Q) = mlp(x) Q");
}

#[test]
fn the_residual_stream_stays_rotated_through_a_block() {
    // attention + MLP with their residual additions: block'(x Q) = block(x) Q,
    // for a whole sequence through the burn model on both backends
    use veil_model::cache::RopeTables;
    use veil_model::nn::{matrix_to_tensor, tensor_to_vec, Stage};
    let f = fixture();
    let c = &f.config;
    for (kind, device) in common::devices() {
        let plain = Stage::from_layers(1, std::slice::from_ref(&f.plain), c, &device);
        let enc = Stage::from_layers(1, std::slice::from_ref(&f.enc), c, &device);
        let rope = RopeTables::new(c, &device);
        let x = veil_model::crypto::linalg::to_f32(&f.x);
        let xq = veil_model::crypto::linalg::to_f32(&(&f.x * &f.q));
        let mut c1 = plain.new_cache(16);
        let mut c2 = enc.new_cache(16);
        let y = plain
            .forward(vec![matrix_to_tensor(&x, &device)], &mut [&mut c1], &rope)
            .expect("fwd");
        let y2 = enc
            .forward(vec![matrix_to_tensor(&xq, &device)], &mut [&mut c2], &rope)
            .expect("fwd");
        let y = DMatrix::from_row_slice(
            5,
            c.d_model,
            &tensor_to_vec(y[0].clone())
                .expect("read")
                .iter()
                .map(|&v| f64::from(v))
                .collect::<Vec<_>>(),
        );
        let y2 = DMatrix::from_row_slice(
            5,
            c.d_model,
            &tensor_to_vec(y2[0].clone())
                .expect("read")
                .iter()
                .map(|&v| f64::from(v))
                .collect::<Vec<_>>(),
        );
        let d = max_diff(&(y * &f.q), &y2);
        assert!(d < 1e-3, "{kind}: block(x) Q vs block'(x Q): {d}");
    }
}
