//! Random-weight Llama-family GGUF files of real models' shapes, for studies at sizes no
//! package ships: the weights are noise, the tokenizer and chat template are a real model's
//! (copied from its GGUF), and llama.cpp loads the file as it loads any Llama.
//!
//! The file is written tensor by tensor, a few rows at a time, so an 8B-shape file needs no
//! more memory than its largest batch of rows. Weights are uniform, scaled so that every
//! layer's outputs keep the magnitude of its inputs; each row has its own seeded generator,
//! so a file is the same whatever the number of threads.

use std::io::Write;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use veil_kernels::GgmlType;

use crate::gguf::{GgufFile, GgufStream, MetaValue, TensorSpec};
use crate::{LlamaConfig, ModelError};

/// Shapes of real models (their published configurations), with the tokenizer's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthShape {
    /// SmolLM2-135M: 30 layers, d 576, MLP 1536, 9/3 heads, tied head.
    Smollm2,
    /// Llama 3.2 1B: 16 layers, d 2048, MLP 8192, 32/8 heads, tied head.
    Llama1b,
    /// Llama 3.2 3B: 28 layers, d 3072, MLP 8192, 24/8 heads, tied head.
    Llama3b,
    /// Llama 3.1 8B: 32 layers, d 4096, MLP 14336, 32/8 heads, its own head.
    Llama8b,
    /// Qwen 2.5 0.5B: 24 layers, d 896, MLP 4864, 14/2 heads, q/k/v biases, tied head.
    Qwen25_05b,
    /// Qwen 3 0.6B: 28 layers, d 1024, MLP 3072, 16/8 heads of 128 (wider than d / H),
    /// per-head q/k norms, tied head.
    Qwen3_06b,
    /// Qwen 3 8B: 36 layers, d 4096, MLP 12288, 32/8 heads of 128, its own head.
    Qwen3_8b,
}

impl SynthShape {
    pub const ALL: [SynthShape; 7] = [
        SynthShape::Smollm2,
        SynthShape::Llama1b,
        SynthShape::Llama3b,
        SynthShape::Llama8b,
        SynthShape::Qwen25_05b,
        SynthShape::Qwen3_06b,
        SynthShape::Qwen3_8b,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            SynthShape::Smollm2 => "smollm2",
            SynthShape::Llama1b => "llama-1b",
            SynthShape::Llama3b => "llama-3b",
            SynthShape::Llama8b => "llama-8b",
            SynthShape::Qwen25_05b => "qwen2.5-0.5b",
            SynthShape::Qwen3_06b => "qwen3-0.6b",
            SynthShape::Qwen3_8b => "qwen3-8b",
        }
    }

    /// The configuration with a vocabulary of `vocab_size` tokens.
    pub fn config(&self, vocab_size: usize) -> LlamaConfig {
        use crate::Family::{Llama, Qwen2, Qwen3};
        // (family, layers, d, ffn, heads, kv heads, head width, RoPE base, tied)
        let (family, n_layers, d_model, d_ff, n_heads, n_kv_heads, head_dim, rope_theta, tied) =
            match self {
                SynthShape::Smollm2 => (Llama, 30, 576, 1536, 9, 3, 64, 100_000.0, true),
                SynthShape::Llama1b => (Llama, 16, 2048, 8192, 32, 8, 64, 500_000.0, true),
                SynthShape::Llama3b => (Llama, 28, 3072, 8192, 24, 8, 128, 500_000.0, true),
                SynthShape::Llama8b => (Llama, 32, 4096, 14336, 32, 8, 128, 500_000.0, false),
                SynthShape::Qwen25_05b => (Qwen2, 24, 896, 4864, 14, 2, 64, 1e6, true),
                SynthShape::Qwen3_06b => (Qwen3, 28, 1024, 3072, 16, 8, 128, 1e6, true),
                SynthShape::Qwen3_8b => (Qwen3, 36, 4096, 12288, 32, 8, 128, 1e6, false),
            };
        LlamaConfig {
            vocab_size,
            d_model,
            d_ff,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_theta,
            rms_eps: if family == Llama { 1e-5 } else { 1e-6 },
            max_seq_len: 8192,
            tied_embeddings: tied,
            family,
            rope_freq_factors: None,
            sliding_window: None,
            local_rope_theta: None,
        }
    }
}

