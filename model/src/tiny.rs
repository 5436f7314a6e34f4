//! A tiny random Llama model with a real byte-level tokenizer and chat template, built as
//! an in-memory GGUF file so that it goes through the same loading path as real models.
//! Its outputs are meaningless but deterministic; tests and demos use it to avoid a download.

use crate::gguf::{GgufWriter, MetaValue};
use crate::{LlamaConfig, LlamaWeights, Matrix, ModelError};

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

/// GGUF dims and data of a `[in, out]` linear weight (GGUF stores `[out][in]`).
fn gguf_linear(m: &Matrix) -> (Vec<usize>, Vec<f32>) {
    (vec![m.rows, m.cols], m.transpose().data)
}

/// The tiny model as GGUF bytes.
pub fn tiny_gguf(seed: u64) -> Result<Vec<u8>, ModelError> {
    let (tokens, types, merges) = vocabulary();
    let config = LlamaConfig::tiny(tokens.len());
    let w = LlamaWeights::random(&config, seed)?;
    let c = &config;
    let mut g = GgufWriter::new();
    let u = |x: usize| MetaValue::U32(x as u32);
    g.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("general.name", MetaValue::String("tiny".into()))
        .meta("llama.block_count", u(c.n_layers))
        .meta("llama.context_length", u(c.max_seq_len))
        .meta("llama.embedding_length", u(c.d_model))
        .meta("llama.feed_forward_length", u(c.d_ff))
        .meta("llama.attention.head_count", u(c.n_heads))
        .meta("llama.attention.head_count_kv", u(c.n_kv_heads))
        .meta("llama.rope.freq_base", MetaValue::F32(c.rope_theta))
        .meta("llama.rope.dimension_count", u(c.head_dim))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(c.rms_eps),
        )
        .meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
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
    for (i, l) in w.layers.iter().enumerate() {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        g.tensor_f32(&n("attn_norm"), &[c.d_model], &l.attn_norm);
        g.tensor_f32(&n("ffn_norm"), &[c.d_model], &l.ffn_norm);
        for (name, m) in [
            ("attn_q", &l.wq),
            ("attn_k", &l.wk),
            ("attn_v", &l.wv),
            ("attn_output", &l.wo),
            ("ffn_gate", &l.w_gate),
            ("ffn_up", &l.w_up),
            ("ffn_down", &l.w_down),
        ] {
            let (dims, data) = gguf_linear(m);
            g.tensor_f32(&n(name), &dims, &data);
        }
    }
    g.tensor_f32("output_norm.weight", &[c.d_model], &w.final_norm);
    Ok(g.to_bytes())
}
