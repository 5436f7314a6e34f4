//! Fidelity of SmolLM2-135M-Instruct in burn against two references computed outside the
//! project: an exact (float64) numpy forward pass and llama.cpp. The data files are
//! `tests/data/smollm2-reference.json` (the project's shared reference) and
//! `tests/data/smollm2-fidelity.json`
//! (made by `tools/reference/make_fidelity_data.py`).
//!
//! Needs the model: `veil model fetch` (CI's `.ci/run` does it).

mod common;

use std::sync::OnceLock;

use common::{devices, json_ids as ids, smollm2_path};
use serde_json::Value;
use veil_model::chat::ChatMessage;
use veil_model::{
    generate, Compute, GenerateParams, LocalModel, ModelBundle, Precision, QuantBundle,
    SamplingParams,
};

/// |Δlogit| allowed against the exact reference: f32 accumulation over 30 layers.
const F32_TOLERANCE: f32 = 1e-2;
/// |Δlogit| allowed against llama.cpp at its top token. llama.cpp quantises activations to
/// 8 bits before its Q4_1/Q8_0 products, so its logits are not those of the f32 model:
/// the shared reference reports ~0.25 mean and up to ~2.6 difference to exact f32.
const LLAMA_CPP_TOLERANCE: f32 = 3.0;
/// Fraction of positions whose top-1 token must equal llama.cpp's. Where the two best
/// logits are closer than llama.cpp's quantisation error, the choice can flip.
const LLAMA_CPP_TOP1_AGREEMENT: f64 = 0.95;

fn bundle() -> &'static ModelBundle {
    static B: OnceLock<ModelBundle> = OnceLock::new();
    B.get_or_init(|| ModelBundle::load(&smollm2_path()).expect("load SmolLM2"))
}

fn json(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).expect("valid JSON")
}

fn shared() -> Value {
    json(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/smollm2-reference.json"
    ))
}

fn ours() -> Value {
    json(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/smollm2-fidelity.json"
    ))
}

/// (id, logit) pairs of a `[{id, logit}]` list.
fn pairs(v: &Value) -> Vec<(usize, f32)> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["id"].as_u64().expect("id") as usize,
                e["logit"].as_f64().expect("logit") as f32,
            )
        })
        .collect()
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let tok = &bundle().text.tokenizer;
    let mut n = 0;
    for (text, probe) in shared()["tokenizer_probes"].as_object().expect("probes") {
        let special = probe["special_parsed"].as_bool().expect("flag");
        assert_eq!(
            tok.encode(text, special).expect("encode"),
            ids(&probe["ids"]),
            "{text:?}"
        );
        n += 1;
    }
    for probe in ours()["tokenizer_probes"].as_array().expect("probes") {
        let text = probe["text"].as_str().expect("text");
        let special = probe["special"].as_bool().expect("flag");
        assert_eq!(
            tok.encode(text, special).expect("encode"),
            ids(&probe["ids"]),
            "{text:?}"
        );
        n += 1;
    }
    for case in ours()["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(
            bundle().text.encode_prompt(text).expect("encode"),
            ids(&case["prompt_ids"])
        );
        n += 1;
    }
    assert!(n >= 25);
}

#[test]
fn chat_template_renders_like_transformers() {
    let b = bundle();
    for case in ours()["cases"].as_array().expect("cases") {
        if case["kind"] == "chat" {
            let prompt = case["prompt"].as_str().expect("prompt");
            let text = b
                .text
                .chat_text(&[ChatMessage::new("user", prompt)])
                .expect("render");
            assert_eq!(text, case["text"].as_str().expect("text"));
            assert_eq!(
                b.text.prompt_tokens(prompt, false).expect("tokens"),
                ids(&case["prompt_ids"])
            );
        }
    }
    for (name, case) in shared()["cases"].as_object().expect("cases") {
        let text = case["prompt_text"].as_str().expect("text");
        if let Some(rest) = text.split("<|im_start|>user\n").nth(1) {
            let user = rest.split("<|im_end|>").next().expect("user turn");
            assert_eq!(
                b.text
                    .chat_text(&[ChatMessage::new("user", user)])
                    .expect("render"),
                text,
                "{name}"
            );
        }
        assert_eq!(
            b.text.encode_prompt(text).expect("encode"),
            ids(&case["prompt_ids"]),
            "{name}"
        );
    }
}

