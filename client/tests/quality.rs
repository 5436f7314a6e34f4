//! `veil perplexity` and `veil model synth` as a user runs them, on SmolLM2 (fetched by the
//! test script) and the text in `model/tests/data/prose.txt`.

use assert_cmd::Command;
use serde_json::Value;

const PROSE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../model/tests/data/prose.txt");

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::cargo_bin("veil")
        .expect("veil binary")
        .env("VEIL_LOG", "warn")
        .args(args)
        .output()
        .expect("run veil");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(args: &[&str]) -> Value {
    let (ok, stdout, stderr) = run(args);
    assert!(ok, "{args:?}: {stderr}");
    serde_json::from_str(stdout.trim()).expect("one JSON object")
}

fn num(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, k| &v[k])
        .as_f64()
        .unwrap_or_else(|| panic!("{path:?} in {v}"))
}

fn perplexity(extra: &[&str]) -> Value {
    let mut args = vec![
        "perplexity",
        "--model",
        "smollm2",
        "--file",
        PROSE,
        "--ctx",
        "128",
        "--chunks",
        "4",
        "--json",
    ];
    args.extend(extra);
    json(&args)
}

#[test]
fn perplexity_of_smollm2_and_of_its_encrypted_pipeline() {
    let plain = perplexity(&[]);
    assert_eq!(plain["chunks"], 4);
    assert_eq!(plain["scored"], 4 * (128 - 1 - 64));
    let ppl = num(&plain, &["model", "perplexity"]);
    // a 135M model on plain English prose: far better than chance (49,152 tokens), not
    // implausibly good
    assert!((5.0..80.0).contains(&ppl), "perplexity {ppl}");
    assert!(num(&plain, &["model", "stderr"]) > 0.0);
    assert!(plain.get("reference").is_none());

    // f32 shards, f32 activations: the encrypted pipeline is the plaintext model
    let exact = perplexity(&["--encrypted", "--quant", "f32", "--exact"]);
    let (e, r) = (
        num(&exact, &["model", "perplexity"]),
        num(&exact, &["reference", "perplexity"]),
    );
    assert!((e / r - 1.0).abs() < 1e-4, "encrypted {e} plaintext {r}");
    assert_eq!(num(&exact, &["agreement", "top1"]), 1.0);
    assert!(num(&exact, &["agreement", "mean_kl"]) < 1e-6);

    // q8_0 shards (the default) stay close: measured 0.9946 on the whole text
    let q8 = perplexity(&["--encrypted"]);
    let ratio = num(&q8, &["model", "perplexity"]) / num(&q8, &["reference", "perplexity"]);
    assert!((0.97..1.03).contains(&ratio), "q8_0 ratio {ratio}");
    assert!(num(&q8, &["agreement", "top1"]) > 0.9, "{q8}");
    assert_eq!(q8["quant"], "q8_0");
}

#[test]
fn calibrated_4_bit_shards_keep_smollm2_close_to_plaintext() {
    // q4_0 shards round against the built-in calibration text by default (measured on
    // these chunks: ratio 1.14-1.19, mean KL 0.09-0.11, top-1 78-80%); rounded plainly they
    // lose far more (ratio 1.9-2.1, KL 0.59-0.65, top-1 57-59%). Each run draws a new key.
    let calibrated = perplexity(&["--encrypted", "--quant", "q4_0"]);
    let rounded = perplexity(&["--encrypted", "--quant", "q4_0", "--calibration", "none"]);
    let ratio = |v: &Value| num(v, &["model", "perplexity"]) / num(v, &["reference", "perplexity"]);
    let kl = |v: &Value| num(v, &["agreement", "mean_kl"]);
    assert!(ratio(&calibrated) < 1.35, "{calibrated}");
    assert!(
        num(&calibrated, &["agreement", "top1"]) > 0.7,
        "{calibrated}"
    );
    assert!(
        kl(&calibrated) < 0.4 * kl(&rounded),
        "{calibrated} against {rounded}"
    );
    assert_eq!(calibrated["quant"], "q4_0");
}

#[test]
fn perplexity_rejects_bad_input_clearly() {
    let dir = tempfile::tempdir().expect("tmp");
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "Too short.").expect("write");
    let short = short.to_str().expect("utf-8");
    for (args, needle) in [
        (vec!["--file", short], "fewer than one chunk"),
        (
            vec!["--file", "/nonexistent/text.txt"],
            "cannot read /nonexistent",
        ),
        (vec!["--file", PROSE, "--ctx", "4"], "at least 8"),
        (
            vec!["--file", PROSE, "--ctx", "100000"],
            "longer than the model's context",
        ),
        (
            vec![
                "--file",
                PROSE,
                "--encrypted",
                "--quant",
                "q4_0",
                "--calibration",
                "/nonexistent/calibration.txt",
            ],
            "cannot read the calibration text /nonexistent",
        ),
    ] {
        let mut all = vec!["perplexity", "--model", "tiny"];
        all.extend(args);
        let (ok, _, stderr) = run(&all);
        assert!(!ok && !stderr.contains("panicked"), "{all:?}: {stderr}");
        let line = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or("");
        assert!(line.contains(needle), "{all:?}: {stderr}");
    }
}

#[test]
fn a_synthetic_model_runs_with_smollm2s_tokenizer() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("llama-1b-2l.gguf");
    let out_s = out.to_str().expect("utf-8");
    let args = [
        "model", "synth", "--shape", "llama-1b", "--layers", "2", "--quant", "q4_0", "--out", out_s,
    ];
    let (ok, stdout, stderr) = run(&args);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), out_s);
    // a 49,152 x 2048 embedding and 2 layers of 60.8M weights, 4.5 bits each: 125 MB
    let size = std::fs::metadata(&out).expect("written").len();
    assert!((120_000_000..130_000_000).contains(&size), "{size} bytes");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // an existing file is kept unless --force
    let (ok, _, stderr) = run(&args);
    assert!(!ok && stderr.contains("--force"), "{stderr}");

    let gen = |model: &str| {
        json(&[
            "generate",
            "--local",
            "--backend",
            "cpu",
            "--model",
            model,
            "--prompt",
            "The lighthouse keeper",
            "--max-tokens",
            "6",
            "--json",
        ])
    };
    let synth = gen(out_s);
    let real = gen("smollm2");
    // the same tokenizer and chat template: the same prompt ids
    assert_eq!(synth["prompt_tokens"], real["prompt_tokens"]);
    let n = synth["tokens"].as_array().map_or(0, Vec::len);
    assert!((1..=6).contains(&n), "{synth}");

    // q4_k needs rows of 256: SmolLM2's 576 are not
    let bad = dir.path().join("bad.gguf");
    let (ok, _, stderr) = run(&[
        "model",
        "synth",
        "--shape",
        "smollm2",
        "--quant",
        "q4_k",
        "--out",
        bad.to_str().expect("utf-8"),
    ]);
    assert!(
        !ok && stderr.contains("token_embd.weight") && stderr.contains("Q4_K"),
        "{stderr}"
    );
    assert!(!bad.exists());
    let (ok, _, stderr) = run(&["model", "synth", "--shape", "llama-2b", "--out", out_s]);
    assert!(!ok && stderr.contains("llama-1b"), "{stderr}");
}
