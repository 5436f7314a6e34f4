//! Key recovery when the plaintext weights are public. A node's gate matrix is
//! `Wg' = Q^T diag(g2) Wg P`: the public `M = diag(g2) Wg` with its columns permuted and
//! rotated. Column norms survive the rotation, so sorting them matches columns; orthogonal
//! Procrustes then gives `Q`, and re-matching the columns in the recovered basis refines
//! both. With `Q`, every received vector decrypts to `x = x' Q^T`, and the first stage's
//! inputs are embedding rows: the nearest public row is the token.

use burn::tensor::{Device, Tensor, TensorData};
use nalgebra::DMatrix;

use super::NodeView;
use crate::crypto::linalg::{scale_rows, to_f64};
use crate::{LayerWeights, Matrix, ModelError};

/// The recovered residual key and how well it explains the shard.
#[derive(Debug, Clone)]
pub struct KeyEstimate {
    /// Estimated `Q` (`d x d`, orthogonal).
    pub q: DMatrix<f64>,
    /// Fraction of gate columns whose decrypted form is within 5% of the public column
    /// they were matched to (1.0 means the shard is fully explained).
    pub explained: f64,
    pub iterations: usize,
}

/// `R` orthogonal minimising `|R A - B|`: `U V^T` from the SVD of `B A^T`.
fn procrustes(a: &DMatrix<f64>, b: &DMatrix<f64>) -> DMatrix<f64> {
    let svd = (b * a.transpose()).svd(true, true);
    match (svd.u, svd.v_t) {
        (Some(u), Some(v_t)) => u * v_t,
        _ => DMatrix::identity(a.nrows(), a.nrows()),
    }
}

fn column_norms(m: &DMatrix<f64>) -> Vec<f64> {
    m.column_iter().map(|c| c.norm()).collect()
}

/// Columns of `m` reordered: column `j` of the result is column `order[j]` of `m`.
fn select_columns(m: &DMatrix<f64>, order: &[usize]) -> DMatrix<f64> {
    DMatrix::from_fn(m.nrows(), order.len(), |r, j| m[(r, order[j])])
}

/// For every column of `y`, the column of `m` nearest to it (Euclidean).
fn nearest_columns(y: &DMatrix<f64>, m: &DMatrix<f64>) -> Vec<usize> {
    let g = y.transpose() * m;
    let m_norms: Vec<f64> = column_norms(m).iter().map(|n| n * n).collect();
    (0..y.ncols())
        .map(|j| {
            (0..m.ncols())
                .min_by(|&a, &b| {
                    let da = m_norms[a] - 2.0 * g[(j, a)];
                    let db = m_norms[b] - 2.0 * g[(j, b)];
                    da.total_cmp(&db)
                })
                .unwrap_or(0)
        })
        .collect()
}

/// Estimate `Q` from a node layer and the same layer of the public model.
pub fn recover_q(node: &LayerWeights, public: &LayerWeights) -> Result<KeyEstimate, ModelError> {
    let w = to_f64(&node.w_gate);
    let m = scale_rows(&to_f64(&public.w_gate), &public.ffn_norm);
    if w.shape() != m.shape() {
        return Err(ModelError::Shape(format!(
            "the shard's gate is {:?}, the public model's {:?}",
            w.shape(),
            m.shape()
        )));
    }
    // match columns by rank of their norms
    let rank = |norms: Vec<f64>| {
        let mut idx: Vec<usize> = (0..norms.len()).collect();
        idx.sort_by(|&a, &b| norms[a].total_cmp(&norms[b]));
        idx
    };
    let (w_rank, m_rank) = (rank(column_norms(&w)), rank(column_norms(&m)));
    let mut order = vec![0usize; w.ncols()];
    for (a, b) in w_rank.iter().zip(&m_rank) {
        order[*a] = *b;
    }
    let mut r = DMatrix::identity(w.nrows(), w.nrows());
    let mut iterations = 0;
    for _ in 0..6 {
        iterations += 1;
        // W' ≈ R M_order with R = Q^T
        r = procrustes(&select_columns(&m, &order), &w);
        let next = nearest_columns(&(r.transpose() * &w), &m);
        if next == order {
            break;
        }
        order = next;
    }
    let y = r.transpose() * &w;
    let matched = select_columns(&m, &order);
    let explained = (0..w.ncols())
        .filter(|&j| {
            let diff = (y.column(j) - matched.column(j)).norm();
            diff <= 0.05 * matched.column(j).norm().max(1e-12)
        })
        .count() as f64
        / w.ncols().max(1) as f64;
    Ok(KeyEstimate {
        q: r.transpose(),
        explained,
        iterations,
    })
}

/// `|Q_est - Q| / |Q|` (Frobenius), to report how close an estimate is.
pub fn relative_error(estimate: &DMatrix<f64>, truth: &DMatrix<f64>) -> f64 {
    (estimate - truth).norm() / truth.norm().max(1e-12)
}

/// Decrypt every received row with `q` and guess the nearest public embedding row.
pub fn decrypt_and_match(
    view: &NodeView,
    q: &DMatrix<f64>,
    public_embedding: &Matrix,
    device: &Device,
) -> Result<Vec<Vec<u32>>, ModelError> {
    let d = view.d_model;
    let vocab = public_embedding.rows;
    // decrypt: x = x' Q^T, i.e. multiply by Q^T on the right
    let qt: Vec<f32> = q.iter().map(|v| *v as f32).collect(); // column-major Q = row-major Q^T
    let qt = Tensor::<2>::from_data(TensorData::new(qt, [d, d]), device);
    let e_t = Tensor::<2>::from_data(
        TensorData::new(public_embedding.transpose().data, [d, vocab]),
        device,
    );
    let e_norms: Vec<f32> = (0..vocab)
        .map(|i| super::dot(public_embedding.row(i), public_embedding.row(i)) as f32)
        .collect();
    let e_norms = Tensor::<2>::from_data(TensorData::new(e_norms, [1, vocab]), device);
    view.sessions
        .iter()
        .map(|s| {
            let n = s.truth.len();
            let x = Tensor::<2>::from_data(TensorData::new(s.received.clone(), [n, d]), device);
            let x = x.matmul(qt.clone());
            // argmin |E_c - x|^2 = argmax 2 E_c·x - |E_c|^2
            let score = x.matmul(e_t.clone()).mul_scalar(2.0) - e_norms.clone();
            let best = score.argmax(1);
            let ids: Vec<i64> = best
                .try_into_vec_as::<i64>()
                .map_err(|e| ModelError::Backend(format!("{e:?}")))?;
            Ok(ids.into_iter().map(|i| i as u32).collect())
        })
        .collect()
}

/// Decrypt with `q` and return the rows (for tests and analysis), `[n, d]` per session.
pub fn decrypt_rows(view: &NodeView, q: &DMatrix<f64>) -> Vec<Vec<f32>> {
    let d = view.d_model;
    view.sessions
        .iter()
        .map(|s| {
            let n = s.truth.len();
            let x = DMatrix::from_row_slice(
                n,
                d,
                &s.received.iter().map(|v| f64::from(*v)).collect::<Vec<_>>(),
            );
            let y = x * q.transpose();
            (0..n)
                .flat_map(|r| (0..d).map(move |c| (r, c)))
                .map(|(r, c)| y[(r, c)] as f32)
                .collect()
        })
        .collect()
}
