//! A node's limits against real node processes: its disk quota refuses an upload before the
//! first byte, allow-lists refuse strangers, a peer over its request rate or queue share is
//! told so while another peer is served, stalled uploads are removed, and `veil deploy`
//! places a stage elsewhere when a node refuses it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use veil_model::crypto::{encrypt_model_quant, KeyOptions, KeyShape, ModelKey, ShardQuant};
use veil_model::ModelBundle;
use veil_protocol::wire::{
    ErrorCode, InferRequest, InferResponse, ShardId, TensorFrame, UploadRequest, UploadResponse,
};
use veil_protocol::{network, Identity, Multiaddr, NetConfig, Network, PeerId};
use veil_testnet::cluster::{find_bin, NodeProcess, NodeSettings};

/// A node of its own with these extra `node.toml` lines, started.
fn node(root: &Path, name: &str, extra: &str, bootstrap: &[String]) -> NodeProcess {
    let settings = NodeSettings {
        extra_config: extra.into(),
        ..NodeSettings::default()
    };
    node_with(root, name, &settings, bootstrap)
}

fn node_with(
    root: &Path,
    name: &str,
    settings: &NodeSettings,
    bootstrap: &[String],
) -> NodeProcess {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("dir");
    let bin = find_bin("veil-node").expect("veil-node");
    let mut n = NodeProcess::init(&bin, name, &dir, settings).expect("init");
    n.start(bootstrap).expect("start");
    n
}

/// A client of its own identity connected to `n`.
async fn client(n: &NodeProcess) -> (Network, PeerId, Identity) {
    let id = Identity::generate();
    let (net, _events, event_loop) = network::new(&id, &NetConfig::default()).expect("network");
    tokio::spawn(event_loop.run());
    let addr: Multiaddr = n.addr.clone().expect("addr").parse().expect("multiaddr");
    let peer = net.dial(addr).await.expect("dial");
    (net, peer, id)
}

/// One valid shard of the tiny model.
fn shard() -> (ShardId, Vec<u8>) {
    let b = ModelBundle::tiny().expect("tiny");
    let key = ModelKey::generate(
        KeyShape::of(&b.weights.config),
        KeyOptions::default(),
        &mut rand_chacha::ChaCha20Rng::seed_from_u64(11),
    );
    let e = encrypt_model_quant(&b, key, 1, 0, ShardQuant::F32, &mut |_, _| {}).expect("encrypt");
    let w = e.shards[0].to_writer().expect("writer");
    let id = hex::decode(w.data_sha256())
        .expect("hex")
        .try_into()
        .expect("32");
    (id, w.to_bytes().expect("bytes"))
}

