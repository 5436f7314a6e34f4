//! GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
//! Pre-trained Transformers", arXiv 2210.17323): round a matrix to a block format one input
//! column at a time, and move each column's rounding error onto the columns not yet rounded,
//! weighted by the inverse of the inputs' second moment `H = Σ xᵀx`. Plain rounding
//! minimises `‖W − Ŵ‖`; this minimises `‖X (W − Ŵ)ᵀ‖`, the error the layer's outputs feel.
//!
//! The blocks come out exactly as the format stores them (a Q4_0 block keeps one scale for
//! its 32 values, chosen from the values when the block is reached), so the kernels run
//! them unchanged. With uncorrelated inputs (`H` diagonal) nothing moves and the result is
//! plain rounding, bit for bit.

use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;
use veil_kernels::format::{q4_k, QK, QK_K};
use veil_kernels::{Bytes, GgmlType, QMatrix};

use crate::nn::tensor_to_vec;
use crate::ModelError;

/// `Σ xᵀx` over calibration rows `x` of width `n`: the inputs' second moment.
#[derive(Debug, Clone)]
pub struct Hessian {
    n: usize,
    rows: usize,
    sum: Vec<f64>,
}

impl Hessian {
    pub fn new(n: usize) -> Self {
        Hessian {
            n,
            rows: 0,
            sum: vec![0.0; n * n],
        }
    }

    /// The width of the inputs.
    pub fn width(&self) -> usize {
        self.n
    }

    /// How many input rows were added.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Add the rows of `x`, `[t, n]`, computing `xᵀx` on `x`'s device.
    pub fn add(&mut self, x: Tensor<2>) -> Result<(), ModelError> {
        let [t, n] = x.dims();
        if n != self.n {
            return Err(ModelError::Shape(format!(
                "inputs of width {n} for a Hessian of width {}",
                self.n
            )));
        }
        let xtx = tensor_to_vec(x.clone().transpose().matmul(x))?;
        for (s, v) in self.sum.iter_mut().zip(xtx) {
            *s += f64::from(v);
        }
        self.rows += t;
        Ok(())
    }

    /// Add the rows of the host matrix `x` (`t` rows of `n`), in f64.
    pub fn add_rows(&mut self, x: &[f32]) {
        assert_eq!(x.len() % self.n.max(1), 0, "rows of {} values", self.n);
        for row in x.chunks_exact(self.n) {
            for (i, &a) in row.iter().enumerate() {
                let a = f64::from(a);
                for (s, &b) in self.sum[i * self.n..(i + 1) * self.n].iter_mut().zip(row) {
                    *s += a * f64::from(b);
                }
            }
            self.rows += 1;
        }
    }

    /// `H[i][j]`.
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.sum[i * self.n + j]
    }
}

/// Relative damping added to the diagonal (as GPTQ's reference code: 1% of its mean): it
/// keeps `H` invertible when there are fewer calibration rows than inputs.
pub const DAMP: f64 = 0.01;

/// The inverse's factor GPTQ walks along: the upper-triangular `U` (row-major, `n x n`,
/// f32) with `(H + λI)⁻¹ = UᵀU`, `λ = damp · mean(diag H)`; inputs never seen
/// (`H_ii = 0`) count as `H_ii = 1`. One per [`Hessian`], shared by every matrix that reads
/// the same inputs.
#[derive(Debug, Clone)]
pub struct InverseFactor {
    n: usize,
    u: Vec<f32>,
}

