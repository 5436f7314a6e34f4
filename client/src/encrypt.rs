//! `veil encrypt`: a model and a fresh key → `client.veil` (the owner's secret) and one
//! `shard-<i>.veil` per stage.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use veil_model::calibrate::{self, Calibration};
use veil_model::crypto::{
    calibrates, client_path, encrypt_model_with, shard_path, short_fingerprint, ClientLayers,
    Encrypted, KeyOptions, KeyShape, ModelKey, ShardQuant,
};
use veil_model::{PlainModel, TextCodec};

use crate::model_spec::ModelSpec;

#[derive(Args, Debug)]
pub struct EncryptArgs {
    /// Model: smollm2, tiny, or a .gguf path.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Number of stages (contiguous layer ranges, one shard each).
    #[arg(long, default_value_t = 3)]
    pub stages: usize,
    /// Layers the client runs itself in plaintext before the first node (a mitigation:
    /// the first node then never receives embedding rows; see SECURITY.md). 0: none.
    #[arg(long, default_value_t = 0)]
    pub client_layers: usize,
    /// Layers the client also runs itself after the last node (the mitigation's other end:
    /// the last node then serves a middle part of the model and never sees the final
    /// layers' computation; see SECURITY.md). 0: none.
    #[arg(long, default_value_t = 0)]
    pub client_last_layers: usize,
    /// How shards store their weights: q8_0 (default; 8-bit blocks, about a quarter of
    /// f32's bytes, run by the nodes' quantized kernels), q4_0, q4_k (4-bit; rows must be
    /// whole blocks of 256), or f32 (exact: encrypted output equals the f32 model's).
    #[arg(long, default_value = "q8_0", value_name = "FORMAT")]
    pub quant: ShardQuant,
    #[arg(long, value_name = "FILE|none", help = CALIBRATION_HELP)]
    pub calibration: Option<String>,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Derive the key from this seed instead of the OS's random source. Reproducible, and
    /// only 64 bits of secret: for tests, never for real deployments.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Overwrite an existing client.veil in the output directory (its key is lost).
    #[arg(long)]
    pub force: bool,
    /// Print a JSON summary instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The `--calibration` option of every command that encrypts.
pub const CALIBRATION_HELP: &str =
    "With 4-bit shards (q4_0, q4_k): a UTF-8 text whose activations \
steer the rounding (GPTQ: each weight is rounded where it costs the layer's outputs least, \
measured on the text in the key's basis; the layers are then encrypted one after another), \
or `none` to round every weight to its nearest value. [default: a built-in text of about \
2,000 tokens]";

/// Calibration sequences are at most this long (tokens) ...
const CALIBRATION_SEQ_LEN: usize = 512;
/// ... and hold at most this many tokens in all.
const CALIBRATION_MAX_TOKENS: usize = 4096;

/// The calibration `--calibration` asks for when shards are stored as `quant`: `None` when
/// the format does not calibrate or the option says `none`.
pub fn calibration_for(
    model: &PlainModel<'_>,
    quant: ShardQuant,
    option: Option<&str>,
) -> Result<Option<Calibration>> {
    if !calibrates(quant) {
        if option.is_some_and(|o| o != "none") {
            tracing::warn!("--calibration is ignored: {quant} shards round plainly");
        }
        return Ok(None);
    }
    let text = match option {
        Some("none") => return Ok(None),
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the calibration text {path}"))?,
        None => calibrate::DEFAULT_TEXT.to_string(),
    };
    let codec = TextCodec::new(model.text.clone())?;
    let c = Calibration::from_text(&codec, &text, CALIBRATION_SEQ_LEN, CALIBRATION_MAX_TOKENS)
        .context("the calibration text")?;
    tracing::info!(
        "4-bit rounding calibrated on {} tokens ({} sequences{})",
        c.tokens(),
        c.sequences.len(),
        option.map(|p| format!(" of {p}")).unwrap_or_default()
    );
    Ok(Some(c))
}

/// Draw a key (seeded for tests) and encrypt `model` layer by layer, showing progress on
/// stderr. `calibration` is the `--calibration` option ([`calibration_for`]).
pub fn encrypt_with_progress<'a>(
    model: impl Into<PlainModel<'a>>,
    stages: usize,
    client_layers: impl Into<ClientLayers>,
    seed: Option<u64>,
    quant: ShardQuant,
    calibration: Option<&str>,
) -> Result<Encrypted> {
    let model = model.into();
    let client_layers: ClientLayers = client_layers.into();
    let calibration = calibration_for(&model, quant, calibration)?;
    let n_layers = model.weights.config().n_layers;
    let shape = KeyShape::of(model.weights.config());
    let mut rng = match seed {
        Some(s) => {
            tracing::warn!(
                "the key is derived from --seed {s}: reproducible and weak, for tests only"
            );
            ChaCha20Rng::seed_from_u64(s)
        }
        None => ChaCha20Rng::from_entropy(),
    };
    let key = ModelKey::generate(shape, KeyOptions::default(), &mut rng);
    let bar = crate::progress::bar(
        Some(n_layers.saturating_sub(client_layers.first + client_layers.last) as u64),
        "{msg} [{bar:30}] {pos}/{len} layers ({elapsed})",
    );
    bar.set_message(if calibration.is_some() {
        "encrypting (calibrated)"
    } else {
        "encrypting"
    });
    let e = encrypt_model_with(
        model,
        key,
        stages,
        client_layers,
        quant,
        calibration.as_ref(),
        &mut |done, _| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    Ok(e)
}

#[derive(Serialize)]
struct StageSummary {
    stage: usize,
    layers: (usize, usize),
    file: String,
    bytes: u64,
}

#[derive(Serialize)]
struct Summary {
    model: String,
    key_fingerprint: String,
    client: String,
    client_bytes: u64,
    stages: Vec<StageSummary>,
}

pub fn run(args: EncryptArgs) -> Result<()> {
    let client_file = client_path(&args.out);
    if client_file.exists() && !args.force {
        bail!(
            "{} already exists; its key is the only way to use the shards made with it \
             (pass --force to overwrite it)",
            client_file.display()
        );
    }
    let bundle = ModelSpec::parse(&args.model)?.load_quantized()?;
    let e = encrypt_with_progress(
        &bundle,
        args.stages,
        ClientLayers {
            first: args.client_layers,
            last: args.client_last_layers,
        },
        args.seed,
        args.quant,
        args.calibration.as_deref(),
    )?;
    e.write(&args.out)
        .with_context(|| format!("cannot write into {}", args.out.display()))?;
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let summary = Summary {
        model: bundle.name.clone(),
        key_fingerprint: e.client.meta.key.fingerprint.clone(),
        client: client_file.display().to_string(),
        client_bytes: size(&client_file),
        stages: e
            .shards
            .iter()
            .map(|s| {
                let p = shard_path(&args.out, s.meta.stage);
                StageSummary {
                    stage: s.meta.stage,
                    layers: s.meta.layers,
                    bytes: size(&p),
                    file: p.display().to_string(),
                }
            })
            .collect(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("model           {}", summary.model);
    println!(
        "key fingerprint {}",
        short_fingerprint(&summary.key_fingerprint)
    );
    println!("{:<6} {:<10} {:>9}  file", "stage", "layers", "MiB");
    for s in &summary.stages {
        println!(
            "{:<6} {:<10} {:>9.1}  {}",
            s.stage,
            format!("{}..{}", s.layers.0, s.layers.1),
            mib(s.bytes),
            s.file
        );
    }
    println!(
        "client {:<10} {:>9.1}  {}  (secret: keep it private)",
        "-",
        mib(summary.client_bytes),
        summary.client
    );
    Ok(())
}
