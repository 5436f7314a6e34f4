//! `veil serve`: an OpenAI-compatible gateway. The gateway is the client: it holds the
//! deployment's secret bundle, so keys, prompts and answers never leave this machine; the
//! nodes see only rotated hidden states.
//!
//! `routes` is the HTTP side (axum), `worker` the model side (a bounded queue and one thread
//! per concurrent answer), `stop` the stop sequences, `api` and `error` OpenAI's shapes.

mod api;
mod error;
mod metrics;
mod network;
mod routes;
mod stop;
mod worker;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use veil_model::crypto::{
    short_fingerprint, ClientLayers, ClientModel, EncryptedLocal, ShardQuant,
};
use veil_model::{LocalModel, TextCodec, TokenModel};

use crate::deployment::Deployment;
use crate::encrypt::encrypt_with_progress;
use crate::generate::{connect_deployment, precision};
use crate::model_spec::ModelSpec;
use crate::net::{Client, NetArgs};
use crate::remote::masked::{MaskProviders, MaskedDeployment};
use crate::remote::RemotePipeline;
pub use error::ApiError;
pub use metrics::Metrics;
pub use network::{ReplicaView, Source, StageView, View};
pub use routes::{router, AppState, Ready, MAX_BODY_BYTES};
use std::sync::atomic::Ordering;
pub use stop::StopMatcher;
use veil_model::masked::Privacy;
pub use worker::{Pool, PoolOptions, Served, Sessions, SLOW_CLIENT_TIMEOUT};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Serve a deployment made by `veil deploy` (encrypted: the nodes see only rotated
    /// hidden states; this gateway holds the key).
    #[arg(long, conflicts_with = "local")]
    pub deployment: Option<String>,
    /// Serve a model in this process, in plaintext (for development and tests).
    #[arg(long)]
    pub local: bool,
    /// With --local: smollm2, tiny, or a .gguf path.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// With --local: encrypt the model with a fresh key at start and answer through its
    /// encrypted stages, all in this process (what a deployment's nodes compute, without a
    /// network).
    #[arg(long, requires = "local")]
    pub encrypted: bool,
    /// With --encrypted: stages to split the model into.
    #[arg(long, default_value_t = 3, requires = "encrypted")]
    pub stages: usize,
    /// With --encrypted: layers the gateway runs itself in plaintext before the first stage.
    #[arg(long, default_value_t = 0, requires = "encrypted")]
    pub client_layers: usize,
    /// With --encrypted: layers the gateway runs itself after the last stage.
    #[arg(long, default_value_t = 0, requires = "encrypted")]
    pub client_last_layers: usize,
    /// With --encrypted: the shards' weight format, q8_0 (default), q4_0, q4_k or f32 (see
    /// `veil encrypt --help`).
    #[arg(
        long,
        default_value = "q8_0",
        value_name = "FORMAT",
        requires = "encrypted"
    )]
    pub quant: ShardQuant,
    #[arg(long, value_name = "FILE|none", requires = "encrypted",
          help = crate::encrypt::CALIBRATION_HELP)]
    pub calibration: Option<String>,
    /// Address to listen on. Port 0 picks a free one; the address is printed on stdout.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Require `Authorization: Bearer KEY` on /v1 requests (without it any token, or none,
    /// is accepted, so OpenAI clients work unchanged).
    #[arg(long, env = "VEIL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests answered at once (with a deployment: concurrent sessions, whose steps the
    /// nodes batch).
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Requests that may wait beyond those being answered; more get 429 with Retry-After.
    #[arg(long, default_value_t = 32)]
    pub queue: usize,
    /// Seconds a worker waits for a client that stopped reading its stream before it drops
    /// the request and frees its sequence (and node sessions).
    #[arg(long, default_value_t = SLOW_CLIENT_TIMEOUT.as_secs(), value_name = "SECONDS")]
    pub slow_client_timeout: u64,
    /// Positions per sequence, prompt and answer together [default: the model's context,
    /// at most 4096].
    #[arg(long)]
    pub ctx: Option<usize>,
    /// f32 activations (see `veil generate --exact`).
    #[arg(long)]
    pub exact: bool,
    #[arg(long, value_name = "RATE", requires = "deployment",
          value_parser = crate::verify::parse_rate, help = crate::verify::VERIFY_HELP)]
    pub verify: Option<f64>,
    /// With --deployment: rotated or masked (the nodes compute only the linear ops, on
    /// uniformly random words; see `veil generate --help` and SECURITY.md). [default: the
    /// deployment's (`veil deploy --privacy`), else rotated]
    #[arg(long, value_name = "MODE", requires = "deployment")]
    pub privacy: Option<Privacy>,
    /// With --privacy masked: `local` (default: this gateway) or the peer ids of mask
    /// providers.
    #[arg(long, default_value = "local", value_name = "local|PEER,...")]
    pub mask_provider: MaskProviders,
    #[command(flatten)]
    pub net: NetArgs,
}

