//! `veil deploy`: encrypt locally, place each stage on R nodes chosen from the capacity ads,
//! upload the shards (resumable, verified by the nodes), and record the deployment.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use veil_model::crypto::{shard_path, ClientLayers, Encrypted, ShardQuant};
use veil_protocol::ad::now_ms;
use veil_protocol::behaviour::UPLOAD_CHUNK;
use veil_protocol::wire::{UploadRequest, UploadResponse};
use veil_protocol::{CapacityAd, Multiaddr, Network, PeerId};

use crate::deployment::{Deployment, Replica, StagePlacement};
use crate::encrypt::encrypt_with_progress;
use crate::model_spec::ModelSpec;
use crate::net::{Client, NetArgs};

#[derive(Args, Debug)]
pub struct DeployArgs {
    #[command(flatten)]
    pub net: NetArgs,
    /// Model: smollm2, tiny, or a .gguf path.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Stages (contiguous layer ranges) [default: one per available node].
    #[arg(long)]
    pub stages: Option<usize>,
    /// Nodes per stage; fewer are used (with a warning) if the network is too small.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// Longest sequence sessions will use (reserved on the nodes as KV cache).
    #[arg(long, default_value_t = 2048)]
    pub max_len: usize,
    /// Layers the client runs itself in plaintext before the first node (a mitigation:
    /// the first node then never receives embedding rows; see SECURITY.md). 0: none.
    #[arg(long, default_value_t = 0)]
    pub client_layers: usize,
    /// Layers the client also runs itself after the last node (the mitigation's other end:
    /// the last node then serves a middle part of the model and never sees the final
    /// layers' computation; see SECURITY.md). 0: none.
    #[arg(long, default_value_t = 0)]
    pub client_last_layers: usize,
    /// How shards store their weights: q8_0 (default; 8-bit blocks, about a quarter of
    /// f32's bytes, run by the nodes' quantized kernels), q4_0, q4_k (4-bit; rows must be
    /// whole blocks of 256), or f32 (exact: encrypted output equals the f32 model's).
    #[arg(long, default_value = "q8_0", value_name = "FORMAT")]
    pub quant: ShardQuant,
    #[arg(long, value_name = "FILE|none", help = crate::encrypt::CALIBRATION_HELP)]
    pub calibration: Option<String>,
    /// Re-place the stages of deployment D that have no live replica.
    #[arg(long, value_name = "D")]
    pub repair: Option<String>,
    /// Seconds to wait for capacity ads.
    #[arg(long, default_value_t = 5)]
    pub wait: u64,
    /// Place the stages only on these nodes (peer ids, comma-separated), e.g. ones you run
    /// or trust; each must have published a capacity ad.
    #[arg(long, value_delimiter = ',', value_name = "PEER")]
    pub nodes: Vec<String>,
    /// The deployment's default `--verify` rate for `generate`, `chat` and `serve`.
    #[arg(long, value_name = "RATE", value_parser = crate::verify::parse_rate,
          help = crate::verify::VERIFY_HELP)]
    pub verify: Option<f64>,
    /// The deployment's default `--privacy` for `generate` and `chat`: rotated (the key
    /// folded into the shards) or masked (the nodes compute only the linear ops, on
    /// uniformly random words; see SECURITY.md). The shards are the same for both.
    #[arg(long, value_name = "MODE")]
    pub privacy: Option<veil_model::masked::Privacy>,
}

/// One node as the planner sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub peer: PeerId,
    pub ad: CapacityAd,
}

/// What a stage needs of a node: memory for the shard and its KV reserve, and disk for
/// the shard unless the node already holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// The shard's content hash (hex).
    pub shard: String,
    pub memory: u64,
    pub disk: u64,
}

impl Need {
    fn fits(&self, ad: &CapacityAd, memory_free: u64, disk_free: u64) -> bool {
        memory_free >= self.memory && (ad.shards.contains(&self.shard) || disk_free >= self.disk)
    }
}

