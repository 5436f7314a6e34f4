//! Comparing two answers to the same inputs of a stage: a node's, and a second replica's (or
//! the client's own) re-execution of the same rows. A re-execution runs the rows in steps of
//! other sizes (a verifier catches up in one prefill), maybe on another device.
//!
//! On the CPU, Veil's kernels compute a row the same way whatever shares its step (the
//! quantized products are tested to the bit, and attention runs row by row), so two honest
//! CPU answers on a quantized shard are *identical*; on an f32 shard they differ by ≤ 4e-6
//! (burn's f32 products sum in shape-dependent orders). A GPU rounds differently: up to 4e-2
//! on quantized shards (measured, `model/tests/integrity.rs`, which prints and bounds the
//! honest differences of every shard format). The tolerances sit far above those and below
//! what a corruption worth making changes; a change smaller than the tolerance that applies
//! is undetectable by construction.

use crate::BackendKind;

/// Largest relative L2 difference of one row (`‖a − b‖ / ‖b‖`) between two honest answers
/// computed on the CPU.
pub const TOLERANCE: f32 = 1e-4;

/// The same when either answer comes from a GPU (wgpu).
pub const GPU_TOLERANCE: f32 = 0.1;

/// The tolerance for comparing answers from these backends (`None`: not known, so a GPU is
/// assumed).
pub fn tolerance(a: Option<BackendKind>, b: Option<BackendKind>) -> f32 {
    match (a, b) {
        (Some(BackendKind::Cpu), Some(BackendKind::Cpu)) => TOLERANCE,
        _ => GPU_TOLERANCE,
    }
}

/// Relative L2 difference of each row of `a` from the same row of `b` (`[t, d]` each).
pub fn row_errors(a: &[f32], b: &[f32], d: usize) -> Vec<f32> {
    a.chunks_exact(d)
        .zip(b.chunks_exact(d))
        .map(|(x, y)| {
            let diff: f64 = x.iter().zip(y).map(|(p, q)| f64::from(p - q).powi(2)).sum();
            let norm: f64 = y.iter().map(|q| f64::from(*q).powi(2)).sum();
            (diff.sqrt() / norm.sqrt().max(1e-12)) as f32
        })
        .collect()
}

/// The first row where `a` and `b` differ by more than `tolerance`, with its difference.
pub fn first_disagreement(a: &[f32], b: &[f32], d: usize, tolerance: f32) -> Option<(usize, f32)> {
    if a.len() != b.len() {
        return Some((0, f32::INFINITY));
    }
    row_errors(a, b, d)
        .into_iter()
        .enumerate()
        .find(|(_, e)| e.is_nan() || *e > tolerance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_compared_relative_to_their_size() {
        let b = [3.0, 4.0, 30.0, 40.0];
        let a = [3.0, 4.1, 30.0, 40.1];
        let e = row_errors(&a, &b, 2);
        assert!(
            (e[0] - 0.02).abs() < 1e-6 && (e[1] - 0.002).abs() < 1e-6,
            "{e:?}"
        );
        assert_eq!(first_disagreement(&a, &b, 2, 0.01), Some((0, e[0])));
        assert_eq!(first_disagreement(&a, &b, 2, 0.03), None);
        // NaN and shape mismatches never pass
        assert!(first_disagreement(&[f32::NAN, 0.0], &[1.0, 0.0], 2, 0.5).is_some());
        assert!(first_disagreement(&[1.0], &[1.0, 0.0], 2, 0.5).is_some());
    }
}
