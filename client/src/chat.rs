//! `veil chat`: an interactive conversation through a deployment, streaming each answer.
//! The nodes keep the conversation's KV cache, so each turn only sends its new tokens.

use std::io::{BufRead, Write};

use anyhow::{Context, Result};
use clap::Args;
use veil_model::chat::ChatMessage;
use veil_model::{generate, GenerateParams, SamplingParams, TextCodec, TokenModel};

use crate::generate::connect_deployment;
use crate::net::NetArgs;
use crate::remote::masked::{MaskProviders, MaskedDeployment, MaskedPipeline};
use crate::remote::RemotePipeline;
use veil_model::masked::Privacy;

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// The deployment to talk to (see `veil deploy`).
    #[arg(long)]
    pub deployment: String,
    #[command(flatten)]
    pub net: NetArgs,
    /// A system message to start the conversation with.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, value_name = "RATE", value_parser = crate::verify::parse_rate,
          help = crate::verify::VERIFY_HELP)]
    pub verify: Option<f64>,
    /// rotated or masked: the nodes compute only the linear ops, on uniformly random words
    /// (see `veil generate --help` and SECURITY.md, "Masked mode"). [default: the
    /// deployment's (`veil deploy --privacy`), else rotated]
    #[arg(long, value_name = "MODE")]
    pub privacy: Option<Privacy>,
    /// With --privacy masked: `local` (default) or the peer ids of mask providers.
    #[arg(long, default_value = "local", value_name = "local|PEER,...")]
    pub mask_provider: MaskProviders,
}

/// A conversation's sessions in either mode.
enum Pipeline {
    Rotated(Box<RemotePipeline>),
    Masked(Box<MaskedPipeline>),
}

impl TokenModel for Pipeline {
    fn context_len(&self) -> usize {
        match self {
            Pipeline::Rotated(p) => p.context_len(),
            Pipeline::Masked(p) => p.context_len(),
        }
    }

    fn position(&self) -> usize {
        match self {
            Pipeline::Rotated(p) => p.position(),
            Pipeline::Masked(p) => p.position(),
        }
    }

    fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>, veil_model::ModelError> {
        match self {
            Pipeline::Rotated(p) => p.feed(ids),
            Pipeline::Masked(p) => p.feed(ids),
        }
    }
}

pub fn run(args: ChatArgs) -> Result<()> {
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        top_logits: 0,
    };
    params.sampling.validate()?;
    let (client, bundle, deployment) = connect_deployment(&args.deployment, &args.net)?;
    let text = TextCodec::new(bundle.meta.text.clone())?;
    let context = bundle.meta.config.max_seq_len;
    let verification = crate::verify::verification_for(&deployment, args.verify)?;
    let masked = match args.privacy.or(deployment.privacy).unwrap_or_default() {
        Privacy::Masked => Some(MaskedDeployment::load(
            client.runtime.handle().clone(),
            client.network.clone(),
            &bundle,
            &deployment,
            context,
            veil_model::Precision::Fast,
        )?),
        Privacy::Rotated => None,
    };
    let make = || -> Result<Pipeline> {
        if let Some(m) = &masked {
            return Ok(Pipeline::Masked(Box::new(m.session(&args.mask_provider)?)));
        }
        let mut p = RemotePipeline::new(
            client.runtime.handle().clone(),
            client.network.clone(),
            &bundle,
            &deployment,
            context,
            veil_model::Precision::Fast,
        )?;
        crate::verify::prepare(&mut p, verification.clone())?;
        Ok(Pipeline::Rotated(Box::new(p)))
    };
    // what each pipeline learned of its nodes, recorded when it closes
    let finish = |p: Pipeline| match p {
        Pipeline::Rotated(mut p) => {
            p.close();
            crate::generate::report_detections(&p.stats.audit);
            if let Err(e) = crate::verify::record(&p, &deployment.id) {
                tracing::warn!("{e:#}");
            }
        }
        Pipeline::Masked(p) => {
            p.close();
            for d in p.detections() {
                tracing::warn!(
                    "caught {} ({}) answering masked op {} wrongly; it was not asked again",
                    d.party,
                    d.role,
                    d.op
                );
            }
        }
    };
    let mut pipeline = make()?;
    let mut messages: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s))
        .collect();
    let mut fed: Vec<u32> = Vec::new();
    eprintln!(
        "chatting with deployment {} (ctrl-d to quit, /reset to start over)",
        deployment.id
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read stdin")?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/reset" {
            messages.retain(|m| m.role == "system");
            fed.clear();
            finish(pipeline);
            pipeline = make()?;
            continue;
        }
        messages.push(ChatMessage::new("user", line));
        let tokens = text.encode_prompt(&text.chat_text(&messages)?)?;
        let common = fed.iter().zip(&tokens).take_while(|(a, b)| a == b).count();
        if common < fed.len() {
            // The template re-rendered earlier turns differently: start the sessions over.
            finish(pipeline);
            pipeline = make()?;
            fed.clear();
        }
        let new = &tokens[fed.len()..];
        let mut out = std::io::stdout();
        let answer = generate(&mut pipeline, &text.tokenizer, new, &params, &mut |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        })?;
        println!();
        fed.extend_from_slice(new);
        fed.extend_from_slice(&answer.tokens[..answer.tokens.len().saturating_sub(1)]);
        debug_assert_eq!(fed.len(), pipeline.position());
        messages.push(ChatMessage::new("assistant", answer.text.trim()));
    }
    finish(pipeline);
    Ok(())
}
