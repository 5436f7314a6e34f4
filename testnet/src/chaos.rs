//! `veil-testnet chaos`: generations run while random nodes are killed (SIGKILL) and
//! restarted; every completed output is compared with its fault-free output.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::bench::greedy;
use crate::cluster::NodeProcess;
use crate::load::{prompts, LoadClient, SessionResult};
use crate::network::LocalNetwork;

#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub sessions: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Generations each session runs one after the other, at least: more rounds follow
    /// until one kill and its restart fall inside the run (a fast machine finishes the
    /// first rounds before the first kill), for at most `kill_every + down + 120` s.
    pub rounds: usize,
    /// Seconds between kills.
    pub kill_every: f64,
    /// Seconds a killed node stays down before it is restarted.
    pub down: f64,
    pub seed: u64,
    /// Which nodes may be killed.
    pub victims: Victims,
}

/// Which nodes chaos kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Victims {
    /// Any node.
    #[default]
    All,
    /// Only nodes that hold stages.
    Serving,
    /// Only nodes that hold no stage: on the WAN, the public nodes that bootstrap and relay
    /// (a relay going away must not lose a session).
    Relays,
}

/// A node kill during the run.
#[derive(Debug, Clone, Serialize)]
pub struct Kill {
    pub at_s: f64,
    pub node: String,
    /// Seconds until it listened again (`None`: the restart failed).
    pub restarted_after_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub nodes: usize,
    pub replicas: usize,
    pub kills: Vec<Kill>,
    pub generations: usize,
    pub completed: usize,
    pub failed: usize,
    /// Completed generations whose tokens equal the fault-free run's.
    pub identical: usize,
    pub failovers: u32,
    pub errors: Vec<String>,
    pub wall_s: f64,
}

impl ChaosReport {
    /// Every completed generation matched, and at least one node was killed.
    pub fn passed(&self) -> bool {
        self.identical == self.completed && !self.kills.is_empty()
    }

    pub fn summary(&self) -> String {
        format!(
            "chaos: {} kill(s) in {:.0} s on {} nodes ({} replicas per stage); {} generations: \
             {} completed, {} failed; {} of {} completed outputs identical to the fault-free \
             run; {} failover(s)",
            self.kills.len(),
            self.wall_s,
            self.nodes,
            self.replicas,
            self.generations,
            self.completed,
            self.failed,
            self.identical,
            self.completed,
            self.failovers
        )
    }
}

/// Sleep up to `d`, waking early when `stop` is set; returns whether it was set.
fn nap(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.load(Ordering::Relaxed)
}

/// Kill a random running node every `every`, restart it after `down`, until `stop`;
/// `done` counts the kills whose restart was attempted.
#[allow(clippy::too_many_arguments)]
fn killer(
    nodes: &mut [NodeProcess],
    victims: &[usize],
    every: Duration,
    down: Duration,
    seed: u64,
    stop: &AtomicBool,
    done: &AtomicUsize,
    start: Instant,
) -> Vec<Kill> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut kills = Vec::new();
    while !nap(every, stop) {
        let i = victims[rng.gen_range(0..victims.len())];
        let at_s = start.elapsed().as_secs_f64();
        tracing::info!("chaos: killing {}", nodes[i].name);
        nodes[i].kill();
        nap(down, stop);
        let others: Vec<String> = nodes
            .iter()
            .enumerate()
            .filter(|(k, _)| *k != i)
            .filter_map(|(_, n)| n.addr.clone())
            .collect();
        let t = Instant::now();
        let restarted_after_s = match nodes[i].start(&others) {
            Ok(()) => Some(down.as_secs_f64() + t.elapsed().as_secs_f64()),
            Err(e) => {
                tracing::warn!("chaos: cannot restart {}: {e:#}", nodes[i].name);
                None
            }
        };
        kills.push(Kill {
            at_s,
            node: nodes[i].name.clone(),
            restarted_after_s,
        });
        done.fetch_add(1, Ordering::Relaxed);
    }
    kills
}

