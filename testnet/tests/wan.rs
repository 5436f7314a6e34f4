//! The WAN topology itself: hosts behind NAT routers reach the public segment, the public
//! segment cannot reach into a home, an endpoint-independent NAT keeps one public port per
//! host port while a symmetric one picks a new port per destination, links carry the delay
//! they were given, and nothing is left behind.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use veil_testnet::wan::{Host, NatKind, Wan, WanOptions};

/// Build a WAN, or say why not: outside CI a machine without root or the tools skips the
/// test; in CI (`CI` set) that is a failure, since `scripts/setup.sh` installs them.
fn wan(opts: &WanOptions) -> Option<Wan> {
    if let Err(why) = Wan::check() {
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipping: {why}");
        return None;
    }
    Some(Wan::build(opts).expect("build the WAN"))
}

/// A UDP server in `host` that answers each datagram with the address it came from.
fn reflector(wan: &Wan, host: &Host) -> Child {
    let script = "import socket\n\
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
        s.bind(('0.0.0.0', 9000))\n\
        s.settimeout(60)\n\
        try:\n\
        \x20   while True:\n\
        \x20       data, (ip, port) = s.recvfrom(100)\n\
        \x20       s.sendto(f'{ip}:{port}'.encode(), (ip, port))\n\
        except OSError:\n\
        \x20   pass\n";
    wan.command(host, std::path::Path::new("python3"))
        .args(["-c", script])
        .stdout(Stdio::null())
        .spawn()
        .expect("start a reflector")
}

/// In `host`, one UDP socket asks each reflector how it sees it; returns `ip:port` per
/// reflector.
fn mappings(wan: &Wan, host: &Host, reflectors: &[&Host]) -> Vec<String> {
    let targets: Vec<String> = reflectors.iter().map(|r| format!("'{}'", r.addr)).collect();
    let script = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', 40000))\n\
         s.settimeout(1)\n\
         for ip in [{}]:\n\
         \x20   for attempt in range(30):\n\
         \x20       s.sendto(b'?', (ip, 9000))\n\
         \x20       try:\n\
         \x20           print(s.recvfrom(100)[0].decode()); break\n\
         \x20       except socket.timeout:\n\
         \x20           pass\n\
         \x20   else:\n\
         \x20       print('none')\n",
        targets.join(", ")
    );
    let out = wan
        .command(host, std::path::Path::new("python3"))
        .args(["-c", &script])
        .output()
        .expect("run the probe");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Seconds a TCP connection from `from` to `to`'s port 9001 takes to be refused (one round
/// trip; the least of three, the first also waiting for ARP), or the error when nothing
/// answers at all.
fn round_trip(wan: &Wan, from: &Host, to: &str) -> Result<f64, String> {
    let script = format!(
        "import socket, time\n\
         best = None\n\
         for attempt in range(3):\n\
         \x20   t = time.monotonic()\n\
         \x20   try:\n\
         \x20       socket.create_connection(('{to}', 9001), timeout=3)\n\
         \x20   except ConnectionRefusedError:\n\
         \x20       d = time.monotonic() - t\n\
         \x20       best = d if best is None else min(best, d)\n\
         \x20   except OSError as e:\n\
         \x20       print('error', e); break\n\
         else:\n\
         \x20   print(best)\n"
    );
    let out = wan
        .command(from, std::path::Path::new("python3"))
        .args(["-c", &script])
        .output()
        .expect("run the probe");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    text.parse::<f64>().map_err(|_| text)
}

