//! `veil generate`.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use veil_model::crypto::{
    short_fingerprint, ClientBundle, ClientLayers, Encrypted, EncryptedLocal, ShardQuant,
};
use veil_model::masked::{MaskedStats, Parties, Privacy};
use veil_model::{
    generate, BackendKind, Compute, GenerateParams, Generation, LocalModel, Precision,
    SamplingParams, TextCodec, TokenLogit, TokenModel,
};

use crate::deployment::Deployment;
use crate::encrypt::encrypt_with_progress;
use crate::net::{Client, NetArgs};
use crate::remote::RemotePipeline;

use crate::model_spec::ModelSpec;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Run the whole model in this process (no network).
    #[arg(long)]
    pub local: bool,
    /// Encrypt the model with a fresh key and run it through its encrypted stages (still in
    /// this process), or with --shards use the deployment written by `veil encrypt`.
    #[arg(long)]
    pub encrypted: bool,
    /// Directory written by `veil encrypt` (`client.veil` and `shard-<i>.veil`).
    #[arg(long, requires = "encrypted")]
    pub shards: Option<std::path::PathBuf>,
    /// Stages to split the model into with --encrypted (without --shards).
    #[arg(long, default_value_t = 3)]
    pub stages: usize,
    /// With --encrypted (without --shards): layers the client runs itself in plaintext
    /// before the first stage (a deployment's bundle records its own).
    #[arg(long, default_value_t = 0)]
    pub client_layers: usize,
    /// With --encrypted (without --shards): layers the client runs itself after the last
    /// stage.
    #[arg(long, default_value_t = 0)]
    pub client_last_layers: usize,
    /// With --encrypted: the shards' weight format, q8_0 (default), q4_0, q4_k or f32 (the
    /// exact one; see `veil encrypt --help`).
    #[arg(long, default_value = "q8_0", value_name = "FORMAT")]
    pub quant: ShardQuant,
    #[arg(long, value_name = "FILE|none", help = crate::encrypt::CALIBRATION_HELP)]
    pub calibration: Option<String>,
    /// Generate through the nodes of this deployment (see `veil deploy`).
    #[arg(long, conflicts_with_all = ["local", "encrypted"])]
    pub deployment: Option<String>,
    #[arg(long, value_name = "RATE", requires = "deployment",
          value_parser = crate::verify::parse_rate, help = crate::verify::VERIFY_HELP)]
    pub verify: Option<f64>,
    #[command(flatten)]
    pub net: NetArgs,
    /// Model: smollm2, gemma3 (plaintext only), tiny, or a .gguf path.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Keep activations in f32 against the dequantized weights (the f32 model's result up
    /// to rounding). By default the CPU quantizes activations to 8 bits per block before
    /// its integer products, as llama.cpp does: several times faster. With --deployment the
    /// nodes do the same for this generation's sessions.
    #[arg(long)]
    pub exact: bool,
    /// The prompt. Rendered with the model's chat template unless --raw.
    #[arg(long)]
    pub prompt: String,
    /// Feed the prompt as-is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Sample only among the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample only among the most likely tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Random seed for sampling (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Report the K highest logits of every step (with --json).
    #[arg(long, default_value_t = 0)]
    pub top_logits: usize,
    /// Compute backend: wgpu or cpu (default: wgpu on a hardware adapter in a build with the
    /// `wgpu` feature, else cpu).
    #[arg(long)]
    pub backend: Option<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// How the nodes' inputs are hidden. `rotated` (default): the key's rotations folded
    /// into the weights (--encrypted, --deployment). `masked`: every linear op's input is
    /// quantized to integers and sent with fresh uniformly random masks, so a node sees
    /// nothing but uniform numbers even when the weights are public (SECURITY.md, "Masked
    /// mode"); a mask provider computes the masks' share and the client checks every
    /// product. With --deployment the client runs norms, attention and the rest itself on
    /// the deployment's shards and the nodes compute the linear ops; with --local or
    /// --encrypted this process plays every party (the same arithmetic, to measure it).
    /// [default: the deployment's (`veil deploy --privacy`), else rotated]
    #[arg(long, value_name = "MODE")]
    pub privacy: Option<Privacy>,
    /// With --privacy masked --deployment: who computes the masks' products. `local`
    /// (default): this process, so the mask seed never leaves it. Or peer ids
    /// (comma-separated) of nodes that hold the stages' shards: each is then never the
    /// compute node of the ops it provides masks for, and you trust that it does not
    /// collude with the compute nodes (SECURITY.md).
    #[arg(long, default_value = "local", value_name = "local|PEER,...")]
    pub mask_provider: crate::remote::masked::MaskProviders,
}

