//! `veil-testnet bench`: concurrent generations through the encrypted network at rising
//! session counts, and in the same run the single-process plaintext and encrypted baselines
//! on the same prompts.

use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use veil_client::model_spec::ModelSpec;
use veil_model::crypto::{Encrypted, EncryptedLocal};
use veil_model::{
    generate, Compute, GenerateParams, LocalModel, Precision, SamplingParams, TokenModel,
};
use veil_protocol::wire::NodeStats;

use crate::load::{prompts, LoadClient, Metered, SessionResult};
use crate::network::LocalNetwork;
use crate::sim::SimParams;
use crate::stats::Latency;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The largest number of concurrent sessions; the bench also runs 1, 2, 4, … below it.
    pub sessions: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Skip the single-process baselines.
    pub no_baselines: bool,
    /// Measure every level again through a `veil serve` gateway.
    pub gateway: bool,
}

/// The session counts measured for a maximum of `max`: powers of two below it, then `max`.
pub fn levels(max: usize) -> Vec<usize> {
    let mut v: Vec<usize> = std::iter::successors(Some(1usize), |x| x.checked_mul(2))
        .take_while(|&x| x < max)
        .collect();
    v.push(max.max(1));
    v
}

/// One node's work during a level.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeLoad {
    pub node: String,
    pub busy_ms: u64,
    /// Busy time over the level's wall time.
    pub busy_fraction: f64,
    pub steps: u64,
    pub batches: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// The figures of one session count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Level {
    pub sessions: usize,
    pub completed: usize,
    pub failed: usize,
    pub wall_s: f64,
    pub tokens: usize,
    /// Generated tokens of all sessions over the wall time.
    pub tokens_per_s: f64,
    pub time_to_first_token: Latency,
    /// Time between consecutive tokens of a session.
    pub per_token: Latency,
    /// Client-side traffic (both directions) per generated token.
    pub bytes_per_token: f64,
    pub nodes: Vec<NodeLoad>,
    /// Every per-token latency in milliseconds (for charts).
    pub per_token_ms: Vec<f64>,
}

/// A single-process run of the same prompts, one after the other.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Baseline {
    pub name: String,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub time_to_first_token: Latency,
    pub per_token: Latency,
}

/// Everything a bench measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub model: String,
    pub layers: usize,
    pub d_model: usize,
    pub nodes: usize,
    pub stages: usize,
    pub replicas: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub cpus: usize,
    pub deploy_s: f64,
    pub levels: Vec<Level>,
    pub baselines: Vec<Baseline>,
    /// The same levels through the OpenAI-compatible gateway (`--gateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<crate::gateway_bench::GatewayReport>,
    /// The WAN the network ran on (`--topology wan`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wan: Option<crate::calibrate::WanReport>,
    /// The same network and levels simulated (needs the baselines), and the parameters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub simulated: Vec<crate::calibrate::Simulated>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sim_params: Option<SimParams>,
}

impl BenchReport {
    pub fn baseline(&self, name: &str) -> Option<&Baseline> {
        self.baselines.iter().find(|b| b.name == name)
    }

    /// Simulation parameters measured by this bench: the per-layer cost of a forward pass
    /// and of each extra row from the plaintext baseline (decode gap and prompt time), and
    /// the network's cost per stage hop from one session's per-token latency over the
    /// encrypted baseline's.
    pub fn sim_params(&self, base: &SimParams) -> SimParams {
        let mut p = base.clone();
        p.layers = self.layers;
        p.row_bytes = 4 * self.d_model;
        let layers = self.layers.max(1) as f64;
        if let Some(b) = self.baseline("plaintext, 1 process") {
            let decode = b.per_token.p50_ms;
            if decode > 0.0 {
                p.pass_ms_per_layer = decode / layers;
            }
            if self.prompt_tokens > 1 && b.time_to_first_token.p50_ms > decode {
                p.row_ms_per_layer = (b.time_to_first_token.p50_ms - decode)
                    / (self.prompt_tokens - 1) as f64
                    / layers;
            }
        }
        if let (Some(one), Some(e)) = (self.levels.first(), self.baseline("encrypted, 1 process")) {
            let extra = one.per_token.p50_ms - e.per_token.p50_ms;
            p.hop_overhead_ms = (extra / self.stages.max(1) as f64).max(0.0);
        }
        p
    }
}

pub fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: SamplingParams::default(),
        top_logits: 0,
    }
}

/// Per-token latencies (gaps between consecutive tokens) and times to first token.
pub fn latencies(results: &[SessionResult]) -> (Vec<f64>, Vec<f64>) {
    let mut gaps = Vec::new();
    let mut ttft = Vec::new();
    for r in results.iter().filter(|r| r.error.is_none()) {
        if let Some(&first) = r.token_times_s.first() {
            ttft.push(first);
        }
        gaps.extend(r.token_times_s.windows(2).map(|w| w[1] - w[0]));
    }
    (gaps, ttft)
}

