//! `veil bench --local`: prompt and decode throughput and peak memory per backend. Each
//! backend runs in a child process so that its peak memory is its own.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use veil_model::crypto::{ClientLayers, EncryptedLocal, ShardQuant};
use veil_model::masked::{MaskedStats, MaskedTotals, Privacy, Traffic};
use veil_model::{BackendKind, LocalModel, TokenModel};

use crate::encrypt::encrypt_with_progress;

use crate::generate::compute_for;
use crate::model_spec::ModelSpec;

const TEXT: &str = "Veil runs language models on machines it does not trust. Each node holds \
an encrypted slice of the layers and never sees a token, an activation or a logit in the clear. \
The client embeds the prompt, rotates it with a secret key and sends it through the pipeline. ";

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Benchmark the model in this process (no network).
    #[arg(long)]
    pub local: bool,
    /// Also run the encrypted pipeline (3 stages, fresh key) on the same prompts and backend,
    /// alternating with the plaintext runs, and report the ratio.
    #[arg(long)]
    pub encrypted: bool,
    /// Model: smollm2, gemma3 (plaintext only), tiny, or a .gguf path.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Backends to measure (default: every backend that runs here).
    #[arg(long, value_delimiter = ',')]
    pub backend: Vec<String>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens to decode after the prompt.
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Timed runs per backend (the median is reported), after one warm-up run.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// f32 activations on the CPU (see `veil generate --exact`).
    #[arg(long)]
    pub exact: bool,
    /// With --encrypted: the shards' weight format, q8_0 (default), q4_0, q4_k or f32 (the
    /// exact one; see `veil encrypt --help`).
    #[arg(long, default_value = "q8_0", value_name = "FORMAT")]
    pub quant: ShardQuant,
    #[arg(long, value_name = "FILE|none", help = crate::encrypt::CALIBRATION_HELP)]
    pub calibration: Option<String>,
    /// With --encrypted: layers the client runs itself before the first stage (the
    /// mitigation in SECURITY.md). The report then shows what the client's own work costs
    /// per decoded token and the memory it holds, to compare with 0.
    #[arg(long, default_value_t = 0, requires = "encrypted")]
    pub client_layers: usize,
    /// With --encrypted: layers the client runs itself after the last stage.
    #[arg(long, default_value_t = 0, requires = "encrypted")]
    pub client_last_layers: usize,
    /// `masked`: also run the model in masked mode (both parties in this process; see
    /// `veil generate --help`) alternating with the plaintext runs, and report the ratio,
    /// where the time goes per decoded token, and the traffic a network would carry.
    #[arg(
        long,
        default_value = "rotated",
        value_name = "MODE",
        conflicts_with = "encrypted"
    )]
    pub privacy: Privacy,
}

#[derive(Args, Debug)]
pub struct ChildArgs {
    #[arg(long)]
    model: String,
    #[arg(long)]
    backend: String,
    #[arg(long)]
    prompt_tokens: usize,
    #[arg(long)]
    gen_tokens: usize,
    #[arg(long)]
    runs: usize,
    #[arg(long)]
    encrypted: bool,
    #[arg(long)]
    exact: bool,
    #[arg(long, default_value = "q8_0")]
    quant: ShardQuant,
    #[arg(long)]
    calibration: Option<String>,
    #[arg(long, default_value_t = 0)]
    client_layers: usize,
    #[arg(long, default_value_t = 0)]
    client_last_layers: usize,
    #[arg(long, default_value = "rotated")]
    privacy: Privacy,
}

