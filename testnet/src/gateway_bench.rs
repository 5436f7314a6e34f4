//! `veil-testnet bench --gateway`: the same sessions through `veil serve` (HTTP, SSE) as
//! through the in-process client, in one run: tokens/s at each session count, the time to
//! first token the gateway adds, and the memory an idle connection costs it.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::bench::Level;
use crate::network::LocalNetwork;
use crate::stats::Latency;
use crate::up;

/// One session count through the gateway, beside the in-process figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayLevel {
    pub sessions: usize,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub in_process_tokens_per_s: f64,
    pub time_to_first_token: Latency,
    pub in_process_ttft_p50_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayReport {
    pub levels: Vec<GatewayLevel>,
    /// Resident memory the gateway gains per open idle connection, in bytes.
    pub idle_connection_bytes: f64,
}

/// One streamed completion: time to its first text, tokens generated.
fn stream(addr: &str, prompt: &str, max_tokens: usize) -> Result<(f64, usize)> {
    let body = json!({
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).context("connect to the gateway")?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    // HTTP/1.0: the answer streams until the connection closes, without chunked framing
    write!(
        s,
        "POST /v1/completions HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut first = None;
    let mut tokens = None;
    let mut status = String::new();
    let mut reader = BufReader::new(s);
    reader.read_line(&mut status)?;
    if !status.contains(" 200 ") {
        bail!("the gateway answered {}", status.trim());
    }
    for line in reader.lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).context("a chunk")?;
        if first.is_none()
            && v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        {
            first = Some(start.elapsed().as_secs_f64());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = Some(n as usize);
        }
    }
    Ok((
        first.unwrap_or(start.elapsed().as_secs_f64()),
        tokens.context("no usage in the stream")?,
    ))
}

fn rss_bytes(pid: u32) -> Option<f64> {
    crate::soak::sample::rss_mib(pid).map(|mib| mib * f64::from(1 << 20))
}

/// Measure every level of `in_process` again through a gateway on `network`.
pub fn measure(
    network: &LocalNetwork,
    prompts: &[Vec<u32>],
    gen_tokens: usize,
    in_process: &[Level],
) -> Result<GatewayReport> {
    let sessions = in_process.iter().map(|l| l.sessions).max().unwrap_or(1);
    let gateway = up::start_gateway_with(network, 0, sessions)?;
    let addr = gateway.url.trim_start_matches("http://").to_string();
    let texts: Vec<String> = prompts
        .iter()
        .map(|p| network.text.tokenizer.decode(p))
        .collect();
    stream(&addr, &texts[0], gen_tokens).context("warming the gateway up")?;
    let mut levels = Vec::new();
    for level in in_process {
        let n = level.sessions;
        let start = Instant::now();
        let results: Vec<Result<(f64, usize)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = texts[..n]
                .iter()
                .map(|t| {
                    let addr = &addr;
                    scope.spawn(move || stream(addr, t, gen_tokens))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| bail!("a stream panicked")))
                .collect()
        });
        let wall = start.elapsed().as_secs_f64();
        let ok: Vec<(f64, usize)> = results.into_iter().collect::<Result<_>>()?;
        let tokens: usize = ok.iter().map(|r| r.1).sum();
        let ttft: Vec<f64> = ok.iter().map(|r| r.0).collect();
        let g = GatewayLevel {
            sessions: n,
            tokens,
            tokens_per_s: tokens as f64 / wall.max(1e-9),
            in_process_tokens_per_s: level.tokens_per_s,
            time_to_first_token: Latency::of_seconds(&ttft),
            in_process_ttft_p50_ms: level.time_to_first_token.p50_ms,
        };
        tracing::info!(
            "{n} session(s) through the gateway: {:.1} tokens/s ({:.2}x in-process), TTFT p50 {:.0} ms",
            g.tokens_per_s,
            g.tokens_per_s / g.in_process_tokens_per_s.max(1e-9),
            g.time_to_first_token.p50_ms
        );
        levels.push(g);
    }
    // idle connections: open many, let the gateway accept them, compare its memory
    let pid = gateway.child.id();
    let before = rss_bytes(pid).context("the gateway's memory")?;
    let idle: Vec<TcpStream> = (0..256)
        .map(|_| TcpStream::connect(&addr))
        .collect::<std::io::Result<_>>()?;
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_bytes(pid).context("the gateway's memory")?;
    drop(idle);
    Ok(GatewayReport {
        levels,
        idle_connection_bytes: (after - before).max(0.0) / 256.0,
    })
}