fn namespaces() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nat_kinds_reachability_latency_and_cleanup() {
    let opts = WanOptions {
        homes: vec![NatKind::EndpointIndependent, NatKind::Symmetric],
        delay_ms: (20, 20),
        jitter_ms: 0,
        ..WanOptions::default()
    };
    let Some(wan) = wan(&opts) else { return };
    let made = wan.namespaces().to_vec();
    assert!(!made.is_empty());
    let mut servers = vec![reflector(&wan, &wan.boot), reflector(&wan, &wan.relay)];
    std::thread::sleep(Duration::from_millis(300));

    // behind an endpoint-independent NAT: seen at the router's address, one port for both
    let eim = mappings(&wan, &wan.homes[0], &[&wan.boot, &wan.relay]);
    assert_eq!(eim.len(), 2, "{eim:?}");
    assert!(
        eim[0].starts_with(&format!("{}:", wan.homes[0].public)),
        "{eim:?}"
    );
    assert_eq!(
        eim[0], eim[1],
        "an endpoint-independent NAT keeps one mapping"
    );
    // behind a symmetric NAT: the router's address, a new port per destination
    let sym = mappings(&wan, &wan.homes[1], &[&wan.boot, &wan.relay]);
    assert!(
        sym[0].starts_with(&format!("{}:", wan.homes[1].public)),
        "{sym:?}"
    );
    assert!(
        sym[1].starts_with(&format!("{}:", wan.homes[1].public)),
        "{sym:?}"
    );
    assert_ne!(sym[0], sym[1], "a symmetric NAT maps each destination anew");

    // the public segment cannot reach into a home, by its private address or its router's
    let private = round_trip(&wan, &wan.boot, &wan.homes[0].addr.to_string());
    assert!(private.is_err(), "{private:?}");
    // one round trip client → boot crosses the client's uplink and the boot's, each way
    let rtt = round_trip(&wan, &wan.client, &wan.boot.addr.to_string()).expect("refused");
    let want = 2.0 * f64::from(wan.client.link.delay_ms + wan.boot.link.delay_ms) / 1000.0;
    // the links' delay is a floor; above it only a gross error is caught, since a busy
    // machine may be slow to carry the frames
    assert!(
        rtt > want * 0.9 && rtt < want * 3.0 + 0.2,
        "round trip {rtt:.3} s, links say {want:.3} s"
    );

    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    drop(wan);
    let left = namespaces();
    for ns in made {
        assert!(!left.contains(&ns), "{ns} left behind: {left}");
    }
}

/// `veil` run inside `host`'s namespace, with its own client home.
fn veil(wan: &Wan, host: &Host, home: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let bin = veil_testnet::cluster::find_bin("veil").expect("veil binary");
    let out = wan
        .command(host, &bin)
        .args(args)
        .env("VEIL_HOME", home)
        .output()
        .expect("run veil");
    assert!(
        out.status.success(),
        "veil {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // JSON (whole or on the last line), else the last line as text
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default().trim().to_string();
    serde_json::from_str(&text)
        .or_else(|_| serde_json::from_str(&last))
        .unwrap_or(serde_json::Value::String(last))
}

/// From the client's namespace: deploy the tiny model in 2 stages of 1 replica (with
/// `extra` deploy flags), generate 8 tokens through it and check they equal a local run's.
/// Returns the network run's JSON and its seconds.
fn deploy_and_generate(
    wan: &Wan,
    home: &std::path::Path,
    boot: &str,
    extra: &[&str],
) -> (serde_json::Value, f64) {
    let mut args = vec![
        "deploy",
        "--quant",
        "f32",
        "--model",
        "tiny",
        "--stages",
        "2",
        "--replicas",
        "1",
        "--bootstrap",
        boot,
        "--wait",
        "3",
    ];
    args.extend_from_slice(extra);
    let id = veil(wan, &wan.client, home, &args);
    let id = id.as_str().expect("deployment id").to_string();
    let prompt = "Rivers cross the plain.";
    let local = veil(
        wan,
        &wan.client,
        home,
        &[
            "generate",
            "--local",
            "--model",
            "tiny",
            "--backend",
            "cpu",
            "--prompt",
            prompt,
            "--max-tokens",
            "8",
            "--json",
        ],
    );
    let started = std::time::Instant::now();
    let out = veil(
        wan,
        &wan.client,
        home,
        &[
            "generate",
            "--deployment",
            &id,
            "--bootstrap",
            boot,
            "--prompt",
            prompt,
            "--max-tokens",
            "8",
            "--verify",
            "0",
            "--json",
        ],
    );
    let took = started.elapsed().as_secs_f64();
    assert_eq!(out["tokens"], local["tokens"], "{out}");
    (out, took)
}

/// Nodes on the public segment, a client behind its NAT: it finds them, deploys to them and
/// generates exactly what the model gives locally, each step crossing the links' delays.
#[test]
fn a_client_behind_nat_generates_through_nodes_across_the_wan() {
    let opts = WanOptions {
        homes: vec![],
        delay_ms: (10, 10),
        jitter_ms: 0,
        ..WanOptions::default()
    };
    let Some(wan) = wan(&opts) else { return };
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = veil_testnet::cluster::start_nodes_on(
        root.path(),
        &[wan.boot.place(), wan.relay.place()],
        &veil_testnet::cluster::NodeSettings::default(),
    )
    .expect("nodes");
    let boot = nodes[0].addr.clone().expect("listening");
    assert!(
        boot.starts_with(&format!("/ip4/{}/tcp/", wan.boot.addr)),
        "{boot}"
    );
    let home = root.path().join("client");
    // the client's view of the network, through its NAT
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let peers = veil(
            &wan,
            &wan.client,
            &home,
            &["peers", "--bootstrap", &boot, "--json", "--wait", "1"],
        );
        if peers.as_array().is_some_and(|p| p.len() >= 2) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "ads: {peers}");
    }
    let (out, took) = deploy_and_generate(&wan, &home, &boot, &[]);
    let route: Vec<&str> = out["route"]
        .as_array()
        .expect("route")
        .iter()
        .map(|p| p.as_str().expect("peer"))
        .collect();
    assert_eq!(route.len(), 2, "{out}");
    // each of the 9 steps (prompt, then 8 tokens) crosses two stages, each a round trip
    // over the client's uplink and the node's: at least 9 · 2 · 2 · (10 + 10) ms
    let floor =
        9.0 * 2.0 * 2.0 * f64::from(wan.client.link.delay_ms + wan.boot.link.delay_ms) / 1000.0;
    assert!(
        took > floor,
        "{took:.2} s is faster than the links allow ({floor:.2} s)"
    );
    drop(nodes);
    drop(wan);
}

