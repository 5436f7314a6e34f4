//! `veil-testnet bench|chaos --topology wan` as a user runs them: nodes at home behind
//! NATs serve through punched holes and relays, the report says where each node ran and how
//! it was reached and sets the simulator beside the measurement, killing a relay loses no
//! output, and nothing (namespace, process, directory) is left behind.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use veil_testnet::cluster::find_bin;
use veil_testnet::wan::Wan;

/// Whether the WAN can be built here; outside CI a machine without root or the tools skips
/// (in CI, `scripts/setup.sh` installs them, so that is a failure).
fn wan_possible() -> bool {
    match Wan::check() {
        Ok(()) => true,
        Err(why) => {
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("skipping: {why}");
            false
        }
    }
}

/// Run `veil-testnet` with its temporary files under `tmp`; returns its pid and output.
fn testnet(tmp: &Path, args: &[&str]) -> (u32, Output) {
    let home = tmp.join("home");
    std::fs::create_dir_all(&home).expect("home");
    let child = Command::new(find_bin("veil-testnet").expect("veil-testnet"))
        .args(args)
        .env("TMPDIR", tmp)
        .env("VEIL_HOME", &home)
        .env("VEIL_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run veil-testnet");
    let pid = child.id();
    (pid, child.wait_with_output().expect("wait"))
}

/// No namespace of process `pid`, no testnet directory under `tmp`, no process mentioning
/// `tmp` is left.
fn assert_clean(pid: u32, tmp: &Path) {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    let left = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !left.contains(&format!("veilwan{pid}x")),
        "namespaces left behind: {left}"
    );
    let dirs: Vec<String> = std::fs::read_dir(tmp)
        .expect("tmp")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("veil-testnet-"))
        .collect();
    assert!(dirs.is_empty(), "left behind: {dirs:?}");
    let needle = tmp.display().to_string();
    let running = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .count();
    assert_eq!(running, 0, "processes left running");
}

#[test]
fn bench_on_the_wan_reports_how_each_node_was_reached_beside_the_simulation() {
    if !wan_possible() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let json = tmp.path().join("bench.json");
    let (pid, out) = testnet(
        tmp.path(),
        &[
            "bench",
            "--topology",
            "wan",
            "--homes",
            "eim,symmetric",
            "--delay-ms",
            "5",
            "--jitter-ms",
            "0",
            "--model",
            "tiny",
            "--nodes",
            "2",
            "--stages",
            "2",
            "--replicas",
            "1",
            "--sessions",
            "2",
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "12",
            "--json",
            &json.display().to_string(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: Value = serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("JSON");
    // two public nodes (bootstrap, relays) and one at home per --nodes
    let wan = &v["wan"];
    let nats: Vec<(&str, bool)> = wan["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| (n["nat"].as_str().expect("nat"), n["relayed"] == true))
        .collect();
    assert_eq!(
        nats,
        [
            ("public", false),
            ("public", false),
            ("endpoint-independent", false),
            ("symmetric", true)
        ],
        "{wan}"
    );
    assert_eq!(wan["client_delay_ms"], 5);
    // the node behind the endpoint-independent NAT was reached through a punched hole, the
    // one behind the symmetric NAT through a relay
    let c = &wan["connections"];
    assert!(c["hole_punches"].as_u64() >= Some(1), "{c}");
    assert!(c["relayed_connections"].as_u64() >= Some(1), "{c}");
    for l in v["levels"].as_array().expect("levels") {
        let n = l["sessions"].as_u64().expect("n");
        assert_eq!(l["failed"], 0, "{l}");
        assert_eq!(l["tokens"].as_u64(), Some(12 * n), "{l}");
        let steps: Vec<u64> = l["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|x| x["steps"].as_u64().expect("steps"))
            .collect();
        // the public nodes relay but hold no stage; each node at home holds one
        assert_eq!(steps[..2], [0, 0], "{l}");
        assert_eq!(steps[2], 12 * n, "{l}");
        assert_eq!(steps[3], 12 * n, "{l}");
    }
    // the simulator on the same network and levels: one row per level, each token's
    // latency at least the links' round trips it crosses (client 5 ms + node 5 ms each way,
    // twice per stage)
    let sim = v["simulated"].as_array().expect("simulated");
    assert_eq!(sim.len(), 2, "{v:#}");
    for s in sim {
        assert!(s["simulated_tokens_per_s"].as_f64() > Some(0.0), "{s}");
        assert!(
            s["simulated_per_token"]["p50_ms"].as_f64() >= Some(2.0 * 2.0 * 10.0),
            "{s}"
        );
        assert!(
            s["measured_per_token"]["p50_ms"].as_f64() >= Some(2.0 * 2.0 * 10.0),
            "{s}"
        );
    }
    // one stage on each node at home, in whichever order the planner chose: the link to
    // one of them is relayed, to the other not
    let links = &v["sim_params"]["links"];
    let mut relayed: Vec<bool> = links["relayed"]
        .as_array()
        .expect("relayed")
        .iter()
        .map(|r| r.as_bool().expect("bool"))
        .collect();
    relayed.sort_unstable();
    assert_eq!(relayed, [false, true], "{links}");
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(
        md.contains("hole punched") && md.contains("through a relay"),
        "{md}"
    );
    assert!(md.contains("simulated / measured"), "{md}");
    assert_clean(pid, tmp.path());
}

#[test]
fn chaos_on_the_wan_killing_relays_loses_no_output() {
    if !wan_possible() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let json = tmp.path().join("chaos.json");
    let (pid, out) = testnet(
        tmp.path(),
        &[
            "chaos",
            "--topology",
            "wan",
            "--homes",
            "symmetric,eim",
            "--delay-ms",
            "5",
            "--model",
            "tiny",
            "--nodes",
            "2",
            "--stages",
            "1",
            "--replicas",
            "2",
            "--victims",
            "relays",
            "--step-delay-ms",
            "10",
            "--sessions",
            "2",
            "--rounds",
            "3",
            "--gen-tokens",
            "30",
            "--kill-every",
            "2",
            "--down",
            "1",
            "--json",
            &json.display().to_string(),
        ],
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("JSON");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}\n{v:#}");
    let kills = v["kills"].as_array().expect("kills");
    assert!(!kills.is_empty(), "{v:#}");
    // only the public nodes (node-0 bootstraps, node-1 relays too) were killed
    for k in kills {
        let node = k["node"].as_str().expect("node");
        assert!(node == "node-0" || node == "node-1", "{k}");
    }
    assert_eq!(v["identical"], v["completed"], "{v:#}");
    assert!(v["completed"].as_u64() > Some(0), "{v:#}");
    assert_clean(pid, tmp.path());
}

#[test]
fn chaos_victims_must_exist() {
    let tmp = tempfile::tempdir().expect("tmp");
    // on loopback every node holds a stage: there is no relay to kill
    let (pid, out) = testnet(
        tmp.path(),
        &[
            "chaos",
            "--model",
            "tiny",
            "--nodes",
            "2",
            "--victims",
            "relays",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no node to kill"), "{err}");
    assert_clean(pid, tmp.path());
}