#[derive(Serialize)]
struct Timing {
    prefill_s: f64,
    decode_tokens_per_s: f64,
}

#[derive(Serialize)]
struct JsonOut<'a> {
    prompt_tokens: &'a [u32],
    tokens: &'a [u32],
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logits: Option<&'a [Vec<TokenLogit>]>,
    timing: Timing,
    stop: veil_model::StopReason,
    backend: String,
    /// Peer ids serving each stage (network generation only).
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    network: Option<NetworkFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    masked: Option<MaskedFigures>,
}

#[derive(Serialize)]
struct NetworkFigures {
    bytes_sent: u64,
    bytes_received: u64,
    failovers: u32,
    verification: crate::remote::AuditStats,
    /// The client's connections at the end: direct or through a relay, hole punches.
    connections: veil_protocol::ReachStatus,
}

/// Parse `--backend` and pick the device, printing a one-line notice on fallback.
pub fn compute_for(backend: Option<&str>) -> Result<Compute> {
    let requested = backend.map(str::parse::<BackendKind>).transpose()?;
    let (compute, notice) = Compute::select(requested)?;
    if let Some(n) = notice {
        tracing::warn!("{n}");
    }
    tracing::info!("backend {} on {}", compute.kind, compute.adapter);
    Ok(compute)
}

/// `--exact` as the kernels' precision.
pub fn precision(exact: bool) -> Precision {
    if exact {
        Precision::Exact
    } else {
        Precision::Fast
    }
}

/// The text codec and the runner the flags ask for: plaintext, encrypted in memory, or
/// encrypted from a `veil encrypt` directory.
fn load_runner(args: &GenerateArgs, compute: &Compute) -> Result<(TextCodec, Box<dyn TokenModel>)> {
    let encrypted = |e: &Encrypted| -> Result<Box<dyn TokenModel>> {
        let model = EncryptedLocal::with_precision(
            &e.client,
            &e.shards,
            &compute.device,
            None,
            precision(args.exact),
        )?;
        if args.privacy == Some(Privacy::Masked) {
            if compute.kind != BackendKind::Cpu {
                bail!("masked mode runs on the CPU backend only (--backend cpu)");
            }
            // the rotated shards' weights, masked: every party in this process
            let stats = std::sync::Arc::new(MaskedStats::default());
            let model = model.masked(&model.ring_ops()?, &stats, |_, _, _| Ok(Parties::Local))?;
            return Ok(Box::new(MaskedRun {
                model: Box::new(model),
                stats,
            }));
        }
        Ok(Box::new(model))
    };
    if let Some(dir) = &args.shards {
        let e = Encrypted::read(dir)
            .with_context(|| format!("cannot use the deployment in {}", dir.display()))?;
        tracing::info!(
            "{} encrypted stages, key {}",
            e.shards.len(),
            short_fingerprint(&e.client.meta.key.fingerprint)
        );
        return Ok((TextCodec::new(e.client.meta.text.clone())?, encrypted(&e)?));
    }
    let spec = ModelSpec::parse(&args.model)?;
    if args.encrypted {
        let bundle = spec.load_quantized()?;
        let e = encrypt_with_progress(
            &bundle,
            args.stages,
            ClientLayers {
                first: args.client_layers,
                last: args.client_last_layers,
            },
            None,
            args.quant,
            args.calibration.as_deref(),
        )?;
        return Ok((bundle.text, encrypted(&e)?));
    }
    if args.privacy == Some(Privacy::Masked) {
        if compute.kind != BackendKind::Cpu {
            bail!("masked mode runs on the CPU backend only (--backend cpu)");
        }
        let bundle = spec.load_quantized()?;
        let stats = std::sync::Arc::new(MaskedStats::default());
        let model = LocalModel::quantized(
            &bundle.weights,
            &compute.device,
            None,
            precision(args.exact),
        )?
        .masked(&stats)?;
        let model = Box::new(model);
        return Ok((bundle.text, Box::new(MaskedRun { model, stats })));
    }
    if compute.kind == BackendKind::Cpu {
        // the GGUF's own blocks, multiplied by the quantized kernels
        let bundle = spec.load_quantized()?;
        let model = LocalModel::quantized(
            &bundle.weights,
            &compute.device,
            None,
            precision(args.exact),
        )?;
        return Ok((bundle.text, Box::new(model)));
    }
    let bundle = spec.load()?;
    let model = LocalModel::new(&bundle.weights, &compute.device, None);
    Ok((bundle.text, Box::new(model)))
}