/// Teacher-force `prompt + continuation` and compare the logits at each generated step
/// with the reference's `(id, logit)` lists; returns the largest |Δ|.
fn compare_steps(
    model: &mut LocalModel,
    prompt: &[u32],
    continuation: &[u32],
    steps: &[Vec<(usize, f32)>],
) -> f32 {
    model.reset();
    let seq: Vec<u32> = prompt.iter().chain(continuation).copied().collect();
    let logits = model.feed_all(&seq).expect("forward");
    let mut worst = 0.0f32;
    for (i, expected) in steps.iter().enumerate() {
        let row = &logits[prompt.len() - 1 + i];
        for &(id, logit) in expected {
            worst = worst.max((row[id] - logit).abs());
        }
    }
    worst
}

/// Our own cases checked on wgpu besides the shared reference's (all of them on the CPU).
/// The software Vulkan device CI runs wgpu on takes ~10 s per case; the kernels' exactness
/// on wgpu is covered shape by shape by the tiny-model tests.
const WGPU_OWN_CASES: usize = 2;

/// The largest |Δlogit| of `model` against the exact f32 reference over the shared cases
/// and the first `own` of ours, and how many logits were compared.
fn reference_logits_worst(model: &mut LocalModel, own: usize) -> (f32, usize) {
    let mut worst = 0.0f32;
    let mut compared = 0;
    for case in ours()["cases"].as_array().expect("cases").iter().take(own) {
        let steps: Vec<Vec<(usize, f32)>> = case["numpy_steps"]
            .as_array()
            .expect("steps")
            .iter()
            .map(|s| [pairs(&s["top"]), pairs(&s["sampled"])].concat())
            .collect();
        compared += steps.iter().map(Vec::len).sum::<usize>();
        let d = compare_steps(
            model,
            &ids(&case["prompt_ids"]),
            &ids(&case["numpy_greedy_ids"]),
            &steps,
        );
        worst = worst.max(d);
    }
    for case in shared()["cases"].as_object().expect("cases").values() {
        let steps: Vec<Vec<(usize, f32)>> = case["numpy_f32_top5_first5"]
            .as_array()
            .expect("steps")
            .iter()
            .map(pairs)
            .collect();
        compared += steps.iter().map(Vec::len).sum::<usize>();
        let d = compare_steps(
            model,
            &ids(&case["prompt_ids"]),
            &ids(&case["numpy_f32_greedy_ids"]),
            &steps,
        );
        worst = worst.max(d);
    }
    (worst, compared)
}

#[test]
fn logits_match_the_exact_f32_reference_on_every_backend() {
    let b = bundle();
    for (kind, device) in devices() {
        let mut model = LocalModel::new(&b.weights, &device, Some(256));
        let own = match kind {
            veil_model::BackendKind::Wgpu => WGPU_OWN_CASES,
            veil_model::BackendKind::Cpu => usize::MAX,
        };
        let (worst, compared) = reference_logits_worst(&mut model, own);
        eprintln!("{kind}: max |Δlogit| vs exact f32 over {compared} logits: {worst:.5}");
        assert!(worst < F32_TOLERANCE, "{kind}: max |Δlogit| {worst}");
    }
}

fn quantized(precision: Precision) -> LocalModel {
    static Q: OnceLock<QuantBundle> = OnceLock::new();
    let q = Q.get_or_init(|| QuantBundle::load(&smollm2_path()).expect("load SmolLM2"));
    LocalModel::quantized(&q.weights, &Compute::cpu().device, Some(256), precision)
        .expect("quantized model")
}

#[test]
fn the_quantized_kernels_with_f32_activations_match_the_exact_reference() {
    let mut model = quantized(Precision::Exact);
    let (worst, compared) = reference_logits_worst(&mut model, usize::MAX);
    eprintln!(
        "quantized kernels, --exact: max |Δlogit| vs exact f32 over {compared} logits: {worst:.5}"
    );
    assert!(worst < F32_TOLERANCE, "max |Δlogit| {worst}");
}

