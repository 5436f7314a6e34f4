//! Byte-level BPE (`tokenizer.ggml.model = gpt2`), encoded with Hugging Face's
//! `tokenizers` crate configured like llama.cpp: digits are split one by one when the
//! pre-tokenizer asks for it (`smollm`, `starcoder`, ...), then the GPT-2 regex splits words
//! (or, for Llama 3's `llama-bpe` and Qwen's `qwen2`, their own regexes, as their
//! `tokenizer.json` and llama.cpp do), then BPE merges run on byte-level symbols. Control
//! tokens (`<|im_start|>`, ...) are matched as whole tokens when special parsing is on.

use std::collections::HashMap;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::{err, TokenizerSpec, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED};
use crate::ModelError;

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

/// The BPE encoder: one `tokenizers` pipeline that splits control tokens out first and
/// one that treats their text as ordinary text.
pub(super) struct BpeEncoder {
    with_special: tokenizers::Tokenizer,
    plain: tokenizers::Tokenizer,
}

impl BpeEncoder {
    /// `specials`: the ids of control and user-defined tokens.
    pub(super) fn new(spec: &TokenizerSpec, specials: &[u32]) -> Result<Self, ModelError> {
        let pre_split = PreSplit::of(&spec.pre)?;
        let tokens = &spec.tokens;
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
        let mut plain = tokenizers::Tokenizer::new(bpe);
        plain.with_pre_tokenizer(Some(pre_split.build()?));
        let mut with_special = plain.clone();
        let added: Vec<AddedToken> = specials
            .iter()
            .map(|&i| AddedToken::from(tokens[i as usize].to_string(), true))
            .collect();
        with_special.add_special_tokens(&added);
        Ok(BpeEncoder {
            with_special,
            plain,
        })
    }

    pub(super) fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, ModelError> {
        let tok = if parse_special {
            &self.with_special
        } else {
            &self.plain
        };
        let enc = tok.encode_fast(text, false).map_err(err)?;
        Ok(enc.get_ids().to_vec())
    }
}

/// The raw bytes of every token: byte-level symbols mapped back; control tokens empty
/// (they render as nothing); user-defined tokens their text.
pub(super) fn token_bytes(spec: &TokenizerSpec) -> Vec<Vec<u8>> {
    let table = byte_to_char();
    let char_to_byte: HashMap<char, u8> = table
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect();
    spec.tokens
        .iter()
        .zip(&spec.token_types)
        .map(|(t, &ty)| {
            if ty == TOKEN_TYPE_CONTROL {
                Vec::new()
            } else if ty == TOKEN_TYPE_USER_DEFINED {
                t.as_bytes().to_vec()
            } else {
                t.chars()
                    .map(|c| char_to_byte.get(&c).copied().unwrap_or(b'?'))
                    .collect()
            }
        })
        .collect()
}