/// A masked model that says on stderr, when dropped, what its parties did.
struct MaskedRun {
    model: Box<dyn TokenModel>,
    stats: std::sync::Arc<MaskedStats>,
}

impl TokenModel for MaskedRun {
    fn context_len(&self) -> usize {
        self.model.context_len()
    }
    fn position(&self) -> usize {
        self.model.position()
    }
    fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>, veil_model::ModelError> {
        self.model.feed(ids)
    }
}

impl Drop for MaskedRun {
    fn drop(&mut self) {
        let t = self.stats.totals();
        tracing::info!(
            "masked: {} ops on {} positions, {} failed checks; masks {:.2} s, products \
             (compute node and mask provider) {:.2} s, client {:.2} s",
            t.ops,
            t.positions,
            t.check_failures,
            t.masks_s,
            t.products_s,
            t.client_s
        );
    }
}

/// Say on stderr which nodes were caught answering wrongly.
pub fn report_detections(audit: &crate::remote::AuditStats) {
    for d in &audit.detections {
        tracing::warn!(
            "caught {} answering wrongly on stage {} (from position {}, relative error {:.3}); \
             its answers were discarded and it is recorded in {}",
            d.peer,
            d.stage,
            d.row,
            d.error,
            crate::verify::Reputation::path()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
    }
}

/// Load a deployment's secret bundle and connect to its nodes.
pub fn connect_deployment(id: &str, net: &NetArgs) -> Result<(Client, ClientBundle, Deployment)> {
    let deployment = Deployment::load(id)?;
    let bundle = ClientBundle::read(&Deployment::dir(id)?.join("client.veil"))
        .with_context(|| format!("cannot read the secret bundle of deployment {id}"))?;
    let mut net = net.clone();
    if net.bootstrap.is_empty() {
        net.bootstrap = deployment.bootstrap.clone();
    }
    let client = Client::connect(&net)?;
    Ok((client, bundle, deployment))
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if !args.local && args.deployment.is_none() {
        bail!("say where to run: --local, or --deployment D (see `veil deploy`)");
    }
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        top_logits: args.top_logits,
    };
    params.sampling.validate()?;
    if let Some(id) = &args.deployment {
        let recorded = Deployment::load(id)?.privacy;
        if args.privacy.or(recorded) == Some(Privacy::Masked) {
            return run_masked(&args, &params, id);
        }
    }
    if let Some(id) = &args.deployment {
        let (client, bundle, deployment) = connect_deployment(id, &args.net)?;
        let text = TextCodec::new(bundle.meta.text.clone())?;
        let mut pipeline = RemotePipeline::new(
            client.runtime.handle().clone(),
            client.network.clone(),
            &bundle,
            &deployment,
            bundle.meta.config.max_seq_len,
            precision(args.exact),
        )?;
        crate::verify::prepare(
            &mut pipeline,
            crate::verify::verification_for(&deployment, args.verify)?,
        )?;
        let out = run_generation(&args, &params, &text, &mut pipeline)?;
        let route = pipeline.route();
        let connections = client
            .runtime
            .block_on(client.network.reach())
            .unwrap_or_default();
        // closing checks what is still unchecked
        pipeline.close();
        crate::verify::record(&pipeline, id)?;
        let stats = pipeline.stats.clone();
        report_detections(&stats.audit);
        let extra = Extra {
            backend: "network".into(),
            route: Some(route),
            network: Some(NetworkFigures {
                bytes_sent: stats.bytes_sent,
                bytes_received: stats.bytes_received,
                failovers: stats.failovers,
                verification: stats.audit,
                connections,
            }),
            masked: None,
        };
        drop(pipeline);
        return finish(&args, &out, extra);
    }
    // masked mode's products are integer kernels on the CPU: that is its default backend
    let backend = match (&args.backend, args.privacy.unwrap_or_default()) {
        (None, Privacy::Masked) => Some("cpu"),
        (b, _) => b.as_deref(),
    };
    let compute = compute_for(backend)?;
    let (text, mut model) = load_runner(&args, &compute)?;
    let out = run_generation(&args, &params, &text, model.as_mut())?;
    finish(
        &args,
        &out,
        Extra {
            backend: compute.kind.to_string(),
            route: None,
            network: None,
            masked: None,
        },
    )
}