impl std::fmt::Display for SynthShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SynthShape {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        SynthShape::ALL
            .into_iter()
            .find(|x| x.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<&str> = SynthShape::ALL.iter().map(|x| x.name()).collect();
                format!("unknown shape `{s}`: expected one of {}", names.join(", "))
            })
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub shape: SynthShape,
    /// Format of every matrix (the norm gains stay F32).
    pub quant: GgmlType,
    /// Keep only the first layers (a small file of a real shape, for tests).
    pub layers: Option<usize>,
    pub seed: u64,
}

/// One tensor to generate: its entry and how its values are drawn.
struct Plan {
    spec: TensorSpec,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    /// Values are uniform in `[-scale, scale]`, or `1.0` for a norm gain.
    scale: Option<f32>,
}

/// The tensors of `config`, in file order.
fn plan(config: &LlamaConfig, quant: GgmlType) -> Result<Vec<Plan>, ModelError> {
    let c = config;
    let (d, f, q, kv) = (c.d_model, c.d_ff, c.q_dim(), c.kv_dim());
    let spec = c.spec();
    // Uniform on [-a, a] has variance a²/3: a = √3/√n keeps a product over n inputs at the
    // inputs' magnitude.
    let s = |n: usize| 3f32.sqrt() / (n as f32).sqrt();
    let mut plans = Vec::new();
    let mut add = |name: String, rows: usize, cols: usize, scale: Option<f32>| {
        // matrices in `quant`; norm gains and biases (one row) in F32, as real files keep them
        let ty = if scale.is_some() && rows > 1 {
            quant
        } else {
            GgmlType::F32
        };
        let row_bytes = ty.byte_size(cols).ok_or_else(|| {
            let block = ty.block_layout().map_or(1, |(b, _)| b);
            ModelError::InvalidConfig(format!(
                "{name} has rows of {cols} values, not whole {ty} blocks of {block}"
            ))
        })?;
        let n_bytes = row_bytes * rows;
        let dims = if rows == 1 {
            vec![cols]
        } else {
            vec![cols, rows]
        };
        plans.push(Plan {
            spec: TensorSpec {
                name,
                dims,
                ggml_type: ty.id(),
                n_bytes,
            },
            ty,
            rows,
            cols,
            scale,
        });
        Ok::<(), ModelError>(())
    };
    add("token_embd.weight".into(), c.vocab_size, d, Some(s(d)))?;
    for i in 0..c.n_layers {
        let n = |x: &str| format!("blk.{i}.{x}.weight");
        add(n("attn_norm"), 1, d, None)?;
        add(n("attn_q"), q, d, Some(s(d)))?;
        add(n("attn_k"), kv, d, Some(s(d)))?;
        add(n("attn_v"), kv, d, Some(s(d)))?;
        add(n("attn_output"), d, q, Some(s(q)))?;
        if spec.qkv_bias {
            // biases are F32 vectors in real files too; small against the products
            for (name, w) in [("attn_q", q), ("attn_k", kv), ("attn_v", kv)] {
                add(format!("blk.{i}.{name}.bias"), 1, w, Some(0.1))?;
            }
        }
        if spec.qk_norm {
            add(n("attn_q_norm"), 1, c.head_dim, None)?;
            add(n("attn_k_norm"), 1, c.head_dim, None)?;
        }
        add(n("ffn_norm"), 1, d, None)?;
        add(n("ffn_gate"), f, d, Some(s(d)))?;
        add(n("ffn_up"), f, d, Some(s(d)))?;
        add(n("ffn_down"), d, f, Some(s(f)))?;
    }
    add("output_norm.weight".into(), 1, d, None)?;
    if !c.tied_embeddings {
        add("output.weight".into(), c.vocab_size, d, Some(s(d)))?;
    }
    Ok(plans)
}