impl InverseFactor {
    /// `H = V Vᵀ` with `V` upper triangular is the Cholesky factor of `H` with rows and
    /// columns reversed (`J H J = L Lᵀ`, `V = J L J`), and then `U = V⁻¹ = J L⁻¹ J`: one
    /// factorisation and one triangular inverse, both in f64 and spread over the threads.
    pub fn new(h: &Hessian, damp: f64) -> Result<Self, ModelError> {
        let n = h.n;
        let mean = (0..n).map(|i| h.get(i, i)).sum::<f64>() / n.max(1) as f64;
        let mut lambda = damp * mean.max(f64::MIN_POSITIVE);
        let seen: Vec<bool> = (0..n).map(|i| h.get(i, i) > 0.0).collect();
        for _ in 0..6 {
            let mut r = vec![0.0f64; n * n];
            r.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
                let a = n - 1 - i;
                for (j, x) in row.iter_mut().enumerate() {
                    let b = n - 1 - j;
                    *x = if a == b {
                        (if seen[a] { h.get(a, a) } else { 1.0 }) + lambda
                    } else if seen[a] && seen[b] {
                        h.get(a, b)
                    } else {
                        0.0
                    };
                }
            });
            if let Some(l) = cholesky(&r, n) {
                let l_inv = lower_inverse(&l, n);
                let mut u = vec![0.0f32; n * n];
                u.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
                    for (j, x) in row.iter_mut().enumerate().skip(i) {
                        *x = l_inv[(n - 1 - i) * n + (n - 1 - j)] as f32;
                    }
                });
                return Ok(InverseFactor { n, u });
            }
            lambda *= 10.0;
        }
        Err(ModelError::Shape(format!(
            "the inputs' second moment ({n} x {n}) is not positive definite even when damped"
        )))
    }

    pub fn width(&self) -> usize {
        self.n
    }

    /// `U[i][j]`.
    pub fn get(&self, i: usize, j: usize) -> f32 {
        self.u[i * self.n + j]
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The lower Cholesky factor `L` (`A = L Lᵀ`) of the symmetric `n x n` row-major `a`, or
/// `None` if `a` is not positive definite. Column by column, the rows below in parallel.
fn cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0f64; n * n];
    for j in 0..n {
        let s = a[j * n + j] - dot(&l[j * n..j * n + j], &l[j * n..j * n + j]);
        if !(s > 0.0 && s.is_finite()) {
            return None;
        }
        let d = s.sqrt();
        l[j * n + j] = d;
        let (head, tail) = l.split_at_mut((j + 1) * n);
        let lj = &head[j * n..j * n + j];
        tail.par_chunks_mut(n)
            .with_min_len(32)
            .enumerate()
            .for_each(|(r, row)| {
                let i = j + 1 + r;
                row[j] = (a[i * n + j] - dot(&row[..j], lj)) / d;
            });
    }
    Some(l)
}

/// `L⁻¹` for the lower-triangular `n x n` row-major `l` (invertible). Row `i` of `M = L⁻¹`
/// from `M L = I`: `M[i][i] = 1 / L[i][i]`, then `M[i][j] = -Σ_{j<k≤i} M[i][k] L[k][j] /
/// L[j][j]` for `j` descending; rows are independent, so they run in parallel, reading `L`
/// by columns (its transpose, by rows).
fn lower_inverse(l: &[f64], n: usize) -> Vec<f64> {
    let mut lt = vec![0.0f64; n * n];
    lt.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(j, row)| {
            for (k, x) in row.iter_mut().enumerate().skip(j) {
                *x = l[k * n + j];
            }
        });
    let mut m = vec![0.0f64; n * n];
    m.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
        row[i] = 1.0 / l[i * n + i];
        for j in (0..i).rev() {
            let s = dot(&row[j + 1..=i], &lt[j * n + j + 1..j * n + i + 1]);
            row[j] = -s / l[j * n + j];
        }
    });
    m
}

/// Whether [`quantize`] rounds into `ty` (other formats round plainly).
pub fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::Q4_K)
}

/// Values per block of `ty` (its scales are chosen once per block).
fn block_len(ty: GgmlType) -> usize {
    if ty == GgmlType::Q4_K {
        QK_K
    } else {
        QK
    }
}

/// Columns rounded before their error is applied to the rest in one matrix product (at
/// least one block).
const PANEL: usize = 128;

