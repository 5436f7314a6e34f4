//! A discrete-event model of Veil's pipeline at scales one machine cannot run: M nodes,
//! each holding one stage (a contiguous range of layers), with heterogeneous speed; clients
//! that relay each token's hidden state through the stages one after the other (as the
//! `veil` client does), over links with latency and bandwidth; nodes that batch the queued
//! steps of concurrent sessions into one forward pass.
//!
//! Time is in microseconds. Every random draw comes from the seed, so runs repeat exactly.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::stats::Latency;

/// How a client picks a stage's replica for a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Routing {
    /// Uniformly at random.
    Random,
    /// The replica with the fewest sessions per unit of speed (the `veil` client asks the
    /// live replicas for their active sessions and takes the least busy; it does not weigh
    /// speed yet).
    LeastLoaded,
}

/// How a token's hidden state travels between stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Relay {
    /// Each stage answers the client, which sends to the next stage (what Veil does today:
    /// two trips per stage).
    Client,
    /// Each stage forwards to the next one; the last answers the client (one trip per stage,
    /// plus one).
    Chain,
}

/// The model's parameters. Costs are per layer so that stage sizes can change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimParams {
    pub nodes: usize,
    pub layers: usize,
    pub layers_per_node: usize,
    /// Concurrent client sessions; each generates again as soon as it finishes.
    pub sessions: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Cost of one forward pass per layer, whatever the batch (reading the weights), ms.
    pub pass_ms_per_layer: f64,
    /// Extra cost per row (token position) in the pass, per layer, ms.
    pub row_ms_per_layer: f64,
    /// Fixed cost per request on a node (decode, framing, encryption of the channel), ms.
    pub hop_overhead_ms: f64,
    /// Client work per token (embedding, head, sampling), ms.
    pub client_ms: f64,
    /// Node speeds are `exp(N(0, sigma))` times the base speed.
    pub speed_sigma: f64,
    /// One-way client-node latency, drawn uniformly per pair, ms (unless `links` is set).
    pub latency_ms: (f64, f64),
    /// A known topology instead of drawn latencies (the testnet's WAN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub links: Option<Links>,
    pub bandwidth_mbit: f64,
    /// Bytes of hidden state per row (4 × d_model).
    pub row_bytes: usize,
    pub max_batch_rows: usize,
    /// 0: every node has a machine of its own. N: the nodes share one machine that runs at
    /// most N forward passes at once (the testnet's nodes on one computer); a node with work
    /// waits for a free one, first come first served.
    #[serde(default)]
    pub machine_passes: usize,
    pub routing: Routing,
    pub relay: Relay,
    /// Simulated seconds, of which the first `warmup_s` are not measured.
    pub duration_s: f64,
    pub warmup_s: f64,
    pub seed: u64,
}

/// The links of a known topology: every machine has an uplink to a common switch, so a
/// message between two of them crosses both uplinks, and one through a relay crosses the
/// relay's uplink twice more. One-way delays in ms.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Links {
    pub client_ms: f64,
    /// Per simulated node (node `i` holds stage `i % stages`).
    pub node_ms: Vec<f64>,
    /// Whether the client reaches the node only through a relay (a symmetric NAT).
    pub relayed: Vec<bool>,
    pub relay_ms: f64,
}

impl Links {
    fn node(&self, i: usize) -> (f64, bool) {
        (
            self.node_ms.get(i).copied().unwrap_or(0.0),
            self.relayed.get(i).copied().unwrap_or(false),
        )
    }

    /// One-way delay and the number of links crossed, client to node `i`.
    pub fn client_to(&self, i: usize) -> (f64, usize) {
        let (d, relayed) = self.node(i);
        if relayed {
            (self.client_ms + d + 2.0 * self.relay_ms, 4)
        } else {
            (self.client_ms + d, 2)
        }
    }

    /// One-way delay and links crossed, node `a` to node `b` (through a relay when either
    /// is behind a symmetric NAT).
    pub fn between(&self, a: usize, b: usize) -> (f64, usize) {
        let ((da, ra), (db, rb)) = (self.node(a), self.node(b));
        if ra || rb {
            (da + db + 2.0 * self.relay_ms, 4)
        } else {
            (da + db, 2)
        }
    }
}