/// The id `/v1/models` shows for `--model M`: the name, or a GGUF path's file stem.
fn local_id(model: &str) -> String {
    let p = std::path::Path::new(model);
    match (
        p.extension().and_then(|e| e.to_str()),
        p.file_stem().and_then(|s| s.to_str()),
    ) {
        (Some("gguf"), Some(stem)) => stem.to_string(),
        _ => model.to_string(),
    }
}

/// Default context per sequence: a local model's KV cache is allocated whole.
const DEFAULT_CTX: usize = 4096;

pub fn run(args: ServeArgs) -> Result<()> {
    if !args.local && args.deployment.is_none() {
        bail!("say what to serve: --local --model M, or --deployment D (see `veil deploy`)");
    }
    if args.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    let model_id = match &args.deployment {
        Some(d) => d.clone(),
        None => {
            ModelSpec::parse(&args.model)?;
            local_id(&args.model)
        }
    };
    let state = Arc::new(AppState {
        model_id,
        created: routes::now(),
        api_key: args.api_key.clone(),
        ready: OnceLock::new(),
        failed: OnceLock::new(),
        metrics: Arc::new(Metrics::new()),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("veil-serve-http")
        .build()
        .context("cannot start the gateway's runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(args.listen))
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // stdout is for data: the address, for scripts and tests
    println!("http://{addr}");
    tracing::info!("listening on http://{addr} (loading the model; /health says 503 until then)");
    // a model that cannot load ends the gateway (with the reason), as llama-server does
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<()>();
    {
        let state = state.clone();
        std::thread::Builder::new()
            .name("veil-serve-load".into())
            .spawn(move || match load(&args, state.metrics.clone()) {
                Ok(ready) => {
                    tracing::info!(
                        "ready: {} with {} positions per sequence",
                        state.model_id,
                        ready.context
                    );
                    let _ = state.ready.set(ready);
                }
                Err(e) => {
                    let _ = state.failed.set(format!("{e:#}"));
                    let _ = failed_tx.send(());
                }
            })
            .context("cannot start the loader")?;
    }
    let app = router(state.clone());
    runtime.block_on(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {
                        tracing::info!("shutting down: finishing the answers in flight");
                    }
                    Ok(()) = failed_rx => {}
                }
            })
            .await
    })?;
    if let Some(why) = state.failed.get() {
        bail!("cannot load the model: {why}");
    }
    Ok(())
}

