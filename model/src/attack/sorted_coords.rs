//! Coordinate-multiset matching: a permutation key only reorders a vector's coordinates, so
//! the sorted coordinates of `x'` equal those of the plaintext `x`, and for the first stage
//! those of an embedding row. A dense rotation mixes every coordinate into every other and
//! leaves nothing to sort.

use super::{row, NodeView};
use crate::Matrix;

fn sorted(v: &[f32]) -> Vec<f32> {
    let mut v = v.to_vec();
    v.sort_by(f32::total_cmp);
    v
}

/// Guess every received token as the public embedding row with the nearest sorted
/// coordinates.
pub fn guess(view: &NodeView, public_embedding: &Matrix) -> Vec<Vec<u32>> {
    let d = view.d_model;
    let table: Vec<Vec<f32>> = (0..public_embedding.rows)
        .map(|i| sorted(public_embedding.row(i)))
        .collect();
    view.sessions
        .iter()
        .map(|s| {
            (0..s.truth.len())
                .map(|i| {
                    let x = sorted(row(&s.received, d, i));
                    let dist = |e: &[f32]| -> f32 {
                        e.iter().zip(&x).map(|(a, b)| (a - b) * (a - b)).sum()
                    };
                    (0..table.len())
                        .min_by(|&a, &b| dist(&table[a]).total_cmp(&dist(&table[b])))
                        .unwrap_or(0) as u32
                })
                .collect()
        })
        .collect()
}