/// Metadata of the synthetic file: the architecture's keys from `config`, every
/// `tokenizer.*` key from `tokenizer`.
fn metadata(
    config: &LlamaConfig,
    spec: &SynthSpec,
    tokenizer: &GgufFile,
) -> Vec<(String, MetaValue)> {
    let c = config;
    let u = |x: usize| MetaValue::U32(x as u32);
    let arch = c.spec().gguf_name;
    let k = |key: &str| format!("{arch}.{key}");
    let mut meta: Vec<(String, MetaValue)> = vec![
        (
            "general.architecture".into(),
            MetaValue::String(arch.into()),
        ),
        (
            "general.name".into(),
            MetaValue::String(format!(
                "veil-synth {} {} (random weights, seed {})",
                spec.shape, spec.quant, spec.seed
            )),
        ),
        (k("block_count"), u(c.n_layers)),
        (k("context_length"), u(c.max_seq_len)),
        (k("embedding_length"), u(c.d_model)),
        (k("feed_forward_length"), u(c.d_ff)),
        (k("attention.head_count"), u(c.n_heads)),
        (k("attention.head_count_kv"), u(c.n_kv_heads)),
        (k("rope.freq_base"), MetaValue::F32(c.rope_theta)),
        (k("rope.dimension_count"), u(c.head_dim)),
        (
            k("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(c.rms_eps),
        ),
        (k("vocab_size"), u(c.vocab_size)),
    ];
    if c.q_dim() != c.d_model {
        meta.push((k("attention.key_length"), u(c.head_dim)));
        meta.push((k("attention.value_length"), u(c.head_dim)));
    }
    for (k, v) in tokenizer.metadata() {
        if k.starts_with("tokenizer.") {
            meta.push((k.clone(), v.clone()));
        }
    }
    meta
}

/// Rows generated and quantized per piece written (a few MB of f32 at the widest shape).
const ROWS_PER_PIECE: usize = 256;

/// Write the synthetic model to `out`, calling `progress(bytes written, total bytes)` as it
/// goes; returns the configuration written.
pub fn write_synth(
    spec: &SynthSpec,
    tokenizer: &GgufFile,
    out: impl Write,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<LlamaConfig, ModelError> {
    let vocab = tokenizer
        .get_str_array("tokenizer.ggml.tokens")
        .map_err(|_| {
            ModelError::InvalidConfig("the tokenizer's GGUF has no tokenizer.ggml.tokens".into())
        })?
        .len();
    let mut config = spec.shape.config(vocab);
    if let Some(n) = spec.layers {
        if n == 0 || n > config.n_layers {
            return Err(ModelError::InvalidConfig(format!(
                "{} has {} layers; cannot keep {n}",
                spec.shape, config.n_layers
            )));
        }
        config.n_layers = n;
    }
    config.validate()?;
    let plans = plan(&config, spec.quant)?;
    let total: u64 = plans.iter().map(|p| p.spec.n_bytes as u64).sum();
    let meta = metadata(&config, spec, tokenizer);
    let io = |e: std::io::Error| ModelError::Io(format!("cannot write the model: {e}"));
    let mut stream = GgufStream::start(out, &meta, plans.iter().map(|p| p.spec.clone()).collect())
        .map_err(io)?;
    let mut done = 0u64;
    for (t, p) in plans.iter().enumerate() {
        for r0 in (0..p.rows).step_by(ROWS_PER_PIECE) {
            let r1 = (r0 + ROWS_PER_PIECE).min(p.rows);
            let pieces: Vec<Vec<u8>> = (r0..r1)
                .into_par_iter()
                .map(|r| {
                    let row = random_row(spec.seed, t, r, p.cols, p.scale);
                    let mut bytes = Vec::with_capacity(p.spec.n_bytes / p.rows);
                    p.ty.quantize(&row, &mut bytes).map(|()| bytes)
                })
                .collect::<Result<_, _>>()
                .map_err(|e| ModelError::InvalidConfig(format!("{}: {e}", p.spec.name)))?;
            for piece in pieces {
                stream.write(&piece).map_err(io)?;
                done += piece.len() as u64;
            }
            progress(done, total);
        }
    }
    stream.finish().map_err(io)?;
    Ok(config)
}

/// Row `r` of tensor `t`: its own generator, so rows can be drawn in any order.
fn random_row(seed: u64, t: usize, r: usize, cols: usize, scale: Option<f32>) -> Vec<f32> {
    let Some(a) = scale else {
        return vec![1.0; cols];
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((t as u64) << 40) ^ (r as u64));
    (0..cols).map(|_| rng.gen_range(-a..a)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_valid_and_named() {
        for s in SynthShape::ALL {
            s.config(49152).validate().expect("valid");
            assert_eq!(s.name().parse::<SynthShape>(), Ok(s));
        }
        let err = "llama-2b".parse::<SynthShape>().expect_err("unknown");
        assert!(err.contains("llama-1b"), "{err}");
    }

    #[test]
    fn plan_sizes_match_the_parameter_count() {
        let c = SynthShape::Llama1b.config(49152);
        let plans = plan(&c, GgmlType::F16).expect("plan");
        let params: usize = plans.iter().map(|p| p.rows * p.cols).sum();
        // Llama 3.2 1B has 1.236B parameters with its 128,256-token vocabulary.
        let real = params + (128_256 - 49_152) * 2048;
        assert!((1_230_000_000..1_240_000_000).contains(&real), "{real}");
        let bytes: usize = plans.iter().map(|p| p.spec.n_bytes).sum();
        assert!(bytes > 2 * (params - 100_000));
    }

    #[test]
    fn qwen_shapes_write_their_family_s_tensors_and_keys() {
        let tok = GgufFile::from_bytes(crate::tiny::tiny_gguf(1).expect("tiny")).expect("parse");
        for (shape, family) in [
            (SynthShape::Qwen25_05b, crate::Family::Qwen2),
            (SynthShape::Qwen3_06b, crate::Family::Qwen3),
        ] {
            let spec = SynthSpec {
                shape,
                quant: GgmlType::Q8_0,
                layers: Some(1),
                seed: 3,
            };
            let mut bytes = Vec::new();
            let config = write_synth(&spec, &tok, &mut bytes, &mut |_, _| ()).expect("write");
            let file = GgufFile::from_bytes(bytes).expect("parse");
            assert_eq!(LlamaConfig::from_gguf(&file).expect("config"), config);
            assert_eq!(config.family, family);
            let w = crate::QuantWeights::from_gguf(&file).expect("loads");
            let e = &w.layers[0].extras;
            assert_eq!(!e.qkv_bias.is_empty(), family == crate::Family::Qwen2);
            assert_eq!(e.qk_norm.is_some(), family == crate::Family::Qwen3);
        }
        // Qwen 3 0.6B: heads of 128, 2048-wide queries on a 1024-wide stream, 0.44B
        // parameters outside the embedding (its real count)
        let c = SynthShape::Qwen3_06b.config(151_936);
        assert_eq!((c.head_dim, c.q_dim()), (128, 2048));
        let params: usize = plan(&c, GgmlType::F16)
            .expect("plan")
            .iter()
            .map(|p| p.rows * p.cols)
            .sum();
        let body = params - 151_936 * 1024;
        assert!((435_000_000..445_000_000).contains(&body), "{body}");
    }

    #[test]
    fn smollm2_shape_refuses_q4_k_naming_the_tensor() {
        let c = SynthShape::Smollm2.config(49152);
        let err = plan(&c, GgmlType::Q4_K)
            .err()
            .expect("576 is not 256-divisible");
        let msg = err.to_string();
        assert!(
            msg.contains("token_embd.weight") && msg.contains("Q4_K"),
            "{msg}"
        );
    }

    #[test]
    fn a_written_file_loads_with_the_tokenizer_it_copied() {
        let tok = GgufFile::from_bytes(crate::tiny::tiny_gguf(1).expect("tiny")).expect("parse");
        let spec = SynthSpec {
            shape: SynthShape::Smollm2,
            quant: GgmlType::Q8_0,
            layers: Some(2),
            seed: 7,
        };
        let mut calls = Vec::new();
        let mut bytes = Vec::new();
        let config =
            write_synth(&spec, &tok, &mut bytes, &mut |d, t| calls.push((d, t))).expect("write");
        let (last, total) = *calls.last().expect("progress");
        assert_eq!(last, total);
        assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
        let file = GgufFile::from_bytes(bytes.clone()).expect("parse");
        assert_eq!(LlamaConfig::from_gguf(&file).expect("config"), config);
        assert_eq!((config.n_layers, config.d_model), (2, 576));
        for (k, v) in tok
            .metadata()
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
        {
            assert_eq!(file.get(k).expect("copied"), v, "{k}");
        }
        let w = crate::QuantWeights::from_gguf(&file).expect("loads");
        assert_eq!(w.layers[1].w_down.ggml_type(), GgmlType::Q8_0);
        let (_, gain) = file.tensor_f32("blk.1.ffn_norm.weight").expect("gain");
        assert!(gain.iter().all(|&g| g == 1.0));
        let (_, down) = file.tensor_f32("blk.0.ffn_down.weight").expect("down");
        let a = 3f32.sqrt() / (1536f32).sqrt();
        let rms = (down.iter().map(|x| x * x).sum::<f32>() / down.len() as f32).sqrt();
        assert!(down.iter().all(|x| x.abs() <= a * 1.01));
        assert!((rms - a / 3f32.sqrt()).abs() < 0.02 * a, "rms {rms}");
        // the same seed writes the same file; another seed another one
        let mut again = Vec::new();
        write_synth(&spec, &tok, &mut again, &mut |_, _| ()).expect("write");
        assert!(again == bytes);
        let mut other = Vec::new();
        let spec2 = SynthSpec { seed: 8, ..spec };
        write_synth(&spec2, &tok, &mut other, &mut |_, _| ()).expect("write");
        assert_eq!(other.len(), bytes.len());
        assert!(other != bytes);
    }
}
