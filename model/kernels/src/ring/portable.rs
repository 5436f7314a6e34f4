//! The reference products modulo 2^32, in plain Rust: what every SIMD kernel is tested
//! against.

use super::{Planes, RingMatrix, Row};

/// `Σ_j w[j] u[j] (mod 2^32)`, straight from the definition.
pub fn dot(w: Row<'_>, u: &[u32]) -> u32 {
    fn sum<T: Copy + Into<i32>>(w: &[T], u: &[u32]) -> u32 {
        w.iter().zip(u).fold(0u32, |acc, (&q, &v)| {
            acc.wrapping_add((q.into() as u32).wrapping_mul(v))
        })
    }
    match w {
        Row::I8(w) => sum(w, u),
        Row::I16(w) => sum(w, u),
        Row::Blocked { .. } => sum(&w.to_i32(), u),
    }
}

/// `out[t, i] = Σ_j w[i, j] u[t, j] (mod 2^32)`, one word after another, one thread: the
/// reference for [`RingMatrix::mul`].
pub fn mul_rows(m: &RingMatrix, u: &[u32], n: usize, out: &mut [u32]) {
    let cols = m.cols();
    for t in 0..n {
        let x = &u[t * cols..(t + 1) * cols];
        for i in 0..m.rows() {
            out[t * m.rows() + i] = dot(m.row(i), x);
        }
    }
}

/// `Σ_j w[j] lo[j]` and `Σ_j w[j] hi[j] (mod 2^32)` over the halves from `from` on: the
/// tail the SIMD kernels leave, and the portable kernel.
pub(super) fn dot_planes<T: Copy + Into<i32>>(
    w: &[T],
    lo: &[i16],
    hi: &[i16],
    from: usize,
) -> (u32, u32) {
    let (mut a, mut b) = (0i32, 0i32);
    for j in from..w.len() {
        let q: i32 = w[j].into();
        a = a.wrapping_add(q.wrapping_mul(i32::from(lo[j])));
        b = b.wrapping_add(q.wrapping_mul(i32::from(hi[j])));
    }
    (a as u32, b as u32)
}

/// Rows `r0..r1` of `m` against every word of `p`, into `out[(i - r0) n + t]`.
pub(super) fn rows_planes(m: &RingMatrix, r0: usize, r1: usize, p: &Planes, out: &mut [u32]) {
    let cols = m.cols();
    for i in r0..r1 {
        let row = m.row(i);
        let blocked = match row {
            Row::Blocked { .. } => row.to_i32(),
            _ => Vec::new(),
        };
        for t in 0..p.n {
            let (lo, hi) = (
                &p.lo[t * cols..(t + 1) * cols],
                &p.hi[t * cols..(t + 1) * cols],
            );
            let (lo, hi) = match row {
                Row::I8(w) => dot_planes(w, lo, hi, 0),
                Row::I16(w) => dot_planes(w, lo, hi, 0),
                Row::Blocked { .. } => dot_planes(&blocked, lo, hi, 0),
            };
            out[(i - r0) * p.n + t] = lo.wrapping_add(hi << 16);
        }
    }
}