/// Load the model (or connect to the deployment) and start the workers.
fn load(args: &ServeArgs, metrics: Arc<Metrics>) -> Result<Ready> {
    let precision = precision(args.exact);
    let options = PoolOptions {
        queue: args.queue,
        slow_client_timeout: Duration::from_secs(args.slow_client_timeout.max(1)),
    };
    if let Some(id) = &args.deployment {
        let (client, bundle, deployment) = connect_deployment(id, &args.net)?;
        let network = Source::Nodes(Box::new(network::Nodes::new(
            client.runtime.handle().clone(),
            client.network.clone(),
            client.bootstrap_peers.clone(),
            deployment.clone(),
            short_fingerprint(&bundle.meta.key.fingerprint).to_string(),
            bundle.meta.client_side(),
        )));
        let codec = Arc::new(TextCodec::new(bundle.meta.text.clone())?);
        let context = args
            .ctx
            .unwrap_or(DEFAULT_CTX)
            .min(bundle.meta.config.max_seq_len);
        let device = veil_model::Compute::cpu().device;
        let tables = ClientModel::with_precision(&bundle, &device, precision)?;
        let verification = crate::verify::verification_for(&deployment, args.verify)?;
        let privacy = args.privacy.or(deployment.privacy).unwrap_or_default();
        let masked = match privacy {
            Privacy::Masked => Some(Arc::new(MaskedDeployment::load(
                client.runtime.handle().clone(),
                client.network.clone(),
                &bundle,
                &deployment,
                context,
                precision,
            )?)),
            Privacy::Rotated => None,
        };
        tracing::info!("privacy: {privacy}");
        let shared = Arc::new(Remote {
            client,
            deployment,
            tables,
            context,
            precision,
            verification,
        });
        let workers = (0..args.parallel)
            .map(|_| match &masked {
                Some(m) => Box::new(MaskedSessions {
                    _remote: shared.clone(),
                    masked: m.clone(),
                    providers: args.mask_provider.clone(),
                }) as Box<dyn Sessions>,
                None => Box::new(RemoteSessions(shared.clone())) as Box<dyn Sessions>,
            })
            .collect();
        let pool = Pool::start(workers, codec.clone(), options, metrics.clone());
        return Ok(Ready {
            pool,
            codec,
            context,
            network: Arc::new(network),
        });
    }
    let bundle = ModelSpec::parse(&args.model)?.load_quantized()?;
    let device = veil_model::Compute::cpu().device;
    let model_id = local_id(&args.model);
    if args.encrypted {
        let e = encrypt_with_progress(
            &bundle,
            args.stages,
            ClientLayers {
                first: args.client_layers,
                last: args.client_last_layers,
            },
            None,
            args.quant,
            args.calibration.as_deref(),
        )?;
        let context = args
            .ctx
            .unwrap_or(DEFAULT_CTX)
            .min(e.client.meta.config.max_seq_len);
        let mut layers: Vec<(usize, usize)> = e.shards.iter().map(|s| s.meta.layers).collect();
        layers.sort_unstable();
        let mut workers: Vec<Box<dyn Sessions>> = Vec::with_capacity(args.parallel);
        for _ in 0..args.parallel {
            // the shards' blocks are shared; each worker has its own caches
            let model = EncryptedLocal::with_precision(
                &e.client,
                &e.shards,
                &device,
                Some(context),
                precision,
            )?;
            workers.push(Box::new(EncryptedSessions {
                model,
                stages: layers.len(),
            }));
        }
        let view = network::local_view(
            "local-encrypted",
            &model_id,
            Some(short_fingerprint(&e.client.meta.key.fingerprint).to_string()),
            e.client.meta.client_side(),
            &layers,
            "cpu",
        );
        let codec = Arc::new(bundle.text);
        let pool = Pool::start(workers, codec.clone(), options, metrics.clone());
        return Ok(Ready {
            pool,
            codec,
            context,
            network: Arc::new(Source::Fixed(view)),
        });
    }
    let context = args
        .ctx
        .unwrap_or(DEFAULT_CTX)
        .min(bundle.weights.config.max_seq_len);
    let n_layers = bundle.weights.config.n_layers;
    let mut workers: Vec<Box<dyn Sessions>> = Vec::with_capacity(args.parallel);
    for _ in 0..args.parallel {
        // the weights' blocks are shared; each worker has its own cache
        let model = LocalModel::quantized(&bundle.weights, &device, Some(context), precision)?;
        workers.push(Box::new(LocalSessions(model)));
    }
    let codec = Arc::new(bundle.text);
    let pool = Pool::start(workers, codec.clone(), options, metrics.clone());
    let view = network::local_view(
        "local",
        &model_id,
        None,
        ClientLayers::default(),
        &[(0, n_layers)],
        "cpu",
    );
    Ok(Ready {
        pool,
        codec,
        context,
        network: Arc::new(Source::Fixed(view)),
    })
}

