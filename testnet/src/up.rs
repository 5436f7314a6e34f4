//! `veil-testnet up`: a local network with the model deployed, one prompt through it, and
//! the network kept up for other clients until ctrl-c.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use std::sync::atomic::Ordering;
use veil_client::net::Client;

use veil_client::remote::masked::{MaskProviders, MaskedPipeline};
use veil_client::remote::RemotePipeline;
use veil_model::masked::Privacy;
use veil_model::{generate, GenerateParams, SamplingParams};

use crate::network::LocalNetwork;

/// The outcome of the demo prompt.
#[derive(Debug, Serialize)]
pub struct UpReport {
    pub text: String,
    pub tokens: usize,
    /// Generated tokens over the whole generation, and after the first token.
    pub tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub time_to_first_token_s: f64,
    /// One entry per stage: `node-i (peer id)`.
    pub route: Vec<String>,
    pub bytes_per_token: f64,
    pub bootstrap: String,
    pub deployment: String,
    pub key_fingerprint: String,
    /// `rotated` or `masked`.
    pub privacy: String,
    /// What checking the nodes found (the deployment's `--verify` rate; rotated mode).
    pub verification: veil_client::remote::AuditStats,
    /// Masked mode: ops computed, products that failed their check, parties caught.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked: Option<MaskedReport>,
}

/// What a masked generation's checks found.
#[derive(Debug, Serialize)]
pub struct MaskedReport {
    pub ops: u64,
    pub failed_checks: u64,
    /// Seconds the client spent making masks, waiting for both parties' products (at once),
    /// and on its own share of the ops (quantizing, masking, unmasking, checking).
    pub masks_s: f64,
    pub products_s: f64,
    pub client_s: f64,
    pub detections: Vec<veil_model::masked::Detection>,
}

/// Run `prompt` (chat-templated) through the network, streaming the answer to `out`:
/// rotated (the deployment's encrypted stages on the nodes) or masked (the nodes compute
/// the linear ops on masked words; the client runs the rest and provides the masks).
pub fn ask(
    network: &LocalNetwork,
    prompt: &str,
    max_tokens: usize,
    privacy: Privacy,
    out: &mut dyn Write,
) -> Result<UpReport> {
    let client = Client::connect(&network.net_args())?;
    let handle = client.runtime.handle().clone();
    let context = network.bundle.meta.config.max_seq_len;
    let ids = network.text.prompt_tokens(prompt, false)?;
    let params = GenerateParams {
        max_tokens,
        sampling: SamplingParams::default(),
        top_logits: 0,
    };
    let mut stream = |piece: &str| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    };
    let tokenizer = &network.text.tokenizer;
    let start = Instant::now();
    let (g, route, bytes, verification, masked) = match privacy {
        Privacy::Rotated => {
            let mut pipeline = RemotePipeline::new(
                handle,
                client.network.clone(),
                &network.bundle,
                &network.deployment,
                context,
                veil_model::Precision::Fast,
            )?;
            veil_client::verify::prepare(
                &mut pipeline,
                veil_client::verify::verification_for(&network.deployment, None)?,
            )?;
            let g = generate(&mut pipeline, tokenizer, &ids, &params, &mut stream)
                .context("generation through the testnet failed")?;
            let route = pipeline.route();
            let bytes = pipeline.stats.bytes_sent + pipeline.stats.bytes_received;
            pipeline.close();
            veil_client::generate::report_detections(&pipeline.stats.audit);
            veil_client::verify::record(&pipeline, &network.deployment.id)?;
            (g, route, bytes, pipeline.stats.audit.clone(), None)
        }
        Privacy::Masked => {
            let mut pipeline = MaskedPipeline::new(
                handle,
                client.network.clone(),
                &network.bundle,
                &network.deployment,
                &MaskProviders::Local,
                context,
                veil_model::Precision::Fast,
            )?;
            let g = generate(&mut pipeline, tokenizer, &ids, &params, &mut stream)
                .context("masked generation through the testnet failed")?;
            let route = pipeline.route();
            pipeline.close();
            let bytes = pipeline.traffic.sent.load(Ordering::Relaxed)
                + pipeline.traffic.received.load(Ordering::Relaxed);
            let t = pipeline.stats.totals();
            let report = MaskedReport {
                ops: t.ops,
                failed_checks: t.check_failures,
                masks_s: t.masks_s,
                products_s: t.products_s,
                client_s: t.client_s,
                detections: pipeline.detections(),
            };
            (g, route, bytes, Default::default(), Some(report))
        }
    };
    let wall = start.elapsed().as_secs_f64();
    let _ = writeln!(out);
    let route = route
        .into_iter()
        .map(|peer| {
            let name = network
                .nodes
                .iter()
                .find(|n| n.peer_id == peer)
                .map_or("?", |n| n.name.as_str());
            format!("{name} ({peer})")
        })
        .collect();
    Ok(UpReport {
        text: g.text.clone(),
        tokens: g.tokens.len(),
        tokens_per_s: g.tokens.len() as f64 / wall.max(1e-9),
        decode_tokens_per_s: match (g.token_times_s.first(), g.token_times_s.last()) {
            (Some(a), Some(b)) if b > a => (g.token_times_s.len() - 1) as f64 / (b - a),
            _ => 0.0,
        },
        time_to_first_token_s: g.token_times_s.first().copied().unwrap_or(0.0),
        route,
        bytes_per_token: bytes as f64 / g.tokens.len().max(1) as f64,
        bootstrap: network.bootstrap.clone(),
        deployment: network.deployment.id.clone(),
        key_fingerprint: network.deployment.key_fingerprint.clone(),
        privacy: privacy.name().to_string(),
        verification,
        masked,
    })
}