/// 8-bit activations (llama.cpp's trade-off) flip the top token only where the f32 model's
/// two best logits nearly tie. Measured over the 4,434 tokens of README.md
/// (`examples/quant_agreement`): 95.7% top-1 agreement with f32 activations, every
/// disagreement but 3 within 0.25 logits — llama.cpp's own kernels agree with the same f32
/// model on 95.4% of those positions.
#[test]
fn eight_bit_activations_flip_the_top_token_only_at_near_ties() {
    let (mut fast, mut exact) = (quantized(Precision::Fast), quantized(Precision::Exact));
    let (mut agree, mut total, mut widest) = (0usize, 0usize, 0.0f32);
    for case in ours()["cases"].as_array().expect("cases") {
        let seq = ids(&case["llama_cpp_sequence"]);
        fast.reset();
        exact.reset();
        let f = fast.feed_all(&seq).expect("fast");
        let e = exact.feed_all(&seq).expect("exact");
        for (rf, re) in f.iter().zip(&e) {
            total += 1;
            let (top, got) = (
                veil_model::sampling::argmax(re),
                veil_model::sampling::argmax(rf),
            );
            if got == top {
                agree += 1;
            } else {
                // how far the exact model preferred its choice over ours
                widest = widest.max(re[top as usize] - re[got as usize]);
            }
        }
    }
    let rate = agree as f64 / total as f64;
    eprintln!(
        "8-bit activations vs f32: top-1 {agree}/{total} = {rate:.4}; widest margin flipped {widest:.3}"
    );
    assert!(rate >= 0.95, "top-1 agreement {rate}");
    assert!(
        widest < 0.5,
        "a top token that led by {widest} logits flipped"
    );
}

#[test]
fn greedy_generation_reproduces_the_reference_tokens() {
    let b = bundle();
    let device = Compute::cpu().device;
    let mut cases: Vec<(Vec<u32>, Vec<u32>)> = shared()["cases"]
        .as_object()
        .expect("cases")
        .values()
        .map(|c| (ids(&c["prompt_ids"]), ids(&c["numpy_f32_greedy_ids"])))
        .collect();
    cases.extend(
        ours()["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .map(|c| (ids(&c["prompt_ids"]), ids(&c["numpy_greedy_ids"]))),
    );
    for (prompt, expected) in cases {
        let params = GenerateParams {
            max_tokens: expected.len(),
            sampling: SamplingParams::default(),
            top_logits: 0,
        };
        // the f32 model in burn, and the quantized kernels with f32 activations
        for mut model in [
            LocalModel::new(&b.weights, &device, Some(256)),
            quantized(Precision::Exact),
        ] {
            let out = generate(&mut model, &b.text.tokenizer, &prompt, &params, &mut |_| {})
                .expect("generate");
            assert_eq!(
                out.tokens,
                expected,
                "continuation of {}",
                b.text.tokenizer.decode(&prompt)
            );
        }
    }
}

#[test]
fn top1_agrees_with_llama_cpp() {
    let b = bundle();
    let device = Compute::cpu().device;
    let mut model = LocalModel::new(&b.weights, &device, Some(256));
    let (mut agree, mut total, mut worst) = (0usize, 0usize, 0.0f32);
    for case in ours()["cases"].as_array().expect("cases") {
        let seq = ids(&case["llama_cpp_sequence"]);
        let top1 = ids(&case["llama_cpp_top1"]);
        let top1_logit: Vec<f32> = case["llama_cpp_top1_logit"]
            .as_array()
            .expect("logits")
            .iter()
            .map(|v| v.as_f64().expect("logit") as f32)
            .collect();
        model.reset();
        let logits = model.feed_all(&seq).expect("forward");
        for ((row, &id), &logit) in logits.iter().zip(&top1).zip(&top1_logit) {
            total += 1;
            if veil_model::sampling::argmax(row) == id {
                agree += 1;
            }
            worst = worst.max((row[id as usize] - logit).abs());
        }
    }
    let rate = agree as f64 / total as f64;
    eprintln!("top-1 agreement with llama.cpp: {agree}/{total} = {rate:.4}; max |Δlogit| at its top-1: {worst:.3}");
    assert!(rate >= LLAMA_CPP_TOP1_AGREEMENT, "top-1 agreement {rate}");
    assert!(worst < LLAMA_CPP_TOLERANCE, "max |Δlogit| {worst}");
}

#[test]
fn a_truncated_model_file_is_an_error() {
    let bytes = std::fs::read(smollm2_path()).expect("read model");
    for cut in [10, 1_000, 2_000_000, bytes.len() / 2, bytes.len() - 1] {
        let result = veil_model::gguf::GgufFile::from_bytes(bytes[..cut].to_vec())
            .map_err(veil_model::ModelError::from)
            .and_then(|f| ModelBundle::from_gguf(&f, "cut"));
        let e = result.expect_err("a truncated file must not load");
        assert!(e.to_string().contains("truncated"), "cut at {cut}: {e}");
    }
}
