//! Summaries of measured samples: percentiles and the figures a bench reports.

use serde::{Deserialize, Serialize};

/// The `p`-th percentile (0..=100) of `samples` by linear interpolation between the
/// closest ranks; `None` without samples.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = (p.clamp(0.0, 100.0) / 100.0) * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (rank - lo as f64))
}

/// Percentiles of a latency sample, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub samples: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// From samples in seconds.
    pub fn of_seconds(samples: &[f64]) -> Self {
        let ms: Vec<f64> = samples.iter().map(|s| s * 1e3).collect();
        let pick = |p| percentile(&ms, p).unwrap_or(0.0);
        Latency {
            samples: ms.len(),
            mean_ms: if ms.is_empty() {
                0.0
            } else {
                ms.iter().sum::<f64>() / ms.len() as f64
            },
            p50_ms: pick(50.0),
            p95_ms: pick(95.0),
            p99_ms: pick(99.0),
            max_ms: pick(100.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v = [4.0, 1.0, 3.0, 2.0, 5.0];
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 50.0), Some(3.0));
        assert_eq!(percentile(&v, 100.0), Some(5.0));
        assert_eq!(percentile(&v, 25.0), Some(2.0));
        assert_eq!(percentile(&[1.0, 2.0], 50.0), Some(1.5));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[f64::NAN], 50.0), None);
    }

    #[test]
    fn latency_summary_is_in_milliseconds() {
        let s: Vec<f64> = (1..=100).map(|i| f64::from(i) / 1000.0).collect();
        let l = Latency::of_seconds(&s);
        assert_eq!(l.samples, 100);
        assert!((l.p50_ms - 50.5).abs() < 1e-9);
        assert!((l.p99_ms - 99.01).abs() < 1e-9);
        assert!((l.mean_ms - 50.5).abs() < 1e-9);
        assert_eq!(l.max_ms, 100.0);
    }
}