struct Extra {
    backend: String,
    route: Option<Vec<String>>,
    network: Option<NetworkFigures>,
    masked: Option<MaskedFigures>,
}

/// What a masked generation through a deployment cost and found.
#[derive(Serialize)]
struct MaskedFigures {
    bytes_sent: u64,
    bytes_received: u64,
    ops: u64,
    positions: u64,
    /// Products that failed their check (each replayed elsewhere).
    failed_checks: u64,
    /// Parties caught answering wrongly.
    detections: Vec<veil_model::masked::Detection>,
}

/// `--privacy masked --deployment D`: the client runs all but the linear ops; the nodes
/// compute those on masked words.
fn run_masked(args: &GenerateArgs, params: &GenerateParams, id: &str) -> Result<()> {
    if args.verify.is_some() {
        tracing::info!("masked mode checks every product (Freivalds): --verify is not used");
    }
    let (client, bundle, deployment) = connect_deployment(id, &args.net)?;
    let text = TextCodec::new(bundle.meta.text.clone())?;
    let mut pipeline = crate::remote::masked::MaskedPipeline::new(
        client.runtime.handle().clone(),
        client.network.clone(),
        &bundle,
        &deployment,
        &args.mask_provider,
        bundle.meta.config.max_seq_len,
        precision(args.exact),
    )?;
    let out = run_generation(args, params, &text, &mut pipeline)?;
    pipeline.close();
    let t = pipeline.stats.totals();
    let detections = pipeline.detections();
    for d in &detections {
        tracing::warn!(
            "caught {} ({}) answering masked op {} wrongly (from position {}); it was not \
             asked again",
            d.party,
            d.role,
            d.op,
            d.position
        );
    }
    let figures = MaskedFigures {
        bytes_sent: pipeline
            .traffic
            .sent
            .load(std::sync::atomic::Ordering::Relaxed),
        bytes_received: pipeline
            .traffic
            .received
            .load(std::sync::atomic::Ordering::Relaxed),
        ops: t.ops,
        positions: t.positions,
        failed_checks: t.check_failures,
        detections,
    };
    tracing::info!(
        "masked: {} ops on {} positions, {} failed checks, {} KiB sent, {} KiB received",
        figures.ops,
        figures.positions,
        figures.failed_checks,
        figures.bytes_sent >> 10,
        figures.bytes_received >> 10
    );
    drop(pipeline);
    finish(
        args,
        &out,
        Extra {
            backend: "network (masked)".into(),
            route: None,
            network: None,
            masked: Some(figures),
        },
    )
}

/// Generate, streaming text to stdout unless `--json`.
fn run_generation(
    args: &GenerateArgs,
    params: &GenerateParams,
    text: &TextCodec,
    model: &mut dyn TokenModel,
) -> Result<Generation> {
    let prompt = text.prompt_tokens(&args.prompt, args.raw)?;
    let context = model.context_len();
    if prompt.len() > context {
        bail!(
            "the prompt has {} tokens but the model's context is {context}",
            prompt.len()
        );
    }
    let mut stdout = std::io::stdout().lock();
    let json = args.json;
    let mut on_text = |piece: &str| {
        if !json {
            // A closed stdout (e.g. `| head`) must not abort the generation with a panic.
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    };
    generate(model, &text.tokenizer, &prompt, params, &mut on_text).context("generation failed")
}

fn finish(args: &GenerateArgs, out: &Generation, extra: Extra) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let obj = JsonOut {
            prompt_tokens: &out.prompt_tokens,
            tokens: &out.tokens,
            text: &out.text,
            top_logits: (args.top_logits > 0).then_some(out.top_logits.as_slice()),
            timing: Timing {
                prefill_s: out.prefill_s,
                decode_tokens_per_s: out.decode_tokens_per_s(),
            },
            stop: out.stop,
            backend: extra.backend,
            route: extra.route,
            network: extra.network,
            masked: extra.masked,
        };
        serde_json::to_writer(&mut stdout, &obj)?;
    }
    writeln!(stdout)?;
    tracing::info!(
        "{} prompt tokens in {:.2}s, {} tokens at {:.1} tokens/s",
        out.prompt_tokens.len(),
        out.prefill_s,
        out.tokens.len(),
        out.decode_tokens_per_s()
    );
    Ok(())
}
