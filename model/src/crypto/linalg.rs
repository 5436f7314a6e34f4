//! Dense linear algebra for keys and transforms, in f64 (nalgebra).

use nalgebra::DMatrix;
use rand::Rng;
use rand_distr::StandardNormal;

use crate::Matrix;

/// A host matrix as f64.
pub fn to_f64(m: &Matrix) -> DMatrix<f64> {
    DMatrix::from_row_iterator(m.rows, m.cols, m.data.iter().map(|&x| f64::from(x)))
}

/// An f64 matrix rounded to a host f32 matrix.
pub fn to_f32(m: &DMatrix<f64>) -> Matrix {
    let mut data = Vec::with_capacity(m.nrows() * m.ncols());
    for r in 0..m.nrows() {
        data.extend(m.row(r).iter().map(|&x| x as f32));
    }
    Matrix::new(m.nrows(), m.ncols(), data)
}

/// A Haar-distributed random orthogonal `n x n` matrix: QR of a Gaussian matrix, with the
/// signs of R's diagonal moved into Q so that the distribution is uniform.
pub fn haar_orthogonal(n: usize, rng: &mut impl Rng) -> DMatrix<f64> {
    let g = DMatrix::<f64>::from_fn(n, n, |_, _| rng.sample(StandardNormal));
    let qr = g.qr();
    let mut q = qr.q();
    let r = qr.r();
    for j in 0..n {
        if r[(j, j)] < 0.0 {
            q.column_mut(j).neg_mut();
        }
    }
    q
}

/// A value log-uniform in `[1/2, 2]`.
pub fn log_uniform_half_to_two(rng: &mut impl Rng) -> f64 {
    rng.gen_range(-std::f64::consts::LN_2..std::f64::consts::LN_2)
        .exp()
}

/// `diag(g) W`: scale row `i` of `w` by `g[i]`.
pub fn scale_rows(w: &DMatrix<f64>, g: &[f32]) -> DMatrix<f64> {
    let mut out = w.clone();
    for (i, &gi) in g.iter().enumerate() {
        out.row_mut(i).scale_mut(f64::from(gi));
    }
    out
}

/// Largest singular value over smallest: how far from orthogonal (1 = orthogonal up to scale).
pub fn condition_number(m: &DMatrix<f64>) -> f64 {
    let sv = m.clone().singular_values();
    let max = sv.iter().cloned().fold(0.0, f64::max);
    let min = sv.iter().cloned().fold(f64::INFINITY, f64::min);
    max / min
}