impl Default for SimParams {
    /// SmolLM2 figures measured on this project's 2-core test machine (CPU backend).
    fn default() -> Self {
        SimParams {
            nodes: 9,
            layers: 30,
            layers_per_node: 10,
            sessions: 9,
            prompt_tokens: 32,
            gen_tokens: 64,
            pass_ms_per_layer: 0.85,
            row_ms_per_layer: 0.09,
            hop_overhead_ms: 1.6,
            client_ms: 1.5,
            speed_sigma: 0.5,
            latency_ms: (5.0, 40.0),
            links: None,
            bandwidth_mbit: 100.0,
            row_bytes: 4 * 576,
            max_batch_rows: 512,
            machine_passes: 0,
            routing: Routing::LeastLoaded,
            relay: Relay::Client,
            duration_s: 120.0,
            warmup_s: 20.0,
            seed: 1,
        }
    }
}

/// What one simulation projects.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimResult {
    pub nodes: usize,
    pub stages: usize,
    pub replicas: usize,
    pub sessions: usize,
    pub tokens: u64,
    /// Generated tokens per second over the measured window.
    pub tokens_per_s: f64,
    pub per_session_tokens_per_s: f64,
    pub per_token: Latency,
    pub time_to_first_token: Latency,
    /// Mean fraction of time the nodes compute.
    pub mean_utilisation: f64,
    pub max_utilisation: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// A session's rows reach a node.
    Arrive { node: usize, session: usize },
    /// A node finished its current batch.
    Done { node: usize },
    /// A stage's output is back at the client.
    Back { session: usize },
    /// A session starts a new generation.
    Start { session: usize },
}

struct Node {
    id: usize,
    stage: usize,
    speed: f64,
    queue: VecDeque<usize>,
    batch: Vec<usize>,
    busy_us: f64,
    /// Sessions currently routed here.
    sessions: usize,
}

struct Session {
    route: Vec<usize>,
    stage: usize,
    /// Rows of the step in flight (the prompt, then 1).
    rows: usize,
    generated: usize,
    started_us: u64,
    last_token_us: u64,
}

/// One-way time for `rows` rows from the client of `session` to `node` (or back), µs:
/// latency plus the time to put them on each link crossed.
fn client_trip_us(p: &SimParams, session: usize, node: usize, rows: usize) -> f64 {
    match &p.links {
        Some(l) => {
            let (ms, hops) = l.client_to(node);
            ms * 1e3 + hops as f64 * transfer_us(p, rows)
        }
        None => pair_latency_us(p, session, node) + transfer_us(p, rows),
    }
}

/// The same from node `a` to node `b` (stages chained).
fn node_trip_us(p: &SimParams, a: usize, b: usize, rows: usize) -> f64 {
    match &p.links {
        Some(l) => {
            let (ms, hops) = l.between(a, b);
            ms * 1e3 + hops as f64 * transfer_us(p, rows)
        }
        // node-to-node latency drawn like a client's, keyed by the pair
        None => pair_latency_us(p, usize::MAX - a, b) + transfer_us(p, rows),
    }
}

/// Time to put `rows` rows on one link, µs.
fn transfer_us(p: &SimParams, rows: usize) -> f64 {
    (rows * p.row_bytes * 8) as f64 / p.bandwidth_mbit.max(1e-6)
}

/// Deterministic one-way latency of a client-node pair, in µs.
fn pair_latency_us(p: &SimParams, session: usize, node: usize) -> f64 {
    // splitmix64 of the pair
    let mut z = (session as u64) << 32 ^ node as u64 ^ p.seed.rotate_left(17);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let u = (z >> 11) as f64 / (1u64 << 53) as f64;
    (p.latency_ms.0 + u * (p.latency_ms.1 - p.latency_ms.0)) * 1e3
}

