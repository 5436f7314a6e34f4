//! A byzantine node for the testnet: `lie_mode` / `lie_rate` in `node.toml` make a node
//! corrupt a fraction of its answers on purpose, the way a cheater would (to save compute)
//! or a saboteur (to spoil answers), so that clients' verification can be measured. The
//! corrupted answer is signed like an honest one: its receipt is what convicts the node.

use rand::{Rng, SeedableRng};

/// How a lying node corrupts an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LieMode {
    /// Gaussian noise of a tenth of each row's RMS added to the honest answer.
    Noise,
    /// Zeros instead of the answer.
    Zeros,
    /// The input returned unchanged, as if the stage's layers were skipped.
    Skip,
    /// The session's previous answer (its last row, repeated) instead of the new one.
    Stale,
}

impl std::str::FromStr for LieMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "noise" => Ok(LieMode::Noise),
            "zeros" => Ok(LieMode::Zeros),
            "skip" | "skip-layers" => Ok(LieMode::Skip),
            "stale" | "replay-stale" => Ok(LieMode::Stale),
            other => Err(format!(
                "lie_mode must be noise, zeros, skip-layers or replay-stale, not `{other}`"
            )),
        }
    }
}

/// Relative size of the noise a `noise` liar adds (to each row's RMS).
pub const NOISE_SCALE: f32 = 0.1;

/// A node's lying policy.
#[derive(Debug)]
pub struct Liar {
    pub mode: LieMode,
    /// Fraction of answers corrupted, each chosen at random.
    pub rate: f64,
    rng: rand::rngs::StdRng,
}

impl Liar {
    pub fn new(mode: LieMode, rate: f64, seed: u64) -> Self {
        Liar {
            mode,
            rate,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// Maybe corrupt `out`, the honest answer `[t, d]` to `input`; `previous` is the last row
    /// of the session's previous answer. True when it lied.
    pub fn apply(
        &mut self,
        input: &[f32],
        out: &mut [f32],
        previous: Option<&[f32]>,
        d: usize,
    ) -> bool {
        if self.rate <= 0.0 || !self.rng.gen_bool(self.rate.min(1.0)) {
            return false;
        }
        match (self.mode, previous) {
            (LieMode::Zeros, _) => out.fill(0.0),
            (LieMode::Skip, _) => out.copy_from_slice(input),
            (LieMode::Stale, Some(prev)) if prev.len() == d => {
                for row in out.chunks_exact_mut(d) {
                    row.copy_from_slice(prev);
                }
            }
            // a first answer has nothing stale to repeat: noise instead
            (LieMode::Noise | LieMode::Stale, _) => {
                for row in out.chunks_exact_mut(d) {
                    let rms = (row.iter().map(|v| v * v).sum::<f32>() / d as f32).sqrt();
                    for v in row.iter_mut() {
                        *v += NOISE_SCALE * rms * gaussian(&mut self.rng);
                    }
                }
            }
        }
        true
    }
}

impl Liar {
    /// Maybe corrupt `out`, an honest masked-mode answer (`W u mod 2^32` words), the way
    /// the mode says where words allow it: zeros, or a random word added to each (noise,
    /// and what a skip or a stale answer looks like once masked: unrelated words). True
    /// when it lied.
    pub fn apply_words(&mut self, out: &mut [u32]) -> bool {
        if self.rate <= 0.0 || !self.rng.gen_bool(self.rate.min(1.0)) {
            return false;
        }
        match self.mode {
            LieMode::Zeros => out.fill(0),
            _ => {
                for w in out.iter_mut() {
                    *w = w.wrapping_add(self.rng.gen_range(1..=u32::MAX));
                }
            }
        }
        true
    }
}

/// A standard normal sample (Box-Muller).
fn gaussian(rng: &mut impl Rng) -> f32 {
    let u: f32 = rng.gen_range(f32::EPSILON..1.0);
    let v: f32 = rng.gen();
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_corrupts_at_its_rate() {
        let d = 4;
        let input = [1.0, 2.0, 3.0, 4.0];
        let honest = [0.5, -0.5, 1.5, -1.5];
        for mode in [
            LieMode::Noise,
            LieMode::Zeros,
            LieMode::Skip,
            LieMode::Stale,
        ] {
            let mut liar = Liar::new(mode, 0.25, 7);
            let prev = [9.0, 9.0, 9.0, 9.0];
            let mut lies = 0;
            for _ in 0..4000 {
                let mut out = honest;
                if liar.apply(&input, &mut out, Some(&prev), d) {
                    lies += 1;
                    assert_ne!(out, honest, "{mode:?}");
                    match mode {
                        LieMode::Zeros => assert_eq!(out, [0.0; 4]),
                        LieMode::Skip => assert_eq!(out, input),
                        LieMode::Stale => assert_eq!(out, prev),
                        LieMode::Noise => {}
                    }
                } else {
                    assert_eq!(out, honest);
                }
            }
            assert!((850..1150).contains(&lies), "{mode:?}: {lies} lies of 4000");
        }
        let mut liar = Liar::new(LieMode::Noise, 1.0, 3);
        let mut words = [5u32, 6, 7];
        assert!(liar.apply_words(&mut words));
        assert!(words.iter().zip([5, 6, 7]).all(|(a, b)| *a != b));
        let mut honest = Liar::new(LieMode::Zeros, 0.0, 3);
        assert!(!honest.apply_words(&mut words));
        assert!("sometimes".parse::<LieMode>().is_err());
        assert_eq!("replay-stale".parse::<LieMode>(), Ok(LieMode::Stale));
    }
}
