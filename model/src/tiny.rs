//! A tiny random Llama model with a real byte-level tokenizer and chat template, built as
//! an in-memory GGUF file so that it goes through the same loading path as real models.
//! Its outputs are meaningless but deterministic; tests and demos use it to avoid a download.

use crate::arch::head_order;
use crate::gguf::{GgufWriter, MetaValue};
use crate::weights::qk_order;
use crate::{Family, LlamaConfig, LlamaWeights, Matrix, ModelError};

/// Seed of the `tiny` model named on the command line.
pub const TINY_SEED: u64 = 0x7e11;

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [&str; 16] = [
    "Ġ t", "h e", "Ġ a", "i n", "Ġt he", "r e", "o n", "e r", "Ġ s", "a t", "Ġ w", "n d", "o u",
    "e n", "l l", "o r",
];
const TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Vocabulary (special tokens, the 256 byte symbols, merged pairs), types and merges.
fn vocabulary() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![3; SPECIALS.len()];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('?');
            next += 1;
            c
        };
        tokens.push(c.to_string());
        types.push(1);
    }
    for m in MERGES {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    (
        tokens,
        types,
        MERGES.iter().map(|s| s.to_string()).collect(),
    )
}

fn strings(v: &[String]) -> MetaValue {
    MetaValue::Array(v.iter().map(|s| MetaValue::String(s.clone())).collect())
}

/// The tiny model as GGUF bytes.
pub fn tiny_gguf(seed: u64) -> Result<Vec<u8>, ModelError> {
    tiny_variant_gguf(TinyVariant::Llama, seed)
}

/// Tiny models of every architecture family (and of Llama 3's RoPE scaling), for tests
/// against llama.cpp and of the encryption's exactness: each has per-head widths, biases,
/// norms or frequency factors as its family does, all random.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyVariant {
    /// The `tiny` model.
    Llama,
    /// Llama 3.x: RoPE frequency factors (`rope_freqs.weight`) and an untied head.
    Llama3,
    /// Qwen 2: query/key/value biases, neox RoPE.
    Qwen2,
    /// Qwen 3: per-head query/key norms, heads wider than `d / H`, neox RoPE.
    Qwen3,
    /// Gemma 3: scaled embeddings, per-head query/key norms, post-norms, GeGLU, six
    /// layers of which the sixth is global and the others slide over 4 tokens.
    Gemma3,
}

impl TinyVariant {
    pub const ALL: [TinyVariant; 5] = [
        TinyVariant::Llama,
        TinyVariant::Llama3,
        TinyVariant::Qwen2,
        TinyVariant::Qwen3,
        TinyVariant::Gemma3,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            TinyVariant::Llama => "llama",
            TinyVariant::Llama3 => "llama3",
            TinyVariant::Qwen2 => "qwen2",
            TinyVariant::Qwen3 => "qwen3",
            TinyVariant::Gemma3 => "gemma3",
        }
    }

    /// The configuration with a vocabulary of `vocab_size` tokens.
    pub fn config(&self, vocab_size: usize) -> LlamaConfig {
        let base = LlamaConfig::tiny(vocab_size);
        match self {
            TinyVariant::Llama => base,
            TinyVariant::Llama3 => LlamaConfig {
                rope_theta: 500_000.0,
                tied_embeddings: false,
                // low frequencies slowed down, as Llama 3.1's factors do
                rope_freq_factors: Some(vec![1.0, 1.0, 1.0, 1.5, 3.0, 6.0, 8.0, 8.0]),
                ..base
            },
            TinyVariant::Qwen2 => LlamaConfig {
                family: Family::Qwen2,
                rope_theta: 1_000_000.0,
                rms_eps: 1e-6,
                ..base
            },
            TinyVariant::Qwen3 => LlamaConfig {
                family: Family::Qwen3,
                head_dim: 32,
                rope_theta: 1_000_000.0,
                rms_eps: 1e-6,
                ..base
            },
            TinyVariant::Gemma3 => LlamaConfig {
                family: Family::Gemma3,
                n_layers: 6,
                n_kv_heads: 1,
                head_dim: 32,
                rope_theta: 1_000_000.0,
                rms_eps: 1e-6,
                sliding_window: Some(4),
                local_rope_theta: Some(10_000.0),
                ..base
            },
        }
    }
}

impl std::str::FromStr for TinyVariant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        TinyVariant::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| format!("unknown tiny model `{s}`"))
    }
}

/// `v` written in the file's order, where Veil reads element `i` from `order[i]`.
fn unorder(v: &[f32], order: Option<Vec<usize>>) -> Vec<f32> {
    let Some(order) = order else {
        return v.to_vec();
    };
    let mut out = vec![0.0; v.len()];
    for (i, &o) in order.iter().enumerate() {
        out[o] = v[i];
    }
    out
}

/// A `[in, out]` matrix whose outputs Veil reads in `order`, as GGUF dims and data.
fn gguf_linear_ordered(m: &Matrix, order: Option<Vec<usize>>) -> (Vec<usize>, Vec<f32>) {
    let t = m.transpose();
    let Some(order) = order else {
        return (vec![m.rows, m.cols], t.data);
    };
    let mut data = vec![0.0; t.data.len()];
    for (i, &o) in order.iter().enumerate() {
        data[o * t.cols..(o + 1) * t.cols].copy_from_slice(t.row(i));
    }
    (vec![m.rows, m.cols], data)
}

