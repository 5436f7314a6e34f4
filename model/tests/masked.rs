//! Masked mode in one process: exact ring arithmetic whatever the masks, every
//! architecture, SmolLM2's fidelity against the exact plaintext model, and lying parties
//! caught without changing a bit of the output.

mod common;

use std::sync::{Arc, Mutex};

use common::{max_abs_diff, smollm2_path};
use veil_model::masked::{
    ComputeParty, LocalParty, MaskParty, MaskedStats, Parties, PartyError, SplitParties,
};
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
    // the masked model at `precision`, scored against the exact one: perplexity within 1%,
    // top-1 agreement at least `min_top1`, every check passed
    let scored = |precision: Precision, min_top1: f64, plain: &mut LocalModel| {
        let stats = Arc::new(MaskedStats::default());
        let mut m = LocalModel::quantized(&q.weights, &device, Some(256), precision)
            .expect("quantized")
            .masked(&stats)
            .expect("masked");
        plain.reset();
        let r = perplexity(
            &mut m,
            Some(plain as &mut dyn SequenceModel),
            &tokens,
            256,
            bos,
            &mut |_, _| {},
        )
        .expect("perplexity");
        let ratio = r.ratio().expect("ratio");
        let top1 = r.agreement.as_ref().expect("agreement").top1;
        eprintln!(
            "masked ({precision:?})/exact perplexity {ratio:.4}, top-1 agreement {:.2}%",
            100.0 * top1
        );
        assert!(
            (ratio - 1.0).abs() < 0.01,
            "{precision:?}: perplexity ratio {ratio}"
        );
        assert!(top1 >= min_top1, "{precision:?}: top-1 agreement {top1}");
        assert_eq!(stats.totals().check_failures, 0);
        m
    };
    let mut m = scored(Precision::Exact, 0.99, &mut plain);

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
    let answer = run(&mut plain);
    assert_eq!(run(&mut m), answer);

    // the default precision: blocked integer weights (a byte each) and the head's
    // activations at 8 bits, scored against the same exact model
    let mut fast = scored(Precision::Fast, 0.96, &mut plain);
    fast.reset();
    plain.reset();
    // the README's answer is the same
    assert_eq!(run(&mut fast), answer);
}

/// A party that answers honestly until its `lie_from`-th call, then adds one to a word of
/// every answer; it records the ops it lied on.
#[derive(Debug)]
struct Liar {
    inner: LocalParty,
    lie_from: usize,
    calls: Mutex<usize>,
    lies: Mutex<Vec<u64>>,
}

impl Liar {
    fn new(inner: LocalParty, lie_from: usize) -> Self {
        Liar {
            inner,
            lie_from,
            calls: Mutex::new(0),
            lies: Mutex::new(Vec::new()),
        }
    }

    fn maybe_lie(&self, op: u64, mut v: Vec<u32>) -> Vec<u32> {
        let mut calls = self.calls.lock().expect("calls");
        *calls += 1;
        if *calls >= self.lie_from {
            v[0] = v[0].wrapping_add(1);
            self.lies.lock().expect("lies").push(op);
        }
        v
    }
}

impl ComputeParty for Liar {
    fn name(&self) -> String {
        ComputeParty::name(&self.inner)
    }
    fn products(&self, op: u64, words: &[u32], n: usize) -> Result<Vec<u32>, PartyError> {
        let v = self.inner.products(op, words, n)?;
        Ok(self.maybe_lie(op, v))
    }
}

impl MaskParty for Liar {
    fn name(&self) -> String {
        MaskParty::name(&self.inner)
    }
    fn mask_products(&self, op: u64, first: u64, n: usize) -> Result<Vec<u32>, PartyError> {
        let v = self.inner.mask_products(op, first, n)?;
        Ok(self.maybe_lie(op, v))
    }
}

/// A compute node that is never reachable.
#[derive(Debug)]
struct Down;

impl ComputeParty for Down {
    fn name(&self) -> String {
        "down".into()
    }
    fn products(&self, _: u64, _: &[u32], _: usize) -> Result<Vec<u32>, PartyError> {
        Err(PartyError {
            party: "down".into(),
            reason: "connection refused".into(),
        })
    }
}

/// Prefill `ids`, then 6 greedy steps: every logit on the way.
fn run(m: &mut LocalModel, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut out = m.feed_all(ids).expect("prefill");
    for _ in 0..6 {
        let next = argmax(out.last().expect("logits"));
        out.push(m.feed(&[next]).expect("step"));
    }
    out
}

