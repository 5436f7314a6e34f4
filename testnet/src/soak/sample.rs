//! What the soak samples of each node process: resident memory, open files, the disk its
//! shards and uploads take, partial uploads and open sessions.

use std::path::Path;

use serde::Serialize;

/// One node at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Sample {
    /// Seconds since the soak began.
    pub t_s: f64,
    pub rss_mib: f64,
    pub open_files: usize,
    /// Shards and partial uploads on disk.
    pub disk_mib: f64,
    pub partial_uploads: usize,
    /// From the node's own stats (`None`: it did not answer in time).
    pub sessions: Option<u32>,
}

/// Resident memory of a process, MiB (Linux).
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// File descriptors a process holds (Linux).
pub fn open_files(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Bytes of the files under `dir`, recursively.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// Files in `dir` (not recursive; 0 if it does not exist).
pub fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.filter_map(Result::ok).count())
}

/// A node's disk as the quota counts it: its shards and partial uploads.
pub fn store_mib(data_dir: &Path) -> f64 {
    (dir_bytes(&data_dir.join("shards")) + dir_bytes(&data_dir.join("partial"))) as f64
        / f64::from(1 << 20)
}

/// Least-squares slope of `y` over `x` (`None` with fewer than three points or no spread).
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    Some(sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_noise() {
        let line: Vec<(f64, f64)> = (0..10)
            .map(|i| (f64::from(i), 3.0 + 0.5 * f64::from(i)))
            .collect();
        assert!((slope(&line).expect("slope") - 0.5).abs() < 1e-12);
        let flat: Vec<(f64, f64)> = (0..10)
            .map(|i| (f64::from(i), if i % 2 == 0 { 1.0 } else { -1.0 }))
            .collect();
        assert!(slope(&flat).expect("slope").abs() < 0.1);
        assert_eq!(slope(&line[..2]), None);
    }

    #[test]
    fn this_process_is_measured() {
        let pid = std::process::id();
        assert!(rss_mib(pid).expect("rss") > 1.0);
        assert!(open_files(pid).expect("fds") >= 3);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("shards/x")).expect("dirs");
        std::fs::write(dir.path().join("shards/x/a"), [0u8; 1 << 20]).expect("write");
        std::fs::write(dir.path().join("node.log"), [0u8; 100]).expect("write");
        assert_eq!(store_mib(dir.path()), 1.0);
        assert_eq!(files_in(&dir.path().join("partial")), 0);
    }
}