fn node_loads(
    network: &LocalNetwork,
    before: &[Option<NodeStats>],
    after: &[Option<NodeStats>],
    wall_s: f64,
) -> Vec<NodeLoad> {
    network
        .nodes
        .iter()
        .zip(before.iter().zip(after))
        .map(|(n, (b, a))| {
            let (b, a) = (b.unwrap_or_default(), a.unwrap_or_default());
            let busy_ms = a.busy_ms.saturating_sub(b.busy_ms);
            NodeLoad {
                node: n.name.clone(),
                busy_ms,
                busy_fraction: busy_ms as f64 / 1e3 / wall_s.max(1e-9),
                steps: a.steps.saturating_sub(b.steps),
                batches: a.batches.saturating_sub(b.batches),
                bytes_sent: a.bytes_sent.saturating_sub(b.bytes_sent),
                bytes_received: a.bytes_received.saturating_sub(b.bytes_received),
            }
        })
        .collect()
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} tokens {per_sec}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// Run `sessions` generations at once and summarise them.
pub fn measure_level(
    network: &LocalNetwork,
    client: &LoadClient,
    prompts: &[Vec<u32>],
    gen_tokens: usize,
) -> Level {
    let sessions = prompts.len();
    let progress = bar(
        (sessions * gen_tokens) as u64,
        &format!("{sessions} session(s)"),
    );
    let before = client.node_stats(network);
    let start = Instant::now();
    let results = client.run(prompts, &greedy(gen_tokens), 1, &progress);
    let wall_s = start.elapsed().as_secs_f64();
    progress.finish_and_clear();
    let after = client.node_stats(network);
    summarise(network, &results, wall_s, &before, &after)
}

fn summarise(
    network: &LocalNetwork,
    results: &[SessionResult],
    wall_s: f64,
    before: &[Option<NodeStats>],
    after: &[Option<NodeStats>],
) -> Level {
    let ok: Vec<&SessionResult> = results.iter().filter(|r| r.error.is_none()).collect();
    for r in results.iter().filter_map(|r| r.error.as_ref()) {
        tracing::warn!("a generation failed: {r}");
    }
    let tokens: usize = ok.iter().map(|r| r.tokens.len()).sum();
    let bytes: u64 = ok.iter().map(|r| r.bytes_sent + r.bytes_received).sum();
    let (gaps, ttft) = latencies(results);
    Level {
        sessions: results.len(),
        completed: ok.len(),
        failed: results.len() - ok.len(),
        wall_s,
        tokens,
        tokens_per_s: tokens as f64 / wall_s.max(1e-9),
        time_to_first_token: Latency::of_seconds(&ttft),
        per_token: Latency::of_seconds(&gaps),
        bytes_per_token: bytes as f64 / tokens.max(1) as f64,
        nodes: node_loads(network, before, after, wall_s),
        per_token_ms: gaps.iter().map(|s| s * 1e3).collect(),
    }
}

/// A model whose KV cache can be emptied for the next prompt.
trait Restart: TokenModel {
    fn restart(&mut self);
}

impl Restart for LocalModel {
    fn restart(&mut self) {
        self.reset();
    }
}

impl Restart for EncryptedLocal {
    fn restart(&mut self) {
        self.reset();
    }
}

/// Generate from every prompt, one after the other, in this process.
fn baseline<M: Restart>(
    name: &str,
    model: &mut M,
    network: &LocalNetwork,
    prompts: &[Vec<u32>],
    gen_tokens: usize,
) -> Result<Baseline> {
    let progress = bar((prompts.len() * gen_tokens) as u64, name);
    let mut busy = 0.0;
    let mut results = Vec::new();
    for prompt in prompts {
        model.restart();
        let start = Instant::now();
        let g = {
            let mut metered = Metered {
                inner: model,
                bar: progress.clone(),
            };
            generate(
                &mut metered,
                &network.text.tokenizer,
                prompt,
                &greedy(gen_tokens),
                &mut |_| {},
            )
            .with_context(|| format!("{name} baseline"))?
        };
        busy += start.elapsed().as_secs_f64();
        results.push(g);
    }
    progress.finish_and_clear();
    let tokens: usize = results.iter().map(|g| g.tokens.len()).sum();
    let ttft: Vec<f64> = results
        .iter()
        .filter_map(|g| g.token_times_s.first().copied())
        .collect();
    let gaps: Vec<f64> = results
        .iter()
        .flat_map(|g| g.token_times_s.windows(2).map(|w| w[1] - w[0]))
        .collect();
    Ok(Baseline {
        name: name.to_string(),
        tokens,
        tokens_per_s: tokens as f64 / busy.max(1e-9),
        time_to_first_token: Latency::of_seconds(&ttft),
        per_token: Latency::of_seconds(&gaps),
    })
}