/// Nodes at home, one behind an endpoint-independent NAT and one behind a symmetric NAT,
/// and a client behind its own NAT: AutoNAT tells each home node it cannot be dialed, each
/// reserves on the public nodes (which relay) and advertises the relayed address; the
/// client reaches both through a relay, punches a hole to the one behind the
/// endpoint-independent NAT and stays relayed to the other; generation is exact.
#[test]
fn nodes_at_home_serve_through_relays_and_punched_holes() {
    let opts = WanOptions {
        homes: vec![NatKind::EndpointIndependent, NatKind::Symmetric],
        delay_ms: (5, 5),
        jitter_ms: 0,
        ..WanOptions::default()
    };
    let Some(wan) = wan(&opts) else { return };
    let root = tempfile::tempdir().expect("tempdir");
    let settings = veil_testnet::cluster::NodeSettings {
        relays: 2,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let nodes = veil_testnet::cluster::start_nodes_on(
        root.path(),
        &[
            wan.boot.place(),
            wan.relay.place(),
            wan.homes[0].place(),
            wan.homes[1].place(),
        ],
        &settings,
    )
    .expect("nodes");
    let boot = nodes[0].addr.clone().expect("listening");
    let home = root.path().join("client");
    let ids: Vec<&str> = nodes.iter().map(|n| n.peer_id.as_str()).collect();
    // every node's ad says how it can be reached: the public ones directly, the ones at
    // home through a relay
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let usable = loop {
        let peers = veil(
            &wan,
            &wan.client,
            &home,
            &["peers", "--bootstrap", &boot, "--json", "--wait", "1"],
        );
        let ad = |id: &str| {
            peers
                .as_array()
                .and_then(|a| a.iter().find(|p| p["peer_id"] == id))
                .cloned()
        };
        let relayed = |id: &str| {
            ad(id).is_some_and(|a| {
                a["reachability"] == "private"
                    && a["addrs"]
                        .as_array()
                        .is_some_and(|x| x.iter().any(|s| s.to_string().contains("/p2p-circuit")))
            })
        };
        let public = |id: &str| ad(id).is_some_and(|a| a["reachability"] == "public");
        if public(ids[0]) && public(ids[1]) && relayed(ids[2]) && relayed(ids[3]) {
            break started.elapsed();
        }
        assert!(std::time::Instant::now() < deadline, "ads: {peers:#}");
    };
    eprintln!(
        "nodes at home usable through a relay {:.1} s after start",
        usable.as_secs_f64()
    );
    let nodes_arg = format!("{},{}", ids[2], ids[3]);
    let (out, _) = deploy_and_generate(&wan, &home, &boot, &["--nodes", &nodes_arg]);
    let mut route: Vec<&str> = out["route"]
        .as_array()
        .expect("route")
        .iter()
        .map(|p| p.as_str().expect("peer"))
        .collect();
    route.sort_unstable();
    let mut at_home = vec![ids[2], ids[3]];
    at_home.sort_unstable();
    assert_eq!(route, at_home, "{out}");
    let c = &out["network"]["connections"];
    eprintln!("the client's connections: {c}");
    // the node behind the endpoint-independent NAT: a hole punched; behind the symmetric
    // one: still relayed
    assert!(c["hole_punches"].as_u64() >= Some(1), "{c}");
    assert!(c["relayed_connections"].as_u64() >= Some(1), "{c}");
    drop(nodes);
    drop(wan);
}

/// A relay at its limit refuses with a reason, and says so; the node it refused says so too
/// and, with no other relay, says it cannot be reached.
#[test]
fn a_relay_at_its_limit_refuses_and_both_sides_say_why() {
    let opts = WanOptions {
        homes: vec![NatKind::EndpointIndependent, NatKind::EndpointIndependent],
        delay_ms: (2, 2),
        jitter_ms: 0,
        ..WanOptions::default()
    };
    let Some(wan) = wan(&opts) else { return };
    let root = tempfile::tempdir().expect("tempdir");
    let settings = veil_testnet::cluster::NodeSettings {
        relays: 1,
        relay_config: "relay_max_reservations = 1".into(),
        ..Default::default()
    };
    let nodes = veil_testnet::cluster::start_nodes_on(
        root.path(),
        &[
            wan.boot.place(),
            wan.relay.place(),
            wan.homes[0].place(),
            wan.homes[1].place(),
        ],
        &settings,
    )
    .expect("nodes");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let relay_log = nodes[0].log();
        let logs: Vec<String> = nodes[2..].iter().map(|n| n.log()).collect();
        // one home node refused (the relay names it), warned that it cannot be reached;
        // the other holds the one reservation
        let refused = (0..2).find(|&i| {
            logs[i].contains("refused or dropped our reservation")
                && logs[i].contains("this node cannot be reached")
                && relay_log.contains(&format!("refused to relay for {}", nodes[2 + i].peer_id))
        });
        if let Some(i) = refused {
            if logs[1 - i].contains("reachable through the relay") {
                break;
            }
        }
        // a public node never takes a relay's slot (it would keep it for the reservation's
        // lifetime even after AutoNAT found it public)
        assert!(
            !nodes[1].log().contains("reachable through the relay"),
            "{}",
            nodes[1].log()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "relay:\n{relay_log}\nhome 0:\n{}\nhome 1:\n{}",
            logs[0],
            logs[1]
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(nodes);
    drop(wan);
}

/// `veil-testnet wan` as a person runs it: it says where everything is and how to reach it
/// from the client's namespace; the nodes there answer (the ones at home too, through their
/// outbound connections); ctrl-c removes the nodes, their files and every namespace.
#[test]
fn veil_testnet_wan_stays_up_until_ctrl_c_and_leaves_nothing() {
    use std::io::{BufRead, BufReader};
    if let Err(why) = Wan::check() {
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipping: {why}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let bin = veil_testnet::cluster::find_bin("veil-testnet").expect("veil-testnet");
    let mut child = Command::new(bin)
        .args(["wan", "--homes", "eim", "--home-nodes", "--delay-ms", "5"])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut said = String::new();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    for line in lines.by_ref().map_while(Result::ok) {
        said.push_str(&line);
        said.push('\n');
        if line.contains("veil chat") {
            break;
        }
    }
    let word_after = |key: &str| {
        said.split(key)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no `{key}` in {said}"))
            .to_string()
    };
    let ns = word_after("namespace ");
    let boot = word_after("--bootstrap ");
    assert!(
        said.contains("behind an endpoint-independent NAT"),
        "{said}"
    );
    let veil = veil_testnet::cluster::find_bin("veil").expect("veil");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&veil)
            .args(["peers", "--bootstrap", &boot, "--json", "--wait", "1"])
            .env("VEIL_HOME", tmp.path().join("home"))
            .output()
            .expect("veil peers");
        let peers: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        // boot, relay and the node at home
        if peers.as_array().is_some_and(|p| p.len() >= 3) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{peers}");
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    assert_eq!(child.wait().expect("wait").code(), Some(130));
    let left = namespaces();
    assert!(!left.contains(&ns), "{ns} left behind: {left}");
    let dirs: Vec<String> = std::fs::read_dir(tmp.path())
        .expect("tmp")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("veil-testnet-"))
        .collect();
    assert!(dirs.is_empty(), "left behind: {dirs:?}");
    let needle = tmp.path().display().to_string();
    let running = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle) && !c.contains("peers"))
        .count();
    assert_eq!(running, 0, "processes left running");
}