/// One block's grid, chosen from its values when GPTQ reaches it (as ggml's reference
/// quantizer would choose it), then fixed while its values are rounded one by one.
#[derive(Debug, Clone, Copy)]
enum Grid {
    /// Q4_0 and Q8_0: one scale `d` (stored as f16), codes rounded with `1 / d`.
    Scale { d: f32, id: f32, d16: f32 },
    /// Q4_K: the super-block's header and its eight groups' `(step, offset)`.
    K {
        header: [u8; q4_k::HEADER_BYTES],
        ranges: [(f32, f32); 8],
    },
}

impl Grid {
    fn fit(ty: GgmlType, block: &[f32]) -> Grid {
        let d = match ty {
            GgmlType::Q4_K => {
                let mut bytes = Vec::with_capacity(q4_k::BLOCK_BYTES);
                q4_k::quantize(block, &mut bytes);
                let mut header = [0u8; q4_k::HEADER_BYTES];
                header.copy_from_slice(&bytes[..q4_k::HEADER_BYTES]);
                return Grid::K {
                    header,
                    ranges: q4_k::group_ranges(&header),
                };
            }
            GgmlType::Q4_0 => {
                let (mut amax, mut max) = (0.0f32, 0.0f32);
                for &v in block {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                max / -8.0
            }
            _ => block.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0,
        };
        Grid::Scale {
            d,
            id: if d != 0.0 { 1.0 / d } else { 0.0 },
            d16: half::f16::from_f32(d).to_f32(),
        }
    }

    /// The code of `v`, the `i`-th value of its block, and the value the code stands for.
    fn round(&self, ty: GgmlType, i: usize, v: f32) -> (u8, f32) {
        match (*self, ty) {
            (Grid::K { ranges, .. }, _) => {
                let (step, offset) = ranges[i / QK];
                let q = q4_k::code((step, offset), v);
                (q, step * f32::from(q) - offset)
            }
            (Grid::Scale { id, d16, .. }, GgmlType::Q4_0) => {
                let q = (v * id + 8.5).clamp(0.0, 15.0) as u8;
                (q, d16 * (f32::from(q) - 8.0))
            }
            (Grid::Scale { id, d16, .. }, _) => {
                let q = (v * id).round().clamp(-127.0, 127.0) as i8;
                (q as u8, d16 * f32::from(q))
            }
        }
    }

    /// Append the block of `codes` in `ty`'s layout.
    fn write(&self, ty: GgmlType, codes: &[u8], out: &mut Vec<u8>) {
        match *self {
            Grid::K { header, .. } => {
                out.extend_from_slice(&header);
                q4_k::write_codes(codes, out);
            }
            Grid::Scale { d, .. } => {
                out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
                if ty == GgmlType::Q4_0 {
                    out.extend((0..QK / 2).map(|j| codes[j] | (codes[QK / 2 + j] << 4)));
                } else {
                    out.extend_from_slice(codes);
                }
            }
        }
    }
}

/// Round `w` (`rows` rows of `cols` inputs, GGUF's `[out, in]` layout) to `ty` with GPTQ,
/// given the factor `u` of its inputs' second moment (width `cols`). The error moved onto
/// later columns is applied in panels of 128 columns as one matrix product on `device`.
pub fn quantize(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    w: &[f32],
    u: &InverseFactor,
    device: &Device,
) -> Result<QMatrix, ModelError> {
    if !supports(ty) {
        return Err(ModelError::Shard(format!(
            "calibrated rounding into {ty} is not implemented"
        )));
    }
    let block = block_len(ty);
    if w.len() != rows * cols || u.width() != cols || !cols.is_multiple_of(block) {
        return Err(ModelError::Shape(format!(
            "a {rows} x {cols} matrix ({} values) with inputs of width {}: need whole blocks of {block}",
            w.len(),
            u.width()
        )));
    }
    let u = &u.u;
    let mut w = w.to_vec();
    let mut codes = vec![0u8; rows * cols];
    let blocks = cols / block;
    let mut grids = vec![Grid::fit(ty, &vec![0.0; block]); rows * blocks];
    let panel = PANEL.max(block);
    for p1 in (0..cols).step_by(panel) {
        let p2 = (p1 + panel).min(cols);
        let width = p2 - p1;
        let mut err = vec![0.0f32; rows * width];
        w.par_chunks_mut(cols)
            .zip(codes.par_chunks_mut(cols))
            .zip(grids.par_chunks_mut(blocks))
            .zip(err.par_chunks_mut(width))
            .for_each(|(((wr, cr), gr), er)| {
                for i in p1..p2 {
                    if i.is_multiple_of(block) {
                        gr[i / block] = Grid::fit(ty, &wr[i..i + block]);
                    }
                    let (code, q) = gr[i / block].round(ty, i % block, wr[i]);
                    cr[i] = code;
                    let e = (wr[i] - q) / u[i * cols + i];
                    er[i - p1] = e;
                    for (x, &f) in wr[i + 1..p2]
                        .iter_mut()
                        .zip(&u[i * cols + i + 1..i * cols + p2])
                    {
                        *x -= e * f;
                    }
                }
            });
        if p2 < cols {
            let rest = cols - p2;
            let panel: Vec<f32> = (p1..p2)
                .flat_map(|i| u[i * cols + p2..(i + 1) * cols].iter().copied())
                .collect();
            let e = Tensor::<2>::from_data(TensorData::new(err, [rows, width]), device);
            let f = Tensor::<2>::from_data(TensorData::new(panel, [width, rest]), device);
            let delta = tensor_to_vec(e.matmul(f))?;
            w.par_chunks_mut(cols)
                .zip(delta.par_chunks(rest))
                .for_each(|(wr, dr)| {
                    for (x, d) in wr[p2..].iter_mut().zip(dr) {
                        *x -= d;
                    }
                });
        }
    }
    let row_bytes = ty.byte_size(cols).expect("whole blocks");
    let mut bytes = Vec::with_capacity(rows * row_bytes);
    for (cr, gr) in codes.chunks_exact(cols).zip(grids.chunks_exact(blocks)) {
        for (b, g) in cr.chunks_exact(block).zip(gr) {
            g.write(ty, b, &mut bytes);
        }
    }
    QMatrix::new(ty, rows, cols, Bytes::from_vec(bytes))
        .map_err(|e| ModelError::Shard(format!("calibrated {ty} matrix: {e}")))
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::StandardNormal;

    use super::*;

    fn device() -> Device {
        crate::Compute::cpu().device
    }

    fn gaussian(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect()
    }

    /// `‖X (W − Ŵ)ᵀ‖²` for inputs `x` (`t x cols`).
    fn output_error(x: &[f32], w: &[f32], q: &QMatrix) -> f64 {
        let (rows, cols) = (q.rows(), q.cols());
        let wq = q.dequantize();
        let mut sum = 0.0;
        for xr in x.chunks_exact(cols) {
            for r in 0..rows {
                let e: f64 = (0..cols)
                    .map(|c| f64::from(xr[c]) * f64::from(w[r * cols + c] - wq[r * cols + c]))
                    .sum();
                sum += e * e;
            }
        }
        sum
    }

    #[test]
    fn uncorrelated_inputs_give_plain_rounding_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (rows, cols) = (24, 512);
        let w = gaussian(&mut rng, rows * cols);
        // inputs along the axes only, with different scales: H is diagonal
        let mut h = Hessian::new(cols);
        for c in 0..cols {
            let mut x = vec![0.0f32; cols];
            x[c] = 0.5 + (c % 7) as f32;
            h.add_rows(&x);
        }
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K] {
            let u = InverseFactor::new(&h, DAMP).expect("factor");
            let g = quantize(ty, rows, cols, &w, &u, &device()).expect("gptq");
            let plain = QMatrix::quantize(ty, rows, cols, &w).expect("rtn");
            assert_eq!(g.bytes(), plain.bytes(), "{ty}");
        }
    }

    #[test]
    fn correlated_inputs_cost_the_outputs_far_less_than_plain_rounding() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (rows, cols, t) = (40, 256, 512);
        let w = gaussian(&mut rng, rows * cols);
        // inputs mixed by a random matrix: strongly correlated columns
        let g = gaussian(&mut rng, t * cols);
        let m = gaussian(&mut rng, cols * cols);
        let mut x = vec![0.0f32; t * cols];
        for i in 0..t {
            for k in 0..cols {
                let a = g[i * cols + k] * (1.0 / (1.0 + k as f32 / 8.0));
                for j in 0..cols {
                    x[i * cols + j] += a * m[k * cols + j];
                }
            }
        }
        let mut h = Hessian::new(cols);
        h.add_rows(&x);
        // the device product gives the same moment as the host sum
        let mut hd = Hessian::new(cols);
        hd.add(Tensor::<2>::from_data(
            TensorData::new(x.clone(), [t, cols]),
            &device(),
        ))
        .expect("add");
        assert_eq!(hd.rows(), t);
        for (a, b) in h.sum.iter().zip(&hd.sum) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
        }
        for (ty, most) in [
            (GgmlType::Q4_0, 0.5),
            (GgmlType::Q8_0, 0.5),
            (GgmlType::Q4_K, 0.5),
        ] {
            let u = InverseFactor::new(&h, DAMP).expect("factor");
            let gptq = quantize(ty, rows, cols, &w, &u, &device()).expect("gptq");
            let plain = QMatrix::quantize(ty, rows, cols, &w).expect("rtn");
            let (eg, ep) = (output_error(&x, &w, &gptq), output_error(&x, &w, &plain));
            assert!(eg < most * ep, "{ty}: gptq {eg:.4e} vs plain {ep:.4e}");
            // still a valid matrix of the format: every weight near its own
            let d = gptq.dequantize();
            let worst = w
                .iter()
                .zip(&d)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(worst < 2.5, "{ty}: a weight moved by {worst}");
        }
    }

    #[test]
    fn inverse_factor_inverts_the_damped_moment() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 40;
        let mut h = Hessian::new(n);
        // fewer rows than inputs, and one input never seen: the damping must cope
        for _ in 0..30 {
            let mut x = gaussian(&mut rng, n);
            x[7] = 0.0;
            h.add_rows(&x);
        }
        let f = InverseFactor::new(&h, DAMP).expect("factor");
        let u = &f.u;
        let mean = (0..n).map(|i| h.get(i, i)).sum::<f64>() / n as f64;
        let damped = |i: usize, j: usize| {
            let v = if i == 7 || j == 7 { 0.0 } else { h.get(i, j) };
            let diag = if i == 7 { 1.0 } else { v };
            if i == j {
                diag + DAMP * mean
            } else {
                v
            }
        };
        for i in 0..n {
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0, "upper triangular");
            }
        }
        // Uᵀ U H = I
        for i in 0..n {
            for j in 0..n {
                let mut s = 0.0f64;
                for k in 0..n {
                    let hinv_ik: f64 = (0..n)
                        .map(|m| f64::from(u[m * n + i]) * f64::from(u[m * n + k]))
                        .sum();
                    s += hinv_ik * damped(k, j);
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((s - want).abs() < 1e-3, "({i},{j}): {s}");
            }
        }
    }

    #[test]
    fn refuses_what_it_cannot_round() {
        let mut h = Hessian::new(64);
        h.add_rows(&[1.0; 64]);
        let u = InverseFactor::new(&h, DAMP).expect("factor");
        let w = vec![0.0f32; 2 * 64];
        let e = quantize(GgmlType::Q5_K, 2, 64, &w, &u, &device()).expect_err("q5_k");
        assert!(e.to_string().contains("not implemented"), "{e}");
        let e = quantize(GgmlType::Q4_K, 2, 64, &w, &u, &device()).expect_err("q4_k rows");
        assert!(e.to_string().contains("blocks of 256"), "{e}");
        let e = quantize(GgmlType::Q4_0, 2, 32, &w[..64], &u, &device()).expect_err("width");
        assert!(e.to_string().contains("width 64"), "{e}");
    }
}
