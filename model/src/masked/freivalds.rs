//! Freivalds' check of a product `y = W x`, modulo the prime `p = 2^61 - 1`.
//!
//! The client draws a secret `s` (uniform in `Z_p`, one per row) and computes `sᵀW` once;
//! then each product costs `O(rows + cols)` to check: `sᵀ y ≡ (sᵀW) x (mod p)`. A wrong
//! `y` passes only if `sᵀ e ≡ 0` for its error `e ≠ 0`, which happens with probability
//! `1/p < 2^-60` over `s`. The check is done on the unmasked, lifted integers and modulo a
//! prime rather than in the ring `mod 2^32`, where errors with many factors of two slip
//! through.

use rand::Rng;
use rayon::prelude::*;
use veil_kernels::ring::{RingMatrix, Row};

/// The Mersenne prime `2^61 - 1`.
pub const P: u64 = (1 << 61) - 1;

/// A secret `s` and `sᵀW` for one matrix.
#[derive(Debug, Clone)]
pub struct Freivalds {
    s: Vec<u64>,
    sw: Vec<u64>,
}

fn reduce(v: i128) -> u64 {
    v.rem_euclid(P as i128) as u64
}

impl Freivalds {
    /// Draw `s` from `rng` and compute `sᵀW` (one pass over the weights).
    pub fn new(w: &RingMatrix, rng: &mut impl Rng) -> Self {
        let s: Vec<u64> = (0..w.rows()).map(|_| rng.gen_range(0..P)).collect();
        // terms below 2^76, sums of at most 2^24 rows below 2^100: no reduction inside
        fn add<T: Copy + Into<i128>>(acc: &mut [i128], s: u64, row: &[T]) {
            for (a, &q) in acc.iter_mut().zip(row) {
                *a += s as i128 * q.into();
            }
        }
        let cols = w.cols();
        let acc = (0..w.rows())
            .into_par_iter()
            .fold(
                || vec![0i128; cols],
                |mut acc, i| {
                    match w.row(i) {
                        Row::I8(r) => add(&mut acc, s[i], r),
                        Row::I16(r) => add(&mut acc, s[i], r),
                        row @ Row::Blocked { .. } => add(&mut acc, s[i], &row.to_i32()),
                    }
                    acc
                },
            )
            .reduce(
                || vec![0i128; cols],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += y;
                    }
                    a
                },
            );
        Freivalds {
            s,
            sw: acc.into_iter().map(reduce).collect(),
        }
    }

    /// Whether `y` (`rows` integers) can be `W x` (`cols` integers); exact products
    /// always pass.
    pub fn holds(&self, x: &[i32], y: &[i32]) -> bool {
        assert_eq!(x.len(), self.sw.len(), "input of the wrong width");
        assert_eq!(y.len(), self.s.len(), "output of the wrong width");
        // terms below 2^92, sums of at most 2^24 below 2^116
        let lhs: i128 = self
            .s
            .iter()
            .zip(y)
            .map(|(&s, &v)| s as i128 * v as i128)
            .sum();
        let rhs: i128 = self
            .sw
            .iter()
            .zip(x)
            .map(|(&s, &v)| s as i128 * v as i128)
            .sum();
        reduce(lhs) == reduce(rhs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use veil_kernels::ring::Ints;

    #[test]
    fn exact_products_pass_and_any_error_is_caught() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (rows, cols) = (40, 64);
        let w: Vec<i16> = (0..rows * cols)
            .map(|_| rng.gen_range(-2047..=2047))
            .collect();
        let m = RingMatrix::from_parts(rows, cols, Ints::I16(w), vec![1.0; rows]).expect("sizes");
        let check = Freivalds::new(&m, &mut rng);
        let x: Vec<i32> = (0..cols).map(|_| rng.gen_range(-10_000..=10_000)).collect();
        let y: Vec<i32> = (0..rows)
            .map(|i| m.row(i).to_i32().iter().zip(&x).map(|(&w, &x)| w * x).sum())
            .collect();
        assert!(check.holds(&x, &y));
        // an error in any one row, of any size, even a multiple of 2^32's factors
        for (row, err) in [(0, 1), (7, -1), (39, 1 << 20), (12, i32::MIN / 2)] {
            let mut bad = y.clone();
            bad[row] = bad[row].wrapping_add(err);
            assert!(!check.holds(&x, &bad), "row {row}, error {err}");
        }
        // a node that returns zeros
        assert!(!check.holds(&x, &vec![0; rows]));
    }
}
