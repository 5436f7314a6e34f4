//! `veil serve`: an OpenAI-compatible gateway. The gateway is the client: it holds the
//! deployment's secret bundle, so keys, prompts and answers never leave this machine; the
//! nodes see only rotated hidden states.
//!
//! `routes` is the HTTP side (axum), `worker` the model side (a bounded queue and one thread
//! per concurrent answer), `stop` the stop sequences, `api` and `error` OpenAI's shapes.

mod api;
mod error;
mod metrics;
mod routes;
mod stop;
mod worker;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use clap::Args;
use veil_model::crypto::ClientModel;
use veil_model::{LocalModel, TextCodec, TokenModel};

use crate::deployment::Deployment;
use crate::generate::{connect_deployment, precision};
use crate::model_spec::ModelSpec;
use crate::net::{Client, NetArgs};
use crate::remote::RemotePipeline;
pub use error::ApiError;
pub use metrics::Metrics;
pub use routes::{router, AppState, Ready, MAX_BODY_BYTES};
pub use stop::StopMatcher;
pub use worker::{Pool, Sessions};

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
    /// Positions per sequence, prompt and answer together [default: the model's context,
    /// at most 4096].
    #[arg(long)]
    pub ctx: Option<usize>,
    /// f32 activations (see `veil generate --exact`).
    #[arg(long)]
    pub exact: bool,
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
    if let Some(id) = &args.deployment {
        let (client, bundle, deployment) = connect_deployment(id, &args.net)?;
        let codec = Arc::new(TextCodec::new(bundle.meta.text.clone())?);
        let context = args
            .ctx
            .unwrap_or(DEFAULT_CTX)
            .min(bundle.meta.config.max_seq_len);
        let device = veil_model::Compute::cpu().device;
        let tables = ClientModel::with_precision(&bundle, &device, precision)?;
        let shared = Arc::new(Remote {
            client,
            deployment,
            tables,
            context,
            precision,
        });
        let workers = (0..args.parallel)
            .map(|_| Box::new(RemoteSessions(shared.clone())) as Box<dyn Sessions>)
            .collect();
        let pool = Pool::start(workers, codec.clone(), args.queue, metrics.clone());
        return Ok(Ready {
            pool,
            codec,
            context,
        });
    }
    let bundle = ModelSpec::parse(&args.model)?.load_quantized()?;
    let context = args
        .ctx
        .unwrap_or(DEFAULT_CTX)
        .min(bundle.weights.config.max_seq_len);
    let device = veil_model::Compute::cpu().device;
    let mut workers: Vec<Box<dyn Sessions>> = Vec::with_capacity(args.parallel);
    for _ in 0..args.parallel {
        // the weights' blocks are shared; each worker has its own cache
        let model = LocalModel::quantized(&bundle.weights, &device, Some(context), precision)?;
        workers.push(Box::new(LocalSessions(model)));
    }
    let codec = Arc::new(bundle.text);
    let pool = Pool::start(workers, codec.clone(), args.queue, metrics.clone());
    Ok(Ready {
        pool,
        codec,
        context,
    })
}

/// A local model: one sequence at a time, its cache cleared per request.
struct LocalSessions(LocalModel);

impl Sessions for LocalSessions {
    fn with_session(&mut self, f: &mut dyn FnMut(&mut dyn TokenModel)) -> Result<()> {
        self.0.reset();
        f(&mut self.0);
        self.0.reset();
        Ok(())
    }
}

/// What every worker of a deployment shares.
struct Remote {
    client: Client,
    deployment: Deployment,
    tables: ClientModel,
    context: usize,
    precision: veil_model::Precision,
}

/// New node sessions per request, closed after it.
struct RemoteSessions(Arc<Remote>);

impl Sessions for RemoteSessions {
    fn with_session(&mut self, f: &mut dyn FnMut(&mut dyn TokenModel)) -> Result<()> {
        let r = &self.0;
        let mut pipeline = RemotePipeline::with_client(
            r.client.runtime.handle().clone(),
            r.client.network.clone(),
            r.tables.clone(),
            &r.deployment,
            r.context,
            r.precision,
        )?;
        f(&mut pipeline);
        pipeline.close();
        Ok(())
    }
}
