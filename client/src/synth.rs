//! `veil model synth`: a random-weight GGUF of a real model's shape (see
//! [`veil_model::synth`]).

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use veil_model::gguf::{GgmlType, GgufFile};
use veil_model::synth::{write_synth, SynthShape, SynthSpec};

use crate::model_spec::ModelSpec;

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Shape to copy: smollm2 (135M), llama-1b (Llama 3.2 1B), llama-3b (Llama 3.2 3B),
    /// llama-8b (Llama 3.1 8B), qwen2.5-0.5b (q/k/v biases), qwen3-0.6b or qwen3-8b (per-head
    /// q/k norms, heads of 128). The vocabulary is the tokenizer's (49,152 tokens for
    /// SmolLM2's), so embeddings are smaller than the real model's.
    #[arg(long)]
    pub shape: SynthShape,
    /// Format of every matrix: f32, f16, q8_0, q4_0 or q4_k (rows of 256: not smollm2).
    #[arg(long, default_value = "q8_0", value_parser = parse_quant, value_name = "FORMAT")]
    pub quant: GgmlType,
    /// Where to write the GGUF file (written whole to a temporary name first).
    #[arg(long)]
    pub out: PathBuf,
    /// Model whose tokenizer and chat template the file gets: smollm2 or a .gguf path.
    #[arg(long, default_value = "smollm2")]
    pub tokenizer: String,
    /// Keep only the first N layers (a small file of a real shape).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Seed of the random weights (the same seed writes the same file).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
}

/// A writable GGML type by its llama.cpp name, any case.
pub fn parse_quant(s: &str) -> std::result::Result<GgmlType, String> {
    GgmlType::WRITABLE
        .into_iter()
        .find(|t| t.name().eq_ignore_ascii_case(s))
        .ok_or_else(|| {
            let names: Vec<String> = GgmlType::WRITABLE
                .iter()
                .map(|t| t.name().to_lowercase())
                .collect();
            format!("Veil writes {}, not `{s}`", names.join(", "))
        })
}

pub fn run(args: SynthArgs) -> Result<()> {
    if args.out.exists() && !args.force {
        bail!("{} exists; pass --force to replace it", args.out.display());
    }
    let spec = ModelSpec::parse(&args.tokenizer)?;
    let Some(tok_path) = spec.path()? else {
        bail!("the tiny model has a toy tokenizer; name smollm2 or a .gguf file");
    };
    let tokenizer = GgufFile::open(&tok_path)
        .with_context(|| format!("cannot read the tokenizer of {}", tok_path.display()))?;
    let synth = SynthSpec {
        shape: args.shape,
        quant: args.quant,
        layers: args.layers,
        seed: args.seed,
    };
    let bar = crate::progress::bar(
        None,
        "writing {msg} [{bar:30}] {bytes}/{total_bytes} ({elapsed}, {eta} left)",
    );
    bar.set_message(format!("{} {}", args.shape, args.quant));
    let tmp = partial_path(&args.out);
    let result = (|| -> Result<_> {
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let config = write_synth(
            &synth,
            &tokenizer,
            BufWriter::with_capacity(1 << 20, file),
            &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            },
        )?;
        std::fs::rename(&tmp, &args.out)
            .with_context(|| format!("cannot rename to {}", args.out.display()))?;
        Ok(config)
    })();
    bar.finish_and_clear();
    let config = match result {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let size = std::fs::metadata(&args.out)?.len();
    tracing::info!(
        "{} layers, d {}, MLP {}, {}/{} heads, vocabulary {}: {:.2} GB",
        config.n_layers,
        config.d_model,
        config.d_ff,
        config.n_heads,
        config.n_kv_heads,
        config.vocab_size,
        size as f64 / 1e9
    );
    println!("{}", args.out.display());
    Ok(())
}

/// `.<name>.partial-<pid>` beside `path`.
fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}
