//! Encrypted SmolLM2 is exact: greedy tokens identical to plaintext for 64 tokens on raw
//! and chat prompts, logits within f32 rounding. Needs the model (`veil model fetch`).

mod common;

use common::{max_abs_diff, smollm2_path};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use veil_model::crypto::{encrypt_model, EncryptedLocal, KeyOptions, KeyShape, ModelKey};
use veil_model::sampling::argmax;
use veil_model::{Compute, LocalModel, ModelBundle, TokenModel};

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
    }
    eprintln!("encrypted vs plaintext over {} prompts x {TOKENS} tokens: identical tokens, max |Δlogit| {worst:.5}", prompts.len());
    assert!(worst < 1e-2, "max |Δlogit| {worst}");
}
