//! Success rates with a Wilson score interval.

use serde::Serialize;

/// `hits` successes out of `trials`, with a 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rate {
    pub hits: usize,
    pub trials: usize,
    pub rate: f64,
    pub ci_low: f64,
    pub ci_high: f64,
}

impl Rate {
    /// The Wilson score interval at 95% (z = 1.96): sound for small samples and for rates
    /// near 0 or 1, unlike the normal approximation.
    pub fn new(hits: usize, trials: usize) -> Self {
        if trials == 0 {
            return Rate {
                hits,
                trials,
                rate: 0.0,
                ci_low: 0.0,
                ci_high: 1.0,
            };
        }
        let (n, p, z) = (trials as f64, hits as f64 / trials as f64, 1.96f64);
        let denom = 1.0 + z * z / n;
        let centre = (p + z * z / (2.0 * n)) / denom;
        let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
        Rate {
            hits,
            trials,
            rate: p,
            ci_low: (centre - half).max(0.0),
            ci_high: (centre + half).min(1.0),
        }
    }

    /// Score guesses against the truth, position by position.
    pub fn score(guesses: &[u32], truth: &[u32]) -> Self {
        let hits = guesses.iter().zip(truth).filter(|(g, t)| g == t).count();
        Rate::new(hits, truth.len().min(guesses.len()))
    }

    /// Combine the trials of several rates.
    pub fn sum(rates: &[Rate]) -> Self {
        Rate::new(
            rates.iter().map(|r| r.hits).sum(),
            rates.iter().map(|r| r.trials).sum(),
        )
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1}% ({}/{}, 95% CI {:.1}-{:.1}%)",
            self.rate * 100.0,
            self.hits,
            self.trials,
            self.ci_low * 100.0,
            self.ci_high * 100.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_interval_matches_known_values() {
        // 8 of 10: Wilson 95% interval is about [0.490, 0.943]
        let r = Rate::new(8, 10);
        assert!((r.ci_low - 0.490).abs() < 1e-3, "{r:?}");
        assert!((r.ci_high - 0.943).abs() < 1e-3, "{r:?}");
        // 0 of 20 still has a non-zero upper bound
        let z = Rate::new(0, 20);
        assert_eq!(z.ci_low, 0.0);
        assert!((z.ci_high - 0.161).abs() < 1e-3, "{z:?}");
        assert_eq!(Rate::score(&[1, 2, 3], &[1, 0, 3]).hits, 2);
        assert_eq!(Rate::sum(&[Rate::new(1, 2), Rate::new(3, 4)]).trials, 6);
    }
}