/// Run one simulation.
pub fn simulate(p: &SimParams) -> SimResult {
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
    let lpn = p.layers_per_node.clamp(1, p.layers.max(1));
    let stages = p.layers.div_ceil(lpn);
    let n_nodes = p.nodes.max(stages);
    let normal = rand_distr::Normal::new(0.0, p.speed_sigma.max(0.0)).ok();
    let mut nodes: Vec<Node> = (0..n_nodes)
        .map(|i| Node {
            id: i,
            stage: i % stages,
            speed: normal.map_or(1.0, |n| rng.sample::<f64, _>(n).exp()),
            queue: VecDeque::new(),
            batch: Vec::new(),
            busy_us: 0.0,
            sessions: 0,
        })
        .collect();
    let by_stage: Vec<Vec<usize>> = (0..stages)
        .map(|s| (0..n_nodes).filter(|&i| nodes[i].stage == s).collect())
        .collect();
    let layers_of = |stage: usize| lpn.min(p.layers - stage * lpn);
    let mut sessions: Vec<Session> = (0..p.sessions)
        .map(|_| Session {
            route: Vec::new(),
            stage: 0,
            rows: 0,
            generated: 0,
            started_us: 0,
            last_token_us: 0,
        })
        .collect();
    let mut heap: BinaryHeap<Reverse<(u64, u64, Event)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |heap: &mut BinaryHeap<_>, t: f64, e: Event| {
        seq += 1;
        heap.push(Reverse((t.max(0.0) as u64, seq, e)));
    };
    // Sessions start spread over the first second.
    for s in 0..p.sessions {
        let t = rng.gen_range(0.0..1e6);
        push(&mut heap, t, Event::Start { session: s });
    }
    let end_us = (p.duration_s * 1e6) as u64;
    let warm_us = (p.warmup_s.min(p.duration_s * 0.9) * 1e6) as u64;
    let (mut tokens, mut gaps, mut ttft) = (0u64, Vec::new(), Vec::new());
    // nodes with queued work and no pass running, in the order they got it
    let mut waiting: VecDeque<usize> = VecDeque::new();
    while let Some(Reverse((now, _, event))) = heap.pop() {
        if now > end_us {
            break;
        }
        let t = now as f64;
        match event {
            Event::Start { session } => {
                let s = &mut sessions[session];
                for &n in &s.route {
                    nodes[n].sessions -= 1;
                }
                s.route = by_stage
                    .iter()
                    .map(|replicas| match p.routing {
                        Routing::Random => replicas[rng.gen_range(0..replicas.len())],
                        Routing::LeastLoaded => *replicas
                            .iter()
                            .min_by(|&&a, &&b| {
                                let load =
                                    |i: usize| (nodes[i].sessions + 1) as f64 / nodes[i].speed;
                                load(a).total_cmp(&load(b))
                            })
                            .unwrap_or(&replicas[0]),
                    })
                    .collect();
                for &n in &s.route {
                    nodes[n].sessions += 1;
                }
                s.stage = 0;
                s.rows = p.prompt_tokens.max(1);
                s.generated = 0;
                s.started_us = now;
                // as `veil` opens a session: per stage, one stats request to every replica
                // at once (to find the least loaded), then an open request to the one chosen
                let setup_us: f64 = by_stage
                    .iter()
                    .zip(&s.route)
                    .map(|(replicas, &chosen)| {
                        let rtt = |n: usize| 2.0 * client_trip_us(p, session, n, 0);
                        let ask = if replicas.len() > 1 {
                            replicas.iter().map(|&n| rtt(n)).fold(0.0, f64::max)
                        } else {
                            0.0
                        };
                        ask + rtt(chosen)
                    })
                    .sum();
                let first = s.route[0];
                let at =
                    t + setup_us + p.client_ms * 1e3 + client_trip_us(p, session, first, s.rows);
                push(
                    &mut heap,
                    at,
                    Event::Arrive {
                        node: first,
                        session,
                    },
                );
            }
            Event::Arrive { node, session } => {
                nodes[node].queue.push_back(session);
                if nodes[node].batch.is_empty() && !waiting.contains(&node) {
                    waiting.push_back(node);
                }
                dispatch(
                    p,
                    &mut nodes,
                    &mut waiting,
                    &sessions,
                    layers_of,
                    t,
                    &mut |t, e| push(&mut heap, t, e),
                );
            }
            Event::Done { node } => {
                let batch = std::mem::take(&mut nodes[node].batch);
                for session in batch {
                    let s = &mut sessions[session];
                    let rows = s.rows;
                    if p.relay == Relay::Chain && s.stage + 1 < stages {
                        // straight to the next stage's node
                        s.stage += 1;
                        let next = s.route[s.stage];
                        let at = t + node_trip_us(p, node, next, rows);
                        push(
                            &mut heap,
                            at,
                            Event::Arrive {
                                node: next,
                                session,
                            },
                        );
                        continue;
                    }
                    let at = t + client_trip_us(p, session, node, rows);
                    push(&mut heap, at, Event::Back { session });
                }
                if !nodes[node].queue.is_empty() {
                    waiting.push_back(node);
                }
                dispatch(
                    p,
                    &mut nodes,
                    &mut waiting,
                    &sessions,
                    layers_of,
                    t,
                    &mut |t, e| push(&mut heap, t, e),
                );
            }
            Event::Back { session } => {
                let s = &mut sessions[session];
                s.stage += 1;
                if s.stage < stages && p.relay == Relay::Client {
                    let next = s.route[s.stage];
                    let at = t + client_trip_us(p, session, next, s.rows);
                    push(
                        &mut heap,
                        at,
                        Event::Arrive {
                            node: next,
                            session,
                        },
                    );
                    continue;
                }
                // The client decodes the token.
                let token_at = t + p.client_ms * 1e3;
                let token_us = token_at as u64;
                if token_us >= warm_us && token_us <= end_us {
                    tokens += 1;
                    if s.generated == 0 {
                        ttft.push((token_us - s.started_us) as f64 / 1e6);
                    } else {
                        gaps.push((token_us - s.last_token_us) as f64 / 1e6);
                    }
                }
                s.generated += 1;
                s.last_token_us = token_us;
                if s.generated >= p.gen_tokens.max(1) {
                    push(&mut heap, token_at, Event::Start { session });
                    continue;
                }
                s.stage = 0;
                s.rows = 1;
                let first = s.route[0];
                let at = token_at + client_trip_us(p, session, first, 1);
                push(
                    &mut heap,
                    at,
                    Event::Arrive {
                        node: first,
                        session,
                    },
                );
            }
        }
    }
    let window_s = (end_us - warm_us) as f64 / 1e6;
    let utilisation: Vec<f64> = nodes.iter().map(|n| n.busy_us / end_us as f64).collect();
    SimResult {
        nodes: n_nodes,
        stages,
        replicas: n_nodes / stages,
        sessions: p.sessions,
        tokens,
        tokens_per_s: tokens as f64 / window_s,
        per_session_tokens_per_s: tokens as f64 / window_s / p.sessions.max(1) as f64,
        per_token: Latency::of_seconds(&gaps),
        time_to_first_token: Latency::of_seconds(&ttft),
        mean_utilisation: utilisation.iter().sum::<f64>() / utilisation.len().max(1) as f64,
        max_utilisation: utilisation.iter().copied().fold(0.0, f64::max),
    }
}