#[test]
fn lying_parties_are_caught_at_their_first_wrong_answer_and_change_nothing() {
    let q = QuantBundle::tiny().expect("tiny");
    let ids = q
        .text
        .tokenizer
        .encode("a lying node is caught", false)
        .expect("ids");
    let want = run(&mut masked(&q, &Arc::new(MaskedStats::default())), &ids);

    let stats = Arc::new(MaskedStats::default());
    let m = masked(&q, &stats);
    let (ops, seed) = m.masked_ops();
    assert_eq!(ops.len(), 4 * q.weights.config.n_layers);
    let ops = Arc::new(ops);
    let party = |name: &str, seed| LocalParty::new(name, ops.clone(), seed);
    let lying_node = Arc::new(Liar::new(party("lying-node", None), 5));
    let lying_provider = Arc::new(Liar::new(party("lying-provider", seed.clone()), 3));
    let split = Arc::new(SplitParties::new(
        vec![
            lying_node.clone() as Arc<dyn ComputeParty>,
            Arc::new(Down),
            Arc::new(party("honest-node", None)),
        ],
        vec![
            lying_provider.clone() as Arc<dyn MaskParty>,
            Arc::new(party("honest-provider", seed)),
        ],
    ));
    let mut m = m.with_parties(&Parties::Split(split.clone()));
    assert_eq!(run(&mut m, &ids), want, "the output changed");

    // each liar lied once: caught at once, never asked again
    let (node_lies, provider_lies) = (
        lying_node.lies.lock().expect("lies").clone(),
        lying_provider.lies.lock().expect("lies").clone(),
    );
    assert_eq!(node_lies.len(), 1);
    assert_eq!(provider_lies.len(), 1);
    let found = split.detections();
    assert_eq!(found.len(), 2, "{found:?}");
    let role_of = |name: &str| {
        found
            .iter()
            .find(|d| d.party == name)
            .map(|d| (d.role.clone(), d.op))
    };
    assert_eq!(
        role_of("lying-node"),
        Some(("compute node".into(), node_lies[0]))
    );
    assert_eq!(
        role_of("lying-provider"),
        Some(("mask provider".into(), provider_lies[0]))
    );
    assert_eq!(stats.totals().check_failures, 2);

    // with no honest compute node left, the client computes the ops itself: same output
    let m = masked(&q, &Arc::new(MaskedStats::default()));
    let (ops, _) = m.masked_ops();
    let liar = Arc::new(Liar::new(LocalParty::new("liar", Arc::new(ops), None), 1));
    let split = Arc::new(SplitParties::new(
        vec![liar.clone() as Arc<dyn ComputeParty>],
        vec![],
    ));
    let mut m = m.with_parties(&Parties::Split(split.clone()));
    assert_eq!(run(&mut m, &ids), want);
    assert_eq!(liar.lies.lock().expect("lies").len(), 1);
    assert_eq!(split.detections().len(), 1);
}

#[test]
fn a_node_reads_nothing_from_masked_words_and_everything_without_masks() {
    use veil_model::attack::masked::{embedding_match, layer0_inputs, recording, uniformity};
    let q = QuantBundle::tiny().expect("tiny");
    let m = masked(&q, &Arc::new(MaskedStats::default()));
    let (mut m, recorder, seed) = recording(m).expect("masked");
    let mut truth = Vec::new();
    for text in [
        "the cat sat on the mat",
        "a dog ran in the park",
        "one two three four five six",
    ] {
        m.reset();
        let ids = q.text.tokenizer.encode(text, false).expect("ids");
        m.feed_all(&ids).expect("run");
        truth.extend(ids);
    }
    let served = recorder.served();
    let (masked_in, plain_in) = layer0_inputs(&served, &seed);
    assert_eq!(masked_in.len(), truth.len());
    let control = embedding_match(&q.weights, &plain_in, &truth);
    let attack = embedding_match(&q.weights, &masked_in, &truth);
    assert!(control.rate >= 0.9, "the control attack fails: {control:?}");
    assert!(
        attack.hits <= 2,
        "masked words gave tokens away: {attack:?}"
    );
    let words: Vec<u32> = served
        .iter()
        .flat_map(|s| s.words.iter().copied())
        .collect();
    assert!(words.len() > 10_000);
    for lane in uniformity(&words) {
        assert!(lane.p > 1e-6, "{lane:?}");
    }
}
