//! Byte-level BPE tokenizer built from a GGUF file's own vocabulary and merges.
//!
//! Encoding uses Hugging Face's `tokenizers` crate configured like llama.cpp's `gpt2` model:
//! digits are split one by one when the pre-tokenizer asks for it (`smollm`, `starcoder`,
//! ...), then the GPT-2 regex splits words (or, for Llama 3's `llama-bpe` and Qwen's `qwen2`,
//! their own regexes, as their `tokenizer.json` and llama.cpp do), then BPE merges run on
//! byte-level symbols.
//! Control tokens (`<|im_start|>`, ...) are matched as whole tokens when special parsing is
//! on. Decoding maps byte-level symbols back to raw bytes itself, so that a stream of
//! tokens can be turned into text without splitting a UTF-8 character.

use std::collections::{HashMap, HashSet};

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use serde::{Deserialize, Serialize};

use crate::gguf::GgufFile;
use crate::ModelError;

/// llama.cpp token types.
const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Pre-tokenizers (GGUF `tokenizer.ggml.pre`) that split digits individually before the
/// GPT-2 regex.
const DIGIT_SPLITTING_PRE: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "codeshell",
    "exaone",
    "minerva",
];
/// Pre-tokenizers that are exactly the GPT-2 regex.
const GPT2_PRE: &[&str] = &["gpt2", "default", "mpt", "olmo", "jais", "trillion"];

/// Llama 3's word regex (numbers in groups of up to three digits).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's (and Qwen 3's) word regex: Llama 3's with one digit per piece.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Pre-tokenizers (GGUF names, as llama.cpp maps them) that split words by their own regex
/// instead of GPT-2's.
const REGEX_PRE: &[(&str, &str)] = &[
    ("llama-bpe", LLAMA3_REGEX),
    ("llama3", LLAMA3_REGEX),
    ("llama-v3", LLAMA3_REGEX),
    ("qwen2", QWEN2_REGEX),
];

/// How a pre-tokenizer splits text before BPE.
#[derive(Debug, Clone, Copy)]
enum PreSplit {
    /// The GPT-2 regex (inside the byte-level step).
    Gpt2,
    /// Digits one by one, then the GPT-2 regex.
    Digits,
    /// A regex of its own, then bytes without the GPT-2 regex.
    Regex(&'static str),
}

impl PreSplit {
    fn of(pre: &str) -> Result<Self, ModelError> {
        if DIGIT_SPLITTING_PRE.contains(&pre) {
            Ok(PreSplit::Digits)
        } else if GPT2_PRE.contains(&pre) {
            Ok(PreSplit::Gpt2)
        } else if let Some((_, re)) = REGEX_PRE.iter().find(|(name, _)| *name == pre) {
            Ok(PreSplit::Regex(re))
        } else {
            Err(err(format!("pre-tokenizer `{pre}` is not supported")))
        }
    }

    fn build(self) -> Result<PreTokenizerWrapper, ModelError> {
        let byte_level =
            |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, use_regex));
        Ok(match self {
            PreSplit::Gpt2 => byte_level(true),
            PreSplit::Digits => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ])),
            PreSplit::Regex(re) => {
                let split = Split::new(
                    SplitPattern::Regex(re.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(err)?;
                PreTokenizerWrapper::Sequence(Sequence::new(vec![
                    PreTokenizerWrapper::Split(split),
                    byte_level(false),
                ]))
            }
        })
    }
}

/// Texts of control tokens that end a generation, besides the declared EOS.
const END_OF_GENERATION: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
];

/// A tokenizer for one model.
pub struct Tokenizer {
    /// Splits control tokens out of the text first.
    with_special: tokenizers::Tokenizer,
    /// Treats control-token text as ordinary text.
    plain: tokenizers::Tokenizer,
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

/// GPT-2's reversible map from bytes to printable characters.
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    table
}

fn err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// Everything needed to rebuild a tokenizer: the `tokenizer.ggml.*` keys of a GGUF file.
/// Client bundles carry it so that they work without the original model file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerSpec {
    pub model: String,
    pub pre: String,
    pub tokens: Vec<String>,
    pub token_types: Vec<i64>,
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: u32,
    pub add_bos: bool,
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
        Ok(TokenizerSpec {
            model: file.get_str("tokenizer.ggml.model")?.to_string(),
            pre: if file.has_key("tokenizer.ggml.pre") {
                file.get_str("tokenizer.ggml.pre")?.to_string()
            } else {
                "default".to_string()
            },
            merges: file
                .get_str_array("tokenizer.ggml.merges")?
                .into_iter()
                .map(str::to_string)
                .collect(),
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?.ok_or_else(|| {
                ModelError::Gguf(crate::gguf::GgufError::MissingKey(
                    "tokenizer.ggml.eos_token_id".into(),
                ))
            })?,
            add_bos: file.has_key("tokenizer.ggml.add_bos_token")
                && file.get_bool("tokenizer.ggml.add_bos_token")?,
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
        if spec.model != "gpt2" {
            return Err(err(format!(
                "tokenizer model `{}` is not supported (Veil reads byte-level BPE, `gpt2`)",
                spec.model
            )));
        }
        let pre_split = PreSplit::of(&spec.pre)?;
        let tokens = &spec.tokens;
        let types = &spec.token_types;
        if types.len() != tokens.len() {
            return Err(err("token types and tokens differ in length"));
        }
        let merges = spec
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("malformed merge `{m}`")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(err)?;

        let specials: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| {
                matches!(
                    types[i as usize],
                    TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED
                )
            })
            .collect();
        let mut plain = tokenizers::Tokenizer::new(bpe);
        plain.with_pre_tokenizer(Some(pre_split.build()?));
        let mut with_special = plain.clone();
        let added: Vec<AddedToken> = specials
            .iter()
            .map(|&i| AddedToken::from(tokens[i as usize].to_string(), true))
            .collect();
        with_special.add_special_tokens(&added);

        let table = byte_to_char();
        let char_to_byte: HashMap<char, u8> = table
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let special: HashSet<u32> = specials.iter().copied().collect();
        let token_bytes = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if types[i] == TOKEN_TYPE_CONTROL {
                    Vec::new()
                } else if types[i] == TOKEN_TYPE_USER_DEFINED {
                    t.as_bytes().to_vec()
                } else {
                    t.chars()
                        .map(|c| char_to_byte.get(&c).copied().unwrap_or(b'?'))
                        .collect()
                }
            })
            .collect();
        let (eos, bos) = (spec.eos, spec.bos);
        if eos as usize >= tokens.len() || bos.is_some_and(|b| b as usize >= tokens.len()) {
            return Err(err("BOS or EOS id outside the vocabulary"));
        }
        let mut end_of_generation: HashSet<u32> = specials
            .iter()
            .copied()
            .filter(|&i| END_OF_GENERATION.contains(&tokens[i as usize].as_str()))
            .collect();
        end_of_generation.insert(eos);
        Ok(Tokenizer {
            with_special,
            plain,
            token_bytes,
            token_text: tokens.clone(),
            special,
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
        let tok = if parse_special {
            &self.with_special
        } else {
            &self.plain
        };
        let enc = tok.encode_fast(text, false).map_err(err)?;
        Ok(enc.get_ids().to_vec())
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
