//! Concurrent generations through a deployment, in this process: one thread per session,
//! all sharing one client network and the client's key-folded tables, started together.

use std::sync::{Arc, Barrier};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use serde::Serialize;
use std::sync::atomic::Ordering;
use veil_client::net::Client;

use veil_client::remote::masked::{MaskProviders, MaskedDeployment};
use veil_client::remote::{RemotePipeline, RemoteStats};
use veil_model::crypto::ClientModel;
use veil_model::masked::Privacy;
use veil_model::{generate, GenerateParams, Generation, ModelError, TextCodec, TokenModel};

use crate::network::LocalNetwork;

/// `count` prompts of exactly `tokens` tokens each (raw text, no chat template), cut from a
/// varied passage at different offsets so that sessions differ.
pub fn prompts(text: &TextCodec, count: usize, tokens: usize) -> Result<Vec<Vec<u32>>> {
    const PASSAGE: &str = "The river rose in the spring and the mill by the bridge worked day \
        and night. Merchants came from the coast with salt, cloth and news of distant wars. \
        In 1847 a school opened beside the church; its first teacher counted forty children, \
        most of whom had never held a book. Farmers argued about the price of wheat, the \
        weather, and whether the new railway would ever reach the valley. When it finally \
        did, in the autumn of 1871, the whole town walked to the station to watch the first \
        train arrive, and the baker sold more bread that morning than in the whole month \
        before. Scientists later measured the river's flow at 340 cubic metres per second \
        during the great flood, a record that still stands. ";
    if tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    let mut ids = text.prompt_tokens(PASSAGE, true)?;
    let base = ids.clone();
    let need = tokens + 11 * count;
    while ids.len() < need {
        ids.extend_from_slice(&base);
    }
    Ok((0..count)
        .map(|i| ids[i * 11..i * 11 + tokens].to_vec())
        .collect())
}

/// A [`TokenModel`] that ticks a progress bar for every token it is fed after the prompt.
pub struct Metered<'a, M: TokenModel + ?Sized> {
    pub inner: &'a mut M,
    pub bar: ProgressBar,
}

impl<M: TokenModel + ?Sized> TokenModel for Metered<'_, M> {
    fn context_len(&self) -> usize {
        self.inner.context_len()
    }

    fn position(&self) -> usize {
        self.inner.position()
    }

    fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        let out = self.inner.feed(ids)?;
        self.bar.inc(1);
        Ok(out)
    }
}

/// One session's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct SessionResult {
    pub prompt: usize,
    /// Seconds from the common start until the session began generating.
    pub start_s: f64,
    /// Seconds from the common start until it finished (or failed).
    pub end_s: f64,
    pub tokens: Vec<u32>,
    /// Seconds from the session's start until each token was sampled.
    pub token_times_s: Vec<f64>,
    pub route: Vec<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub failovers: u32,
    /// What checking the nodes found (with verification on).
    pub audit: veil_client::remote::AuditStats,
    pub error: Option<String>,
}

impl SessionResult {
    fn failed(prompt: usize, start_s: f64, end_s: f64, e: &anyhow::Error) -> Self {
        SessionResult {
            prompt,
            start_s,
            end_s,
            tokens: Vec::new(),
            token_times_s: Vec::new(),
            route: Vec::new(),
            bytes_sent: 0,
            bytes_received: 0,
            failovers: 0,
            audit: Default::default(),
            error: Some(format!("{e:#}")),
        }
    }
}

/// A client of a local network that runs generations.
pub struct LoadClient {
    client: Client,
    model: ClientModel,
    /// In masked mode: what every session shares.
    masked: Option<MaskedDeployment>,
    net: Arc<NetworkView>,
    /// How sessions check the nodes (the deployment's `--verify` rate, off without one); no
    /// record of nodes is kept between sessions, so that each is an independent trial.
    pub verification: veil_client::remote::Verification,
}

/// What sessions need to know of the network.
struct NetworkView {
    deployment: veil_client::deployment::Deployment,
    text: TextCodec,
    context: usize,
}

