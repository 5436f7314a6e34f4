//! The weight transforms of the design note, as pure functions from plaintext weights and
//! a key to the weights a node holds. Products are computed in f64 and rounded once.
//!
//! With `x' = x Q` and `u' = rmsnorm(x')` (no gain):
//!
//! ```text
//! Wq' = Q^T diag(g1) Wq  blockdiag_i(A_g(i))      Wg' = Q^T diag(g2) Wg P
//! Wk' = Q^T diag(g1) Wk  blockdiag_g(A_g^-T)      Wu' = Q^T diag(g2) Wu P D
//! Wv' = Q^T diag(g1) Wv  blockdiag_g(C_g)         Wd' = D^-1 P^T Wd Q
//! Wo' = blockdiag_i(C_g(i)^-1) Wo Q
//! ```
//!
//! followed by the optional permutation of key/value heads (with their query heads).
//! Biases transform as their projection's columns (`b' = b M`). With per-head query/key
//! norms, `A_g` cannot act before the norm (its scales change the norm): there the heads
//! get a rotation `O` per RoPE pair, and each head's norm applies the pair map
//! `O^T P B` (`P` the gain, `B` the RoPE-commuting block of `A_g` or `A_g^-T`).

use std::ops::Range;

use nalgebra::DMatrix;

use super::key::{LayerKey, ModelKey};
use super::linalg::{scale_rows, to_f32, to_f64};
use crate::arch::{PairMap, QkNorm};
use crate::{AttnExtras, LayerWeights, LlamaConfig, ModelError};

/// Right-multiply the `h`-wide column block starting at `col` by the RoPE-commuting block
/// matrix with per-pair blocks `B(s_j, p_j) = s_j [[cos p_j, -sin p_j], [sin p_j, cos p_j]]`
/// (`s_j = scale[j]^power`; `scale` `None` for pure rotations).
fn apply_pair_blocks(
    w: &mut DMatrix<f64>,
    col: usize,
    scale: Option<&[f64]>,
    angle: &[f64],
    power: f64,
) {
    for (j, &p) in angle.iter().enumerate() {
        let s = scale.map_or(1.0, |sc| sc[j].powf(power));
        let (sin, cos) = p.sin_cos();
        let (c0, c1) = (col + 2 * j, col + 2 * j + 1);
        for r in 0..w.nrows() {
            let (a, b) = (w[(r, c0)], w[(r, c1)]);
            // [a b] * s [[cos, -sin], [sin, cos]]
            w[(r, c0)] = s * (a * cos + b * sin);
            w[(r, c1)] = s * (-a * sin + b * cos);
        }
    }
}

/// `B(s, p)` of [`apply_pair_blocks`] as a 2x2 matrix.
fn pair_block(s: f64, p: f64) -> [[f64; 2]; 2] {
    let (sin, cos) = p.sin_cos();
    [[s * cos, -s * sin], [s * sin, s * cos]]
}

fn mul2(a: [[f64; 2]; 2], b: [[f64; 2]; 2]) -> [[f64; 2]; 2] {
    std::array::from_fn(|i| std::array::from_fn(|j| a[i][0] * b[0][j] + a[i][1] * b[1][j]))
}

/// The encrypted pair map of one head: `M = B(1, o)^T P B(s, p)` per pair, where `P` is the
/// plaintext map (a gain: diagonal), `o` the pre-norm rotation and `B(s, p)` the RoPE-commuting
/// block that follows the norm. The node sees `n B(1, o)` (`n` the normalized head) and
/// returns `n P B(s, p)`.
fn encrypt_pair_map(
    plain: &PairMap,
    head: usize,
    h: usize,
    pre_angle: &[f64],
    scale: &[f64],
    power: f64,
    angle: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let (mut diag, mut cross) = (vec![0.0; h], vec![0.0; h]);
    for j in 0..h / 2 {
        let (i0, i1) = (head * h + 2 * j, head * h + 2 * j + 1);
        // row convention: y = x P with y0 = x0 P00 + x1 P10, y1 = x0 P01 + x1 P11
        let p = [
            [f64::from(plain.diag[i0]), f64::from(plain.cross[i1])],
            [f64::from(plain.cross[i0]), f64::from(plain.diag[i1])],
        ];
        let o = pair_block(1.0, pre_angle[j]);
        let o_t = [[o[0][0], o[1][0]], [o[0][1], o[1][1]]];
        let m = mul2(mul2(o_t, p), pair_block(scale[j].powf(power), angle[j]));
        diag[2 * j] = m[0][0];
        diag[2 * j + 1] = m[1][1];
        cross[2 * j] = m[1][0];
        cross[2 * j + 1] = m[0][1];
    }
    (diag, cross)
}