/// One backend's figures.
#[derive(Debug, Serialize, Deserialize)]
pub struct BenchResult {
    pub backend: String,
    pub adapter: String,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub load_s: f64,
    pub prompt_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub peak_rss_mib: f64,
    /// With --encrypted: the encrypted pipeline's figures and encrypted/plaintext ratios.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<EncryptedFigures>,
    /// With --privacy masked: masked mode's figures and masked/plaintext ratios.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked: Option<MaskedFigures>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MaskedFigures {
    pub prompt_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub prompt_ratio: f64,
    pub decode_ratio: f64,
    /// Per decoded token, in milliseconds: drawing the masks, the products of the compute
    /// nodes and the mask providers (in one pass here), and the client's quantizing,
    /// masking, unmasking and checks (its norms, attention and head come on top).
    pub masks_ms_per_token: f64,
    pub products_ms_per_token: f64,
    pub client_ms_per_token: f64,
    /// Products that failed their check (0 unless something is broken).
    pub check_failures: u64,
    /// What a network would carry per decoded token.
    pub traffic: Traffic,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EncryptedFigures {
    pub prompt_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub prompt_ratio: f64,
    pub decode_ratio: f64,
    /// Layers the client ran itself before the first stage.
    pub client_layers: usize,
    /// Layers the client ran itself after the last stage.
    #[serde(default)]
    pub client_last_layers: usize,
    /// The client's own work per decoded token (embedding or client layers, rotation,
    /// head), in milliseconds: on a network, each token waits for it.
    pub client_ms_per_token: f64,
    /// Bytes of model the client holds (tables, client layers, key), in MiB.
    pub client_mib: f64,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !args.local {
        bail!("only local benchmarks exist in this build; use --local");
    }
    if args.prompt_tokens == 0 || args.gen_tokens == 0 || args.runs == 0 {
        bail!("--prompt-tokens, --gen-tokens and --runs must be at least 1");
    }
    // Resolve (and fetch) the model once, before the children start.
    let spec = ModelSpec::parse(&args.model)?;
    if args.client_layers + args.client_last_layers > 0 {
        let n_layers = spec.load_quantized()?.weights.config.n_layers;
        check_client_layers(args.client_layers + args.client_last_layers, n_layers)?;
    }
    let model_arg = match spec.path()? {
        Some(p) => p.display().to_string(),
        None => "tiny".to_string(),
    };
    let masked = args.privacy == Privacy::Masked;
    let backends: Vec<BackendKind> = if masked && args.backend.is_empty() {
        vec![BackendKind::Cpu]
    } else if args.backend.is_empty() {
        // every backend this build has
        BackendKind::ALL
            .into_iter()
            .filter(|b| *b != BackendKind::Wgpu || veil_model::Compute::WGPU_BUILT)
            .collect()
    } else {
        args.backend
            .iter()
            .map(|b| b.parse::<BackendKind>())
            .collect::<Result<_, _>>()?
    };
    if masked && backends.iter().any(|b| *b != BackendKind::Cpu) {
        bail!("masked mode runs on the CPU backend only (its products are exact integer kernels)");
    }
    let exe = std::env::current_exe().context("cannot find the veil executable")?;
    let mut results = Vec::new();
    for backend in backends {
        tracing::info!("benchmarking the {backend} backend");
        let out = Command::new(&exe)
            .arg("bench-child")
            .args(["--model", &model_arg, "--backend", backend.as_str()])
            .args(["--prompt-tokens", &args.prompt_tokens.to_string()])
            .args(["--gen-tokens", &args.gen_tokens.to_string()])
            .args(["--runs", &args.runs.to_string()])
            .args(args.encrypted.then_some("--encrypted"))
            .args(args.exact.then_some("--exact"))
            .args(["--quant", args.quant.as_str()])
            .args(["--client-layers", &args.client_layers.to_string()])
            .args(["--client-last-layers", &args.client_last_layers.to_string()])
            .args(["--privacy", args.privacy.name()])
            .args(
                args.calibration
                    .as_deref()
                    .map(|c| ["--calibration", c])
                    .into_iter()
                    .flatten(),
            )
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("cannot start the benchmark process")?;
        if !out.status.success() {
            tracing::warn!("the {backend} backend does not run here; skipped");
            continue;
        }
        let r: BenchResult = serde_json::from_slice(&out.stdout)
            .context("the benchmark process printed no result")?;
        results.push(r);
    }
    if results.is_empty() {
        bail!("no backend could run the benchmark");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(());
    }
    println!(
        "{:<7} {:>13} {:>13} {:>13} {:>8}  adapter",
        "backend", "prompt tok/s", "decode tok/s", "peak RSS MiB", "load s"
    );
    for r in &results {
        println!(
            "{:<7} {:>13.1} {:>13.1} {:>13.0} {:>8.2}  {}",
            r.backend,
            r.prompt_tokens_per_s,
            r.decode_tokens_per_s,
            r.peak_rss_mib,
            r.load_s,
            r.adapter
        );
    }
    for r in &results {
        if let Some(m) = &r.masked {
            println!(
                "{:<7} {:>13.1} {:>13.1}  masked; ratio to plaintext: prompt {:.3}, decode {:.3}",
                r.backend,
                m.prompt_tokens_per_s,
                m.decode_tokens_per_s,
                m.prompt_ratio,
                m.decode_ratio
            );
            println!(
                "{:<7} per decoded token: masks {:.2} ms, products (nodes and mask providers) {:.2} ms, client {:.2} ms; \
                 {} round trips, {:.1} KiB to the nodes, {:.1} KiB back from each party; {} failed checks",
                r.backend,
                m.masks_ms_per_token,
                m.products_ms_per_token,
                m.client_ms_per_token,
                m.traffic.round_trips,
                m.traffic.bytes_to_nodes as f64 / 1024.0,
                m.traffic.bytes_from_nodes as f64 / 1024.0,
                m.check_failures
            );
        }
        if let Some(e) = &r.encrypted {
            println!(
                "{:<7} {:>13.1} {:>13.1}  encrypted; ratio to plaintext: prompt {:.3}, decode {:.3}",
                r.backend, e.prompt_tokens_per_s, e.decode_tokens_per_s, e.prompt_ratio, e.decode_ratio
            );
            println!(
                "{:<7} client ({} client layer(s) first, {} last): {:.2} ms per decoded token, {:.1} MiB of model",
                r.backend, e.client_layers, e.client_last_layers, e.client_ms_per_token, e.client_mib
            );
        }
    }
    println!(
        "({} prompt tokens, {} decoded tokens, median of {} runs after a warm-up)",
        args.prompt_tokens, args.gen_tokens, args.runs
    );
    Ok(())
}

fn check_client_layers(client_layers: usize, n_layers: usize) -> Result<()> {
    if client_layers >= n_layers {
        bail!("--client-layers and --client-last-layers must leave at least one of the model's {n_layers} layers to the stages");
    }
    Ok(())
}

/// Peak resident memory of this process, from /proc (0 where unavailable).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prefill `prompt`; returns its tokens/s and the last position's logits.
fn timed_prefill(model: &mut dyn TokenModel, prompt: &[u32]) -> Result<(f64, Vec<f32>)> {
    let t = Instant::now();
    let logits = model.feed(prompt)?;
    Ok((prompt.len() as f64 / t.elapsed().as_secs_f64(), logits))
}

/// Decode `gen` tokens greedily after `logits`; returns tokens/s.
fn timed_decode(model: &mut dyn TokenModel, mut logits: Vec<f32>, gen: usize) -> Result<f64> {
    let t = Instant::now();
    for _ in 0..gen {
        let next = veil_model::sampling::argmax(&logits);
        logits = model.feed(&[next])?;
    }
    Ok(gen as f64 / t.elapsed().as_secs_f64())
}

/// Prefill `prompt`, then decode `gen` tokens greedily; returns (prompt tok/s, decode tok/s).
fn timed_run(model: &mut dyn TokenModel, prompt: &[u32], gen: usize) -> Result<(f64, f64)> {
    let (prefill, logits) = timed_prefill(model, prompt)?;
    Ok((prefill, timed_decode(model, logits, gen)?))
}

/// [`timed_run`] on the encrypted pipeline, also returning the client's own time over
/// the decoded tokens.
fn timed_encrypted_run(
    model: &mut EncryptedLocal,
    prompt: &[u32],
    gen: usize,
) -> Result<(f64, f64, Duration)> {
    let (prefill, logits) = timed_prefill(model, prompt)?;
    model.take_client_time();
    let decode = timed_decode(model, logits, gen)?;
    Ok((prefill, decode, model.take_client_time()))
}

pub fn run_child(args: ChildArgs) -> Result<()> {
    let compute = compute_for(Some(&args.backend))?;
    let t = Instant::now();
    let spec = ModelSpec::parse(&args.model)?;
    let context = Some(args.prompt_tokens + args.gen_tokens + 1);
    // The plaintext model: on the CPU, the GGUF's own blocks and the quantized kernels.
    let q = spec.load_quantized()?;
    let mut plain = if compute.kind == BackendKind::Cpu {
        LocalModel::quantized(
            &q.weights,
            &compute.device,
            context,
            crate::generate::precision(args.exact),
        )?
    } else {
        LocalModel::new(&spec.load()?.weights, &compute.device, context)
    };
    let text = &q.text;
    let mut prompt = Vec::new();
    let unit = text.tokenizer.encode(TEXT, false)?;
    while prompt.len() < args.prompt_tokens {
        prompt.extend_from_slice(&unit);
    }
    prompt.truncate(args.prompt_tokens);
    if plain.context_len() < args.prompt_tokens + args.gen_tokens {
        bail!("the model's context is shorter than the benchmark's sequence");
    }
    let n_layers = q.weights.config.n_layers;
    let client_layers = ClientLayers {
        first: args.client_layers,
        last: args.client_last_layers,
    };
    check_client_layers(client_layers.first + client_layers.last, n_layers)?;
    let mut encrypted = if args.encrypted {
        let e = encrypt_with_progress(
            &q,
            3.min(n_layers - client_layers.first - client_layers.last),
            client_layers,
            None,
            args.quant,
            args.calibration.as_deref(),
        )?;
        Some(EncryptedLocal::with_precision(
            &e.client,
            &e.shards,
            &compute.device,
            context,
            crate::generate::precision(args.exact),
        )?)
    } else {
        None
    };
    let stats = Arc::new(MaskedStats::default());
    let mut masked = if args.privacy == Privacy::Masked {
        if compute.kind != BackendKind::Cpu {
            bail!("masked mode runs on the CPU backend");
        }
        Some(
            LocalModel::quantized(
                &q.weights,
                &compute.device,
                context,
                crate::generate::precision(args.exact),
            )?
            .masked(&stats)?,
        )
    } else {
        None
    };
    let load_s = t.elapsed().as_secs_f64();
    let (mut pp, mut pd, mut ep, mut ed) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut client_ms = Vec::new();
    let (mut mp, mut md, mut mtotals) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..=args.runs {
        plain.reset();
        let (p, d) = timed_run(&mut plain, &prompt, args.gen_tokens)?;
        if let Some(m) = masked.as_mut() {
            m.reset();
            let (p2, logits) = timed_prefill(m, &prompt)?;
            stats.take();
            let d2 = timed_decode(m, logits, args.gen_tokens)?;
            let totals = stats.take();
            if run > 0 {
                mp.push(p2);
                md.push(d2);
                mtotals.push(totals);
            }
        }
        if let Some(enc) = encrypted.as_mut() {
            enc.reset();
            let (p2, d2, client) = timed_encrypted_run(enc, &prompt, args.gen_tokens)?;
            if run > 0 {
                ep.push(p2);
                ed.push(d2);
                client_ms.push(client.as_secs_f64() * 1e3 / args.gen_tokens as f64);
            }
        }
        if run > 0 {
            pp.push(p);
            pd.push(d);
        }
    }
    let (prompt_rate, decode_rate) = (median(pp), median(pd));
    let result = BenchResult {
        backend: compute.kind.to_string(),
        adapter: compute.adapter.clone(),
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        load_s,
        prompt_tokens_per_s: prompt_rate,
        decode_tokens_per_s: decode_rate,
        peak_rss_mib: peak_rss_mib(),
        masked: masked.map(|_| {
            let (p, d) = (median(mp), median(md));
            let per_token = |f: fn(&MaskedTotals) -> f64| {
                median(mtotals.iter().map(f).collect()) * 1e3 / args.gen_tokens as f64
            };
            MaskedFigures {
                prompt_tokens_per_s: p,
                decode_tokens_per_s: d,
                prompt_ratio: p / prompt_rate,
                decode_ratio: d / decode_rate,
                masks_ms_per_token: per_token(|t| t.masks_s),
                products_ms_per_token: per_token(|t| t.products_s),
                client_ms_per_token: per_token(|t| t.client_s),
                check_failures: mtotals.iter().map(|t| t.check_failures).sum(),
                traffic: Traffic::per_position(&q.weights.config),
            }
        }),
        encrypted: encrypted.map(|enc| {
            let (p, d) = (median(ep), median(ed));
            EncryptedFigures {
                prompt_tokens_per_s: p,
                decode_tokens_per_s: d,
                prompt_ratio: p / prompt_rate,
                decode_ratio: d / decode_rate,
                client_layers: enc.client().client_layers(),
                client_last_layers: enc.client().client_last_layers(),
                client_ms_per_token: median(client_ms),
                client_mib: enc.client().weight_bytes() as f64 / (1024.0 * 1024.0),
            }
        }),
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
