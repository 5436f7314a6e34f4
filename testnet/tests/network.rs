//! A real network on loopback: node processes, the `veil` CLI deploying to them and
//! generating through them, nodes dying and restarting, and what a node receives.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use veil_testnet::cluster::{find_bin, start_nodes, Byzantine, NodeProcess, NodeSettings};

struct Veil {
    home: tempfile::TempDir,
}

impl Veil {
    fn new() -> Self {
        Veil {
            home: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let bin = find_bin("veil").expect("veil binary");
        Command::new(bin)
            .args(args)
            .env("VEIL_HOME", self.home.path())
            .env("VEIL_LOG", "info")
            .output()
            .expect("run veil")
    }

    /// Run, require success, return stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "veil {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let stdout = self.ok(args);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
    }
}

fn addr(n: &NodeProcess) -> String {
    n.addr.clone().expect("started")
}

fn deployment(veil: &Veil, id: &str) -> Value {
    let path = veil
        .home
        .path()
        .join("deployments")
        .join(id)
        .join("deployment.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("record")).expect("JSON")
}

fn local_tokens(veil: &Veil, prompt: &str, n: usize) -> Value {
    local_tokens_of(veil, "tiny", prompt, n)
}

fn local_tokens_of(veil: &Veil, model: &str, prompt: &str, n: usize) -> Value {
    veil.json(&[
        "generate",
        "--local",
        "--model",
        model,
        "--backend",
        "cpu",
        "--prompt",
        prompt,
        "--max-tokens",
        &n.to_string(),
        "--json",
    ])["tokens"]
        .clone()
}

fn deploy(veil: &Veil, bootstrap: &str, stages: usize) -> String {
    deploy_model(veil, bootstrap, "tiny", stages, 2)
}

/// Deploy `model` as f32 shards; returns the deployment id.
fn deploy_model(
    veil: &Veil,
    bootstrap: &str,
    model: &str,
    stages: usize,
    replicas: usize,
) -> String {
    deploy_with(veil, bootstrap, model, stages, replicas, &[])
}

/// [`deploy_model`] with `extra` arguments for `veil deploy` (client layers, say).
fn deploy_with(
    veil: &Veil,
    bootstrap: &str,
    model: &str,
    stages: usize,
    replicas: usize,
    extra: &[&str],
) -> String {
    let (stages, replicas) = (stages.to_string(), replicas.to_string());
    let mut args = vec![
        "deploy",
        "--quant",
        "f32",
        "--model",
        model,
        "--stages",
        &stages,
        "--replicas",
        &replicas,
        "--bootstrap",
        bootstrap,
        "--wait",
        "3",
    ];
    args.extend_from_slice(extra);
    let out = veil.ok(&args);
    out.lines()
        .last()
        .expect("deployment id")
        .trim()
        .to_string()
}

/// Poll `check` until it gives a value; panic naming `what` after a deadline generous
/// enough for a loaded machine (the tests wait for events, never for fixed times).
fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for_ads(veil: &Veil, bootstrap: &str, n: usize) -> Value {
    wait_until(&format!("{n} capacity ads"), || {
        let v = veil.json(&["peers", "--bootstrap", bootstrap, "--json", "--wait", "1"]);
        (v.as_array().map_or(0, Vec::len) >= n).then_some(v)
    })
}

/// Sessions a node has opened on `shard` (a hex shard id), from its log.
fn sessions_opened(node: &NodeProcess, shard: &str) -> usize {
    node.log()
        .matches(&format!("opened on shard {}", &shard[..12]))
        .count()
}

/// AutoNAT: nodes that can dial each other back learn they are public and say so in their
/// ads; an address the operator declares is advertised as it is.
#[test]
fn nodes_learn_they_are_reachable_and_advertise_declared_addresses() {
    let root = tempfile::tempdir().expect("tempdir");
    let settings = NodeSettings {
        relays: 1,
        relay_config: "external_addresses = [\"/ip4/203.0.113.5/tcp/4001\"]".into(),
        ..NodeSettings::default()
    };
    let nodes = start_nodes(root.path(), 3, &settings).expect("nodes");
    let boot = addr(&nodes[0]);
    let veil = Veil::new();
    let peers = wait_until("every node's ad to say it is public", || {
        let v = veil.json(&["peers", "--bootstrap", &boot, "--json", "--wait", "1"]);
        let list = v.as_array()?;
        (list.len() == 3 && list.iter().all(|p| p["reachability"] == "public")).then_some(v)
    });
    let declared = peers
        .as_array()
        .expect("list")
        .iter()
        .find(|p| p["peer_id"] == nodes[0].peer_id.as_str())
        .expect("node 0");
    assert!(
        declared["addrs"]
            .as_array()
            .expect("addrs")
            .iter()
            .any(|a| a == "/ip4/203.0.113.5/tcp/4001"),
        "{declared}"
    );
}

#[test]
fn client_layers_at_both_ends_give_the_plaintext_tokens_over_the_network() {
    // the client runs layer 0 and layer 3 itself; two nodes serve layers 1 and 2, and
    // every new row of a step comes back through the client's last layer
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = start_nodes(root.path(), 2, &NodeSettings::default()).expect("nodes");
    let boot = addr(&nodes[0]);
    let veil = Veil::new();
    wait_for_ads(&veil, &boot, 2);
    let id = deploy_with(
        &veil,
        &boot,
        "tiny",
        2,
        1,
        &["--client-layers", "1", "--client-last-layers", "1"],
    );
    let record = deployment(&veil, &id);
    let layers: Vec<Value> = record["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| s["layers"].clone())
        .collect();
    assert_eq!(
        layers,
        vec![serde_json::json!([1, 2]), serde_json::json!([2, 3])]
    );
    let prompt = "both ends stay home";
    let expected = local_tokens(&veil, prompt, 16);
    let out = veil.json(&[
        "generate",
        "--deployment",
        &id,
        "--prompt",
        prompt,
        "--max-tokens",
        "16",
        "--json",
        "--bootstrap",
        &boot,
    ]);
    assert_eq!(out["tokens"], expected);
    drop(nodes);
}

#[test]
fn deploy_generate_and_survive_a_node_dying() {
    let root = tempfile::tempdir().expect("tempdir");
    let settings = NodeSettings {
        step_delay_ms: 40,
        ..NodeSettings::default()
    };
    let mut nodes = start_nodes(root.path(), 3, &settings).expect("nodes");
    let boot = addr(&nodes[0]);
    let veil = Veil::new();
    let peers = wait_for_ads(&veil, &boot, 3);
    for p in peers.as_array().expect("list") {
        assert_eq!(p["backend"], "cpu");
        assert!(p["throughput_gflops"].as_f64().expect("gflops") > 0.0);
    }

    let id = deploy(&veil, &boot, 3);
    let record = deployment(&veil, &id);
    let stages = record["stages"].as_array().expect("stages");
    assert_eq!(stages.len(), 3);
    for s in stages {
        assert_eq!(s["replicas"].as_array().expect("replicas").len(), 2);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let client = veil
            .home
            .path()
            .join("deployments")
            .join(&id)
            .join("client.veil");
        let mode = std::fs::metadata(client)
            .expect("client.veil")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // Same text as the local plaintext model.
    let prompt = "tell me about encrypted inference";
    let expected = local_tokens(&veil, prompt, 24);
    let out = veil.json(&[
        "generate",
        "--deployment",
        &id,
        "--prompt",
        prompt,
        "--max-tokens",
        "24",
        "--json",
        "--bootstrap",
        &boot,
    ]);
    assert_eq!(out["tokens"], expected);
    let route = out["route"].as_array().expect("route");
    assert_eq!(route.len(), 3);
    assert_eq!(out["network"]["failovers"], 0);

    // Kill the node serving stage 1 while a generation is under way: the replica that
    // opens the generation's session on stage 1 (its log says so) is killed at once, long
    // before its 60 steps (40 ms each) can be done.
    let shard = stages[1]["shard"].as_str().expect("shard").to_string();
    let replicas: Vec<String> = stages[1]["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["peer"].as_str().expect("peer").to_string())
        .collect();
    let opened_before: Vec<usize> = nodes.iter().map(|n| sessions_opened(n, &shard)).collect();
    let expected = local_tokens(&veil, prompt, 60);
    let bin = find_bin("veil").expect("veil");
    let child = Command::new(bin)
        .args([
            "generate",
            "--deployment",
            &id,
            "--prompt",
            prompt,
            "--max-tokens",
            "60",
            "--json",
            "--bootstrap",
            &boot,
        ])
        .env("VEIL_HOME", veil.home.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let victim = wait_until("a replica of stage 1 to open the session", || {
        nodes
            .iter()
            .zip(&opened_before)
            .find(|(n, &before)| sessions_opened(n, &shard) > before)
            .map(|(n, _)| n.peer_id.clone())
    });
    assert!(replicas.contains(&victim));
    let node = nodes
        .iter_mut()
        .find(|n| n.peer_id == victim)
        .expect("victim");
    node.kill();
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        v["tokens"], expected,
        "the text must equal an uninterrupted run"
    );
    assert!(
        v["network"]["failovers"].as_u64().expect("failovers") >= 1,
        "the kill happened mid-generation"
    );
    assert!(!v["route"]
        .as_array()
        .expect("route")
        .iter()
        .any(|p| p == &Value::from(victim.clone())));
}

#[test]
fn a_restarted_node_still_serves_its_shards() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut nodes = start_nodes(root.path(), 3, &NodeSettings::default()).expect("nodes");
    let boot = addr(&nodes[0]);
    let veil = Veil::new();
    wait_for_ads(&veil, &boot, 3);
    let id = deploy(&veil, &boot, 3);
    let record = deployment(&veil, &id);

    // Graceful restart of node 2 (SIGTERM, same data dir and port).
    assert!(nodes[2].stop(Duration::from_secs(60)), "graceful shutdown");
    nodes[2]
        .start(std::slice::from_ref(&boot))
        .expect("restart");
    let restarted = nodes[2].peer_id.clone();
    assert!(
        nodes[2].log().contains("holding 2 shard(s)"),
        "{}",
        nodes[2].log_tail(10)
    );
    // Kill the other replica of every stage the restarted node holds, so it must serve.
    let mut killed = Vec::new();
    for s in record["stages"].as_array().expect("stages") {
        let peers: Vec<String> = s["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .map(|r| r["peer"].as_str().expect("peer").to_string())
            .collect();
        if peers.contains(&restarted) {
            for p in peers.iter().filter(|p| **p != restarted) {
                if p != &nodes[0].peer_id && !killed.contains(p) {
                    killed.push(p.clone());
                }
            }
        }
    }
    for n in nodes.iter_mut().filter(|n| killed.contains(&n.peer_id)) {
        n.kill();
    }
    let prompt = "restart";
    let expected = local_tokens(&veil, prompt, 12);
    let out = veil.json(&[
        "generate",
        "--deployment",
        &id,
        "--prompt",
        prompt,
        "--max-tokens",
        "12",
        "--json",
        "--bootstrap",
        &boot,
    ]);
    assert_eq!(out["tokens"], expected);
    assert!(out["route"]
        .as_array()
        .expect("route")
        .iter()
        .any(|p| p == &Value::from(restarted.clone())));
}

/// Windows of `k` consecutive values of `seq`, as little-endian bytes of width `w`.
fn windows(seq: &[u32], k: usize, w: usize) -> Vec<Vec<u8>> {
    seq.windows(k)
        .map(|win| {
            win.iter()
                .flat_map(|v| v.to_le_bytes()[..w].to_vec())
                .collect()
        })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn nodes_never_receive_plaintext() {
    use veil_model::crypto::{ClientBundle, ClientModel};
    use veil_model::nn::{tensor_to_vec, Probe, Site, Stage, TokenEmbedding};
    use veil_model::ModelBundle;

    let root = tempfile::tempdir().expect("tempdir");
    let settings = NodeSettings {
        record_traffic: true,
        ..NodeSettings::default()
    };
    let nodes = start_nodes(root.path(), 3, &settings).expect("nodes");
    let boot = addr(&nodes[0]);
    let veil = Veil::new();
    wait_for_ads(&veil, &boot, 3);
    let id = deploy(&veil, &boot, 3);
    let prompt = "the secret meeting is at noon";
    let out = veil.json(&[
        "generate",
        "--deployment",
        &id,
        "--prompt",
        prompt,
        "--max-tokens",
        "16",
        "--json",
        "--bootstrap",
        &boot,
    ]);
    let ids: Vec<u32> = out["prompt_tokens"]
        .as_array()
        .expect("ids")
        .iter()
        .chain(out["tokens"].as_array().expect("ids"))
        .map(|v| v.as_u64().expect("id") as u32)
        .collect();
    let traffic: Vec<u8> = nodes.iter().flat_map(|n| n.traffic()).collect();
    assert!(
        traffic.len() > 10_000,
        "the nodes recorded what they received"
    );

    // No token id sequence, as u32 or u16.
    for w in [4, 2] {
        for needle in windows(&ids, 3, w) {
            assert!(
                !contains(&traffic, &needle),
                "a plaintext token sequence reached a node"
            );
        }
    }
    // No plaintext activation: the embeddings and the residual stream after every layer.
    let b = ModelBundle::tiny().expect("tiny");
    let device = veil_model::Compute::cpu().device;
    #[derive(Default)]
    struct Rows(Vec<Vec<f32>>);
    impl Probe for Rows {
        fn record(&mut self, _: usize, site: Site, t: burn::tensor::Tensor<2>) {
            if matches!(
                site,
                Site::BlockInput | Site::BlockOutput | Site::AttnOut | Site::MlpOut
            ) {
                let [_, cols] = t.dims();
                let v = tensor_to_vec(t).expect("read");
                self.0.extend(v.chunks(cols).map(<[f32]>::to_vec));
            }
        }
    }
    let stage = Stage::from_layers(0, &b.weights.layers, &b.weights.config, &device);
    let rope = veil_model::cache::RopeTables::new(&b.weights.config, &device);
    let mut cache = stage.new_cache(256);
    let mut rows = Rows::default();
    let x = TokenEmbedding::from_matrix(&b.weights.embedding, &device)
        .forward(&ids)
        .expect("embed");
    stage
        .forward_probed(vec![x], &mut [&mut cache], &rope, &mut rows)
        .expect("forward");
    assert!(rows.0.len() > 100);
    for row in &rows.0 {
        for chunk in row.chunks_exact(4).step_by(4) {
            let needle: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert!(
                !contains(&traffic, &needle),
                "a plaintext activation reached a node"
            );
        }
    }
    // The recording does hold the encrypted inputs (so the search above could succeed).
    let bundle = ClientBundle::read(
        &veil
            .home
            .path()
            .join("deployments")
            .join(&id)
            .join("client.veil"),
    )
    .expect("bundle");
    let client = ClientModel::new(&bundle, &device).expect("client");
    let enc = tensor_to_vec(
        client
            .encode(&ids[..3], &mut client.new_cache(8))
            .expect("encode"),
    )
    .expect("read");
    let needle: Vec<u8> = enc[..4].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(
        contains(&traffic, &needle),
        "the encrypted embedding of the prompt is in the recording"
    );
}

#[test]
fn bad_bootstrap_and_missing_deployments_are_clear_errors() {
    let veil = Veil::new();
    let out = veil.run(&["peers", "--bootstrap", "/ip4/127.0.0.1/tcp/9"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach any bootstrap peer"),
        "{stderr}"
    );
    let out = veil.run(&[
        "generate",
        "--deployment",
        "d-nothere",
        "--prompt",
        "x",
        "--bootstrap",
        "/ip4/127.0.0.1/tcp/9",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no deployment `d-nothere`"));
    let out = veil.run(&["peers"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bootstrap"));
}

#[test]
fn a_lost_stage_is_a_clear_error_until_repaired() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut nodes = start_nodes(root.path(), 3, &NodeSettings::default()).expect("nodes");
    let boot = addr(&nodes[0]);
    let veil = Veil::new();
    wait_for_ads(&veil, &boot, 3);
    let out = veil.ok(&[
        "deploy",
        "--quant",
        "f32",
        "--model",
        "tiny",
        "--stages",
        "3",
        "--replicas",
        "1",
        "--bootstrap",
        &boot,
        "--wait",
        "3",
    ]);
    let id = out.lines().last().expect("id").trim().to_string();
    let record = deployment(&veil, &id);
    // with one replica per stage, every node holds one stage; a non-bootstrap node dies
    let victim = 1;
    let stage_of_victim = record["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .position(|s| s["replicas"][0]["peer"].as_str() == Some(nodes[victim].peer_id.as_str()))
        .expect("the victim holds a stage");
    nodes[victim].kill();
    let out = veil.run(&[
        "generate",
        "--deployment",
        &id,
        "--prompt",
        "hi",
        "--max-tokens",
        "4",
        "--bootstrap",
        &boot,
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("stage {stage_of_victim}")) && stderr.contains("deploy --repair"),
        "{stderr}"
    );
    // wait until the dead node's ad has expired, then repair
    let dead = nodes[victim].peer_id.clone();
    wait_until("the dead node's ad to expire", || {
        let peers = veil.json(&["peers", "--bootstrap", &boot, "--json", "--wait", "1"]);
        let list = peers.as_array().expect("list");
        (!list.iter().any(|p| p["peer_id"] == dead.as_str())).then_some(())
    });
    let out = veil.ok(&[
        "deploy",
        "--quant",
        "f32",
        "--repair",
        &id,
        "--bootstrap",
        &boot,
        "--replicas",
        "1",
        "--wait",
        "2",
    ]);
    assert_eq!(out.lines().last().expect("id").trim(), id);
    let expected = local_tokens(&veil, "hi", 8);
    let out = veil.json(&[
        "generate",
        "--deployment",
        &id,
        "--prompt",
        "hi",
        "--max-tokens",
        "8",
        "--json",
        "--bootstrap",
        &boot,
    ]);
    assert_eq!(out["tokens"], expected);
}

#[test]
fn quic_transport_and_interactive_chat() {
    let root = tempfile::tempdir().expect("tempdir");
    let settings = NodeSettings {
        quic: true,
        ..NodeSettings::default()
    };
    let nodes = start_nodes(root.path(), 2, &settings).expect("nodes");
    let quic = nodes[0].quic_addr.clone().expect("quic address");
    assert!(quic.contains("/udp/") && quic.contains("/quic-v1"));
    let veil = Veil::new();
    // everything through QUIC
    wait_for_ads(&veil, &quic, 2);
    let id = deploy(&veil, &quic, 2);

    let bin = find_bin("veil").expect("veil");
    let mut child = Command::new(bin)
        .args([
            "chat",
            "--deployment",
            &id,
            "--max-tokens",
            "6",
            "--bootstrap",
            &quic,
        ])
        .env("VEIL_HOME", veil.home.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn chat");
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "hello there").expect("write");
        writeln!(stdin, "and again").expect("write");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("chat");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 2, "one answer per turn: {stdout:?}");
    // the first answer is what a one-turn generation gives
    let first = veil.json(&[
        "generate",
        "--local",
        "--model",
        "tiny",
        "--backend",
        "cpu",
        "--prompt",
        "hello there",
        "--max-tokens",
        "6",
        "--json",
    ]);
    assert_eq!(
        stdout.lines().next().expect("answer"),
        first["text"].as_str().expect("text").trim_end_matches('\n')
    );
}

/// The SmolLM2 GGUF cached by `veil model fetch` (or VEIL_TEST_MODEL).
fn smollm2() -> String {
    if let Ok(p) = std::env::var("VEIL_TEST_MODEL") {
        return p;
    }
    let home = std::env::var("VEIL_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").expect("HOME")).join(".veil")
        });
    let p = home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run `veil model fetch` first",
        p.display()
    );
    p.display().to_string()
}

#[test]
fn smollm2_on_three_nodes_generates_what_the_local_model_does() {
    let model = smollm2();
    let root = tempfile::tempdir().expect("tempdir");
    // sessions idle for a second expire: the chat below pauses longer than that
    let settings = NodeSettings {
        session_idle_timeout_s: 1,
        ..NodeSettings::default()
    };
    let nodes = start_nodes(root.path(), 3, &settings).expect("nodes");
    let boot = addr(&nodes[0]);
    let veil = Veil::new();
    wait_for_ads(&veil, &boot, 3);
    let out = veil.ok(&[
        "deploy",
        "--quant",
        "f32",
        "--model",
        &model,
        "--stages",
        "3",
        "--replicas",
        "1",
        "--bootstrap",
        &boot,
        "--wait",
        "3",
    ]);
    let id = out.lines().last().expect("id").trim().to_string();
    let prompt = "Name three planets of the solar system.";
    // the network runs f32 shards: the local run keeps f32 activations too
    let local = veil.json(&[
        "generate",
        "--local",
        "--exact",
        "--model",
        &model,
        "--backend",
        "cpu",
        "--prompt",
        prompt,
        "--max-tokens",
        "24",
        "--json",
    ]);
    let remote = veil.json(&[
        "generate",
        "--deployment",
        &id,
        "--prompt",
        prompt,
        "--max-tokens",
        "24",
        "--json",
        "--bootstrap",
        &boot,
    ]);
    assert_eq!(remote["tokens"], local["tokens"]);
    assert_eq!(remote["text"], local["text"]);
    assert!(remote["text"].as_str().expect("text").contains("Mars"));
    let peers: std::collections::HashSet<&str> = remote["route"]
        .as_array()
        .expect("route")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        peers.len(),
        3,
        "three different nodes served the three stages"
    );

    // A chat whose sessions expire between turns reopens them, replays, and says the same.
    // The slow chat pauses 3 s after each answer has arrived, three times the idle timeout:
    // the nodes expire the sessions before serving the next turn, however slow the machine.
    let turns = ["What is the capital of France?", "And of Italy?"];
    let (quick, _) = chat(&veil, &id, &boot, &turns, Duration::ZERO);
    let (slow, log) = chat(&veil, &id, &boot, &turns, Duration::from_secs(3));
    assert!(log.contains("reopening the session"), "{log}");
    assert_eq!(
        slow, quick,
        "the conversation goes on as if nothing expired"
    );
    assert!(quick.contains("Paris"), "{quick}");
}

/// Run `veil chat` with `turns`; from the second turn on, wait until the previous answer
/// is complete (the chat prompts for the next line on stderr), then sleep `pause`.
/// Returns stdout and stderr.
fn chat(veil: &Veil, id: &str, boot: &str, turns: &[&str], pause: Duration) -> (String, String) {
    chat_with(veil, id, boot, turns, pause, &[])
}

/// [`chat`] with `extra` arguments for `veil chat`.
fn chat_with(
    veil: &Veil,
    id: &str,
    boot: &str,
    turns: &[&str],
    pause: Duration,
    extra: &[&str],
) -> (String, String) {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    let bin = find_bin("veil").expect("veil");
    let mut child = Command::new(bin)
        .args([
            "chat",
            "--deployment",
            id,
            "--max-tokens",
            "8",
            "--bootstrap",
            boot,
        ])
        .args(extra)
        .env("VEIL_HOME", veil.home.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn chat");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(Mutex::new(String::new()));
    let reader = {
        let log = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                log.lock().expect("log").push_str(&text);
            }
        })
    };
    // `veil chat` writes "> " to stderr whenever it waits for a line: once at the start,
    // then once after each answer.
    let prompts = || log.lock().expect("log").matches("> ").count();
    for (i, t) in turns.iter().enumerate() {
        if i > 0 && !pause.is_zero() {
            wait_until(&format!("answer {i} of the chat"), || {
                (prompts() > i).then_some(())
            });
            std::thread::sleep(pause);
        }
        writeln!(stdin, "{t}").expect("write");
        stdin.flush().expect("flush");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("chat");
    reader.join().expect("stderr reader");
    let log = log.lock().expect("log").clone();
    assert!(out.status.success(), "{log}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), log)
}

/// A child process killed when dropped, so that a failing test leaves none running.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `curl` a JSON body to the gateway at `base`; the parsed answer.
fn curl_json(base: &str, path: &str, body: &Value) -> Value {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "120",
            "-H",
            "Content-Type: application/json",
        ])
        .args(["-d", &body.to_string(), &format!("{base}{path}")])
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn the_gateway_answers_through_a_deployment_as_generate_does() {
    let root = tempfile::tempdir().expect("tempdir");
    let settings = NodeSettings {
        metrics: true,
        ..NodeSettings::default()
    };
    let nodes = start_nodes(root.path(), 3, &settings).expect("nodes");
    let boot = addr(&nodes[0]);
    let veil = Veil::new();
    wait_for_ads(&veil, &boot, 3);
    let id = deploy(&veil, &boot, 3);
    let prompts = ["The river", "A small house", "Numbers: 1, 2, 3", "Once"];
    let reference: Vec<String> = prompts
        .iter()
        .map(|p| {
            veil.json(&[
                "generate",
                "--deployment",
                &id,
                "--bootstrap",
                &boot,
                "--raw",
                "--prompt",
                p,
                "--max-tokens",
                "8",
                "--json",
            ])["text"]
                .as_str()
                .expect("text")
                .to_string()
        })
        .collect();
    let bin = find_bin("veil").expect("veil binary");
    let mut gateway = Reaped(
        std::process::Command::new(bin)
            .args(["serve", "--deployment", &id, "--bootstrap", &boot])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--parallel",
                "4",
                "--request-timeout",
                "5",
            ])
            .env("VEIL_HOME", veil.home.path())
            .env("VEIL_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start the gateway"),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(gateway.0.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("address");
    let base = line.trim().to_string();
    wait_until("the gateway to be ready", || {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("{base}/health"),
            ])
            .output()
            .ok()?;
        (out.stdout == b"200").then_some(())
    });
    let ask = |p: &str| {
        let v = curl_json(
            &base,
            "/v1/completions",
            &serde_json::json!({"prompt": p, "max_tokens": 8, "temperature": 0}),
        );
        assert_eq!(v["model"], id.as_str(), "{v}");
        v["choices"][0]["text"].as_str().expect("text").to_string()
    };
    // one at a time, then all at once (concurrent node sessions, batched by the nodes)
    let alone: Vec<String> = prompts.iter().map(|p| ask(p)).collect();
    assert_eq!(alone, reference);
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts.iter().map(|p| s.spawn(|| ask(p))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert_eq!(together, reference);
    // the network view: every stage of the deployment with its replica, whose capacity ad
    // (from the bootstrap's directory) and stats answer it shows
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", &format!("{base}/api/network")])
        .output()
        .expect("curl");
    let view: Value = serde_json::from_slice(&out.stdout).expect("the view as JSON");
    assert_eq!(view["mode"], "deployment", "{view}");
    assert_eq!(view["model"], id.as_str(), "{view}");
    let stages = view["stages"].as_array().expect("stages");
    assert_eq!(stages.len(), 3, "{view}");
    for s in stages {
        let r = &s["replicas"][0];
        assert_eq!(r["reachable"], true, "{view}");
        assert!(
            r["backend"].is_string() && r["uptime_s"].as_f64() > Some(0.0),
            "{view}"
        );
    }
    // each answer names the replica that served each stage
    let v = curl_json(
        &base,
        "/v1/completions",
        &serde_json::json!({"prompt": "Once", "max_tokens": 2}),
    );
    let route = v["veil"]["route"].as_array().expect("route").clone();
    assert_eq!(route.len(), 3, "{v}");
    for (peer, s) in route.iter().zip(stages) {
        let replicas = s["replicas"].as_array().expect("replicas");
        assert!(replicas.iter().any(|r| &r["peer"] == peer), "{v} vs {view}");
    }
    assert_eq!(v["veil"]["failovers"], 0, "{v}");
    // the gateway counts its traffic to the nodes
    let out = Command::new("curl")
        .args(["-sS", &format!("{base}/metrics")])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let sent: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("veil_node_bytes_sent_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bytes sent in\n{text}"));
    assert!(sent > 0.0, "{text}");
    // a chat request through the same deployment
    let chat = curl_json(
        &base,
        "/v1/chat/completions",
        &serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    );
    assert_eq!(chat["object"], "chat.completion", "{chat}");
    assert!(chat["usage"]["completion_tokens"].as_u64() <= Some(4));
    // the official `openai` package through the deployment (scripts/test.sh installs it and
    // sets VEIL_OPENAI_SITE): whole, streamed, usage, stops, errors, 8 concurrent streams
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../client/tests/data/openai_client.py"
    );
    let out = Command::new("python3")
        .args([script, &base, &id])
        .env(
            "PYTHONPATH",
            std::env::var("VEIL_OPENAI_SITE").unwrap_or_default(),
        )
        .output()
        .expect("run python3");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !stderr.contains("No module named 'openai'"),
        "the `openai` package is missing: run scripts/test.sh, or set VEIL_OPENAI_SITE"
    );
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "{stdout}\n{stderr}"
    );
    // every node session the gateway (and `generate`) opened is closed again
    wait_until("every session to be closed", || {
        let count = |f: &dyn Fn(&str) -> bool| -> usize {
            nodes
                .iter()
                .map(|n| n.log().lines().filter(|l| f(l)).count())
                .sum()
        };
        let opened = count(&|l| l.contains("opened on shard"));
        let closed = count(&|l| l.contains("session ") && l.trim_end().ends_with(" closed"));
        (opened >= 3 * (2 * prompts.len() + 1) && opened == closed).then_some(())
    });
    // each node's Prometheus metrics count what it served
    let mut steps = 0.0;
    for n in &nodes {
        let log = n.log();
        let url = log
            .lines()
            .find_map(|l| l.split("metrics on ").nth(1))
            .expect("the metrics address in the log")
            .trim()
            .to_string();
        let out = Command::new("curl")
            .args(["-sS", &url])
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let value = |name: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in\n{text}"))
        };
        assert_eq!(value("veil_node_sessions_active"), 0.0, "{text}");
        assert!(value("veil_node_shards_loaded") >= 1.0, "{text}");
        assert!(value("veil_node_batches_total") <= value("veil_node_steps_total"));
        assert!(value("veil_node_step_seconds_count") >= 1.0, "{text}");
        let ok_steps = value(r#"veil_node_requests_total{kind="step",outcome="ok"}"#);
        assert_eq!(ok_steps, value("veil_node_steps_total"), "{text}");
        // one batch-size observation per forward pass, summing to the steps
        assert_eq!(
            value("veil_node_batch_size_count"),
            value("veil_node_batches_total"),
            "{text}"
        );
        assert_eq!(value("veil_node_batch_size_sum"), ok_steps, "{text}");
        // libp2p's own metrics share the registry (every node was dialled by the gateway)
        assert!(
            text.contains("veil_node_libp2p_swarm_connections_incoming_total{"),
            "{text}"
        );
        steps += ok_steps;
    }
    assert!(steps > 0.0);
    // with every node gone, a request is a 503 in OpenAI's shape, not a hang or a 500
    let mut nodes = nodes;
    for n in &mut nodes {
        n.kill();
    }
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "300",
            "-w",
            "\n%{http_code}",
            "-H",
            "Content-Type: application/json",
        ])
        .args([
            "-d",
            r#"{"prompt": "anyone?", "max_tokens": 4}"#,
            &format!("{base}/v1/completions"),
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    assert_eq!(code, "503", "{text}");
    let v: Value = serde_json::from_str(body).expect("JSON error");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    drop(gateway);
}

/// Two nodes, the second lying on a fraction `rate` of its answers as `mode` says.
fn with_a_liar(root: &std::path::Path, mode: &str, rate: f64) -> Vec<NodeProcess> {
    let settings = NodeSettings {
        byzantine: Some(Byzantine {
            nodes: 1,
            mode: mode.into(),
            rate,
        }),
        ..NodeSettings::default()
    };
    start_nodes(root, 2, &settings).expect("nodes")
}

/// A client's record of nodes (`$VEIL_HOME/reputation.json`).
fn reputation(veil: &Veil) -> Value {
    let path = veil.home.path().join("reputation.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("record")).expect("JSON")
}

/// A node that lies (testnet-only `lie_mode`) is caught by re-execution on the other replica,
/// settled by recomputing the stage from the deployment's own shard, and its answers are
/// replaced: the user gets exactly the honest tokens, only the liar is accused, the client
/// records it, and the next generation leaves it out.
#[test]
fn a_lying_node_is_caught_and_its_answers_replaced() {
    for mode in ["zeros", "noise", "skip-layers", "replay-stale"] {
        let root = tempfile::tempdir().expect("tempdir");
        let nodes = with_a_liar(root.path(), mode, 1.0);
        let (honest, liar) = (nodes[0].peer_id.clone(), nodes[1].peer_id.clone());
        let veil = Veil::new();
        let boot = addr(&nodes[0]);
        wait_for_ads(&veil, &boot, 2);
        let id = deploy(&veil, &boot, 1);
        let prompt = "Tell me about rivers.";
        let reference = local_tokens(&veil, prompt, 8);
        let out = veil.json(&[
            "generate",
            "--deployment",
            &id,
            "--bootstrap",
            &boot,
            "--prompt",
            prompt,
            "--max-tokens",
            "8",
            "--verify",
            "1",
            "--json",
        ]);
        assert_eq!(out["tokens"], reference, "{mode}: {out}");
        let v = &out["network"]["verification"];
        let caught: Vec<&str> = v["detections"]
            .as_array()
            .expect("detections")
            .iter()
            .map(|d| d["peer"].as_str().expect("peer"))
            .collect();
        assert_eq!(caught, [liar.as_str()], "{mode}: {v}");
        assert_eq!(out["route"], serde_json::json!([honest]), "{mode}: {out}");
        // the client remembers, with a fraud proof anyone can check: the liar's signed
        // receipts over these inputs and its wrong answers
        let book = reputation(&veil);
        let record = &book["peers"][&liar]["caught"][0];
        assert_eq!(record["deployment"], id.as_str(), "{book}");
        let proof = record["proof"].as_str().expect("a proof file");
        let out = veil.run(&["verify-proof", proof]);
        let verdict = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && verdict.starts_with("proven:"),
            "{mode}: {verdict}"
        );
        assert!(verdict.contains(&liar), "{verdict}");
        assert!(book["peers"][&honest]["caught"]
            .as_array()
            .is_none_or(Vec::is_empty));
        // later generations leave the liar out (and so say nothing is left to re-execute)
        let again = veil.json(&[
            "generate",
            "--deployment",
            &id,
            "--bootstrap",
            &boot,
            "--prompt",
            prompt,
            "--max-tokens",
            "8",
            "--json",
        ]);
        assert_eq!(again["tokens"], reference, "{mode}");
        assert_eq!(again["route"], serde_json::json!([honest]), "{mode}");
        let again = &again["network"]["verification"];
        assert!(again["detections"].as_array().is_some_and(Vec::is_empty));
        assert_eq!(again["unverifiable"], serde_json::json!([0]), "{again}");
        drop(nodes);
    }
}

/// Checking only some steps, a lie can be used before it is found: then the stages after the
/// liar's are recomputed from the corrected rows. From the step where the liar was found on,
/// every token is the one the honest model picks after the tokens so far (checked by
/// feeding the same tokens to the deployment's own shards in this process).
#[test]
fn later_stages_are_repaired_after_a_lie_found_late() {
    use veil_model::crypto::{Encrypted, EncryptedLocal};
    use veil_model::TokenModel;
    let root = tempfile::tempdir().expect("tempdir");
    // two nodes, two stages, two replicas: each node serves both stages
    let nodes = with_a_liar(root.path(), "noise", 0.3);
    let liar = nodes[1].peer_id.clone();
    let veil = Veil::new();
    let boot = addr(&nodes[0]);
    wait_for_ads(&veil, &boot, 2);
    let id = deploy(&veil, &boot, 2);
    let dir = veil.home.path().join("deployments").join(&id);
    let e = Encrypted::read(&dir).expect("the deployment's shards");
    let device = veil_model::Compute::cpu().device;
    let mut repaired = 0;
    // whether a lie slips through before a check is chance: try until one does
    for attempt in 0..40 {
        let out = veil.json(&[
            "generate",
            "--deployment",
            &id,
            "--bootstrap",
            &boot,
            "--raw",
            "--prompt",
            "The river rose in the spring and the mill",
            "--max-tokens",
            "24",
            "--verify",
            "0.2",
            "--json",
        ]);
        // the client's record would keep the liar out of the next attempts: forget it, but
        // not that its published proofs were settled (they would convict it again)
        let path = veil.home.path().join("reputation.json");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let mut book: Value = serde_json::from_str(&text).expect("JSON");
            book["peers"] = serde_json::json!({});
            std::fs::write(&path, book.to_string()).expect("write");
        }
        let v = &out["network"]["verification"];
        let detections = v["detections"].as_array().expect("detections");
        assert!(detections.iter().all(|d| d["peer"] == liar.as_str()), "{v}");
        if v["rows_repaired"].as_u64().unwrap_or(0) == 0 {
            continue;
        }
        let found = v["detections"]
            .as_array()
            .expect("detections")
            .iter()
            .filter_map(|d| d["found_at"].as_u64())
            .max()
            .expect("found_at") as usize;
        let prompt: Vec<u32> = serde_json::from_value(out["prompt_tokens"].clone()).expect("ids");
        let tokens: Vec<u32> = serde_json::from_value(out["tokens"].clone()).expect("ids");
        let mut model = EncryptedLocal::new(&e.client, &e.shards, &device, None).expect("model");
        let mut logits = model.feed(&prompt).expect("prompt");
        let mut checked = 0;
        for (j, &t) in tokens.iter().enumerate() {
            let pos = prompt.len() - 1 + j;
            if pos + 1 >= found {
                checked += 1;
                assert_eq!(
                    veil_model::sampling::argmax(&logits),
                    t,
                    "attempt {attempt}: token {j} (position {pos}, lie found at {found})"
                );
            }
            logits = model.feed(&[t]).expect("step");
        }
        assert!(checked > 0, "the lie was found after the last token");
        repaired += 1;
        break;
    }
    assert!(repaired > 0, "no generation needed a repair in 40 attempts");
    drop(nodes);
}