/// A local model: one sequence at a time, its cache cleared per request.
struct LocalSessions(LocalModel);

impl Sessions for LocalSessions {
    fn with_session(&mut self, f: &mut dyn FnMut(&mut dyn TokenModel)) -> Result<Served> {
        self.0.reset();
        f(&mut self.0);
        self.0.reset();
        Ok(Served {
            route: vec!["local".into()],
            ..Served::default()
        })
    }
}

/// Encrypted stages in this process: one sequence at a time, caches cleared per request.
struct EncryptedSessions {
    model: EncryptedLocal,
    stages: usize,
}

impl Sessions for EncryptedSessions {
    fn with_session(&mut self, f: &mut dyn FnMut(&mut dyn TokenModel)) -> Result<Served> {
        self.model.reset();
        f(&mut self.model);
        self.model.reset();
        Ok(Served {
            route: (0..self.stages)
                .map(|i| format!("local stage {i}"))
                .collect(),
            ..Served::default()
        })
    }
}

/// What every worker of a deployment shares.
struct Remote {
    client: Client,
    deployment: Deployment,
    tables: ClientModel,
    context: usize,
    precision: veil_model::Precision,
    verification: crate::remote::Verification,
}

/// New masked sessions per request (a fresh mask seed each), closed after it.
struct MaskedSessions {
    /// Keeps the client's network running.
    _remote: Arc<Remote>,
    masked: Arc<MaskedDeployment>,
    providers: MaskProviders,
}

impl Sessions for MaskedSessions {
    fn with_session(&mut self, f: &mut dyn FnMut(&mut dyn TokenModel)) -> Result<Served> {
        let mut pipeline = self.masked.session(&self.providers)?;
        f(&mut pipeline);
        let route = pipeline.route();
        pipeline.close();
        let detections = pipeline.detections();
        for d in &detections {
            tracing::warn!(
                "caught {} ({}) answering masked op {} wrongly; it was not asked again",
                d.party,
                d.role,
                d.op
            );
        }
        let t = pipeline.stats.totals();
        Ok(Served {
            route,
            failovers: 0,
            bytes_sent: pipeline.traffic.sent.load(Ordering::Relaxed),
            bytes_received: pipeline.traffic.received.load(Ordering::Relaxed),
            checks: u32::try_from(t.ops).unwrap_or(u32::MAX),
            caught: detections.into_iter().map(|d| d.party).collect(),
        })
    }
}

/// New node sessions per request, closed after it.
struct RemoteSessions(Arc<Remote>);

impl Sessions for RemoteSessions {
    fn with_session(&mut self, f: &mut dyn FnMut(&mut dyn TokenModel)) -> Result<Served> {
        let r = &self.0;
        let mut pipeline = RemotePipeline::with_client(
            r.client.runtime.handle().clone(),
            r.client.network.clone(),
            r.tables.clone(),
            &r.deployment,
            r.context,
            r.precision,
        )?;
        crate::verify::prepare(&mut pipeline, r.verification.clone())?;
        f(&mut pipeline);
        let route = pipeline.route();
        // closing runs the last checks first (with verification on)
        pipeline.close();
        crate::generate::report_detections(&pipeline.stats.audit);
        if let Err(e) = crate::verify::record(&pipeline, &r.deployment.id) {
            tracing::warn!("{e:#}");
        }
        let stats = &pipeline.stats;
        Ok(Served {
            route,
            failovers: stats.failovers,
            bytes_sent: stats.bytes_sent,
            bytes_received: stats.bytes_received,
            checks: stats.audit.checks,
            caught: stats
                .audit
                .detections
                .iter()
                .map(|d| d.peer.clone())
                .collect(),
        })
    }
}