impl LoadClient {
    pub fn connect(network: &LocalNetwork) -> Result<Self> {
        let client = Client::connect(&network.net_args()).context("cannot join the testnet")?;
        let device = veil_model::Compute::cpu().device;
        let model = ClientModel::new(&network.bundle, &device)?;
        let masked = match network.privacy {
            Privacy::Rotated => None,
            Privacy::Masked => Some(MaskedDeployment::load(
                client.runtime.handle().clone(),
                client.network.clone(),
                &network.bundle,
                &network.deployment,
                network.bundle.meta.config.max_seq_len,
                veil_model::Precision::Fast,
            )?),
        };
        Ok(LoadClient {
            client,
            model,
            masked,
            net: Arc::new(NetworkView {
                deployment: network.deployment.clone(),
                text: TextCodec::new(network.bundle.meta.text.clone())?,
                context: network.bundle.meta.config.max_seq_len,
            }),
            // the deployment's own rate when it has one (`--verify`), else off
            verification: veil_client::remote::Verification {
                rate: network.deployment.verify.unwrap_or(0.0),
                shards: network.deployment_dir().ok(),
                // each session is an independent trial: nothing is published
                publish: false,
            },
        })
    }

    /// Run one generation per prompt, all at once, each in its own thread. `prompts[i]`
    /// runs `repeat` times in a row in session thread `i`.
    pub fn run(
        &self,
        prompts: &[Vec<u32>],
        params: &GenerateParams,
        repeat: usize,
        bar: &ProgressBar,
    ) -> Vec<SessionResult> {
        let barrier = Arc::new(Barrier::new(prompts.len()));
        let start = Instant::now();
        std::thread::scope(|scope| {
            let handles: Vec<_> = prompts
                .iter()
                .enumerate()
                .map(|(i, prompt)| {
                    let barrier = barrier.clone();
                    let bar = bar.clone();
                    scope.spawn(move || {
                        barrier.wait();
                        (0..repeat)
                            .map(|_| {
                                let t0 = start.elapsed().as_secs_f64();
                                match self.one(prompt, params, &bar) {
                                    Ok((g, route, stats)) => SessionResult {
                                        prompt: i,
                                        start_s: t0,
                                        end_s: start.elapsed().as_secs_f64(),
                                        tokens: g.tokens,
                                        token_times_s: g.token_times_s,
                                        route,
                                        bytes_sent: stats.bytes_sent,
                                        bytes_received: stats.bytes_received,
                                        failovers: stats.failovers,
                                        audit: stats.audit,
                                        error: None,
                                    },
                                    Err(e) => SessionResult::failed(
                                        i,
                                        t0,
                                        start.elapsed().as_secs_f64(),
                                        &e,
                                    ),
                                }
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        })
    }

    fn one(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        bar: &ProgressBar,
    ) -> Result<(Generation, Vec<String>, RemoteStats)> {
        if let Some(base) = &self.masked {
            let mut pipeline = base.session(&MaskProviders::Local)?;
            let g = self.metered(&mut pipeline, prompt, params, bar)?;
            let route = pipeline.route();
            pipeline.close();
            let stats = RemoteStats {
                bytes_sent: pipeline.traffic.sent.load(Ordering::Relaxed),
                bytes_received: pipeline.traffic.received.load(Ordering::Relaxed),
                ..RemoteStats::default()
            };
            return Ok((g, route, stats));
        }
        let mut pipeline = RemotePipeline::with_client(
            self.client.runtime.handle().clone(),
            self.client.network.clone(),
            self.model.clone(),
            &self.net.deployment,
            self.net.context,
            veil_model::Precision::Fast,
        )?;
        pipeline.set_verification(self.verification.clone());
        let g = self.metered(&mut pipeline, prompt, params, bar)?;
        let route = pipeline.route();
        pipeline.close();
        Ok((g, route, pipeline.stats.clone()))
    }

    /// Generate from `prompt` with `model`, each token counted on `bar`.
    fn metered(
        &self,
        model: &mut dyn TokenModel,
        prompt: &[u32],
        params: &GenerateParams,
        bar: &ProgressBar,
    ) -> Result<Generation> {
        let mut metered = Metered {
            inner: model,
            bar: bar.clone(),
        };
        Ok(generate(
            &mut metered,
            &self.net.text.tokenizer,
            prompt,
            params,
            &mut |_| {},
        )?)
    }

    /// Work counters of every node (`None` where a node did not answer).
    /// This client's connections: hole punches, relayed and direct ones.
    pub fn reach(&self) -> Option<veil_protocol::ReachStatus> {
        let network = self.client.network.clone();
        self.client
            .runtime
            .block_on(async move { network.reach().await })
            .ok()
    }

    pub fn node_stats(
        &self,
        network: &LocalNetwork,
    ) -> Vec<Option<veil_protocol::wire::NodeStats>> {
        network
            .nodes
            .iter()
            .map(|n| {
                let peer = n.peer_id.parse().ok()?;
                self.client.stats(peer).ok()
            })
            .collect()
    }
}