/// Choose `replicas` distinct nodes for each stage: enough free memory for the shard and
/// its KV reserve and disk for the shard, least loaded first, then fastest.
pub fn plan(candidates: &[Candidate], need: &[Need], replicas: usize) -> Result<Vec<Vec<usize>>> {
    if candidates.is_empty() {
        bail!("no node has published a capacity ad yet");
    }
    let mut free: Vec<u64> = candidates.iter().map(|c| c.ad.free_memory_bytes).collect();
    let mut disk: Vec<u64> = candidates.iter().map(|c| c.ad.free_disk_bytes).collect();
    let mut load = vec![0usize; candidates.len()];
    let mut out = Vec::with_capacity(need.len());
    for (stage, n) in need.iter().enumerate() {
        let mut order: Vec<usize> = (0..candidates.len())
            .filter(|&i| n.fits(&candidates[i].ad, free[i], disk[i]))
            .collect();
        order.sort_by(|&a, &b| {
            load[a].cmp(&load[b]).then(
                candidates[b]
                    .ad
                    .throughput_gflops
                    .total_cmp(&candidates[a].ad.throughput_gflops),
            )
        });
        order.truncate(replicas);
        if order.is_empty() {
            bail!(
                "no node has room for stage {stage}: it needs {} MiB of memory and {} MiB of \
                 disk (most free: {} MiB of memory, {} MiB of disk)",
                n.memory >> 20,
                n.disk >> 20,
                free.iter().max().copied().unwrap_or(0) >> 20,
                disk.iter().max().copied().unwrap_or(0) >> 20
            );
        }
        if order.len() < replicas {
            tracing::warn!(
                "stage {stage}: only {} of {replicas} replicas can be placed",
                order.len()
            );
        }
        for &i in &order {
            free[i] -= n.memory;
            if !candidates[i].ad.shards.contains(&n.shard) {
                disk[i] = disk[i].saturating_sub(n.disk);
            }
            load[i] += 1;
        }
        out.push(order);
    }
    Ok(out)
}

/// Upload a shard file to a node, resuming where it left off; `progress(bytes)` is called
/// after each chunk.
pub async fn upload(
    network: &Network,
    peer: PeerId,
    shard: [u8; 32],
    bytes: &[u8],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let total = bytes.len() as u64;
    let mut offset = match network
        .upload(peer, UploadRequest::Query { shard, total })
        .await?
    {
        UploadResponse::Progress { complete: true, .. } => {
            progress(total);
            return Ok(());
        }
        UploadResponse::Progress { received, .. } => received.min(total),
        UploadResponse::Error { message, .. } => bail!("{peer} refused the shard: {message}"),
    };
    progress(offset);
    loop {
        let end = (offset as usize + UPLOAD_CHUNK).min(bytes.len());
        let data = bytes[offset as usize..end].to_vec();
        let sent = data.len() as u64;
        match network
            .upload(
                peer,
                UploadRequest::Chunk {
                    shard,
                    total,
                    offset,
                    data,
                },
            )
            .await?
        {
            UploadResponse::Progress { complete: true, .. } => {
                progress(total);
                return Ok(());
            }
            UploadResponse::Progress { received, .. } => {
                if received != offset + sent {
                    tracing::debug!("{peer} resumes at {received}");
                }
                progress(received.saturating_sub(offset));
                offset = received;
            }
            UploadResponse::Error { message, .. } => bail!("{peer} refused the shard: {message}"),
        }
    }
}

/// The nodes that advertise capacity, less those this client caught answering wrongly.
/// `--nodes` as peer ids, checked before the network is joined.
fn only_nodes(args: &DeployArgs) -> Result<Vec<PeerId>> {
    args.nodes
        .iter()
        .map(|n| {
            n.parse()
                .with_context(|| format!("--nodes: `{n}` is not a peer id"))
        })
        .collect()
}