/// Start passes on waiting nodes, first come first served, while the machine has room.
fn dispatch(
    p: &SimParams,
    nodes: &mut [Node],
    waiting: &mut VecDeque<usize>,
    sessions: &[Session],
    layers_of: impl Fn(usize) -> usize + Copy,
    t: f64,
    push: &mut dyn FnMut(f64, Event),
) {
    while let Some(&n) = waiting.front() {
        if p.machine_passes > 0
            && nodes.iter().filter(|x| !x.batch.is_empty()).count() >= p.machine_passes
        {
            return;
        }
        waiting.pop_front();
        if nodes[n].batch.is_empty() {
            start_batch(p, &mut nodes[n], sessions, layers_of, t, push);
        }
    }
}

/// Start a forward pass on `node` over its queue (up to the row limit), if it has any.
fn start_batch(
    p: &SimParams,
    node: &mut Node,
    sessions: &[Session],
    layers_of: impl Fn(usize) -> usize,
    t: f64,
    push: &mut dyn FnMut(f64, Event),
) {
    let mut rows = 0;
    while let Some(&s) = node.queue.front() {
        let r = sessions[s].rows;
        if !node.batch.is_empty() && rows + r > p.max_batch_rows {
            break;
        }
        rows += r;
        node.batch.push(s);
        node.queue.pop_front();
    }
    if node.batch.is_empty() {
        return;
    }
    let layers = layers_of(node.stage) as f64;
    let compute_ms = layers * (p.pass_ms_per_layer + p.row_ms_per_layer * rows as f64) / node.speed
        + p.hop_overhead_ms * node.batch.len() as f64;
    node.busy_us += compute_ms * 1e3;
    push(t + compute_ms * 1e3, Event::Done { node: node.id });
}

/// Project `base` to each node count, scaling sessions with the nodes.
pub fn sweep(base: &SimParams, node_counts: &[usize], sessions_per_node: f64) -> Vec<SimResult> {
    node_counts
        .iter()
        .map(|&m| {
            simulate(&SimParams {
                nodes: m,
                sessions: ((m as f64 * sessions_per_node).round() as usize).max(1),
                ..base.clone()
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "sim_tests.rs"]
mod tests;
