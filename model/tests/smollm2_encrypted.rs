//! Encrypted SmolLM2 is exact: greedy tokens identical to plaintext for 64 tokens on raw
//! and chat prompts, logits within f32 rounding. Needs the model (`veil model fetch`).

mod common;

use common::{max_abs_diff, smollm2_path};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use veil_model::crypto::{
    encrypt_model, EncryptedLocal, KeyOptions, KeyShape, ModelKey, ShardQuant,
};
use veil_model::sampling::argmax;
use veil_model::{Compute, LocalModel, ModelBundle, Precision, TokenModel};

const TOKENS: usize = 64;

#[test]
fn encrypted_greedy_decoding_equals_plaintext() {
    let b = ModelBundle::load(&smollm2_path()).expect("load");
    let key = ModelKey::generate(
        KeyShape::of(&b.weights.config),
        KeyOptions::default(),
        &mut ChaCha20Rng::seed_from_u64(2026),
    );
    let e = encrypt_model(&b, key, 3, &mut |_, _| {}).expect("encrypt");
    let device = Compute::cpu().device;
    let context = Some(256);
    let mut plain = LocalModel::new(&b.weights, &device, context);
    let mut enc = EncryptedLocal::new(&e.client, &e.shards, &device, context).expect("pipeline");
    let prompts = [
        ("The history of the printing press", true),
        ("fn main() {\n    let numbers = vec![3, 1, 2];", true),
        (
            "Q: What is the boiling point of water in Fahrenheit?\nA:",
            true,
        ),
        (
            "Give me three tips for staying focused while studying.",
            false,
        ),
        ("Write a short poem about the sea.", false),
        (
            "What is the difference between a list and a tuple in Python?",
            false,
        ),
    ];
    let mut worst = 0.0f32;
    let mut sequences = Vec::new();
    for (prompt, raw) in prompts {
        let ids = b.text.prompt_tokens(prompt, raw).expect("prompt");
        plain.reset();
        enc.reset();
        let (mut lp, mut le) = (
            plain.feed(&ids).expect("plain"),
            enc.feed(&ids).expect("enc"),
        );
        let (mut tp, mut te) = (Vec::new(), Vec::new());
        // exactly TOKENS greedy steps, past any end-of-turn token
        for _ in 0..TOKENS {
            worst = worst.max(max_abs_diff(&lp, &le));
            let (a, c) = (argmax(&lp), argmax(&le));
            tp.push(a);
            te.push(c);
            lp = plain.feed(&[a]).expect("plain");
            le = enc.feed(&[c]).expect("enc");
        }
        assert_eq!(tp, te, "{prompt:?}: encrypted tokens differ");
        let mut seq = ids.clone();
        seq.extend(&tp);
        sequences.push(seq);
    }
    eprintln!("encrypted vs plaintext over {} prompts x {TOKENS} tokens: identical tokens, max |Δlogit| {worst:.5}", prompts.len());
    assert!(worst < 1e-2, "max |Δlogit| {worst}");

    // The same shards re-quantized: top-1 agreement with the f32 model along the same
    // sequences (teacher-forced), with f32 and with 8-bit activations.
    drop(enc);
    let reference: Vec<Vec<Vec<f32>>> = sequences
        .iter()
        .map(|s| {
            plain.reset();
            plain.feed_all(s).expect("plain")
        })
        .collect();
    drop(plain);
    // floors: llama.cpp's own 8-bit activations agree with f32 on 95.4% of README tokens
    for (quant, precision, floor) in [
        (ShardQuant::Q8_0, Precision::Exact, 0.95),
        (ShardQuant::Q8_0, Precision::Fast, 0.94),
        // measured 0.65 (0.55 with attn_output and ffn_down at 4 bits too): re-quantizing a
        // Q4_1 model to 4 bits loses much; a guard, not a target
        (ShardQuant::Q4_0, Precision::Fast, 0.55),
    ] {
        let shards: Vec<_> = e
            .shards
            .iter()
            .map(|s| s.requantized(quant).expect("requantize"))
            .collect();
        // the client as `veil encrypt --quant` writes it: its tables quantized too
        let mut client = e.client.clone();
        client.meta.shard_dtype = quant.to_string();
        let mut q = EncryptedLocal::with_precision(&client, &shards, &device, context, precision)
            .expect("pipeline");
        let (mut same, mut total, mut widest) = (0usize, 0usize, 0.0f32);
        for (s, want) in sequences.iter().zip(&reference) {
            q.reset();
            let got = q.feed_all(s).expect("quantized");
            for (a, b) in got.iter().zip(want) {
                total += 1;
                if argmax(a) == argmax(b) {
                    same += 1;
                } else {
                    // how far ahead the f32 model's top token was of the one chosen
                    widest = widest.max(b[argmax(b) as usize] - b[argmax(a) as usize]);
                }
            }
        }
        let agreement = same as f64 / total as f64;
        eprintln!(
            "{quant} shards, {precision:?} activations: top-1 agreement with f32 {same}/{total} = {agreement:.3}, widest flipped margin {widest:.3}"
        );
        assert!(
            agreement >= floor,
            "{quant} {precision:?}: agreement {agreement:.3} < {floor}"
        );
        if quant == ShardQuant::Q8_0 {
            assert!(
                widest < 1.0,
                "{quant} {precision:?} flipped a clear winner ({widest})"
            );
        }
    }
}