/// Copy column blocks (or row blocks, with `rows`) of width `h` into the order `order`:
/// block `i` of the result is block `order[i]` of `w`.
fn permute_blocks(w: &DMatrix<f64>, order: &[usize], h: usize, rows: bool) -> DMatrix<f64> {
    let mut out = w.clone();
    for (dst, &src) in order.iter().enumerate() {
        if rows {
            out.rows_mut(dst * h, h).copy_from(&w.rows(src * h, h));
        } else {
            out.columns_mut(dst * h, h)
                .copy_from(&w.columns(src * h, h));
        }
    }
    out
}

/// A vector as a one-row matrix.
fn row_matrix(v: &[f32]) -> DMatrix<f64> {
    DMatrix::from_iterator(1, v.len(), v.iter().map(|&x| f64::from(x)))
}

fn row_vec(m: &DMatrix<f64>) -> Vec<f32> {
    m.iter().map(|&x| x as f32).collect()
}

/// Encrypt one layer. The returned weights have empty norm gains: the gains are folded
/// into the matrices that follow the norms.
pub fn encrypt_layer(
    w: &LayerWeights,
    key: &LayerKey,
    q: &DMatrix<f64>,
    config: &LlamaConfig,
) -> LayerWeights {
    let (h, groups) = (config.head_dim, config.n_kv_heads);
    let (qw, kvw) = (config.q_dim(), config.kv_dim());
    let r = config.group_size();
    let qt = q.transpose();
    let qk_norm = w.extras.qk_norm.as_ref();

    // Head permutation: encrypted kv head g is plaintext head head_perm[g].
    let kv_order: Vec<usize> = key.head_perm.iter().map(|&p| p as usize).collect();
    let q_order: Vec<usize> = kv_order
        .iter()
        .flat_map(|&g| (0..r).map(move |j| g * r + j))
        .collect();
    debug_assert_eq!(kv_order.len(), groups);

    // The per-head keys of queries, keys and values, on any matrix with those columns
    // (a projection, or its bias as one row). Before a per-head norm only a rotation
    // keeps the norm: `A_g` then moves into the norm's pair map.
    let heads_q = |mut m: DMatrix<f64>| {
        for i in 0..config.n_heads {
            let hk = &key.heads[i / r];
            match qk_norm {
                Some(_) => apply_pair_blocks(&mut m, i * h, None, &hk.q_norm_angle, 1.0),
                None => apply_pair_blocks(&mut m, i * h, Some(&hk.rope_scale), &hk.rope_angle, 1.0),
            }
        }
        permute_blocks(&m, &q_order, h, false)
    };
    let heads_k = |mut m: DMatrix<f64>| {
        for (g, hk) in key.heads.iter().enumerate() {
            // A^-T has the same rotation and the inverse scale.
            match qk_norm {
                Some(_) => apply_pair_blocks(&mut m, g * h, None, &hk.k_norm_angle, -1.0),
                None => {
                    apply_pair_blocks(&mut m, g * h, Some(&hk.rope_scale), &hk.rope_angle, -1.0)
                }
            }
        }
        permute_blocks(&m, &kv_order, h, false)
    };
    let heads_v = |mut m: DMatrix<f64>| {
        for (g, hk) in key.heads.iter().enumerate() {
            let block = m.columns(g * h, h) * hk.c();
            m.columns_mut(g * h, h).copy_from(&block);
        }
        permute_blocks(&m, &kv_order, h, false)
    };

    // Attention inputs: Q^T diag(g1) W, then the per-head keys.
    let wq = heads_q(&qt * scale_rows(&to_f64(&w.wq), &w.attn_norm));
    let wk = heads_k(&qt * scale_rows(&to_f64(&w.wk), &w.attn_norm));
    let wv = heads_v(&qt * scale_rows(&to_f64(&w.wv), &w.attn_norm));
    // Biases: b' = b M for the same M as their projection's columns.
    let qkv_bias = if w.extras.qkv_bias.is_empty() {
        Vec::new()
    } else {
        let b = &w.extras.qkv_bias;
        let mut out = row_vec(&heads_q(row_matrix(&b[..qw])));
        out.extend(row_vec(&heads_k(row_matrix(&b[qw..qw + kvw]))));
        out.extend(row_vec(&heads_v(row_matrix(&b[qw + kvw..]))));
        out
    };
    // Per-head norms: each head's pair map carries its pre-norm rotation and A_g.
    let qk_norm = qk_norm.map(|n| {
        let maps = |plain: &PairMap, heads: usize, order: &[usize], query: bool| {
            let (mut diag, mut cross) = (Vec::new(), Vec::new());
            for &src in order {
                let hk = &key.heads[if query { src / r } else { src }];
                let (pre, power) = if query {
                    (&hk.q_norm_angle, 1.0)
                } else {
                    (&hk.k_norm_angle, -1.0)
                };
                let (d, c) =
                    encrypt_pair_map(plain, src, h, pre, &hk.rope_scale, power, &hk.rope_angle);
                diag.extend(d.iter().map(|&x| x as f32));
                cross.extend(c.iter().map(|&x| x as f32));
            }
            debug_assert_eq!(diag.len(), heads * h);
            PairMap { diag, cross }
        };
        QkNorm {
            q: maps(&n.q, config.n_heads, &q_order, true),
            k: maps(&n.k, groups, &kv_order, false),
        }
    });

    // Attention output: blockdiag(C^-1) Wo Q.
    let mut wo = to_f64(&w.wo);
    for i in 0..config.n_heads {
        let block = key.heads[i / r].c_inv() * wo.rows(i * h, h);
        wo.rows_mut(i * h, h).copy_from(&block);
    }
    let wo = permute_blocks(&(wo * q), &q_order, h, true);

    // MLP: columns permuted (and scaled for up), down's rows to match.
    let gate = &qt * scale_rows(&to_f64(&w.w_gate), &w.ffn_norm);
    let up = &qt * scale_rows(&to_f64(&w.w_up), &w.ffn_norm);
    let down = to_f64(&w.w_down);
    let f = config.d_ff;
    let mut gate_p = DMatrix::zeros(gate.nrows(), f);
    let mut up_pd = DMatrix::zeros(up.nrows(), f);
    let mut down_pd = DMatrix::zeros(f, down.ncols());
    for (j, (&p, &dj)) in key.mlp_perm.iter().zip(&key.mlp_scale).enumerate() {
        let p = p as usize;
        gate_p.set_column(j, &gate.column(p));
        up_pd.set_column(j, &(up.column(p) * dj));
        down_pd.set_row(j, &(down.row(p) / dj));
    }
    let down = down_pd * q;

    LayerWeights {
        attn_norm: Vec::new(),
        wq: to_f32(&wq),
        wk: to_f32(&wk),
        wv: to_f32(&wv),
        wo: to_f32(&wo),
        ffn_norm: Vec::new(),
        w_gate: to_f32(&gate_p),
        w_up: to_f32(&up_pd),
        w_down: to_f32(&down),
        extras: AttnExtras { qkv_bias, qk_norm },
        post_norms: None,
    }
}