/// Run the fault-free reference, then the same generations under kills.
pub fn run(network: &mut LocalNetwork, opts: &ChaosOptions) -> Result<ChaosReport> {
    if opts.kill_every <= 0.0 || opts.down < 0.0 {
        bail!("--kill-every must be positive and --down not negative");
    }
    let victims: Vec<usize> = network
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| match opts.victims {
            Victims::All => true,
            Victims::Serving => network.serving.contains(&n.peer_id),
            Victims::Relays => !network.serving.contains(&n.peer_id),
        })
        .map(|(i, _)| i)
        .collect();
    if victims.is_empty() {
        bail!(
            "no node to kill: --victims {:?} matches none of the {} nodes (only the WAN \
             topology has nodes that relay and hold no stage)",
            opts.victims,
            network.nodes.len()
        );
    }
    let prompts = prompts(&network.text, opts.sessions, opts.prompt_tokens)?;
    let client = LoadClient::connect(network)?;
    let params = greedy(opts.gen_tokens);
    crate::bench::warm_up(network, &client, &prompts[0])?;
    tracing::info!("fault-free reference run");
    let reference = client.run(&prompts, &params, 1, &ProgressBar::hidden());
    if let Some(e) = reference.iter().find_map(|r| r.error.as_ref()) {
        bail!("the fault-free run failed: {e}");
    }
    let bar = ProgressBar::new((opts.sessions * opts.rounds * opts.gen_tokens) as u64);
    bar.set_message("generating under chaos");
    let stop = AtomicBool::new(false);
    let done = AtomicUsize::new(0);
    let start = Instant::now();
    let (every, down) = (
        Duration::from_secs_f64(opts.kill_every),
        Duration::from_secs_f64(opts.down),
    );
    let deadline = every + down + Duration::from_secs(120);
    let nodes = &mut network.nodes;
    let (results, kills) = std::thread::scope(|scope| {
        let k =
            scope.spawn(|| killer(nodes, &victims, every, down, opts.seed, &stop, &done, start));
        let mut results = client.run(&prompts, &params, opts.rounds.max(1), &bar);
        while done.load(Ordering::Relaxed) == 0 && start.elapsed() < deadline {
            tracing::info!("no kill has completed yet: one more round");
            bar.inc_length((opts.sessions * opts.gen_tokens) as u64);
            results.extend(client.run(&prompts, &params, 1, &bar));
        }
        stop.store(true, Ordering::Relaxed);
        (results, k.join().unwrap_or_default())
    });
    bar.finish_and_clear();
    let wall_s = start.elapsed().as_secs_f64();
    // Nodes whose restart failed get one more chance, so the network is whole again.
    let addrs: Vec<String> = network
        .nodes
        .iter()
        .filter_map(|n| n.addr.clone())
        .collect();
    for n in network.nodes.iter_mut() {
        if n.is_running() {
            continue;
        }
        if let Err(e) = n.start(&addrs) {
            tracing::warn!("{} stays down: {e:#}", n.name);
        }
    }
    Ok(compare(network, &reference, &results, kills, wall_s))
}

fn compare(
    network: &LocalNetwork,
    reference: &[SessionResult],
    results: &[SessionResult],
    kills: Vec<Kill>,
    wall_s: f64,
) -> ChaosReport {
    let done: Vec<&SessionResult> = results.iter().filter(|r| r.error.is_none()).collect();
    let identical = done
        .iter()
        .filter(|r| {
            reference
                .iter()
                .find(|f| f.prompt == r.prompt)
                .is_some_and(|f| f.tokens == r.tokens)
        })
        .count();
    ChaosReport {
        nodes: network.nodes.len(),
        replicas: network.min_replicas(),
        kills,
        generations: results.len(),
        completed: done.len(),
        failed: results.len() - done.len(),
        identical,
        failovers: results.iter().map(|r| r.failovers).sum(),
        errors: results.iter().filter_map(|r| r.error.clone()).collect(),
        wall_s,
    }
}
