//! Tokenizers built from a GGUF file's own vocabulary, as llama.cpp builds them: byte-level
//! BPE (`gpt2`, [`bpe`]) and SentencePiece (`llama`, [`spm`]). Decoding maps tokens back to
//! raw bytes, so that a stream of tokens can be turned into text without splitting a UTF-8
//! character.

mod bpe;
mod spm;

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::gguf::GgufFile;
use crate::ModelError;

/// llama.cpp token types.
const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;
const TOKEN_TYPE_BYTE: i64 = 6;

/// Texts of control tokens that end a generation, besides the declared EOS.
const END_OF_GENERATION: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
];

/// How text becomes token ids.
enum Encoder {
    Bpe(Box<bpe::BpeEncoder>),
    Spm(Box<spm::SpmEncoder>),
}

/// A tokenizer for one model.
pub struct Tokenizer {
    encoder: Encoder,
    /// Raw bytes of every token (control tokens: empty, they render as nothing).
    token_bytes: Vec<Vec<u8>>,
    token_text: Vec<String>,
    special: HashSet<u32>,
    end_of_generation: HashSet<u32>,
    pub bos: Option<u32>,
    pub eos: u32,
    /// Whether llama.cpp would prepend BOS to a prompt.
    pub add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.token_bytes.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// Everything needed to rebuild a tokenizer: the `tokenizer.ggml.*` keys of a GGUF file.
/// Client bundles carry it so that they work without the original model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerSpec {
    /// `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub model: String,
    pub pre: String,
    pub tokens: Vec<String>,
    pub token_types: Vec<i64>,
    /// BPE merges (`gpt2`).
    pub merges: Vec<String>,
    /// Token scores: SentencePiece merges the pair whose token scores highest.
    #[serde(default)]
    pub scores: Vec<f32>,
    pub bos: Option<u32>,
    pub eos: u32,
    pub add_bos: bool,
    /// SentencePiece: a space is put before the text (and after every special token).
    #[serde(default)]
    pub add_space_prefix: bool,
}

impl TokenizerSpec {
    /// Read the `tokenizer.ggml.*` keys.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let tokens: Vec<String> = file
            .get_str_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_string)
            .collect();
        let token_types = if file.has_key("tokenizer.ggml.token_type") {
            file.get_i64_array("tokenizer.ggml.token_type")?
        } else {
            vec![TOKEN_TYPE_NORMAL; tokens.len()]
        };
        let id = |key: &str| -> Result<Option<u32>, ModelError> {
            if !file.has_key(key) {
                return Ok(None);
            }
            u32::try_from(file.get_usize(key)?)
                .map(Some)
                .map_err(|_| err(format!("{key} out of range")))
        };
        let model = file.get_str("tokenizer.ggml.model")?.to_string();
        let spm = model == "llama";
        let flag = |key: &str, default: bool| -> Result<bool, ModelError> {
            Ok(if file.has_key(key) {
                file.get_bool(key)?
            } else {
                default
            })
        };
        Ok(TokenizerSpec {
            pre: if file.has_key("tokenizer.ggml.pre") {
                file.get_str("tokenizer.ggml.pre")?.to_string()
            } else {
                "default".to_string()
            },
            merges: if file.has_key("tokenizer.ggml.merges") || !spm {
                file.get_str_array("tokenizer.ggml.merges")?
                    .into_iter()
                    .map(str::to_string)
                    .collect()
            } else {
                Vec::new()
            },
            scores: if file.has_key("tokenizer.ggml.scores") {
                file.get_f32_array("tokenizer.ggml.scores")?
            } else {
                Vec::new()
            },
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?.ok_or_else(|| {
                ModelError::Gguf(crate::gguf::GgufError::MissingKey(
                    "tokenizer.ggml.eos_token_id".into(),
                ))
            })?,
            // llama.cpp's defaults: SentencePiece adds BOS and a space prefix
            add_bos: flag("tokenizer.ggml.add_bos_token", spm)?,
            add_space_prefix: spm && flag("tokenizer.ggml.add_space_prefix", true)?,
            model,
            tokens,
            token_types,
        })
    }

    /// The text of a token id (for template variables such as `bos_token`).
    pub fn token_text(&self, id: Option<u32>) -> String {
        id.and_then(|i| self.tokens.get(i as usize))
            .cloned()
            .unwrap_or_default()
    }
}

impl Tokenizer {
    /// Build the tokenizer described by a GGUF file's `tokenizer.ggml.*` keys.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        Self::from_spec(&TokenizerSpec::from_gguf(file)?)
    }

    /// Build a tokenizer from its description.
    pub fn from_spec(spec: &TokenizerSpec) -> Result<Self, ModelError> {
        let tokens = &spec.tokens;
        let types = &spec.token_types;
        if types.len() != tokens.len() {
            return Err(err("token types and tokens differ in length"));
        }
        let (eos, bos) = (spec.eos, spec.bos);
        if eos as usize >= tokens.len() || bos.is_some_and(|b| b as usize >= tokens.len()) {
            return Err(err("BOS or EOS id outside the vocabulary"));
        }
        let specials: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| {
                matches!(
                    types[i as usize],
                    TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED
                )
            })
            .collect();
        let (encoder, token_bytes) = match spec.model.as_str() {
            "gpt2" => (
                Encoder::Bpe(Box::new(bpe::BpeEncoder::new(spec, &specials)?)),
                bpe::token_bytes(spec),
            ),
            "llama" => (
                Encoder::Spm(Box::new(spm::SpmEncoder::new(spec)?)),
                spm::token_bytes(spec),
            ),
            other => {
                return Err(err(format!(
                    "tokenizer model `{other}` is not supported (Veil reads byte-level BPE, \
                     `gpt2`, and SentencePiece, `llama`)"
                )))
            }
        };
        let mut end_of_generation: HashSet<u32> = specials
            .iter()
            .copied()
            .filter(|&i| END_OF_GENERATION.contains(&tokens[i as usize].as_str()))
            .collect();
        end_of_generation.insert(eos);
        Ok(Tokenizer {
            encoder,
            token_bytes,
            token_text: tokens.clone(),
            special: specials.into_iter().collect(),
            end_of_generation,
            bos,
            eos,
            add_bos: spec.add_bos,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Token ids of `text`. With `parse_special`, control-token text such as
    /// `<|im_start|>` becomes that token; without, it is tokenized as ordinary text.
    /// BOS is not added here (see [`Tokenizer::add_bos`]).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, ModelError> {
        match &self.encoder {
            Encoder::Bpe(b) => b.encode(text, parse_special),
            Encoder::Spm(s) => Ok(s.encode(text, parse_special)),
        }
    }

    /// The raw bytes a token stands for (empty for control tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map_or(&[][..], |b| b.as_slice())
    }

    /// The token's entry in the vocabulary, as stored (byte-level symbols).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.token_text.get(id as usize).map(String::as_str)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }

    /// Whether generating this token ends the answer (EOS, end-of-turn, ...).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    /// Text of a token sequence; control tokens render as nothing, invalid UTF-8 as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Turns a stream of tokens into text pieces without splitting a UTF-8 character.
#[derive(Debug, Default)]
pub struct TextStream {
    pending: Vec<u8>,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a token; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.pending.extend_from_slice(tokenizer.token_bytes(id));
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // An invalid sequence (not just an incomplete one): flush it lossily.
            Err(_) => self.pending.len(),
        };
        let out: Vec<u8> = self.pending.drain(..valid).collect();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Whatever is left at the end of the stream.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
