//! Norm matching: an orthogonal key keeps every vector's norm, and the first stage's inputs
//! are embedding rows, so `|x'| = |E[token]|` points into the public embedding table.

use super::{norm, row, NodeView};
use crate::Matrix;

/// Norms of the rows of `table`, with their ids, sorted by norm.
pub struct NormIndex {
    sorted: Vec<(f64, u32)>,
}

impl NormIndex {
    pub fn new(table: &Matrix) -> Self {
        let mut sorted: Vec<(f64, u32)> = (0..table.rows)
            .map(|i| (norm(table.row(i)), i as u32))
            .collect();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        NormIndex { sorted }
    }

    /// The `k` ids whose norms are closest to `target`, closest first.
    pub fn nearest(&self, target: f64, k: usize) -> Vec<u32> {
        let n = self.sorted.len();
        let mut hi = self.sorted.partition_point(|(v, _)| *v < target);
        let mut lo = hi;
        let mut out = Vec::with_capacity(k.min(n));
        while out.len() < k.min(n) {
            let below = (lo > 0).then(|| target - self.sorted[lo - 1].0);
            let above = (hi < n).then(|| self.sorted[hi].0 - target);
            match (below, above) {
                (Some(b), Some(a)) if b <= a => {
                    lo -= 1;
                    out.push(self.sorted[lo].1);
                }
                (_, Some(_)) => {
                    out.push(self.sorted[hi].1);
                    hi += 1;
                }
                (Some(_), None) => {
                    lo -= 1;
                    out.push(self.sorted[lo].1);
                }
                (None, None) => break,
            }
        }
        out
    }
}

/// For every received row, the `k` tokens whose public embedding norms are closest.
pub fn candidates(view: &NodeView, public_embedding: &Matrix, k: usize) -> Vec<Vec<Vec<u32>>> {
    let index = NormIndex::new(public_embedding);
    view.sessions
        .iter()
        .map(|s| {
            (0..s.truth.len())
                .map(|i| index.nearest(norm(row(&s.received, view.d_model, i)), k))
                .collect()
        })
        .collect()
}

/// Guess every received token by the closest norm; returns one guess list per session.
pub fn guess(view: &NodeView, public_embedding: &Matrix) -> Vec<Vec<u32>> {
    candidates(view, public_embedding, 1)
        .into_iter()
        .map(|s| {
            s.into_iter()
                .map(|c| c.first().copied().unwrap_or(0))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_norms_come_closest_first() {
        let table = Matrix::new(4, 1, vec![3.0, 1.0, 2.0, 10.0]);
        let index = NormIndex::new(&table);
        assert_eq!(index.nearest(2.2, 2), vec![2, 0]);
        assert_eq!(index.nearest(100.0, 2), vec![3, 0]);
        assert_eq!(index.nearest(0.0, 9), vec![1, 2, 0, 3]);
    }
}
