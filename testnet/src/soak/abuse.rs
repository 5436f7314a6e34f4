//! The soak's abusive peers, each a task with an identity of its own: upload floods,
//! session floods, garbage and request floods, stalled uploads, and peers that vanish in
//! the middle of an upload. They count what they sent and how the nodes answered.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;
use veil_protocol::wire::{
    ErrorCode, InferRequest, InferResponse, ShardId, TensorFrame, UploadRequest, UploadResponse,
};
use veil_protocol::{network, Identity, Multiaddr, NetConfig, Network, PeerId};

/// A node to abuse.
#[derive(Debug, Clone)]
pub struct Target {
    pub peer: PeerId,
    pub addr: Multiaddr,
}

/// What one kind of abuser did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AbuseCounts {
    pub requests: u64,
    /// Answers by outcome: `ok`, an error code, or `failed` (no answer: the stream or the
    /// connection broke, or the request timed out).
    pub outcomes: BTreeMap<String, u64>,
}

/// Every abuser's counts, by kind.
pub type Tally = Arc<Mutex<BTreeMap<&'static str, AbuseCounts>>>;

fn count(tally: &Tally, kind: &'static str, outcome: &str) {
    let mut t = tally
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let c = t.entry(kind).or_default();
    c.requests += 1;
    *c.outcomes.entry(outcome.to_string()).or_default() += 1;
}

fn code_name(code: ErrorCode) -> String {
    format!("{code:?}")
}

fn infer_outcome(r: &Result<InferResponse, veil_protocol::ProtocolError>) -> String {
    match r {
        Ok(InferResponse::Error { code, .. }) => code_name(*code),
        Ok(_) => "ok".into(),
        Err(_) => "failed".into(),
    }
}

fn upload_outcome(r: &Result<UploadResponse, veil_protocol::ProtocolError>) -> String {
    match r {
        Ok(UploadResponse::Error { code, .. }) => code_name(*code),
        Ok(_) => "ok".into(),
        Err(_) => "failed".into(),
    }
}

/// A network of a new identity, connected to every target it can reach.
async fn connect(targets: &[Target]) -> Option<Network> {
    let config = NetConfig {
        request_timeout: Duration::from_secs(20),
        ..NetConfig::default()
    };
    let (net, _events, event_loop) = network::new(&Identity::generate(), &config).ok()?;
    tokio::spawn(event_loop.run());
    for t in targets {
        let _ = net.add_address(t.peer, t.addr.clone()).await;
    }
    Some(net)
}

async fn pause(stop: &AtomicBool, d: Duration) -> bool {
    let step = Duration::from_millis(50);
    let mut left = d;
    while !left.is_zero() {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        let s = left.min(step);
        tokio::time::sleep(s).await;
        left -= s;
    }
    stop.load(Ordering::Relaxed)
}

fn random_id(rng: &mut impl RngCore) -> ShardId {
    let mut id = [0u8; 32];
    rng.fill_bytes(&mut id);
    id
}