/// A tiny model of `variant` as GGUF bytes, laid out as its family's files are (the
/// inverse of what the loaders do).
pub fn tiny_variant_gguf(variant: TinyVariant, seed: u64) -> Result<Vec<u8>, ModelError> {
    let (tokens, types, merges) = vocabulary();
    let config = variant.config(tokens.len());
    let w = LlamaWeights::random(&config, seed)?;
    let c = &config;
    let arch = c.spec().gguf_name;
    let mut g = GgufWriter::new();
    let u = |x: usize| MetaValue::U32(x as u32);
    let k = |s: &str| format!("{arch}.{s}");
    g.meta("general.architecture", MetaValue::String(arch.into()))
        .meta(
            "general.name",
            MetaValue::String(match variant {
                TinyVariant::Llama => "tiny".into(),
                v => format!("tiny-{}", v.name()),
            }),
        )
        .meta(&k("block_count"), u(c.n_layers))
        .meta(&k("context_length"), u(c.max_seq_len))
        .meta(&k("embedding_length"), u(c.d_model))
        .meta(&k("feed_forward_length"), u(c.d_ff))
        .meta(&k("attention.head_count"), u(c.n_heads))
        .meta(&k("attention.head_count_kv"), u(c.n_kv_heads))
        .meta(&k("rope.freq_base"), MetaValue::F32(c.rope_theta))
        .meta(&k("rope.dimension_count"), u(c.head_dim))
        .meta(
            &k("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(c.rms_eps),
        );
    if c.head_dim * c.n_heads != c.d_model {
        g.meta(&k("attention.key_length"), u(c.head_dim))
            .meta(&k("attention.value_length"), u(c.head_dim));
    }
    if let Some(w) = c.sliding_window {
        g.meta(&k("attention.sliding_window"), u(w));
    }
    g.meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", MetaValue::String("smollm".into()))
        .meta("tokenizer.ggml.tokens", strings(&tokens))
        .meta(
            "tokenizer.ggml.token_type",
            MetaValue::Array(types.iter().map(|&t| MetaValue::I32(t)).collect()),
        )
        .meta("tokenizer.ggml.merges", strings(&merges))
        .meta("tokenizer.ggml.bos_token_id", u(1))
        .meta("tokenizer.ggml.eos_token_id", u(2))
        .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(false))
        .meta(
            "tokenizer.chat_template",
            MetaValue::String(TEMPLATE.into()),
        );
    g.tensor_f32(
        "token_embd.weight",
        &[c.d_model, c.vocab_size],
        &w.embedding.data,
    );
    if let Some(f) = &c.rope_freq_factors {
        g.tensor_f32("rope_freqs.weight", &[f.len()], f);
    }
    let (q, kv) = (c.q_dim(), c.kv_dim());
    for (i, l) in w.layers.iter().enumerate() {
        let n = |s: &str| format!("blk.{i}.{s}");
        g.tensor_f32(&n("attn_norm.weight"), &[c.d_model], &l.attn_norm);
        g.tensor_f32(&n("ffn_norm.weight"), &[c.d_model], &l.ffn_norm);
        for (name, m, order) in [
            ("attn_q", &l.wq, qk_order(c, c.n_heads)),
            ("attn_k", &l.wk, qk_order(c, c.n_kv_heads)),
            ("attn_v", &l.wv, None),
            ("attn_output", &l.wo, None),
            ("ffn_gate", &l.w_gate, None),
            ("ffn_up", &l.w_up, None),
            ("ffn_down", &l.w_down, None),
        ] {
            let (dims, data) = gguf_linear_ordered(m, order);
            g.tensor_f32(&n(&format!("{name}.weight")), &dims, &data);
        }
        let b = &l.extras.qkv_bias;
        if !b.is_empty() {
            let q_b = unorder(&b[..q], qk_order(c, c.n_heads));
            let k_b = unorder(&b[q..q + kv], qk_order(c, c.n_kv_heads));
            g.tensor_f32(&n("attn_q.bias"), &[q], &q_b);
            g.tensor_f32(&n("attn_k.bias"), &[kv], &k_b);
            g.tensor_f32(&n("attn_v.bias"), &[kv], &b[q + kv..]);
        }
        if let Some(norm) = &l.extras.qk_norm {
            let order = Some(head_order(c.spec().rope, c.head_dim));
            let h = c.head_dim;
            let q_g = unorder(&norm.q.diag[..h], order.clone());
            let k_g = unorder(&norm.k.diag[..h], order);
            g.tensor_f32(&n("attn_q_norm.weight"), &[h], &q_g);
            g.tensor_f32(&n("attn_k_norm.weight"), &[h], &k_g);
        }
        if let Some(p) = &l.post_norms {
            g.tensor_f32(&n("post_attention_norm.weight"), &[c.d_model], &p.attn);
            g.tensor_f32(&n("post_ffw_norm.weight"), &[c.d_model], &p.ffn);
        }
    }
    g.tensor_f32("output_norm.weight", &[c.d_model], &w.final_norm);
    if let Some(o) = &w.output {
        let (dims, data) = gguf_linear_ordered(o, None);
        g.tensor_f32("output.weight", &dims, &data);
    }
    Ok(g.to_bytes())
}
