//! Masked mode in one process: exact ring arithmetic whatever the masks, every
//! architecture, and SmolLM2's fidelity against the exact plaintext model.

mod common;

use std::sync::Arc;

use common::{max_abs_diff, smollm2_path};
use veil_model::masked::MaskedStats;
use veil_model::perplexity::{perplexity, SequenceModel};
use veil_model::sampling::argmax;
use veil_model::tiny::TinyVariant;
use veil_model::{Compute, LocalModel, Precision, QuantBundle, TokenModel};

fn masked(q: &QuantBundle, stats: &Arc<MaskedStats>) -> LocalModel {
    LocalModel::quantized(&q.weights, &Compute::cpu().device, None, Precision::Exact)
        .expect("quantized")
        .masked(stats)
        .expect("masked")
}

#[test]
fn outputs_do_not_depend_on_the_masks() {
    // two sessions draw different seeds; unmasking is exact, so their logits are the same
    // bits, and every product passes its check
    let q = QuantBundle::tiny().expect("tiny");
    let ids = q
        .text
        .tokenizer
        .encode("the cat sat on the mat", false)
        .expect("ids");
    let stats = Arc::new(MaskedStats::default());
    let (mut a, mut b) = (masked(&q, &stats), masked(&q, &stats));
    let (la, lb) = (a.feed_all(&ids).expect("a"), b.feed_all(&ids).expect("b"));
    assert_eq!(la, lb);
    let (na, nb) = (a.feed(&[3]).expect("a"), b.feed(&[3]).expect("b"));
    assert_eq!(na, nb);
    let t = stats.totals();
    let layers = q.weights.config.n_layers as u64;
    assert_eq!(t.ops, 2 * 2 * 4 * layers);
    assert!(t.positions > 0);
    assert_eq!(t.check_failures, 0);
}

#[test]
fn every_architecture_follows_its_exact_model() {
    for v in TinyVariant::ALL {
        let q = QuantBundle::tiny_variant(v).expect("tiny");
        let ids = q
            .text
            .tokenizer
            .encode("the quick brown fox jumps over the lazy dog", false)
            .expect("ids");
        let device = Compute::cpu().device;
        let exact = LocalModel::quantized(&q.weights, &device, None, Precision::Exact)
            .expect("quantized")
            .feed_all(&ids)
            .expect("exact");
        let stats = Arc::new(MaskedStats::default());
        let got = masked(&q, &stats).feed_all(&ids).expect("masked");
        let scale = exact.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        let worst = exact
            .iter()
            .zip(&got)
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-2 * scale,
            "{}: max |Δlogit| {worst} for logits up to {scale}",
            v.name()
        );
        let agree = exact
            .iter()
            .zip(&got)
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count();
        assert!(
            agree + 1 >= ids.len(),
            "{}: top-1 {agree}/{}",
            v.name(),
            ids.len()
        );
        assert_eq!(stats.totals().check_failures, 0);
    }
}

#[test]
fn smollm2_masked_scores_like_the_exact_model() {
    let q = QuantBundle::load(&smollm2_path()).expect("load SmolLM2");
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/prose.txt"))
            .expect("text");
    let tok = &q.text.tokenizer;
    let bos = tok.add_bos.then_some(tok.bos).flatten();
    let mut tokens: Vec<u32> = bos.into_iter().collect();
    tokens.extend(tok.encode(&text, false).expect("ids"));
    let device = Compute::cpu().device;
    let mut plain =
        LocalModel::quantized(&q.weights, &device, Some(256), Precision::Exact).expect("plain");
    let stats = Arc::new(MaskedStats::default());
    let mut m = LocalModel::quantized(&q.weights, &device, Some(256), Precision::Exact)
        .expect("quantized")
        .masked(&stats)
        .expect("masked");
    let r = perplexity(
        &mut m,
        Some(&mut plain as &mut dyn SequenceModel),
        &tokens,
        256,
        bos,
        &mut |_, _| {},
    )
    .expect("perplexity");
    let ratio = r.ratio().expect("ratio");
    let top1 = r.agreement.as_ref().expect("agreement").top1;
    eprintln!(
        "masked/exact perplexity {ratio:.4}, top-1 agreement {:.2}%",
        100.0 * top1
    );
    assert!((ratio - 1.0).abs() < 0.01, "perplexity ratio {ratio}");
    assert!(top1 >= 0.99, "top-1 agreement {top1}");
    assert_eq!(stats.totals().check_failures, 0);

    // greedy decoding on a chat prompt: the same answer as the exact model
    let ids = q
        .text
        .prompt_tokens("Why is the sky blue?", false)
        .expect("prompt");
    let run = |model: &mut dyn TokenModel| {
        let mut logits = model.feed(&ids).expect("prompt");
        let mut out = Vec::new();
        for _ in 0..48 {
            let next = argmax(&logits);
            out.push(next);
            logits = model.feed(&[next]).expect("step");
        }
        out
    };
    plain.reset();
    m.reset();
    assert_eq!(run(&mut m), run(&mut plain));
}