/// Copy `from`'s deployment `id` (its record, key and shards) into a fresh client home.
fn with_deployment(from: &Veil, id: &str) -> Veil {
    let to = Veil::new();
    let src = from.home.path().join("deployments").join(id);
    let dst = to.home.path().join("deployments").join(id);
    std::fs::create_dir_all(&dst).expect("mkdir");
    for e in std::fs::read_dir(&src).expect("deployment").flatten() {
        std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
    }
    to
}

/// Fraud proofs travel: a client that convicts a node publishes the proof through the other
/// nodes, and another client, which never met the liar, learns of it, recomputes it from the
/// deployment's shard and leaves the liar out. A proof against an honest node (its genuine
/// receipts over right answers, submitted by a hostile peer) is announced too (its receipts
/// hold), but found innocent where it is checked: the honest node keeps serving, and the
/// reporter is noted. A forged proof is refused by the node with the reason.
#[test]
fn published_proofs_are_believed_only_once_recomputed() {
    use veil_protocol::proof::{FraudProof, ProofRequest, ProofResponse};
    use veil_protocol::wire::{InferRequest, InferResponse, TensorFrame};
    use veil_protocol::{network, Identity, NetConfig};

    let root = tempfile::tempdir().expect("tempdir");
    let nodes = with_a_liar(root.path(), "noise", 1.0);
    let (honest, liar) = (nodes[0].peer_id.clone(), nodes[1].peer_id.clone());
    let veil = Veil::new();
    let boot = addr(&nodes[0]);
    wait_for_ads(&veil, &boot, 2);
    let id = deploy(&veil, &boot, 1);
    let prompt = "Tell me about rivers.";
    let reference = local_tokens(&veil, prompt, 8);
    let generate = |v: &Veil, verify: &str| {
        v.json(&[
            "generate",
            "--deployment",
            &id,
            "--bootstrap",
            &boot,
            "--prompt",
            prompt,
            "--max-tokens",
            "8",
            "--verify",
            verify,
            "--json",
        ])
    };
    // the first client catches the liar and publishes its proof through the honest node
    let out = generate(&veil, "1");
    let detections = &out["network"]["verification"]["detections"];
    assert_eq!(detections[0]["peer"], liar.as_str(), "{out}");
    assert_eq!(
        detections[0]["published"],
        serde_json::json!([honest]),
        "{out}"
    );

    // a hostile peer puts the honest node's genuine receipts over right answers in a proof
    let record = deployment(&veil, &id);
    let shard_hex = record["stages"][0]["shard"]
        .as_str()
        .expect("shard")
        .to_string();
    let shard: [u8; 32] = hex::decode(&shard_hex)
        .expect("hex")
        .try_into()
        .expect("32 bytes");
    let d = {
        let path = veil
            .home
            .path()
            .join("deployments")
            .join(&id)
            .join("shard-0.veil");
        let c = veil_model::container::Container::open(&path).expect("shard");
        veil_model::crypto::Shard::from_container(&c)
            .expect("shard")
            .meta
            .config
            .d_model
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let hostile = Identity::generate();
    let (net, _events, event_loop) = rt
        .block_on(async { network::new(&hostile, &NetConfig::default()) })
        .expect("net");
    rt.spawn(event_loop.run());
    let honest_id = rt
        .block_on(net.dial(boot.parse().expect("addr")))
        .expect("dial");
    let liar_id = rt
        .block_on(net.dial(addr(&nodes[1]).parse().expect("addr")))
        .expect("dial");
    let session = [9u8; 16];
    let layers = match rt
        .block_on(net.infer(
            honest_id,
            InferRequest::Open {
                session,
                shard,
                max_len: 16,
                exact: false,
            },
        ))
        .expect("open")
    {
        InferResponse::Opened { layers, .. } => (layers.0 as usize, layers.1 as usize),
        other => panic!("{other:?}"),
    };
    let inputs: Vec<f32> = (0..3 * d)
        .map(|i| ((i * 31 % 97) as f32 / 97.0) - 0.5)
        .collect();
    let mut answers = Vec::new();
    for row in 0..3 {
        let hidden = TensorFrame::from_f32(&[1, d], &inputs[row * d..(row + 1) * d]);
        match rt
            .block_on(net.infer(honest_id, InferRequest::Step { session, hidden }))
            .expect("step")
        {
            InferResponse::Hidden { hidden, receipt } => {
                answers.push((receipt, hidden.to_f32().expect("frame").1))
            }
            other => panic!("{other:?}"),
        }
    }
    let false_proof = FraudProof::new(
        &honest_id,
        &shard,
        0,
        layers,
        d,
        (false, false),
        &inputs,
        &answers,
        "made up",
    );
    // forged: an answer changed after the node signed it
    let mut forged = false_proof.clone();
    forged.answers[1].output = forged.answers[0].output.clone();
    match rt
        .block_on(net.proof(liar_id, ProofRequest::Submit(forged.to_bytes())))
        .expect("submit")
    {
        ProofResponse::Rejected(why) => {
            assert!(why.contains("not the answer its receipt signs"), "{why}")
        }
        other => panic!("a forged proof was not refused: {other:?}"),
    }
    // the genuine receipts hold, so the node keeps and announces it
    match rt
        .block_on(net.proof(liar_id, ProofRequest::Submit(false_proof.to_bytes())))
        .expect("submit")
    {
        ProofResponse::Accepted(n) => assert_eq!(n.accused, honest),
        other => panic!("{other:?}"),
    }
    // both notices reach the honest node by gossip
    wait_until("both proof notices at the bootstrap node", || {
        match rt.block_on(net.proof(honest_id, ProofRequest::Notices)) {
            Ok(ProofResponse::Notices(n)) if n.len() == 2 => Some(()),
            _ => None,
        }
    });

    // a client that never met the liar, with the deployment (and so its shard)
    let other = with_deployment(&veil, &id);
    let out = generate(&other, "0");
    assert_eq!(out["tokens"], reference, "{out}");
    assert_eq!(out["route"], serde_json::json!([honest]), "{out}");
    let learned = out["network"]["verification"]["learned"]
        .as_array()
        .expect("learned")
        .clone();
    let verdict = |peer: &str| {
        learned
            .iter()
            .find(|l| l["peer"] == peer)
            .map(|l| l["verdict"].as_str().expect("verdict").to_string())
    };
    assert_eq!(verdict(&liar).as_deref(), Some("guilty"), "{learned:?}");
    assert_eq!(verdict(&honest).as_deref(), Some("innocent"), "{learned:?}");
    let book = reputation(&other);
    let caught = &book["peers"][&liar]["caught"][0];
    assert!(
        caught["referee"]
            .as_str()
            .is_some_and(|r| r.starts_with("published by")),
        "{book}"
    );
    // the learned proof is kept and checks offline like one this client made
    let out = other.run(&["verify-proof", caught["proof"].as_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(book["peers"][&honest]["caught"]
        .as_array()
        .is_none_or(Vec::is_empty));
    assert_eq!(
        book["false_reports"][hostile.peer_id().to_string()],
        1,
        "{book}"
    );
    // settled proofs are not fetched again: the next generation learns nothing new
    let again = generate(&other, "0");
    assert_eq!(again["route"], serde_json::json!([honest]), "{again}");
    assert!(again["network"]["verification"]["learned"]
        .as_array()
        .is_some_and(Vec::is_empty));
    drop(nodes);
}

#[test]
fn qwen_and_llama3_models_deploy_and_generate_what_they_generate_locally() {
    // Tiny random models of the other families (biases, per-head norms, wider heads, RoPE
    // frequency factors) through real nodes: shard upload, the node's own loading and its
    // batched steps.
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = start_nodes(root.path(), 2, &NodeSettings::default()).expect("nodes");
    let boot = addr(&nodes[0]);
    let veil = Veil::new();
    wait_for_ads(&veil, &boot, 2);
    use veil_model::tiny::{tiny_variant_gguf, TinyVariant, TINY_SEED};
    for v in [TinyVariant::Qwen2, TinyVariant::Qwen3, TinyVariant::Llama3] {
        let path = root.path().join(format!("tiny-{}.gguf", v.name()));
        std::fs::write(&path, tiny_variant_gguf(v, TINY_SEED).expect("gguf")).expect("write");
        let model = path.to_str().expect("utf-8");
        let prompt = "which family am I?";
        let local = local_tokens_of(&veil, model, prompt, 16);
        let id = deploy_model(&veil, &boot, model, 2, 1);
        let remote = veil.json(&[
            "generate",
            "--deployment",
            &id,
            "--prompt",
            prompt,
            "--max-tokens",
            "16",
            "--json",
            "--bootstrap",
            &boot,
        ]);
        assert_eq!(remote["tokens"], local, "{}", v.name());
        assert_eq!(remote["route"].as_array().expect("route").len(), 2);
    }
}

/// Masked mode through a deployment (`--privacy masked`): the nodes compute the linear ops
/// on masked words and the tokens equal those of the same shards masked in one process. A
/// node that lies on every answer is caught on its first one, as compute node or as mask
/// provider, and the tokens do not change; a provider is never the compute node of the
/// ops it masks, and a placement that would need it is refused with the reason.
#[test]
fn masked_mode_through_nodes_catches_liars_and_keeps_the_tokens() {
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = with_a_liar(root.path(), "noise", 1.0);
    let (honest, liar) = (nodes[0].peer_id.clone(), nodes[1].peer_id.clone());
    let veil = Veil::new();
    let boot = addr(&nodes[0]);
    wait_for_ads(&veil, &boot, 2);
    let id = deploy(&veil, &boot, 1);
    let prompt = "Tell me about rivers.";
    let dir = veil.home.path().join("deployments").join(&id);
    let dir = dir.to_str().expect("utf-8");
    let common = ["--prompt", prompt, "--max-tokens", "8", "--json"];
    let mut local = vec![
        "generate",
        "--local",
        "--encrypted",
        "--shards",
        dir,
        "--backend",
        "cpu",
        "--privacy",
        "masked",
    ];
    local.extend_from_slice(&common);
    let reference = veil.json(&local)["tokens"].clone();
    let masked = |provider: &str| {
        let mut args = vec![
            "generate",
            "--deployment",
            &id,
            "--bootstrap",
            &boot,
            "--privacy",
            "masked",
            "--mask-provider",
            provider,
        ];
        args.extend_from_slice(&common);
        veil.json(&args)
    };
    let caught = |out: &Value| -> Vec<(String, String)> {
        out["masked"]["detections"]
            .as_array()
            .expect("detections")
            .iter()
            .map(|d| {
                (
                    d["party"].as_str().expect("party").to_string(),
                    d["role"].as_str().expect("role").to_string(),
                )
            })
            .collect()
    };
    // the honest node provides the masks: the liar is the only compute node left
    let out = masked(&honest);
    assert_eq!(out["tokens"], reference, "{out}");
    assert_eq!(caught(&out), [(liar.clone(), "compute node".to_string())]);
    let m = &out["masked"];
    assert!(
        m["bytes_sent"].as_u64() > Some(0) && m["ops"].as_u64() > Some(0),
        "{m}"
    );
    // the liar provides the masks: caught too, and the client computes them instead
    let out = masked(&liar);
    assert_eq!(out["tokens"], reference, "{out}");
    assert_eq!(caught(&out), [(liar.clone(), "mask provider".to_string())]);
    // the client provides the masks; whichever node computes, the tokens are the same
    let out = masked("local");
    assert_eq!(out["tokens"], reference, "{out}");
    assert!(caught(&out).iter().all(|(p, _)| *p == liar), "{out}");
    // a masked chat's first answer is that generation's (the same template, greedy)
    let text = out["text"].as_str().expect("text").to_string();
    let (said, _) = chat_with(
        &veil,
        &id,
        &boot,
        &[prompt, "And lakes?"],
        Duration::ZERO,
        &["--privacy", "masked", "--mask-provider", &honest],
    );
    assert!(said.starts_with(&text), "{said:?} / {text:?}");
    assert!(said.lines().count() >= 2, "{said:?}");
    // both replicas named as providers: nobody may compute
    let both = format!("{honest},{liar}");
    let out = veil.run(&[
        "generate",
        "--deployment",
        &id,
        "--bootstrap",
        &boot,
        "--privacy",
        "masked",
        "--mask-provider",
        &both,
        "--prompt",
        prompt,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("may not compute"),
        "{err}"
    );
    // `veil deploy --privacy masked` makes masked the deployment's default; --privacy
    // still chooses
    let id = deploy_with(&veil, &boot, "tiny", 1, 2, &["--privacy", "masked"]);
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--deployment", &id, "--bootstrap", &boot];
        args.extend_from_slice(&common);
        args.extend_from_slice(extra);
        veil.json(&args)
    };
    let out = run(&[]);
    assert!(out["masked"]["ops"].as_u64() > Some(0), "{out}");
    assert!(
        out["tokens"].as_array().is_some_and(|t| t.len() == 8),
        "{out}"
    );
    assert!(run(&["--privacy", "rotated"])["masked"].is_null());
    // the gateway serves the deployment in its recorded mode: the same text as generate
    let reference = veil.json(&[
        "generate",
        "--deployment",
        &id,
        "--bootstrap",
        &boot,
        "--raw",
        "--prompt",
        "The river",
        "--max-tokens",
        "8",
        "--json",
    ])["text"]
        .clone();
    let bin = find_bin("veil").expect("veil binary");
    let mut gateway = Reaped(
        std::process::Command::new(bin)
            .args(["serve", "--deployment", &id, "--bootstrap", &boot])
            .args(["--listen", "127.0.0.1:0", "--parallel", "2"])
            .env("VEIL_HOME", veil.home.path())
            .env("VEIL_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start the gateway"),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(gateway.0.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("address");
    let base = line.trim().to_string();
    wait_until("the gateway to be ready", || {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("{base}/health"))
            .output()
            .ok()?;
        (out.stdout == b"200").then_some(())
    });
    let v = curl_json(
        &base,
        "/v1/completions",
        &serde_json::json!({"prompt": "The river", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(v["choices"][0]["text"], reference, "{v}");
    drop(gateway);
    drop(nodes);
}