/// Uploads of garbage: sizes past any quota, announced uploads that reserve room until the
/// node refuses more, then whole fake shards of random bytes (which the node stores while
/// they arrive and rejects at the end).
async fn upload_flood(targets: Vec<Target>, stop: Arc<AtomicBool>, tally: Tally, seed: u64) {
    let Some(net) = connect(&targets).await else {
        return;
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    const KIND: &str = "upload flood";
    while !stop.load(Ordering::Relaxed) {
        for t in &targets {
            let huge = UploadRequest::Query {
                shard: random_id(&mut rng),
                total: 1 << 40,
            };
            count(
                &tally,
                KIND,
                &upload_outcome(&net.upload(t.peer, huge).await),
            );
            // reserve room with announced uploads until the node says no more (they
            // stall and expire)
            for _ in 0..64 {
                let reserve = UploadRequest::Query {
                    shard: random_id(&mut rng),
                    total: 4 << 20,
                };
                let r = net.upload(t.peer, reserve).await;
                count(&tally, KIND, &upload_outcome(&r));
                if !matches!(r, Ok(UploadResponse::Progress { .. })) || stop.load(Ordering::Relaxed)
                {
                    break;
                }
            }
            let shard = random_id(&mut rng);
            let total = 4u64 << 20;
            let mut offset = 0u64;
            while offset < total && !stop.load(Ordering::Relaxed) {
                let mut data = vec![0u8; 1 << 20];
                rng.fill_bytes(&mut data);
                let r = net
                    .upload(
                        t.peer,
                        UploadRequest::Chunk {
                            shard,
                            total,
                            offset,
                            data,
                        },
                    )
                    .await;
                count(&tally, KIND, &upload_outcome(&r));
                match r {
                    Ok(UploadResponse::Progress { received, .. }) if received > offset => {
                        offset = received;
                    }
                    _ => break,
                }
            }
        }
        if pause(&stop, Duration::from_millis(500)).await {
            break;
        }
    }
}

/// Sessions opened on the deployment's shards with the longest context and never used.
async fn session_flood(
    targets: Vec<Target>,
    shards: Vec<ShardId>,
    stop: Arc<AtomicBool>,
    tally: Tally,
    seed: u64,
) {
    let Some(net) = connect(&targets).await else {
        return;
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    const KIND: &str = "session flood";
    while !stop.load(Ordering::Relaxed) {
        for t in &targets {
            for shard in &shards {
                let mut session = [0u8; 16];
                rng.fill_bytes(&mut session);
                let open = InferRequest::Open {
                    session,
                    shard: *shard,
                    max_len: u32::MAX,
                    exact: false,
                };
                count(&tally, KIND, &infer_outcome(&net.infer(t.peer, open).await));
            }
        }
        if pause(&stop, Duration::from_millis(700)).await {
            break;
        }
    }
}

/// Malformed and wrong requests, and bursts of `burst` requests at once (past the rate
/// limit).
async fn garbage(
    targets: Vec<Target>,
    burst: usize,
    stop: Arc<AtomicBool>,
    tally: Tally,
    seed: u64,
) {
    let Some(net) = connect(&targets).await else {
        return;
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    while !stop.load(Ordering::Relaxed) {
        for t in &targets {
            let mut session = [0u8; 16];
            rng.fill_bytes(&mut session);
            let nan = TensorFrame {
                dtype: veil_protocol::wire::WireDType::F32,
                shape: vec![1, 2],
                data: [f32::NAN, 1.0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            };
            let short = TensorFrame {
                dtype: veil_protocol::wire::WireDType::F32,
                shape: vec![1000, 1000],
                data: vec![0; 12],
            };
            let bad = [
                InferRequest::Step {
                    session,
                    hidden: nan,
                },
                InferRequest::Step {
                    session,
                    hidden: short,
                },
                InferRequest::Step {
                    session,
                    hidden: TensorFrame::from_f32(&[1, 3], &[1.0, 2.0, 3.0]),
                },
                InferRequest::Open {
                    session,
                    shard: random_id(&mut rng),
                    max_len: 0,
                    exact: rng.gen(),
                },
                InferRequest::Close { session },
            ];
            for req in bad {
                count(
                    &tally,
                    "garbage",
                    &infer_outcome(&net.infer(t.peer, req).await),
                );
            }
            let answers = futures::future::join_all(
                (0..burst).map(|_| net.infer(t.peer, InferRequest::Stats)),
            )
            .await;
            for r in &answers {
                count(&tally, "request flood", &infer_outcome(r));
            }
        }
        if pause(&stop, Duration::from_secs(1)).await {
            break;
        }
    }
}

/// Uploads that stop halfway: `vanish` drops the peer (its connections close), otherwise
/// it stays connected and sends nothing more.
async fn half_uploads(
    targets: Vec<Target>,
    vanish: bool,
    stop: Arc<AtomicBool>,
    tally: Tally,
    seed: u64,
) {
    let kind = if vanish {
        "vanish mid-upload"
    } else {
        "stalled upload"
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut kept = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Some(net) = connect(&targets).await else {
            return;
        };
        for t in &targets {
            let mut data = vec![0u8; 256 << 10];
            rng.fill_bytes(&mut data);
            let r = net
                .upload(
                    t.peer,
                    UploadRequest::Chunk {
                        shard: random_id(&mut rng),
                        total: 2 << 20,
                        offset: 0,
                        data,
                    },
                )
                .await;
            count(&tally, kind, &upload_outcome(&r));
        }
        if vanish {
            drop(net);
        } else {
            // the last few stay connected
            kept.push(net);
            if kept.len() > 4 {
                kept.remove(0);
            }
        }
        if pause(&stop, Duration::from_secs(2)).await {
            break;
        }
    }
}

/// Run every abuser until `stop`; returns their counts. The request flood sends `burst`
/// requests at once to each node every second.
pub async fn run(
    targets: Vec<Target>,
    shards: Vec<ShardId>,
    burst: usize,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> BTreeMap<&'static str, AbuseCounts> {
    let tally: Tally = Arc::default();
    let tasks = vec![
        tokio::spawn(upload_flood(
            targets.clone(),
            stop.clone(),
            tally.clone(),
            seed,
        )),
        tokio::spawn(session_flood(
            targets.clone(),
            shards,
            stop.clone(),
            tally.clone(),
            seed + 1,
        )),
        tokio::spawn(garbage(
            targets.clone(),
            burst,
            stop.clone(),
            tally.clone(),
            seed + 2,
        )),
        tokio::spawn(half_uploads(
            targets.clone(),
            false,
            stop.clone(),
            tally.clone(),
            seed + 3,
        )),
        tokio::spawn(half_uploads(targets, true, stop, tally.clone(), seed + 4)),
    ];
    for t in tasks {
        let _ = t.await;
    }
    let t = tally
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    t.clone()
}
