//! `veil-testnet bench --byzantine K`: how verification fares against lying nodes. The same
//! prompts run at each `--verify` rate through a network whose last K nodes corrupt a
//! fraction of their answers; every output is compared with the fault-free one (the
//! deployment's own shards run in this process, which honest CPU nodes match to the bit).
//! Per rate: throughput and its cost against rate 0, how often and how fast liars were
//! caught, wrong tokens that reached the user, and accusations of honest nodes.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use veil_model::crypto::{Encrypted, EncryptedLocal};
use veil_model::{generate, Compute};

use crate::bench::greedy;
use crate::load::{prompts, LoadClient};
use crate::network::LocalNetwork;

/// What to measure.
#[derive(Debug, Clone)]
pub struct IntegrityOptions {
    /// Verification rates to compare (0 included as the baseline of cost).
    pub rates: Vec<f64>,
    /// Generations per rate, run `sessions` at a time.
    pub trials: usize,
    pub sessions: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Peer ids of the lying nodes.
    pub liars: Vec<String>,
    /// How they lie, for the report.
    pub lie: String,
    pub lie_rate: f64,
}

/// The figures of one verification rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateReport {
    pub rate: f64,
    pub generations: usize,
    pub failed: usize,
    pub tokens: usize,
    pub tokens_per_s: f64,
    /// Tokens/s over rate 0's.
    pub throughput_ratio: f64,
    /// Generations where a liar answered steps as a primary.
    pub liar_generations: usize,
    /// Of those, generations where it was caught.
    pub caught: usize,
    /// Steps a liar had answered when caught (each catch).
    pub steps_to_catch: Vec<u64>,
    /// Steps a liar answered in each generation where it was not caught (with verification
    /// on, every row is re-executed by the end, so these are generations where it happened
    /// not to lie: it lies on each answer at random).
    #[serde(default)]
    pub uncaught_steps: Vec<u64>,
    /// Steps answered by liars and by honest nodes.
    pub liar_steps: u64,
    pub honest_steps: u64,
    /// Rows of honest nodes' answers confirmed by re-execution.
    pub honest_rows_verified: u64,
    /// Honest nodes accused (must be 0).
    pub false_accusations: usize,
    /// Generated tokens that differ from the fault-free output, and generations with any.
    pub wrong_tokens: usize,
    pub wrong_generations: usize,
    /// Checks, disputes, rows of later stages recomputed after a catch.
    pub checks: u64,
    pub disputes: u64,
    pub rows_repaired: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IntegrityReport {
    pub model: String,
    pub nodes: usize,
    pub stages: usize,
    pub replicas: usize,
    pub byzantine: usize,
    pub lie: String,
    pub lie_rate: f64,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub rates: Vec<RateReport>,
}

/// The fault-free tokens of each prompt: the deployment's shards, in this process.
fn reference(network: &LocalNetwork, prompts: &[Vec<u32>], gen: usize) -> Result<Vec<Vec<u32>>> {
    let e = Encrypted::read(&network.deployment_dir()?)
        .context("cannot read the deployment's shards")?;
    let device = Compute::cpu().device;
    let mut model = EncryptedLocal::new(&e.client, &e.shards, &device, None)?;
    prompts
        .iter()
        .map(|p| {
            model.reset();
            Ok(generate(
                &mut model,
                &network.text.tokenizer,
                p,
                &greedy(gen),
                &mut |_| {},
            )?
            .tokens)
        })
        .collect()
}

/// Tokens of `got` that differ from `want` (everything after the first difference counts,
/// as does a length difference).
fn wrong_tokens(got: &[u32], want: &[u32]) -> usize {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => got.len().max(want.len()) - i,
        None => got.len().abs_diff(want.len()),
    }
}

