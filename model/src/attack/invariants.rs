//! Vocabulary matching with key-invariant quantities only. An orthogonal key keeps every
//! inner product, so the node sees the Gram matrix of its inputs across positions:
//! `x'_i · x'_j = E[t_i] · E[t_j]`. Candidates for each position come from the norm (the
//! diagonal); the rest of the row (inner products with the other positions' guesses)
//! picks among them. A second pass re-guesses every position against all the others.

use super::norms::NormIndex;
use super::{dot, norm, row, NodeView};
use crate::Matrix;

/// Options of the matcher.
#[derive(Debug, Clone, Copy)]
pub struct InvariantOptions {
    /// Candidates per position, by norm.
    pub shortlist: usize,
    /// Positions on each side whose inner products are compared.
    pub window: usize,
}

impl Default for InvariantOptions {
    fn default() -> Self {
        InvariantOptions {
            shortlist: 256,
            window: 32,
        }
    }
}

/// Guess every received token from norms and Gram entries against `public_embedding`.
pub fn guess(view: &NodeView, public_embedding: &Matrix, opts: InvariantOptions) -> Vec<Vec<u32>> {
    let index = NormIndex::new(public_embedding);
    let d = view.d_model;
    view.sessions
        .iter()
        .map(|s| {
            let n = s.truth.len();
            let rows: Vec<&[f32]> = (0..n).map(|i| row(&s.received, d, i)).collect();
            let shortlists: Vec<Vec<u32>> = rows
                .iter()
                .map(|r| index.nearest(norm(r), opts.shortlist))
                .collect();
            let mut guesses: Vec<u32> = Vec::with_capacity(n);
            // pass 1: each position against the guesses before it
            for (i, shortlist) in shortlists.iter().enumerate() {
                let others: Vec<usize> = (i.saturating_sub(opts.window)..i).collect();
                let g = best(shortlist, i, &others, &rows, &guesses, public_embedding);
                guesses.push(g);
            }
            // pass 2: each position against every other position's guess in the window
            for i in 0..n {
                let others: Vec<usize> = (i.saturating_sub(opts.window)
                    ..(i + opts.window + 1).min(n))
                    .filter(|&j| j != i)
                    .collect();
                guesses[i] = best(
                    &shortlists[i],
                    i,
                    &others,
                    &rows,
                    &guesses,
                    public_embedding,
                );
            }
            guesses
        })
        .collect()
}

/// The candidate whose norm and inner products with the guessed tokens at `others` best
/// explain row `i`'s observed ones.
fn best(
    candidates: &[u32],
    i: usize,
    others: &[usize],
    rows: &[&[f32]],
    guesses: &[u32],
    table: &Matrix,
) -> u32 {
    let observed_norm = dot(rows[i], rows[i]);
    let score = |c: u32| -> f64 {
        let e = table.row(c as usize);
        let mut s = (dot(e, e) - observed_norm).powi(2);
        for &j in others {
            let ej = table.row(guesses[j] as usize);
            s += (dot(e, ej) - dot(rows[i], rows[j])).powi(2);
        }
        s
    };
    candidates
        .iter()
        .copied()
        .min_by(|&a, &b| score(a).total_cmp(&score(b)))
        .unwrap_or(0)
}
