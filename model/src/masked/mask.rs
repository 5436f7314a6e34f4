//! The masks: uniform words from ChaCha20, addressed by op and position, so that a mask
//! provider holding the seed can compute any op's `W r` ahead of the client and in any
//! order.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// A session's mask seed (secret between the client and its mask provider).
#[derive(Clone, PartialEq, Eq)]
pub struct MaskSeed([u8; 32]);

impl std::fmt::Debug for MaskSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskSeed(..)")
    }
}

impl MaskSeed {
    pub fn new(bytes: [u8; 32]) -> Self {
        MaskSeed(bytes)
    }

    /// The seed's bytes: what the session's mask provider is sent (a secret: whoever holds
    /// it and a compute node's inputs can unmask them).
    pub fn bytes(&self) -> [u8; 32] {
        self.0
    }

    /// A fresh seed from the operating system's generator.
    pub fn random() -> Self {
        let mut b = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut b);
        MaskSeed(b)
    }

    /// The masks of op `op` for positions `first..first + n` of width `cols`, into `out`
    /// (`[n, cols]`): ChaCha20 keyed by the seed, the op as its stream, and the position
    /// as the offset (in words of `cols`).
    ///
    /// # Panics
    /// If `out` does not hold `n` rows of `cols`.
    pub fn fill(&self, op: u64, first: u64, n: usize, cols: usize, out: &mut [u32]) {
        assert_eq!(out.len(), n * cols, "mask buffer of the wrong size");
        let mut rng = ChaCha20Rng::from_seed(self.0);
        rng.set_stream(op);
        rng.set_word_pos(u128::from(first) * cols as u128);
        for v in out.iter_mut() {
            *v = rng.next_u32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_addressed_by_op_and_position() {
        let seed = MaskSeed::new([7; 32]);
        let cols = 5;
        let mut all = vec![0; 4 * cols];
        seed.fill(3, 0, 4, cols, &mut all);
        // any position on its own gives the same words as the run
        let mut one = vec![0; cols];
        seed.fill(3, 2, 1, cols, &mut one);
        assert_eq!(one, all[2 * cols..3 * cols]);
        // another op, another seed: other words
        let mut other = vec![0; 4 * cols];
        seed.fill(4, 0, 4, cols, &mut other);
        assert_ne!(other, all);
        MaskSeed::new([8; 32]).fill(3, 0, 4, cols, &mut other);
        assert_ne!(other, all);
        assert_ne!(format!("{seed:?}"), format!("{:?}", [7u8; 32]));
    }

    #[test]
    fn mask_bytes_look_uniform() {
        // a chi-square test on 2^16 words' bytes: 255 degrees of freedom, whose 99.99th
        // percentile is about 347
        let seed = MaskSeed::new([1; 32]);
        let mut w = vec![0u32; 1 << 16];
        seed.fill(0, 0, 1 << 8, 1 << 8, &mut w);
        for lane in 0..4 {
            let mut counts = [0f64; 256];
            for v in &w {
                counts[((v >> (8 * lane)) & 0xff) as usize] += 1.0;
            }
            let expected = w.len() as f64 / 256.0;
            let chi2: f64 = counts
                .iter()
                .map(|c| (c - expected).powi(2) / expected)
                .sum();
            assert!(chi2 < 347.0, "lane {lane}: chi-square {chi2}");
        }
    }
}