/// The plaintext model and the deployment's own encrypted shards, run in this process on
/// the CPU backend (what the nodes run).
pub fn baselines(
    network: &LocalNetwork,
    prompts: &[Vec<u32>],
    gen_tokens: usize,
) -> Result<Vec<Baseline>> {
    let device = Compute::cpu().device;
    let model = match &network.model_path {
        Some(p) => ModelSpec::Path(p.clone()),
        None => ModelSpec::Tiny,
    };
    // the plaintext model as `veil generate --local` runs it on the CPU: the GGUF's blocks
    let bundle = model.load_quantized()?;
    let mut plain = LocalModel::quantized(&bundle.weights, &device, None, Precision::Fast)?;
    let plaintext = baseline(
        "plaintext, 1 process",
        &mut plain,
        network,
        prompts,
        gen_tokens,
    );
    drop(plain);
    let encrypted = Encrypted::read(&network.deployment_dir()?)
        .context("cannot read the deployment's shards")?;
    let mut enc = EncryptedLocal::new(&encrypted.client, &encrypted.shards, &device, None)?;
    let encrypted = baseline(
        "encrypted, 1 process",
        &mut enc,
        network,
        prompts,
        gen_tokens,
    );
    Ok(vec![plaintext?, encrypted?])
}

/// Untimed generations until every replica of every stage has served one: nodes load
/// their shards on first use, which is not what the bench measures.
pub fn warm_up(network: &LocalNetwork, client: &LoadClient, prompt: &[u32]) -> Result<()> {
    tracing::info!("warming up every replica");
    let mut unseen: std::collections::HashSet<(usize, String)> = network
        .deployment
        .stages
        .iter()
        .flat_map(|s| s.replicas.iter().map(move |r| (s.stage, r.peer.clone())))
        .collect();
    for _ in 0..50 {
        if unseen.is_empty() {
            return Ok(());
        }
        let batch = vec![prompt.to_vec(); 4];
        for r in client.run(&batch, &greedy(2), 1, &ProgressBar::hidden()) {
            if let Some(e) = &r.error {
                anyhow::bail!("the network cannot generate: {e}");
            }
            for (stage, peer) in r.route.into_iter().enumerate() {
                unseen.remove(&(stage, peer));
            }
        }
    }
    tracing::warn!(
        "{} replica(s) never served during the warm-up",
        unseen.len()
    );
    Ok(())
}

/// Run the whole bench on a started network.
pub fn run(network: &LocalNetwork, opts: &BenchOptions, model: &str) -> Result<BenchReport> {
    let prompts = prompts(&network.text, opts.sessions, opts.prompt_tokens)?;
    let client = LoadClient::connect(network)?;
    warm_up(network, &client, &prompts[0])?;
    let mut levels_done = Vec::new();
    for n in levels(opts.sessions) {
        let level = measure_level(network, &client, &prompts[..n], opts.gen_tokens);
        tracing::info!(
            "{n} session(s): {:.1} tokens/s, per-token p50 {:.1} ms",
            level.tokens_per_s,
            level.per_token.p50_ms
        );
        levels_done.push(level);
    }
    let connections = client.reach();
    drop(client);
    let gateway = if opts.gateway {
        Some(crate::gateway_bench::measure(
            network,
            &prompts,
            opts.gen_tokens,
            &levels_done,
        )?)
    } else {
        None
    };
    let baselines = if opts.no_baselines {
        Vec::new()
    } else {
        baselines(network, &prompts, opts.gen_tokens)?
    };
    let config = &network.bundle.meta.config;
    let mut report = BenchReport {
        model: model.to_string(),
        layers: config.n_layers,
        d_model: config.d_model,
        nodes: network.nodes.len(),
        stages: network.stages,
        replicas: network.min_replicas(),
        prompt_tokens: opts.prompt_tokens,
        gen_tokens: opts.gen_tokens,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        deploy_s: network.deploy_s,
        levels: levels_done,
        baselines,
        gateway,
        wan: crate::calibrate::wan_report(network, connections),
        simulated: Vec::new(),
        sim_params: None,
    };
    if report.baseline("plaintext, 1 process").is_some() {
        let params = crate::calibrate::sim_params(&report, network);
        report.simulated = crate::calibrate::compare(&report, &params);
        report.sim_params = Some(params);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_double_up_to_the_maximum() {
        assert_eq!(levels(1), vec![1]);
        assert_eq!(levels(4), vec![1, 2, 4]);
        assert_eq!(levels(6), vec![1, 2, 4, 6]);
        assert_eq!(levels(0), vec![1]);
    }

    #[test]
    fn latencies_are_gaps_between_tokens_of_completed_sessions() {
        let r = |times: Vec<f64>, error: Option<String>| SessionResult {
            prompt: 0,
            start_s: 0.0,
            end_s: 1.0,
            tokens: vec![1; times.len()],
            token_times_s: times,
            route: vec![],
            bytes_sent: 0,
            bytes_received: 0,
            failovers: 0,
            audit: Default::default(),
            error,
        };
        let (gaps, ttft) = latencies(&[
            r(vec![0.5, 0.6, 0.8], None),
            r(vec![9.0, 10.0], Some("failed".into())),
        ]);
        assert_eq!(ttft, vec![0.5]);
        assert_eq!(gaps.len(), 2);
        assert!((gaps[0] - 0.1).abs() < 1e-12 && (gaps[1] - 0.2).abs() < 1e-12);
    }
}
