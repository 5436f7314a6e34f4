//! `veil attack masked`: what a compute node learns in masked mode. Sessions run with a
//! recording compute node; then the strongest attack on the first layer's inputs reads
//! them with and without the masks, and every byte lane of every word is tested for
//! uniformity.

use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;
use veil_model::attack::masked::{embedding_match, layer0_inputs, recording, uniformity, LaneTest};
use veil_model::attack::Rate;
use veil_model::masked::MaskedStats;
use veil_model::sampling::argmax;
use veil_model::{LocalModel, Precision, TokenModel};

use super::PromptSet;
use crate::generate::compute_for;
use crate::model_spec::ModelSpec;

#[derive(Args, Debug, Clone)]
pub struct MaskedArgs {
    /// The public model.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Sessions recorded (one prompt each).
    #[arg(long, default_value_t = 12)]
    pub prompts: usize,
    #[arg(long, value_enum, default_value_t = PromptSet::General)]
    pub prompt_set: PromptSet,
    /// Tokens generated per session (the node sees all but the last).
    #[arg(long, default_value_t = 16)]
    pub gen_tokens: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    sessions: usize,
    /// Words the compute node received, over every op.
    words: usize,
    /// The layer-0 inputs matched against the public embeddings, as the node receives
    /// them.
    masked: Rate,
    /// The same attack on the integers without their masks (the control).
    unmasked: Rate,
    vocab: usize,
    lanes: [LaneTest; 4],
}

pub fn run(args: &MaskedArgs) -> Result<()> {
    let prompts = args.prompt_set.prompts();
    if args.prompts == 0 || args.prompts > prompts.len() {
        bail!("--prompts must be 1 to {}", prompts.len());
    }
    let compute = compute_for(Some("cpu"))?;
    let q = ModelSpec::parse(&args.model)?.load_quantized()?;
    let stats = Arc::new(MaskedStats::default());
    let model = LocalModel::quantized(&q.weights, &compute.device, None, Precision::Fast)?
        .masked(&stats)?;
    let (mut model, recorder, seed) = recording(model)?;

    // every token the node's layer-0 op sees, session after session
    let mut truth = Vec::new();
    for prompt in &prompts[..args.prompts] {
        model.reset();
        let ids = q.text.prompt_tokens(prompt, false)?;
        let mut logits = model.feed(&ids)?;
        truth.extend_from_slice(&ids);
        for _ in 1..args.gen_tokens {
            let next = argmax(&logits);
            logits = model.feed(&[next])?;
            truth.push(next);
        }
    }
    let served = recorder.served();
    let (masked_in, plain_in) = layer0_inputs(&served, &seed);
    if masked_in.len() != truth.len() {
        bail!(
            "recorded {} positions of layer 0 for {} tokens",
            masked_in.len(),
            truth.len()
        );
    }
    let words: Vec<u32> = served
        .iter()
        .flat_map(|s| s.words.iter().copied())
        .collect();
    let report = Report {
        model: args.model.clone(),
        sessions: args.prompts,
        words: words.len(),
        masked: embedding_match(&q.weights, &masked_in, &truth),
        unmasked: embedding_match(&q.weights, &plain_in, &truth),
        vocab: q.weights.config.vocab_size,
        lanes: uniformity(&words),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let rate = |r: &Rate| {
        format!(
            "{}/{} = {:.1}% (95% CI {:.1}-{:.1}%)",
            r.hits,
            r.trials,
            100.0 * r.rate,
            100.0 * r.ci_low,
            100.0 * r.ci_high
        )
    };
    println!(
        "{}: {} sessions, {} words received by the compute node",
        report.model, report.sessions, report.words
    );
    println!("| what the node reads | tokens recovered (layer-0 inputs vs the embeddings) |");
    println!("|---|---|");
    println!(
        "| the masked words it receives | {} |",
        rate(&report.masked)
    );
    println!(
        "| the integers without masks (control) | {} |",
        rate(&report.unmasked)
    );
    println!("(a random guess: 1/{} per token)", report.vocab);
    println!("| byte lane | chi-square (255 dof) | p (uniform) |");
    println!("|---|---|---|");
    for l in &report.lanes {
        println!("| {} | {:.1} | {:.3} |", l.lane, l.chi2, l.p);
    }
    Ok(())
}
