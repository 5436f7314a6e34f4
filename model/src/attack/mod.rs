//! Attacks on what a node sees. Each takes a recorded node view (its shard and the
//! encrypted hidden states it received) and what the attacker is assumed to know (usually
//! the public plaintext model) and returns its guesses; [`Rate`] scores them against the
//! truth with a confidence interval.
//!
//! - [`key_recovery`]: solve the residual key `Q` from the shard (column matching, least
//!   squares and orthogonal Procrustes), then decrypt every received vector.
//! - [`norms`]: match the norm of each received vector against a public embedding table.
//! - [`invariants`]: match later tokens with key-invariant quantities only: norms and Gram
//!   matrices across positions.
//! - [`sorted_coords`]: match the multiset of a vector's coordinates, which a
//!   permutation-only key keeps and a dense rotation destroys.
//! - [`sequential`]: walk each session left to right, running the public model's candidate
//!   tokens through the node's layers and matching everything the key leaves visible
//!   (norms, attention scores, sorted gate pre-activations: [`features`]).
//!
//! - [`inversion`]: a network trained on those same quantities, computed with the public
//!   model over a text corpus, reads each position's token directly.
//!
//! [`private`] makes the owner's private model from the public one (noise, or a LoRA-style
//! fine-tune).
//!
//! Against the client-layers mitigation the attacker matches against
//! [`position0_table`] (the residual after the client's layers at position 0) instead of the
//! embedding table.

pub mod features;
pub mod invariants;
pub mod inversion;
pub mod key_recovery;
pub mod masked;
pub mod norms;
pub mod position0;
pub mod prefilter;
pub mod private;
pub mod rate;
pub mod sequential;
pub mod sorted_coords;
pub mod view;

pub use position0::position0_table;
pub use private::{finetuned, perturbed};
pub use rate::Rate;
pub use view::{record_views, Deployment, NodeView};

/// Row `i` of a `[rows, cols]` row-major slice.
pub(crate) fn row(data: &[f32], cols: usize, i: usize) -> &[f32] {
    &data[i * cols..(i + 1) * cols]
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

pub(crate) fn norm(a: &[f32]) -> f64 {
    dot(a, a).sqrt()
}