fn candidates(client: &mut Client, args: &DeployArgs, only: &[PeerId]) -> Result<Vec<Candidate>> {
    let book = client.discover(Duration::from_secs(args.wait), usize::MAX);
    if let Some(peer) = only.iter().find(|p| book.get(p).is_none()) {
        bail!("--nodes: {peer} has published no capacity ad (is it running and joined?)");
    }
    let reputation = crate::verify::Reputation::load().unwrap_or_else(|e| {
        tracing::warn!("{e:#}");
        crate::verify::Reputation::default()
    });
    Ok(book
        .ads(now_ms())
        .into_iter()
        .filter(|(peer, _)| only.is_empty() || only.contains(peer))
        .filter(|(peer, _)| {
            let caught = reputation.caught(peer);
            if caught {
                tracing::warn!("leaving out {peer}: it was caught answering wrongly before");
            }
            !caught
        })
        .map(|(peer, ad)| Candidate { peer, ad })
        .collect())
}

fn register_addrs(client: &Client, c: &Candidate) {
    for a in &c.ad.addrs {
        if let Ok(addr) = a.parse::<Multiaddr>() {
            let _ = client
                .runtime
                .block_on(client.network.add_address(c.peer, addr));
        }
    }
}

/// Upload every (stage, node) pair concurrently with one progress bar; each pair's outcome.
fn upload_all(
    client: &Client,
    dir: &std::path::Path,
    jobs: Vec<(usize, [u8; 32], Candidate)>,
) -> Result<Vec<Result<()>>> {
    let total: u64 = jobs
        .iter()
        .map(|(s, ..)| std::fs::metadata(shard_path(dir, *s)).map_or(0, |m| m.len()))
        .sum();
    let bar = crate::progress::bar(
        Some(total),
        "uploading [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    );
    let bar = Arc::new(bar);
    let mut files: HashMap<usize, Arc<Vec<u8>>> = HashMap::new();
    for (s, ..) in &jobs {
        if !files.contains_key(s) {
            let p = shard_path(dir, *s);
            files.insert(
                *s,
                Arc::new(
                    std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?,
                ),
            );
        }
    }
    let results: Vec<Result<()>> = client.runtime.block_on(async {
        let tasks: Vec<_> = jobs
            .into_iter()
            .map(|(stage, shard, c)| {
                let network = client.network.clone();
                let bytes = files[&stage].clone();
                let bar = bar.clone();
                tokio::spawn(async move {
                    let inc = |n: u64| bar.inc(n);
                    upload(&network, c.peer, shard, &bytes, &inc)
                        .await
                        .with_context(|| format!("uploading stage {stage} to {}", c.peer))
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(
                t.await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("upload task failed: {e}"))),
            );
        }
        out
    });
    bar.finish_and_clear();
    Ok(results)
}

fn shard_id(hex_id: &str) -> Result<[u8; 32]> {
    hex::decode(hex_id)
        .ok()
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("bad shard id `{hex_id}`"))
}

/// Upload each (stage, shard, candidate) job; a node that refuses (no room, not allowed,
/// busy) or fails gets its stage placed on another node that has room, while any is left.
/// The jobs that succeeded, as (stage, shard, node).
fn upload_or_replace(
    client: &Client,
    dir: &std::path::Path,
    found: &[Candidate],
    need: &[Need],
    todo: &[usize],
    mut jobs: Vec<(usize, [u8; 32], usize)>,
) -> Result<Vec<(usize, [u8; 32], Candidate)>> {
    let mut done = Vec::new();
    let mut tried: Vec<(usize, usize)> = jobs.iter().map(|&(s, _, i)| (s, i)).collect();
    let mut failures: HashMap<usize, Vec<String>> = HashMap::new();
    while !jobs.is_empty() {
        for &(stage, _, i) in &jobs {
            register_addrs(client, &found[i]);
            tracing::info!("stage {stage} -> {}", found[i].peer);
        }
        let batch: Vec<_> = jobs
            .iter()
            .map(|&(s, id, i)| (s, id, found[i].clone()))
            .collect();
        let results = upload_all(client, dir, batch)?;
        let mut retry = Vec::new();
        for ((stage, id, i), r) in jobs.into_iter().zip(results) {
            let Err(e) = r else {
                done.push((stage, id, found[i].clone()));
                continue;
            };
            tracing::warn!("{e:#}; placing the stage elsewhere");
            failures.entry(stage).or_default().push(format!("{e:#}"));
            let n = &need[todo.iter().position(|&t| t == stage).unwrap_or(0)];
            let busy = |j: usize| {
                tried.contains(&(stage, j))
                    || done.iter().any(|(s, _, c): &(usize, [u8; 32], Candidate)| {
                        *s == stage && c.peer == found[j].peer
                    })
            };
            let next = (0..found.len())
                .filter(|&j| !busy(j))
                .filter(|&j| {
                    n.fits(
                        &found[j].ad,
                        found[j].ad.free_memory_bytes,
                        found[j].ad.free_disk_bytes,
                    )
                })
                .max_by(|&a, &b| {
                    found[a]
                        .ad
                        .throughput_gflops
                        .total_cmp(&found[b].ad.throughput_gflops)
                });
            if let Some(j) = next {
                tried.push((stage, j));
                retry.push((stage, id, j));
            }
        }
        jobs = retry;
    }
    for &stage in todo {
        if !done.iter().any(|(s, ..)| *s == stage) {
            let why = failures
                .get(&stage)
                .map(|f| f.join("; "))
                .unwrap_or_default();
            bail!("stage {stage} could not be placed on any node: {why}");
        }
    }
    Ok(done)
}

pub fn run(args: DeployArgs) -> Result<()> {
    let d = if let Some(id) = &args.repair {
        repair(&args, id)?
    } else {
        deploy(&args)?
    };
    println!("{}", d.id);
    Ok(())
}

/// Encrypt the model, place its shards on the network and save the deployment record.
pub fn deploy(args: &DeployArgs) -> Result<Deployment> {
    let only = only_nodes(args)?;
    let mut client = Client::connect(&args.net)?;
    let found = candidates(&mut client, args, &only)?;
    if found.is_empty() {
        bail!("no node has published a capacity ad; are nodes running and bootstrapped?");
    }
    let bundle = ModelSpec::parse(&args.model)?.load_quantized()?;
    let n_layers = bundle.weights.config.n_layers;
    let client_layers = ClientLayers {
        first: args.client_layers,
        last: args.client_last_layers,
    };
    let nodes = client_layers.node_range(n_layers).map_err(|_| {
        anyhow::anyhow!(
            "--client-layers and --client-last-layers must leave at least one of the model's {n_layers} layers to the nodes"
        )
    })?;
    let stages = args.stages.unwrap_or(found.len()).clamp(1, nodes.len());
    if args.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    let e = encrypt_with_progress(
        &bundle,
        stages,
        client_layers,
        None,
        args.quant,
        args.calibration.as_deref(),
    )?;
    let id = format!("d-{}", &e.client.meta.key.fingerprint[..12]);
    let dir = Deployment::dir(&id)?;
    e.write(&dir)
        .with_context(|| format!("cannot write {}", dir.display()))?;
    place_and_upload(
        &mut client,
        args,
        &e,
        &dir,
        &id,
        bundle.name.clone(),
        found,
        None,
    )
}

#[allow(clippy::too_many_arguments)]
fn place_and_upload(
    client: &mut Client,
    args: &DeployArgs,
    e: &Encrypted,
    dir: &std::path::Path,
    id: &str,
    model: String,
    found: Vec<Candidate>,
    previous: Option<Deployment>,
) -> Result<Deployment> {
    let cfg = &e.client.meta.config;
    let kv = |layers: (usize, usize)| {
        2 * (layers.1 - layers.0) as u64 * cfg.kv_dim() as u64 * args.max_len as u64 * 4
    };
    let records = &e.client.meta.stages;
    // Stages to (re)place: all, or those without a live replica.
    let live = |s: &StagePlacement| -> Vec<Replica> {
        s.replicas
            .iter()
            .filter(|r| {
                found
                    .iter()
                    .any(|c| c.peer.to_string() == r.peer && c.ad.shards.contains(&s.shard))
            })
            .cloned()
            .collect()
    };
    let todo: Vec<usize> = match &previous {
        None => (0..records.len()).collect(),
        Some(p) => p
            .stages
            .iter()
            .filter(|s| live(s).is_empty())
            .map(|s| s.stage)
            .collect(),
    };
    let need: Vec<Need> = todo
        .iter()
        .map(|&s| {
            let bytes = std::fs::metadata(shard_path(dir, s)).map_or(0, |m| m.len());
            Need {
                shard: records[s].shard_sha256.clone(),
                memory: bytes + kv(records[s].layers),
                disk: bytes,
            }
        })
        .collect();
    let placement = plan(&found, &need, args.replicas)?;
    let mut jobs = Vec::new();
    for (&stage, nodes) in todo.iter().zip(&placement) {
        for &i in nodes {
            jobs.push((stage, shard_id(&records[stage].shard_sha256)?, i));
        }
    }
    let jobs = upload_or_replace(client, dir, &found, &need, &todo, jobs)?;
    let stages = records
        .iter()
        .map(|r| {
            let placed: Vec<Replica> = jobs
                .iter()
                .filter(|(s, ..)| *s == r.stage)
                .map(|(_, _, c)| Replica {
                    peer: c.peer.to_string(),
                    addrs: c.ad.addrs.clone(),
                })
                .collect();
            let kept = previous
                .as_ref()
                .and_then(|p| p.stages.iter().find(|s| s.stage == r.stage))
                .map(&live)
                .unwrap_or_default();
            StagePlacement {
                stage: r.stage,
                layers: r.layers,
                shard: r.shard_sha256.clone(),
                bytes: std::fs::metadata(shard_path(dir, r.stage)).map_or(0, |m| m.len()),
                replicas: kept.into_iter().chain(placed).collect(),
            }
        })
        .collect();
    let d = Deployment {
        id: id.to_string(),
        model,
        key_fingerprint: e.client.meta.key.fingerprint.clone(),
        created_ms: previous.as_ref().map_or_else(now_ms, |p| p.created_ms),
        bootstrap: args.net.bootstrap.clone(),
        verify: args.verify.or(previous.as_ref().and_then(|p| p.verify)),
        privacy: args.privacy.or(previous.as_ref().and_then(|p| p.privacy)),
        stages,
    };
    d.save()?;
    Ok(d)
}

/// Re-place the stages of deployment `id` that have no live replica.
pub fn repair(args: &DeployArgs, id: &str) -> Result<Deployment> {
    let previous = Deployment::load(id)?;
    let dir = Deployment::dir(id)?;
    let e = Encrypted::read(&dir).with_context(|| format!("deployment {id} is damaged"))?;
    let mut net = args.net.clone();
    if net.bootstrap.is_empty() {
        net.bootstrap = previous.bootstrap.clone();
    }
    let only = only_nodes(args)?;
    let mut client = Client::connect(&net)?;
    let found = candidates(&mut client, args, &only)?;
    let model = previous.model.clone();
    let d = place_and_upload(
        &mut client,
        args,
        &e,
        &dir,
        id,
        model,
        found,
        Some(previous),
    )?;
    for s in &d.stages {
        tracing::info!("stage {}: {} replica(s)", s.stage, s.replicas.len());
    }
    Ok(d)
}
