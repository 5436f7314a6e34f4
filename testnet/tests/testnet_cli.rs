//! `veil-testnet` as a user runs it: up, bench, chaos and simulate on the tiny model, its
//! errors, and nothing left behind (no process, no directory) whatever happens.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use veil_testnet::cluster::find_bin;

/// Run `veil-testnet` with its temporary files under `tmp` and the model cache in `home`.
fn testnet(tmp: &Path, args: &[&str]) -> Output {
    let bin = find_bin("veil-testnet").expect("veil-testnet");
    let home = tmp.join("home");
    std::fs::create_dir_all(&home).expect("home");
    Command::new(bin)
        .args(args)
        .env("TMPDIR", tmp)
        .env("VEIL_HOME", &home)
        .env("VEIL_LOG", "info")
        .output()
        .expect("run veil-testnet")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// No testnet directory under `tmp` and no process mentioning `tmp` is left.
fn assert_clean(tmp: &Path) {
    let left: Vec<String> = std::fs::read_dir(tmp)
        .expect("tmp")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("veil-testnet-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let needle = tmp.display().to_string();
    let running: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect();
    assert!(running.is_empty(), "processes left running: {running:?}");
}

#[test]
fn up_answers_through_three_nodes_and_cleans_up() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = testnet(
        tmp.path(),
        &[
            "up",
            "--model",
            "tiny",
            "--quant",
            "f32",
            "--exit",
            "--json",
            "--max-tokens",
            "12",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["tokens"], 12);
    let route = v["route"].as_array().expect("route");
    assert_eq!(route.len(), 3, "three stages");
    assert!(route
        .iter()
        .all(|r| r.as_str().expect("str").starts_with("node-")));
    assert!(v["decode_tokens_per_s"].as_f64().expect("rate") > 0.0);
    assert!(stderr(&out).contains("waiting for every node's capacity ad"));
    assert_clean(tmp.path());

    // with the client running its first and last layers, the network gives the same answer
    let mitigated = testnet(
        tmp.path(),
        &[
            "up",
            "--model",
            "tiny",
            "--quant",
            "f32",
            "--exit",
            "--json",
            "--max-tokens",
            "12",
            "--client-layers",
            "1",
            "--client-last-layers",
            "1",
            // the tiny model's 4 layers: 1 at each end, 2 for the nodes
            "--stages",
            "2",
        ],
    );
    assert!(mitigated.status.success(), "{}", stderr(&mitigated));
    let m: Value = serde_json::from_slice(&mitigated.stdout).expect("JSON");
    assert_eq!(m["text"], v["text"]);
    assert_clean(tmp.path());
}

#[test]
fn bad_requests_fail_before_starting_anything() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = testnet(
        tmp.path(),
        &[
            "up", "--model", "tiny", "--nodes", "2", "--stages", "3", "--exit",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("3 stages need at least 3 nodes"),
        "{}",
        stderr(&out)
    );
    let out = testnet(tmp.path(), &["up", "--model", "no-such-model", "--exit"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown model"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));
    assert_clean(tmp.path());
}

#[test]
fn a_port_in_use_is_a_clear_error_and_stops_the_started_nodes() {
    let tmp = tempfile::tempdir().expect("tmp");
    // find two free consecutive ports, and hold the second
    let (base, _held) = (20000u16..40000)
        .step_by(7)
        .find_map(|p| {
            let first = std::net::TcpListener::bind(("127.0.0.1", p)).ok()?;
            let second = std::net::TcpListener::bind(("127.0.0.1", p + 1)).ok()?;
            drop(first);
            Some((p, second))
        })
        .expect("free ports");
    let out = testnet(
        tmp.path(),
        &[
            "up",
            "--model",
            "tiny",
            "--exit",
            "--base-port",
            &base.to_string(),
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("node-1"), "{err}");
    assert!(err.to_lowercase().contains("in use"), "{err}");
    assert_clean(tmp.path());
}

#[test]
fn bench_reports_throughput_latency_and_baselines_and_feeds_the_simulator() {
    let tmp = tempfile::tempdir().expect("tmp");
    let report = tmp.path().join("report");
    let json = tmp.path().join("bench.json");
    let out = testnet(
        tmp.path(),
        &[
            "bench",
            "--model",
            "tiny",
            "--sessions",
            "3",
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "10",
            "--report",
            &report.display().to_string(),
            "--json",
            &json.display().to_string(),
            "--gateway",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("JSON");
    // the same levels through the gateway: every token arrives, with its figures beside
    let gateway = &v["gateway"];
    let glevels = gateway["levels"].as_array().expect("gateway levels");
    assert_eq!(glevels.len(), 3, "{gateway}");
    for g in glevels {
        let n = g["sessions"].as_u64().expect("n");
        assert_eq!(g["tokens"].as_u64(), Some(10 * n), "{g}");
        assert!(g["tokens_per_s"].as_f64() > Some(0.0));
        assert!(g["in_process_tokens_per_s"].as_f64() > Some(0.0));
        assert!(g["time_to_first_token"]["p50_ms"].as_f64() > Some(0.0));
    }
    assert!(gateway["idle_connection_bytes"].as_f64() >= Some(0.0));
    let md = std::fs::read_to_string(report.join("bench.md")).expect("bench.md");
    assert!(md.contains("through the gateway"), "{md}");
    let levels = v["levels"].as_array().expect("levels");
    let sessions: Vec<u64> = levels
        .iter()
        .map(|l| l["sessions"].as_u64().expect("n"))
        .collect();
    assert_eq!(sessions, vec![1, 2, 3]);
    for l in levels {
        assert_eq!(l["failed"], 0);
        assert_eq!(
            l["tokens"].as_u64(),
            Some(10 * l["sessions"].as_u64().expect("n"))
        );
        assert!(l["tokens_per_s"].as_f64().expect("rate") > 0.0);
        let p = &l["per_token"];
        assert!(p["p50_ms"].as_f64() <= p["p95_ms"].as_f64());
        assert!(p["p95_ms"].as_f64() <= p["p99_ms"].as_f64());
        let nodes = l["nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), 3);
        let steps: u64 = nodes
            .iter()
            .map(|n| n["steps"].as_u64().expect("steps"))
            .sum();
        // every token of every session crossed the three stages (the prompt once more)
        assert_eq!(steps, 3 * l["tokens"].as_u64().expect("tokens"));
        assert!(nodes.iter().any(|n| n["busy_ms"].as_u64() > Some(0)));
    }
    let names: Vec<&str> = v["baselines"]
        .as_array()
        .expect("baselines")
        .iter()
        .map(|b| b["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["plaintext, 1 process", "encrypted, 1 process"]);
    // the simulator on the same network (three nodes, loopback) beside each level
    let simulated = v["simulated"].as_array().expect("simulated");
    assert_eq!(simulated.len(), 3, "{v:#}");
    for (s, l) in simulated.iter().zip(levels) {
        assert_eq!(s["sessions"], l["sessions"]);
        assert_eq!(s["measured_tokens_per_s"], l["tokens_per_s"]);
        assert!(s["simulated_tokens_per_s"].as_f64() > Some(0.0), "{s}");
    }
    let md = std::fs::read_to_string(report.join("bench.md")).expect("md");
    assert!(md.contains("| sessions |") && md.contains("vs plaintext"));
    assert!(md.contains("simulated / measured"), "{md}");
    for svg in ["tokens-per-second.svg", "per-token-latency.svg"] {
        let text = std::fs::read_to_string(report.join(svg)).expect("svg");
        assert!(
            text.starts_with("<svg") && text.contains("polyline"),
            "{svg}"
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("# Veil testnet bench"));
    assert_clean(tmp.path());

    // the simulator takes its costs from the bench
    let sim = testnet(
        tmp.path(),
        &[
            "simulate",
            "--from",
            &json.display().to_string(),
            "--nodes",
            "6,60",
            "--duration",
            "20",
            "--json",
        ],
    );
    assert!(sim.status.success(), "{}", stderr(&sim));
    let s: Value = serde_json::from_slice(&sim.stdout).expect("JSON");
    let r = s["results"].as_array().expect("results");
    assert_eq!(r.len(), 2);
    assert!(r[1]["tokens_per_s"].as_f64() > r[0]["tokens_per_s"].as_f64());
    assert_eq!(s["params"]["layers"], v["layers"]);
}

#[test]
fn chaos_kills_nodes_and_every_completed_output_is_unchanged() {
    let tmp = tempfile::tempdir().expect("tmp");
    let json = tmp.path().join("chaos.json");
    let out = testnet(
        tmp.path(),
        &[
            "chaos",
            "--model",
            "tiny",
            "--step-delay-ms",
            "15",
            "--sessions",
            "2",
            "--rounds",
            "3",
            "--gen-tokens",
            "40",
            "--kill-every",
            "1.5",
            "--down",
            "0.5",
            "--json",
            &json.display().to_string(),
        ],
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("JSON");
    assert!(out.status.success(), "{}\n{v:#}", stderr(&out));
    assert!(!v["kills"].as_array().expect("kills").is_empty());
    // 3 rounds of 2 sessions, and more rounds if no kill had completed by then
    let generations = v["generations"].as_u64().expect("generations");
    assert!(
        generations >= 6 && generations.is_multiple_of(2),
        "{generations}"
    );
    assert_eq!(v["identical"], v["completed"]);
    assert!(v["completed"].as_u64() > Some(0));
    assert!(v["failovers"].as_u64() > Some(0), "kills hit live sessions");
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical to the fault-free run"));
    assert_clean(tmp.path());
}

/// A run whose rounds end before the first kill (a fast machine: CI once failed so) goes
/// on with more rounds until a node has been killed and restarted.
#[test]
fn chaos_runs_more_rounds_until_a_kill_falls_inside_the_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    let json = tmp.path().join("chaos.json");
    let out = testnet(
        tmp.path(),
        &[
            "chaos",
            "--model",
            "tiny",
            "--sessions",
            "2",
            "--rounds",
            "1",
            "--gen-tokens",
            "4",
            "--kill-every",
            "2",
            "--down",
            "0.2",
            "--json",
            &json.display().to_string(),
        ],
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("JSON");
    assert!(out.status.success(), "{}\n{v:#}", stderr(&out));
    assert!(!v["kills"].as_array().expect("kills").is_empty(), "{v:#}");
    let generations = v["generations"].as_u64().expect("generations");
    assert!(
        generations > 2,
        "one round of 4 tokens cannot last 2 s: {v:#}"
    );
    assert_eq!(v["identical"], v["completed"]);
    assert_clean(tmp.path());
}

/// A short soak on the tiny model: abusers get refusals of every kind, the nodes stay within
/// their bounds, nothing of the abusers outlives them, and the report is written.
#[test]
fn a_short_soak_keeps_every_node_within_its_bounds() {
    let tmp = tempfile::tempdir().expect("tmp");
    let report = tmp.path().join("report");
    let out = testnet(
        tmp.path(),
        &[
            "soak",
            "--model",
            "tiny",
            "--quant",
            "f32",
            "--nodes",
            "2",
            "--step-delay-ms",
            "5",
            "--duration",
            "40s",
            "--max-disk-mib",
            "64",
            "--report",
            &report.display().to_string(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", stderr(&out));
    let v: Value = serde_json::from_slice(&std::fs::read(report.join("soak.json")).expect("json"))
        .expect("JSON");
    assert!(v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .all(|c| c["passed"] == true));
    assert!(v["generations"].as_u64() > Some(2));
    assert_eq!(v["identical"], v["generations"]);
    // every abuser was refused the way its limit says
    let outcome =
        |kind: &str, what: &str| v["abusers"][kind]["outcomes"][what].as_u64().unwrap_or(0);
    assert!(
        outcome("request flood", "RateLimited") > 0,
        "{:#}",
        v["abusers"]
    );
    assert!(outcome("upload flood", "NoSpace") > 0, "{:#}", v["abusers"]);
    assert!(outcome("session flood", "Busy") > 0, "{:#}", v["abusers"]);
    assert!(outcome("garbage", "BadRequest") > 0, "{:#}", v["abusers"]);
    assert!(outcome("vanish mid-upload", "ok") > 0, "{:#}", v["abusers"]);
    for n in v["series"].as_array().expect("series") {
        assert!(n["samples"].as_array().expect("samples").len() >= 10);
        assert_eq!(n["sessions_left"], 0);
        assert_eq!(n["partial_uploads_left"], 0);
    }
    for f in ["soak.md", "soak-memory.svg", "soak-disk.svg"] {
        assert!(report.join(f).exists(), "{f}");
    }
    assert!(stdout.contains("| check | result |"));
    assert_clean(tmp.path());
}

/// A `veil-testnet` child stopped with ctrl-c when dropped while still running (so that it
/// removes its nodes), should a test fail before stopping it itself.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill")
                .args(["-INT", &self.0.id().to_string()])
                .status();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn ctrl_c_stops_a_running_testnet_and_removes_everything() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().expect("tmp");
    let bin = find_bin("veil-testnet").expect("veil-testnet");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let mut child = Stopped(
        Command::new(bin)
            .args(["up", "--model", "tiny", "--max-tokens", "4"])
            .env("TMPDIR", tmp.path())
            .env("VEIL_HOME", &home)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn"),
    );
    let stderr = child.0.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = String::new();
    for line in lines.by_ref().map_while(Result::ok) {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("press ctrl-c") {
            break;
        }
    }
    // keep reading what it says while it stops
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    assert!(seen.contains("veil chat --deployment"), "{seen}");
    let status = Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = child.0.wait().expect("wait");
    assert_eq!(exit.code(), Some(130));
    let rest = rest.join().expect("stderr").join("\n");
    assert!(rest.contains("stopping the testnet"), "{rest}");
    assert_clean(tmp.path());
}

#[test]
fn a_new_session_goes_to_the_least_loaded_replica() {
    use veil_client::net::Client;
    use veil_client::remote::RemotePipeline;
    use veil_model::TokenModel;
    use veil_testnet::network::{LocalNetwork, NetworkOptions};
    let network = LocalNetwork::start(
        &NetworkOptions {
            nodes: 2,
            model: "tiny".into(),
            stages: Some(1),
            replicas: 2,
            ..NetworkOptions::default()
        },
        &|_| {},
    )
    .expect("network");
    let client = Client::connect(&network.net_args()).expect("client");
    let pipeline = || {
        RemotePipeline::new(
            client.runtime.handle().clone(),
            client.network.clone(),
            &network.bundle,
            &network.deployment,
            64,
            veil_model::Precision::Fast,
        )
        .expect("pipeline")
    };
    for _ in 0..4 {
        let mut a = pipeline();
        a.feed(&[1, 2, 3]).expect("a");
        let mut b = pipeline();
        b.feed(&[4, 5]).expect("b");
        assert_ne!(a.route(), b.route(), "b avoids the replica serving a");
    }
}

#[test]
fn up_with_serve_keeps_a_gateway_to_the_deployment() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().expect("tmp");
    let bin = find_bin("veil-testnet").expect("veil-testnet");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let mut child = Stopped(
        Command::new(bin)
            .args(["up", "--model", "tiny", "--max-tokens", "4", "--serve", "0"])
            .env("TMPDIR", tmp.path())
            .env("VEIL_HOME", &home)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    // keep reading stdout to the end: a closed pipe would make the harness's later prints fail
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.0.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let line = rx
        .iter()
        .find(|l| l.starts_with("OpenAI-compatible gateway: "))
        .expect("the gateway's line");
    let url = line
        .trim_start_matches("OpenAI-compatible gateway: ")
        .split("/v1")
        .next()
        .expect("url")
        .to_string();
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "120",
            "-H",
            "Content-Type: application/json",
            "-d",
        ])
        .arg(r#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":4}"#)
        .arg(format!("{url}/v1/chat/completions"))
        .output()
        .expect("curl");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert!(
        v["model"].as_str().is_some_and(|m| m.starts_with("d-")),
        "{v}"
    );
    Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert_eq!(child.0.wait().expect("wait").code(), Some(130));
    assert_clean(tmp.path());
    // the gateway went with the nodes
    let addr = url.trim_start_matches("http://");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "{addr} still answers"
    );
}

/// `up --privacy masked` answers through three nodes with every product checked, and
/// `--record DIR` keeps what each node received: masked words pass the uniformity test
/// lane by lane, rotated hidden states fail it.
#[test]
fn up_masked_answers_and_its_recordings_are_uniform() {
    let tmp = tempfile::tempdir().expect("tmp");
    let record = tmp.path().join("record");
    let run = |privacy: &str| {
        let dir = record.join(privacy);
        let out = testnet(
            tmp.path(),
            &[
                "up",
                "--model",
                "tiny",
                "--quant",
                "f32",
                "--exit",
                "--json",
                "--max-tokens",
                "12",
                "--privacy",
                privacy,
                "--record",
                dir.to_str().expect("utf-8"),
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        assert_eq!(v["tokens"], 12, "{v}");
        assert_eq!(v["privacy"], privacy, "{v}");
        let veil = find_bin("veil").expect("veil");
        let out = Command::new(veil)
            .args(["attack", "uniformity", "--json"])
            .arg(&dir)
            .output()
            .expect("veil attack uniformity");
        assert!(out.status.success(), "{}", stderr(&out));
        let u: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        (v, u)
    };
    let (v, u) = run("masked");
    let m = &v["masked"];
    assert!(m["ops"].as_u64() > Some(0), "{v}");
    assert_eq!(m["failed_checks"], 0, "{v}");
    assert_eq!(u["uniform"], true, "{u}");
    let nodes = u["nodes"].as_array().expect("nodes");
    assert!(!nodes.is_empty(), "{u}");
    assert!(
        nodes.iter().all(|n| n["words"].as_u64() > Some(10_000)),
        "{u}"
    );
    let (_, u) = run("rotated");
    assert_eq!(u["uniform"], false, "{u}");
    assert_clean(tmp.path());
}

/// `chaos --privacy masked`: nodes killed and restarted under masked sessions; their ops
/// move to the other replica (a restarted node gets its session opened again) and every
/// completed output equals the fault-free run's.
#[test]
fn chaos_masked_keeps_every_completed_output() {
    let tmp = tempfile::tempdir().expect("tmp");
    let json = tmp.path().join("chaos.json");
    let out = testnet(
        tmp.path(),
        &[
            "chaos",
            "--model",
            "tiny",
            "--privacy",
            "masked",
            "--sessions",
            "2",
            "--rounds",
            "3",
            "--gen-tokens",
            "40",
            "--kill-every",
            "1",
            "--down",
            "0.5",
            "--json",
            &json.display().to_string(),
        ],
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("JSON");
    assert!(out.status.success(), "{}\n{v:#}", stderr(&out));
    assert!(!v["kills"].as_array().expect("kills").is_empty());
    assert!(v["completed"].as_u64() > Some(0), "{v:#}");
    assert_eq!(v["identical"], v["completed"], "{v:#}");
    assert_clean(tmp.path());
}