fn refusal(r: &UploadResponse) -> (ErrorCode, &str) {
    match r {
        UploadResponse::Error { code, message } => (*code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn infer_refusal(r: &InferResponse) -> Option<(ErrorCode, &str)> {
    match r {
        InferResponse::Error { code, message } => Some((*code, message)),
        _ => None,
    }
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn disk_quota_allow_lists_and_stalled_uploads() {
    let root = tempfile::tempdir().expect("tempdir");
    let (id, bytes) = shard();
    let total = bytes.len() as u64;
    assert!(total < 1 << 20, "the tiny shard fits a 1 MiB quota");
    let friend = Identity::generate();
    let quota = node(
        root.path(),
        "quota",
        "max_disk_mib = 1\npeer_disk_share = 1.0\npartial_upload_timeout_s = 1",
        &[],
    );
    let closed = node(
        root.path(),
        "closed",
        &format!(
            "deploy_allow = [\"{0}\"]\nserve_allow = [\"{0}\"]",
            friend.peer_id()
        ),
        &[],
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (net, peer, _) = client(&quota).await;
        // announced larger than the quota: refused before any byte, nothing kept
        let r = net
            .upload(
                peer,
                UploadRequest::Query {
                    shard: [7; 32],
                    total: 3 << 20,
                },
            )
            .await
            .expect("answer");
        let (code, message) = refusal(&r);
        assert_eq!(code, ErrorCode::NoSpace);
        assert!(
            message.contains("max_disk_mib") && message.contains("3 MiB"),
            "{message}"
        );
        assert_eq!(files_in(&quota.data_dir.join("partial")), 0);
        // one that fits is admitted; half of it then stalls and is removed
        let r = net
            .upload(peer, UploadRequest::Query { shard: id, total })
            .await
            .expect("answer");
        assert_eq!(
            r,
            UploadResponse::Progress {
                received: 0,
                complete: false
            }
        );
        let half = bytes.len() / 2;
        let r = net
            .upload(
                peer,
                UploadRequest::Chunk {
                    shard: id,
                    total,
                    offset: 0,
                    data: bytes[..half].to_vec(),
                },
            )
            .await
            .expect("answer");
        assert!(matches!(r, UploadResponse::Progress { received, .. } if received == half as u64));
        wait_until("the stalled upload to be removed", || {
            files_in(&quota.data_dir.join("partial")) == 0
        });
        assert!(quota.log().contains("removed 1 stalled upload"));
        // the whole shard, sent promptly, is stored
        veil_client::deploy::upload(&net, peer, id, &bytes, &|_| {})
            .await
            .expect("upload");
        assert!(quota
            .data_dir
            .join("shards")
            .join(format!("{}.veil", hex::encode(id)))
            .exists());

        // allow-lists: a stranger may neither upload nor open a session, but may ask for stats
        let (net, peer, _) = client(&closed).await;
        let r = net
            .upload(peer, UploadRequest::Query { shard: id, total })
            .await
            .expect("answer");
        let (code, message) = refusal(&r);
        assert_eq!(code, ErrorCode::Forbidden);
        assert!(message.contains("deploy_allow"), "{message}");
        let r = net
            .infer(
                peer,
                InferRequest::Open {
                    session: [1; 16],
                    shard: id,
                    max_len: 8,
                    exact: false,
                },
            )
            .await
            .expect("answer");
        let (code, message) = infer_refusal(&r).expect("refused");
        assert_eq!(code, ErrorCode::Forbidden);
        assert!(message.contains("serve_allow"), "{message}");
        assert!(matches!(
            net.infer(peer, InferRequest::Stats).await.expect("stats"),
            InferResponse::Stats(_)
        ));
    });
    // the friend may
    rt.block_on(async {
        let (net, _events, event_loop) =
            network::new(&friend, &NetConfig::default()).expect("network");
        tokio::spawn(event_loop.run());
        let addr: Multiaddr = closed.addr.clone().expect("addr").parse().expect("ma");
        let peer = net.dial(addr).await.expect("dial");
        veil_client::deploy::upload(&net, peer, id, &bytes, &|_| {})
            .await
            .expect("the friend uploads");
        let r = net
            .infer(
                peer,
                InferRequest::Open {
                    session: [1; 16],
                    shard: id,
                    max_len: 8,
                    exact: false,
                },
            )
            .await
            .expect("answer");
        assert!(matches!(r, InferResponse::Opened { .. }), "{r:?}");
    });
    for mut n in [quota, closed] {
        assert!(n.is_running());
        assert!(!n.log().contains("panicked"));
    }
}

#[test]
fn a_peer_over_its_rate_or_queue_share_is_refused_while_another_is_served() {
    let root = tempfile::tempdir().expect("tempdir");
    let n = node_with(
        root.path(),
        "fair",
        &NodeSettings {
            extra_config: "max_requests_per_s_per_peer = 5\nmax_queued_per_peer = 1".into(),
            step_delay_ms: 3000,
            ..NodeSettings::default()
        },
        &[],
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (greedy, peer, _) = client(&n).await;
        // 20 requests at once: a burst of 5 passes, the rest are told to slow down
        let answers =
            futures::future::join_all((0..20).map(|_| greedy.infer(peer, InferRequest::Stats)))
                .await;
        let limited: Vec<&str> = answers
            .iter()
            .filter_map(|a| infer_refusal(a.as_ref().expect("answer")))
            .filter(|(code, _)| *code == ErrorCode::RateLimited)
            .map(|(_, m)| m)
            .collect();
        assert!(limited.len() >= 10, "{} of 20 limited", limited.len());
        assert!(
            limited[0].contains("max_requests_per_s_per_peer"),
            "{}",
            limited[0]
        );
        // meanwhile another peer is served
        let (polite, p2, _) = client(&n).await;
        assert!(matches!(
            polite.infer(p2, InferRequest::Stats).await.expect("stats"),
            InferResponse::Stats(_)
        ));
        // two steps at once from the polite peer (whose bucket has room): whichever arrives
        // first waits for the (slow) engine, the other is refused
        let step = || InferRequest::Step {
            session: [9; 16],
            hidden: TensorFrame::from_f32(&[1, 2], &[1.0, 2.0]),
        };
        let (a, b) = tokio::join!(polite.infer(p2, step()), polite.infer(p2, step()));
        let mut codes: Vec<(ErrorCode, String)> = [a, b]
            .iter()
            .map(|r| {
                let r = r.as_ref().expect("answer");
                infer_refusal(r)
                    .map(|(c, m)| (c, m.to_string()))
                    .unwrap_or_else(|| panic!("{r:?}"))
            })
            .collect();
        codes.sort_by_key(|(c, _)| *c != ErrorCode::Busy);
        assert_eq!(codes[0].0, ErrorCode::Busy, "{codes:?}");
        assert!(codes[0].1.contains("max_queued_per_peer"), "{codes:?}");
        assert_eq!(codes[1].0, ErrorCode::UnknownSession, "{codes:?}");
    });
    let mut n = n;
    assert!(n.is_running());
}

#[test]
fn deploy_places_a_refused_stage_on_another_node() {
    let root = tempfile::tempdir().expect("tempdir");
    // `stingy` advertises plenty of disk but gives any one peer almost none of it
    let open = node(root.path(), "open", "", &[]);
    let boot = vec![open.addr.clone().expect("addr")];
    let stingy = node(
        root.path(),
        "stingy",
        "max_disk_mib = 100000\npeer_disk_share = 0.0000001",
        &boot,
    );
    let home = tempfile::tempdir().expect("home");
    let veil = find_bin("veil").expect("veil");
    wait_until("both capacity ads", || {
        let out = Command::new(&veil)
            .args(["peers", "--bootstrap", &boot[0], "--json", "--wait", "1"])
            .env("VEIL_HOME", home.path())
            .output()
            .expect("veil peers");
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .is_some_and(|n| n >= 2)
    });
    let out = Command::new(&veil)
        .args([
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
            &boot[0],
            "--wait",
            "3",
        ])
        .env("VEIL_HOME", home.path())
        .env("VEIL_LOG", "info")
        .output()
        .expect("veil deploy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        stderr.contains("peer_disk_share") && stderr.contains("placing the stage elsewhere"),
        "{stderr}"
    );
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            home.path()
                .join("deployments")
                .join(&id)
                .join("deployment.json"),
        )
        .expect("record"),
    )
    .expect("json");
    for s in record["stages"].as_array().expect("stages") {
        let peers: Vec<&str> = s["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .map(|r| r["peer"].as_str().expect("peer"))
            .collect();
        assert_eq!(peers, vec![open.peer_id.as_str()], "{s}");
    }
    assert!(!stingy.log().contains("stored shard"));
    // and it generates
    let out = Command::new(&veil)
        .args([
            "generate",
            "--deployment",
            &id,
            "--prompt",
            "hi",
            "--max-tokens",
            "3",
        ])
        .env("VEIL_HOME", home.path())
        .output()
        .expect("veil generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Unmounts a tmpfs when dropped.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_reported_not_a_crash() {
    let root = tempfile::tempdir().expect("tempdir");
    let small = root.path().join("small");
    std::fs::create_dir_all(&small).expect("dir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    }
    let _mount = Mount(small.clone());
    let dir = small.join("node");
    std::fs::create_dir_all(&dir).expect("dir");
    let bin = find_bin("veil-node").expect("veil-node");
    let settings = NodeSettings {
        extra_config: "max_disk_mib = 100".into(),
        ..NodeSettings::default()
    };
    let mut n = NodeProcess::init(&bin, "full", &dir, &settings).expect("init");
    // fill the disk but for a little room for the node's log
    let filler = vec![7u8; 64 << 10];
    let mut f = std::fs::File::create(small.join("filler")).expect("filler");
    use std::io::Write;
    let mut written = 0usize;
    while written < (4 << 20) - (512 << 10) && f.write_all(&filler).is_ok() {
        written += filler.len();
    }
    drop(f);
    n.start(&[]).expect("a node on a full disk starts");
    assert!(n.log().contains("disk is full"), "{}", n.log());
    let (id, bytes) = shard();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (net, peer, _) = client(&n).await;
        let r = net
            .upload(
                peer,
                UploadRequest::Query {
                    shard: id,
                    total: bytes.len() as u64,
                },
            )
            .await
            .expect("answer");
        let (code, message) = refusal(&r);
        assert_eq!(code, ErrorCode::NoSpace);
        assert!(message.contains("disk has"), "{message}");
        assert!(matches!(
            net.infer(peer, InferRequest::Stats).await.expect("stats"),
            InferResponse::Stats(_)
        ));
    });
    assert!(n.is_running());
    n.stop(Duration::from_secs(10));
}