/// Split `n_layers` into `n_stages` contiguous ranges of near-equal size.
pub fn plan_stages(n_layers: usize, n_stages: usize) -> Result<Vec<Range<usize>>, ModelError> {
    if n_stages == 0 || n_stages > n_layers {
        return Err(ModelError::InvalidConfig(format!(
            "cannot split {n_layers} layers into {n_stages} stages (1 to {n_layers})"
        )));
    }
    let (base, extra) = (n_layers / n_stages, n_layers % n_stages);
    let mut start = 0;
    Ok((0..n_stages)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect())
}

/// Check that `ranges` (in any order) tile `first..n_layers` exactly (`first` is the
/// number of layers the client runs first; `n_layers`, the end of the nodes' layers, is
/// short of the model's by the layers the client runs last).
pub fn check_coverage(
    mut ranges: Vec<Range<usize>>,
    first: usize,
    n_layers: usize,
) -> Result<(), ModelError> {
    ranges.sort_by_key(|r| r.start);
    let mut next = first;
    for r in &ranges {
        if r.start > next {
            return Err(ModelError::Shard(format!(
                "layers {next}..{} are not covered by any shard",
                r.start
            )));
        }
        if r.start < next {
            return Err(ModelError::Shard(format!(
                "layers {}..{} are covered by more than one shard",
                r.start,
                next.min(r.end)
            )));
        }
        next = r.end;
    }
    if next != n_layers {
        return Err(ModelError::Shard(format!(
            "layers {next}..{n_layers} are not covered by any shard"
        )));
    }
    Ok(())
}

/// Encrypt every layer of `range`.
pub fn encrypt_layers(
    layers: &[LayerWeights],
    range: Range<usize>,
    key: &ModelKey,
    config: &LlamaConfig,
) -> Vec<LayerWeights> {
    range
        .map(|l| encrypt_layer(&layers[l], &key.layers[l], &key.q, config))
        .collect()
}