/// How to use the running network from another terminal.
pub fn usage_hint(network: &LocalNetwork) -> String {
    let home = network.root().join("client");
    // on the WAN, a client must run where the harness's client does
    let prefix = network
        .client_namespace()
        .map_or(String::new(), |ns| format!("ip netns exec {ns} "));
    format!(
        "the testnet is up ({} nodes); from another terminal:\n  \
         VEIL_HOME={} {prefix}veil chat --deployment {} --bootstrap {}\n  \
         {prefix}veil peers --bootstrap {}\npress ctrl-c to stop it",
        network.nodes.len(),
        home.display(),
        network.deployment.id,
        network.bootstrap,
        network.bootstrap
    )
}

/// A `veil serve` gateway to the testnet's deployment, run as a child process (stopped with
/// the nodes on ctrl-c).
#[derive(Debug)]
pub struct Gateway {
    pub child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        crate::cleanup::remove_process(self.child.id());
    }
}

/// Start `veil serve --deployment` on `127.0.0.1:port` (0: any free port) and wait until it
/// answers `/health`.
pub fn start_gateway(network: &LocalNetwork, port: u16) -> Result<Gateway> {
    start_gateway_with(network, port, 4)
}

/// [`start_gateway`] answering `parallel` requests at once.
pub fn start_gateway_with(network: &LocalNetwork, port: u16, parallel: usize) -> Result<Gateway> {
    use std::io::BufRead;
    let bin = crate::cluster::find_bin("veil")?;
    let mut child = std::process::Command::new(bin)
        .args(["serve", "--deployment", &network.deployment.id])
        .args(["--bootstrap", &network.bootstrap])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--parallel", &parallel.to_string()])
        .env("VEIL_HOME", network.root().join("client"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot start the gateway (veil serve)")?;
    crate::cleanup::add_process(child.id());
    let mut line = String::new();
    let stdout = child.stdout.take().context("the gateway's stdout")?;
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .context("the gateway's address")?;
    let gateway = Gateway {
        url: line.trim().to_string(),
        child,
    };
    if !gateway.url.starts_with("http://") {
        anyhow::bail!("the gateway did not start (see its error above)");
    }
    let addr = gateway.url.trim_start_matches("http://").to_string();
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    while health(&addr) != Some(200) {
        if Instant::now() > deadline {
            anyhow::bail!("the gateway at {} is not ready after 120 s", gateway.url);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(gateway)
}

/// The status of `GET /health` at `addr`, if it answers.
fn health(addr: &str) -> Option<u16> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
