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

use std::ops::Range;

use nalgebra::DMatrix;

use super::key::{HeadKey, LayerKey, ModelKey};
use super::linalg::{scale_rows, to_f32, to_f64};
use crate::{LayerWeights, LlamaConfig, ModelError};

/// Right-multiply the `h`-wide column block starting at `col` by a RoPE-commuting block
/// matrix with per-pair scale `scale[j]^power` and angle `angle[j]`.
fn apply_rope_block(w: &mut DMatrix<f64>, col: usize, key: &HeadKey, power: f64) {
    for (j, (&s, &p)) in key.rope_scale.iter().zip(&key.rope_angle).enumerate() {
        let s = s.powf(power);
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

/// Encrypt one layer. The returned weights have empty norm gains: the gains are folded
/// into the matrices that follow the norms.
pub fn encrypt_layer(
    w: &LayerWeights,
    key: &LayerKey,
    q: &DMatrix<f64>,
    config: &LlamaConfig,
) -> LayerWeights {
    let (h, groups) = (config.head_dim, config.n_kv_heads);
    let r = config.group_size();
    let qt = q.transpose();

    // Attention inputs: Q^T diag(g1) W, then the per-head keys.
    let mut wq = &qt * scale_rows(&to_f64(&w.wq), &w.attn_norm);
    let mut wk = &qt * scale_rows(&to_f64(&w.wk), &w.attn_norm);
    let mut wv = &qt * scale_rows(&to_f64(&w.wv), &w.attn_norm);
    for i in 0..config.n_heads {
        apply_rope_block(&mut wq, i * h, &key.heads[i / r], 1.0);
    }
    for (g, hk) in key.heads.iter().enumerate() {
        // A^-T has the same rotation and the inverse scale.
        apply_rope_block(&mut wk, g * h, hk, -1.0);
        let block = wv.columns(g * h, h) * hk.c();
        wv.columns_mut(g * h, h).copy_from(&block);
    }
    // Attention output: blockdiag(C^-1) Wo Q.
    let mut wo = to_f64(&w.wo);
    for i in 0..config.n_heads {
        let block = key.heads[i / r].c_inv() * wo.rows(i * h, h);
        wo.rows_mut(i * h, h).copy_from(&block);
    }
    let wo = wo * q;

    // Head permutation: encrypted kv head g is plaintext head head_perm[g].
    let kv_order: Vec<usize> = key.head_perm.iter().map(|&p| p as usize).collect();
    let q_order: Vec<usize> = kv_order
        .iter()
        .flat_map(|&g| (0..r).map(move |j| g * r + j))
        .collect();
    debug_assert_eq!(kv_order.len(), groups);
    let wq = permute_blocks(&wq, &q_order, h, false);
    let wk = permute_blocks(&wk, &kv_order, h, false);
    let wv = permute_blocks(&wv, &kv_order, h, false);
    let wo = permute_blocks(&wo, &q_order, h, true);

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
/// number of layers the client runs itself).
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
