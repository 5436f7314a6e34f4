//! `veil-testnet soak`: normal generations for a long while, with abusive peers at the
//! same time, on nodes with tight limits; every node's memory, open files, disk, partial
//! uploads and sessions are sampled throughout. The soak fails if a node crosses a bound,
//! panics or stops, keeps files or sessions of peers that are gone, or if a normal
//! generation fails or differs from its fault-free run.

mod abuse;
mod report;
pub mod sample;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use serde::Serialize;

use crate::bench::{greedy, latencies, warm_up};
use crate::cluster::NodeSettings;
use crate::load::{prompts, LoadClient, SessionResult};
use crate::network::LocalNetwork;
use crate::stats::percentile;
pub use abuse::AbuseCounts;
pub use report::{markdown, write};
use sample::Sample;

/// The limits the soak's nodes run with (their `node.toml`), and so the bounds it checks.
#[derive(Debug, Clone, Serialize)]
pub struct SoakLimits {
    pub memory_limit_mib: u64,
    pub max_disk_mib: u64,
    pub partial_upload_timeout_s: u64,
    pub session_idle_timeout_s: u64,
    pub max_sessions_per_peer: u32,
    pub max_requests_per_s_per_peer: u32,
    pub max_queued_per_peer: u32,
    /// What a node's resident memory may exceed `memory_limit_mib` by: the process itself
    /// (runtime, network, the engine's scratch), measured on an idle node.
    pub rss_allowance_mib: u64,
}

impl Default for SoakLimits {
    fn default() -> Self {
        SoakLimits {
            memory_limit_mib: 2048,
            max_disk_mib: 512,
            partial_upload_timeout_s: 15,
            session_idle_timeout_s: 15,
            max_sessions_per_peer: 8,
            max_requests_per_s_per_peer: 300,
            max_queued_per_peer: 16,
            rss_allowance_mib: 512,
        }
    }
}

impl SoakLimits {
    /// The node settings that apply them.
    pub fn apply(&self, mut settings: NodeSettings) -> NodeSettings {
        settings.memory_limit_mib = self.memory_limit_mib;
        settings.session_idle_timeout_s = self.session_idle_timeout_s;
        settings.extra_config.push_str(&format!(
            "max_disk_mib = {}\npartial_upload_timeout_s = {}\nmax_sessions_per_peer = {}\n\
             max_requests_per_s_per_peer = {}\nmax_queued_per_peer = {}\n",
            self.max_disk_mib,
            self.partial_upload_timeout_s,
            self.max_sessions_per_peer,
            self.max_requests_per_s_per_peer,
            self.max_queued_per_peer
        ));
        settings
    }
}

#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub duration: Duration,
    /// Normal sessions at once.
    pub sessions: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub sample_every: Duration,
    /// Run the abusive peers (off: a calm soak, for comparison).
    pub abuse: bool,
    pub seed: u64,
    pub limits: SoakLimits,
}

/// Shortest time after the warm-up over which a memory or file trend is reported.
pub const MIN_TREND_S: f64 = 300.0;

/// One node's samples and verdicts.
#[derive(Debug, Clone, Serialize)]
pub struct NodeSeries {
    pub name: String,
    pub samples: Vec<Sample>,
    /// Resident memory while idle before any session, MiB.
    pub idle_rss_mib: f64,
    pub max_rss_mib: f64,
    pub max_disk_mib: f64,
    pub max_open_files: usize,
    /// Resident memory's trend after the warm-up (the first fifth of the run), MiB/hour;
    /// `None` when that is shorter than [`MIN_TREND_S`].
    pub rss_slope_mib_per_h: Option<f64>,
    pub open_files_slope_per_h: Option<f64>,
    /// At the end, once every abuser had been gone for the timeouts.
    pub sessions_left: Option<u32>,
    pub partial_uploads_left: usize,
    pub panicked: bool,
    pub running: bool,
}

/// One of the soak's checks.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub model: String,
    pub nodes: usize,
    pub duration_s: f64,
    pub limits: SoakLimits,
    pub abuse: bool,
    pub generations: usize,
    pub completed: usize,
    pub identical: usize,
    pub errors: Vec<String>,
    /// Per-token latency p99 of the fault-free run and under abuse, ms.
    pub p99_calm_ms: f64,
    pub p99_soak_ms: f64,
    pub abusers: BTreeMap<&'static str, AbuseCounts>,
    pub series: Vec<NodeSeries>,
    pub checks: Vec<Check>,
}

impl SoakReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }
}

