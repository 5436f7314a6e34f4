//! The generation loop shared by every way of running a model (local plaintext, local
//! encrypted, over the network): feed the prompt, then sample and feed one token at a time.

use std::ops::ControlFlow;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::sampling::{top_logits, Sampler, SamplingParams, TokenLogit};
use crate::tokenizer::{TextStream, Tokenizer};
use crate::ModelError;

/// Something that turns tokens into next-token logits and keeps its own state (cache).
pub trait TokenModel {
    /// Longest sequence (prompt and generated tokens) accepted.
    fn context_len(&self) -> usize;
    /// Tokens fed so far.
    fn position(&self) -> usize;
    /// Feed the next tokens of the sequence; returns the logits after the last one.
    fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>, ModelError>;
}

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Record the `top_logits` highest logits of every step (0: none).
    pub top_logits: usize,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-generation token (kept in `tokens`).
    EndOfGeneration,
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The caller stopped it (a stop sequence, a client that left).
    Stopped,
}

/// The result of one generation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    /// One list per generated token: the highest raw logits before sampling.
    pub top_logits: Vec<Vec<TokenLogit>>,
    pub stop: StopReason,
    /// Seconds spent on the prompt (until the first token's logits).
    pub prefill_s: f64,
    /// Seconds spent feeding generated tokens back.
    pub decode_s: f64,
    /// Generated tokens fed back (decode steps).
    pub decode_steps: usize,
    /// Seconds from the start of generation until each token was sampled: the first is the
    /// time to first token, the differences are per-token latencies.
    pub token_times_s: Vec<f64>,
}

impl Generation {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens.len(), self.prefill_s)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_steps, self.decode_s)
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// Generate from `prompt`, calling `on_text` with each piece of text as it is complete.
pub fn generate(
    model: &mut dyn TokenModel,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation, ModelError> {
    generate_until(model, tokenizer, prompt, params, &mut |piece| {
        on_text(piece);
        ControlFlow::Continue(())
    })
}

/// [`generate`], stopped early when `on_text` breaks ([`StopReason::Stopped`]; no more
/// text is passed after that, and no further token is fed).
pub fn generate_until(
    model: &mut dyn TokenModel,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::Shape("the prompt has no tokens".into()));
    }
    let context = model.context_len();
    if model.position() + prompt.len() > context {
        return Err(ModelError::ContextOverflow {
            needed: model.position() + prompt.len(),
            capacity: context,
        });
    }
    let mut sampler = Sampler::new(params.sampling)?;
    let start = Instant::now();
    let mut logits = model.feed(prompt)?;
    let prefill_s = start.elapsed().as_secs_f64();

    let mut stream = TextStream::new();
    let mut out = Generation {
        prompt_tokens: prompt.to_vec(),
        tokens: Vec::new(),
        text: String::new(),
        top_logits: Vec::new(),
        stop: StopReason::MaxTokens,
        prefill_s,
        decode_s: 0.0,
        decode_steps: 0,
        token_times_s: Vec::new(),
    };
    for step in 0..params.max_tokens {
        if params.top_logits > 0 {
            out.top_logits.push(top_logits(&logits, params.top_logits));
        }
        let token = sampler.sample(&logits);
        out.tokens.push(token);
        out.token_times_s.push(start.elapsed().as_secs_f64());
        let piece = stream.push(tokenizer, token);
        if !piece.is_empty() {
            out.text.push_str(&piece);
            if on_text(&piece).is_break() {
                out.stop = StopReason::Stopped;
                return Ok(out);
            }
        }
        if tokenizer.is_end_of_generation(token) {
            out.stop = StopReason::EndOfGeneration;
            break;
        }
        if step + 1 == params.max_tokens {
            break;
        }
        if model.position() >= context {
            out.stop = StopReason::ContextFull;
            break;
        }
        let t = Instant::now();
        logits = model.feed(&[token])?;
        out.decode_s += t.elapsed().as_secs_f64();
        out.decode_steps += 1;
    }
    let rest = stream.finish();
    if !rest.is_empty() {
        out.text.push_str(&rest);
        if on_text(&rest).is_break() {
            out.stop = StopReason::Stopped;
        }
    }
    Ok(out)
}
