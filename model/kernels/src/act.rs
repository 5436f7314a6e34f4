//! Activations quantized to signed bytes for the integer dot products, as llama.cpp does
//! before its quantized matrix products (its "vec_dot_type"): per block of 32 values for
//! the 32-value weight formats (like ggml's Q8_0/Q8_1, with an f32 scale and the block's
//! sum), per 256 values for the k-quants (ggml's Q8_K: one scale, sums per 16).

use crate::format::{QK, QK_K};

/// Rows of activations quantized per 32 values: `x ≈ d * q`.
#[derive(Debug, Clone, Default)]
pub struct Q8Acts {
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols` values.
    pub q: Vec<i8>,
    /// One scale per block (`rows * cols / 32`).
    pub d: Vec<f32>,
    /// The sum of each block's `q`.
    pub sum: Vec<i32>,
    /// `d * sum` per block: the block's sum of values, for the weights' offsets and
    /// minimums.
    pub s: Vec<f32>,
}

/// One row of [`Q8Acts`].
#[derive(Debug, Clone, Copy)]
pub struct Q8Row<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub sum: &'a [i32],
    pub s: &'a [f32],
}

impl Q8Acts {
    /// Quantize `x` (`rows * cols` values, `cols` a multiple of 32): `d = max|x| / 127`,
    /// `q = round(x / d)`, per block.
    ///
    /// # Panics
    /// If `cols` is not a multiple of 32 or `x` does not hold `rows * cols` values.
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(cols % QK, 0, "activations need a multiple of {QK} columns");
        assert_eq!(x.len(), rows * cols);
        let blocks = x.len() / QK;
        let mut a = Q8Acts {
            rows,
            cols,
            q: vec![0; x.len()],
            d: Vec::with_capacity(blocks),
            sum: Vec::with_capacity(blocks),
            s: Vec::with_capacity(blocks),
        };
        for (xb, qb) in x.chunks_exact(QK).zip(a.q.chunks_exact_mut(QK)) {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in qb.iter_mut().zip(xb) {
                *q = (v * id).round() as i8;
                sum += i32::from(*q);
            }
            a.d.push(d);
            a.sum.push(sum);
            a.s.push(d * sum as f32);
        }
        a
    }

    pub fn row(&self, r: usize) -> Q8Row<'_> {
        let (c, b) = (self.cols, self.cols / QK);
        Q8Row {
            q: &self.q[r * c..(r + 1) * c],
            d: &self.d[r * b..(r + 1) * b],
            sum: &self.sum[r * b..(r + 1) * b],
            s: &self.s[r * b..(r + 1) * b],
        }
    }
}

/// Rows of activations quantized per 256 values (ggml's Q8_K): `x ≈ d * q`, with the sums
/// of each 16 `q`.
#[derive(Debug, Clone, Default)]
pub struct Q8KActs {
    pub rows: usize,
    pub cols: usize,
    pub q: Vec<i8>,
    /// One scale per 256 values.
    pub d: Vec<f32>,
    /// The sum of each 16 `q` (`rows * cols / 16`).
    pub bsums: Vec<i32>,
}

/// One row of [`Q8KActs`].
#[derive(Debug, Clone, Copy)]
pub struct Q8KRow<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub bsums: &'a [i32],
}

impl Q8KActs {
    /// Quantize `x` (`rows * cols` values, `cols` a multiple of 256) as ggml's
    /// `quantize_row_q8_K`: the value of largest magnitude maps to -127.
    ///
    /// # Panics
    /// If `cols` is not a multiple of 256 or `x` does not hold `rows * cols` values.
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(
            cols % QK_K,
            0,
            "activations need a multiple of {QK_K} columns"
        );
        assert_eq!(x.len(), rows * cols);
        let mut a = Q8KActs {
            rows,
            cols,
            q: vec![0; x.len()],
            d: Vec::with_capacity(x.len() / QK_K),
            bsums: Vec::with_capacity(x.len() / 16),
        };
        for (xb, qb) in x.chunks_exact(QK_K).zip(a.q.chunks_exact_mut(QK_K)) {
            let (mut amax, mut max) = (0.0f32, 0.0f32);
            for &v in xb {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            if amax == 0.0 {
                a.d.push(0.0);
                a.bsums.extend([0; QK_K / 16]);
                continue;
            }
            let iscale = -127.0 / max;
            for (q, v) in qb.iter_mut().zip(xb) {
                *q = (iscale * v).round().min(127.0) as i8;
            }
            a.d.push(1.0 / iscale);
            a.bsums.extend(
                qb.chunks_exact(16)
                    .map(|c| c.iter().map(|&q| i32::from(q)).sum::<i32>()),
            );
        }
        a
    }

    pub fn row(&self, r: usize) -> Q8KRow<'_> {
        let c = self.cols;
        Q8KRow {
            q: &self.q[r * c..(r + 1) * c],
            d: &self.d[r * c / QK_K..(r + 1) * c / QK_K],
            bsums: &self.bsums[r * c / 16..(r + 1) * c / 16],
        }
    }
}