fn sample_nodes(network: &LocalNetwork, client: &LoadClient, t_s: f64) -> Vec<Sample> {
    let stats = client.node_stats(network);
    network
        .nodes
        .iter()
        .zip(stats)
        .map(|(n, st)| {
            let pid = n.pid();
            Sample {
                t_s,
                rss_mib: pid.and_then(sample::rss_mib).unwrap_or(0.0),
                open_files: pid.and_then(sample::open_files).unwrap_or(0),
                disk_mib: sample::store_mib(&n.data_dir),
                partial_uploads: sample::files_in(&n.data_dir.join("partial")),
                sessions: st.map(|s| s.active_sessions),
            }
        })
        .collect()
}

/// Run the soak on a network started with [`SoakLimits::apply`]'s settings.
pub fn run(network: &mut LocalNetwork, opts: &SoakOptions, model: &str) -> Result<SoakReport> {
    if opts.sessions == 0 || opts.gen_tokens == 0 {
        bail!("--sessions and --gen-tokens must be at least 1");
    }
    let net: &LocalNetwork = network;
    let client = LoadClient::connect(net)?;
    let idle = sample_nodes(net, &client, 0.0);
    let prompts = prompts(&net.text, opts.sessions, opts.prompt_tokens)?;
    let params = greedy(opts.gen_tokens);
    warm_up(net, &client, &prompts[0])?;
    tracing::info!("fault-free reference run");
    let reference = client.run(&prompts, &params, 1, &ProgressBar::hidden());
    if let Some(e) = reference.iter().find_map(|r| r.error.as_ref()) {
        bail!("the fault-free run failed: {e}");
    }
    let targets: Vec<abuse::Target> = net
        .nodes
        .iter()
        .filter_map(|n| {
            Some(abuse::Target {
                peer: n.peer_id.parse().ok()?,
                addr: n.addr.as_ref()?.parse().ok()?,
            })
        })
        .collect();
    let shards: Vec<[u8; 32]> = net
        .deployment
        .stages
        .iter()
        .filter_map(|s| hex::decode(&s.shard).ok()?.try_into().ok())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let done_sampling = AtomicBool::new(false);
    let samples: Mutex<Vec<Vec<Sample>>> = Mutex::new(Vec::new());
    let start = Instant::now();
    let bar = ProgressBar::new(opts.duration.as_secs());
    bar.set_message("soaking");
    let runtime = tokio::runtime::Runtime::new().context("abusers' runtime")?;
    let abusers = opts.abuse.then(|| {
        runtime.spawn(abuse::run(
            targets.clone(),
            shards.clone(),
            2 * opts.limits.max_requests_per_s_per_peer as usize,
            stop.clone(),
            opts.seed,
        ))
    });
    let results: Vec<SessionResult> = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut next = Instant::now();
            while !done_sampling.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    let s = sample_nodes(net, &client, start.elapsed().as_secs_f64());
                    samples
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(s);
                    bar.set_position(start.elapsed().as_secs().min(opts.duration.as_secs()));
                    next += opts.sample_every;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let mut results = Vec::new();
        while start.elapsed() < opts.duration {
            results.extend(client.run(&prompts, &params, 1, &ProgressBar::hidden()));
        }
        stop.store(true, Ordering::Relaxed);
        // the abusers are gone: sessions and uploads they left must go within the timeouts
        let drain = Duration::from_secs(
            opts.limits
                .session_idle_timeout_s
                .max(opts.limits.partial_upload_timeout_s)
                + 15,
        );
        let drained = Instant::now();
        while drained.elapsed() < drain {
            let clean = net
                .nodes
                .iter()
                .all(|n| sample::files_in(&n.data_dir.join("partial")) == 0)
                && client
                    .node_stats(net)
                    .iter()
                    .all(|s| s.is_some_and(|s| s.active_sessions == 0));
            if clean && drained.elapsed() > Duration::from_secs(2) {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        done_sampling.store(true, Ordering::Relaxed);
        results
    });
    bar.finish_and_clear();
    let counts = match abusers {
        Some(h) => runtime.block_on(h).unwrap_or_default(),
        None => BTreeMap::new(),
    };
    drop(runtime);
    let end = sample_nodes(net, &client, start.elapsed().as_secs_f64());
    let samples = samples
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok(judge(
        network, opts, model, &reference, &results, counts, &idle, samples, &end, start,
    ))
}

