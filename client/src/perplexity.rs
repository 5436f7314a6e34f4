//! `veil perplexity`: llama.cpp's perplexity of a model on a text file, and with
//! `--encrypted` the encrypted pipeline's beside the plaintext model's, with their top-1
//! agreement.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use veil_model::crypto::{EncryptedLocal, ShardQuant};
use veil_model::masked::{MaskedStats, MaskedTotals, Privacy};
use veil_model::perplexity::{perplexity, Perplexity, PerplexityReport, SequenceModel};
use veil_model::{BackendKind, LocalModel, Precision};

use crate::encrypt::encrypt_with_progress;
use crate::generate::{compute_for, precision};
use crate::model_spec::ModelSpec;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    /// Model: smollm2, gemma3 (plaintext only), tiny, or a .gguf path.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// UTF-8 text to score (tokenized whole, as llama.cpp's `llama-perplexity -f` does).
    #[arg(long)]
    pub file: PathBuf,
    /// Tokens per chunk; each chunk's second half is scored.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score at most this many chunks (default: every whole chunk of the text).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Also encrypt the model with a fresh key and score its encrypted stages (in this
    /// process), reporting both perplexities, their ratio, and how often the two models'
    /// most likely next token agree.
    #[arg(long)]
    pub encrypted: bool,
    /// With --encrypted: the shards' weight format (f32, q8_0, q4_0, q4_k).
    #[arg(long, default_value = "q8_0", value_name = "FORMAT")]
    pub quant: ShardQuant,
    #[arg(long, value_name = "FILE|none", help = crate::encrypt::CALIBRATION_HELP)]
    pub calibration: Option<String>,
    /// With --encrypted: stages to split the model into.
    #[arg(long, default_value_t = 3)]
    pub stages: usize,
    /// With --encrypted: layers the client runs itself before the first stage.
    #[arg(long, default_value_t = 0)]
    pub client_layers: usize,
    /// With --encrypted: layers the client runs itself after the last stage.
    #[arg(long, default_value_t = 0)]
    pub client_last_layers: usize,
    /// f32 activations against dequantized weights (see `veil generate --help`).
    #[arg(long)]
    pub exact: bool,
    /// `masked`: also score the model in masked mode (every linear op on masked integer
    /// words, both parties in this process; see `veil generate --help`) beside the exact
    /// plaintext model, with their top-1 agreement and the checks' findings.
    #[arg(
        long,
        default_value = "rotated",
        value_name = "MODE",
        conflicts_with = "encrypted"
    )]
    pub privacy: Privacy,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let compute = compute_for(Some("cpu"))?;
    debug_assert_eq!(compute.kind, BackendKind::Cpu);
    let spec = ModelSpec::parse(&args.model)?;
    let bundle = spec.load_quantized()?;
    let tokenizer = &bundle.text.tokenizer;
    let bos = tokenizer.add_bos.then_some(tokenizer.bos).flatten();
    let mut tokens: Vec<u32> = bos.into_iter().collect();
    tokens.extend(
        tokenizer
            .encode(&text, false)
            .with_context(|| format!("cannot tokenize {}", args.file.display()))?,
    );
    if let Some(n) = args.chunks {
        if n == 0 {
            bail!("--chunks must be at least 1");
        }
        tokens.truncate(n.saturating_mul(args.ctx));
    }
    let masked = args.privacy == Privacy::Masked;
    // masked mode is compared with the exact plaintext model
    let plain_precision = if masked {
        Precision::Exact
    } else {
        precision(args.exact)
    };
    let mut plain = LocalModel::quantized(
        &bundle.weights,
        &compute.device,
        Some(args.ctx),
        plain_precision,
    )?;
    if plain.config().max_seq_len < args.ctx {
        bail!(
            "--ctx {} is longer than the model's context ({})",
            args.ctx,
            plain.config().max_seq_len
        );
    }
    let bar = crate::progress::bar(
        None,
        "{msg} [{bar:30}] {pos}/{len} chunks ({elapsed}, {eta} left)",
    );
    let mut on_chunk = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let stats = std::sync::Arc::new(MaskedStats::default());
    let report = if masked {
        bar.set_message("preparing masked mode");
        let mut m = LocalModel::quantized(
            &bundle.weights,
            &compute.device,
            Some(args.ctx),
            precision(args.exact),
        )?
        .masked(&stats)?;
        bar.set_message("scoring masked and plaintext");
        perplexity(
            &mut m,
            Some(&mut plain as &mut dyn SequenceModel),
            &tokens,
            args.ctx,
            bos,
            &mut on_chunk,
        )?
    } else if args.encrypted {
        let e = encrypt_with_progress(
            &bundle,
            args.stages,
            veil_model::crypto::ClientLayers {
                first: args.client_layers,
                last: args.client_last_layers,
            },
            None,
            args.quant,
            args.calibration.as_deref(),
        )?;
        let mut enc = EncryptedLocal::with_precision(
            &e.client,
            &e.shards,
            &compute.device,
            Some(args.ctx),
            precision(args.exact),
        )?;
        drop(e);
        bar.set_message("scoring encrypted and plaintext");
        perplexity(
            &mut enc,
            Some(&mut plain as &mut dyn SequenceModel),
            &tokens,
            args.ctx,
            bos,
            &mut on_chunk,
        )?
    } else {
        bar.set_message("scoring");
        perplexity(&mut plain, None, &tokens, args.ctx, bos, &mut on_chunk)?
    };
    bar.finish_and_clear();
    let mut out = std::io::stdout().lock();
    if args.json {
        let json = Json {
            name: &args.model,
            file: &args.file,
            encrypted: args.encrypted,
            quant: args.encrypted.then(|| args.quant.to_string()),
            exact: args.exact || masked,
            privacy: masked.then_some(args.privacy),
            masked: masked.then(|| stats.totals()),
            report: &report,
        };
        serde_json::to_writer(&mut out, &json)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{}: {} chunks of {} tokens, {} tokens scored ({} in the text)",
        args.model, report.chunks, report.ctx, report.scored, report.text_tokens
    )?;
    let line = |name: &str, p: &Perplexity| {
        format!(
            "{name:<22} perplexity {:>9.4} ± {:.4}   ({:.1} s)",
            p.perplexity, p.stderr, p.seconds
        )
    };
    if let (Some(r), Some(g)) = (&report.reference, &report.agreement) {
        writeln!(
            out,
            "{}",
            line(
                if masked {
                    "plaintext (exact)"
                } else {
                    "plaintext"
                },
                r
            )
        )?;
        let name = if masked {
            "masked".to_string()
        } else {
            format!("encrypted {}", args.quant)
        };
        writeln!(out, "{}", line(&name, &report.model))?;
        writeln!(
            out,
            "ratio {:.4}, top-1 agreement {:.2}%, mean KL {:.5} nats",
            report.ratio().unwrap_or(f64::NAN),
            100.0 * g.top1,
            g.mean_kl
        )?;
    } else {
        writeln!(out, "{}", line("plaintext", &report.model))?;
    }
    if masked {
        let f = stats.totals();
        writeln!(
            out,
            "masked: {} ops on {} positions, {} failed checks; masks {:.1} s, products \
             (compute node and mask provider) {:.1} s, client {:.1} s",
            f.ops, f.positions, f.check_failures, f.masks_s, f.products_s, f.client_s
        )?;
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct Json<'a> {
    name: &'a str,
    file: &'a std::path::Path,
    encrypted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    quant: Option<String>,
    exact: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    privacy: Option<Privacy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    masked: Option<MaskedTotals>,
    /// With --encrypted or --privacy masked, `model` is that model and `reference` the
    /// plaintext.
    #[serde(flatten)]
    report: &'a PerplexityReport,
}