pub fn run(
    network: &LocalNetwork,
    opts: &IntegrityOptions,
    model: &str,
) -> Result<IntegrityReport> {
    let prompts = prompts(&network.text, opts.trials, opts.prompt_tokens)?;
    tracing::info!("computing the fault-free outputs");
    let want = reference(network, &prompts, opts.gen_tokens)?;
    let mut client = LoadClient::connect(network)?;
    let is_liar = |p: &str| opts.liars.iter().any(|l| l == p);
    let mut rates = Vec::new();
    for &rate in &opts.rates {
        client.verification = veil_client::remote::Verification {
            rate,
            shards: Some(network.deployment_dir()?),
            publish: false,
        };
        let started = Instant::now();
        let mut results = Vec::new();
        for chunk in prompts.chunks(opts.sessions.max(1)) {
            let bar = indicatif::ProgressBar::hidden();
            let mut got = client.run(chunk, &greedy(opts.gen_tokens), 1, &bar);
            got.sort_by_key(|r| r.prompt);
            let base = results.len();
            results.extend(got.into_iter().map(|mut r| {
                r.prompt += base;
                r
            }));
        }
        let wall = started.elapsed().as_secs_f64();
        let mut r = RateReport {
            rate,
            generations: results.len(),
            failed: results.iter().filter(|s| s.error.is_some()).count(),
            tokens: results.iter().map(|s| s.tokens.len()).sum(),
            tokens_per_s: 0.0,
            throughput_ratio: 0.0,
            liar_generations: 0,
            caught: 0,
            steps_to_catch: Vec::new(),
            uncaught_steps: Vec::new(),
            liar_steps: 0,
            honest_steps: 0,
            honest_rows_verified: 0,
            false_accusations: 0,
            wrong_tokens: 0,
            wrong_generations: 0,
            checks: 0,
            disputes: 0,
            rows_repaired: 0,
        };
        r.tokens_per_s = r.tokens as f64 / wall.max(1e-9);
        for s in &results {
            if s.error.is_some() {
                continue;
            }
            let wrong = wrong_tokens(&s.tokens, &want[s.prompt]);
            r.wrong_tokens += wrong;
            r.wrong_generations += usize::from(wrong > 0);
            let a = &s.audit;
            r.checks += u64::from(a.checks);
            r.disputes += u64::from(a.disputes);
            r.rows_repaired += a.rows_repaired;
            let mut liar_here = false;
            let mut liar_answered = 0;
            for (peer, n) in &a.answered {
                if is_liar(peer) {
                    r.liar_steps += n;
                    liar_answered += n;
                    liar_here = true;
                } else {
                    r.honest_steps += n;
                }
            }
            for (peer, n) in &a.verified {
                if !is_liar(peer) {
                    r.honest_rows_verified += n;
                }
            }
            let mut caught_here = false;
            for d in &a.detections {
                if is_liar(&d.peer) {
                    caught_here = true;
                    r.steps_to_catch.push(d.steps_answered);
                } else {
                    r.false_accusations += 1;
                }
            }
            // a liar caught as a verifier did not answer as a primary
            r.liar_generations += usize::from(liar_here || caught_here);
            r.caught += usize::from(caught_here);
            if liar_here && !caught_here {
                r.uncaught_steps.push(liar_answered);
            }
        }
        tracing::info!(
            "verify {rate}: {:.1} tokens/s, liars caught in {}/{} generations, {} wrong \
             tokens delivered, {} false accusations",
            r.tokens_per_s,
            r.caught,
            r.liar_generations,
            r.wrong_tokens,
            r.false_accusations
        );
        rates.push(r);
    }
    let base = rates
        .iter()
        .find(|r| r.rate == 0.0)
        .map(|r| r.tokens_per_s)
        .unwrap_or(0.0);
    for r in &mut rates {
        r.throughput_ratio = if base > 0.0 {
            r.tokens_per_s / base
        } else {
            0.0
        };
    }
    Ok(IntegrityReport {
        model: model.to_string(),
        nodes: network.nodes.len(),
        stages: network.stages,
        replicas: network.min_replicas(),
        byzantine: opts.liars.len(),
        lie: opts.lie.clone(),
        lie_rate: opts.lie_rate,
        prompt_tokens: opts.prompt_tokens,
        gen_tokens: opts.gen_tokens,
        rates,
    })
}

/// The report as Markdown.
pub fn markdown(r: &IntegrityReport) -> String {
    let liars = if r.byzantine == 0 {
        "none lying: the cost of checking alone".to_string()
    } else {
        format!(
            "{} lying: {} on {:.0}% of their answers",
            r.byzantine,
            r.lie,
            r.lie_rate * 100.0
        )
    };
    let mut out = format!(
        "# Verification against lying nodes\n\n{} nodes ({liars}), {} stages × {} replicas, \
         model {}, {} prompt + {} generated tokens per generation.\n\n| --verify | tokens/s | vs 0 | liar generations caught | steps to catch \
         (median, max) | wrong tokens delivered | honest steps (rows verified) | false \
         accusations |\n|---|---|---|---|---|---|---|---|\n",
        r.nodes,
        r.stages,
        r.replicas,
        r.model,
        r.prompt_tokens,
        r.gen_tokens
    );
    for x in &r.rates {
        let mut steps = x.steps_to_catch.clone();
        steps.sort_unstable();
        let median = steps.get(steps.len() / 2).copied();
        let max = steps.last().copied();
        let per_steps = match (median, max) {
            (Some(m), Some(x)) => format!("{m}, {x}"),
            _ => "–".into(),
        };
        out.push_str(&format!(
            "| {} | {:.1} | {:.2} | {}/{} | {} | {} of {} | {} ({}) | {} |\n",
            x.rate,
            x.tokens_per_s,
            x.throughput_ratio,
            x.caught,
            x.liar_generations,
            per_steps,
            x.wrong_tokens,
            x.tokens,
            x.honest_steps,
            x.honest_rows_verified,
            x.false_accusations
        ));
    }
    for x in r
        .rates
        .iter()
        .filter(|x| x.rate > 0.0 && !x.uncaught_steps.is_empty())
    {
        out.push_str(&format!(
            "\nAt {}, steps the liar answered in the generations where it was not caught: \
             {:?} (it lies on each answer at random: in so few it may not have lied)\n",
            x.rate, x.uncaught_steps
        ));
    }
    let mut by_rate: BTreeMap<String, usize> = BTreeMap::new();
    for x in &r.rates {
        by_rate.insert(format!("{}", x.rate), x.failed);
    }
    if by_rate.values().any(|f| *f > 0) {
        out.push_str(&format!("\nFailed generations by rate: {by_rate:?}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_tokens_count_from_the_first_difference() {
        assert_eq!(wrong_tokens(&[1, 2, 3], &[1, 2, 3]), 0);
        assert_eq!(wrong_tokens(&[1, 9, 3], &[1, 2, 3]), 2);
        assert_eq!(wrong_tokens(&[1, 2], &[1, 2, 3]), 1);
        assert_eq!(wrong_tokens(&[], &[1, 2]), 2);
    }
}