#[allow(clippy::too_many_arguments)]
fn judge(
    network: &mut LocalNetwork,
    opts: &SoakOptions,
    model: &str,
    reference: &[SessionResult],
    results: &[SessionResult],
    abusers: BTreeMap<&'static str, AbuseCounts>,
    idle: &[Sample],
    samples: Vec<Vec<Sample>>,
    end: &[Sample],
    start: Instant,
) -> SoakReport {
    let duration_s = start.elapsed().as_secs_f64();
    let warm = duration_s.min(opts.duration.as_secs_f64()) / 5.0;
    let series: Vec<NodeSeries> = network
        .nodes
        .iter_mut()
        .enumerate()
        .map(|(i, n)| {
            let s: Vec<Sample> = samples
                .iter()
                .filter_map(|row| row.get(i).copied())
                .collect();
            let after: Vec<&Sample> = s.iter().filter(|x| x.t_s >= warm).collect();
            // a trend over a few minutes is noise (allocators grow in steps): none below
            let span = after.last().map_or(0.0, |l| l.t_s) - after.first().map_or(0.0, |f| f.t_s);
            let trend = |f: &dyn Fn(&Sample) -> f64| {
                if span < MIN_TREND_S {
                    return None;
                }
                sample::slope(&after.iter().map(|x| (x.t_s, f(x))).collect::<Vec<_>>())
                    .map(|per_s| per_s * 3600.0)
            };
            let log = n.log();
            NodeSeries {
                name: n.name.clone(),
                idle_rss_mib: idle.get(i).map_or(0.0, |x| x.rss_mib),
                max_rss_mib: s.iter().map(|x| x.rss_mib).fold(0.0, f64::max),
                max_disk_mib: s.iter().map(|x| x.disk_mib).fold(0.0, f64::max),
                max_open_files: s.iter().map(|x| x.open_files).max().unwrap_or(0),
                rss_slope_mib_per_h: trend(&|x| x.rss_mib),
                open_files_slope_per_h: trend(&|x| x.open_files as f64),
                sessions_left: end.get(i).and_then(|x| x.sessions),
                partial_uploads_left: end.get(i).map_or(0, |x| x.partial_uploads),
                panicked: log.contains("panicked"),
                running: n.is_running(),
                samples: s,
            }
        })
        .collect();
    let by_prompt: BTreeMap<usize, &Vec<u32>> =
        reference.iter().map(|r| (r.prompt, &r.tokens)).collect();
    let completed: Vec<&SessionResult> = results.iter().filter(|r| r.error.is_none()).collect();
    let identical = completed
        .iter()
        .filter(|r| by_prompt.get(&r.prompt) == Some(&&r.tokens))
        .count();
    let errors: Vec<String> = results.iter().filter_map(|r| r.error.clone()).collect();
    let p99 = |r: &[SessionResult]| percentile(&latencies(r).0, 99.0).unwrap_or(0.0) * 1000.0;
    let (p99_calm_ms, p99_soak_ms) = (p99(reference), p99(results));
    let l = &opts.limits;
    let mut checks = Vec::new();
    let mut check = |what: &str, passed: bool, detail: String| {
        checks.push(Check {
            what: what.into(),
            passed,
            detail,
        })
    };
    check(
        "normal generations completed and equal their fault-free outputs",
        !results.is_empty() && identical == results.len(),
        format!(
            "{identical} identical of {} ({} failed)",
            results.len(),
            errors.len()
        ),
    );
    for s in &series {
        let rss_bound = (l.memory_limit_mib + l.rss_allowance_mib) as f64;
        check(
            &format!("{}: resident memory within its bound", s.name),
            s.max_rss_mib <= rss_bound,
            format!(
                "max {:.0} MiB (idle {:.0}) of memory_limit_mib {} + {} for the process; trend \
                 after warm-up {}",
                s.max_rss_mib,
                s.idle_rss_mib,
                l.memory_limit_mib,
                l.rss_allowance_mib,
                s.rss_slope_mib_per_h
                    .map_or("-".into(), |v| format!("{v:+.1} MiB/h"))
            ),
        );
        check(
            &format!("{}: disk within max_disk_mib", s.name),
            s.max_disk_mib <= l.max_disk_mib as f64,
            format!("max {:.1} of {} MiB", s.max_disk_mib, l.max_disk_mib),
        );
        check(
            &format!("{}: no panic, still running", s.name),
            !s.panicked && s.running,
            format!("panicked: {}, running: {}", s.panicked, s.running),
        );
        check(
            &format!("{}: nothing left of peers that are gone", s.name),
            s.sessions_left == Some(0) && s.partial_uploads_left == 0,
            format!(
                "{} session(s) and {} partial upload(s) left after the timeouts; open files \
                 max {}, trend {}",
                s.sessions_left.map_or("?".into(), |v| v.to_string()),
                s.partial_uploads_left,
                s.max_open_files,
                s.open_files_slope_per_h
                    .map_or("-".into(), |v| format!("{v:+.1}/h"))
            ),
        );
    }
    SoakReport {
        model: model.to_string(),
        nodes: network.nodes.len(),
        duration_s,
        limits: opts.limits.clone(),
        abuse: opts.abuse,
        generations: results.len(),
        completed: completed.len(),
        identical,
        errors,
        p99_calm_ms,
        p99_soak_ms,
        abusers,
        series,
        checks,
    }
}
