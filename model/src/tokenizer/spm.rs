//! SentencePiece (`tokenizer.ggml.model = llama`), as llama.cpp encodes it: the text is cut
//! at special tokens (control tokens only when special parsing is on; user-defined tokens
//! always, longest first), a space is put before each piece of text that starts the prompt
//! or follows a special token (when the file asks for a space prefix), spaces become `▁`,
//! and the piece's characters are merged pairwise, always the adjacent pair whose merged
//! text is the token of highest score (leftmost on ties). Characters left unmerged that are
//! not tokens become byte tokens `<0xXX>`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::{
    err, TokenizerSpec, TOKEN_TYPE_BYTE, TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN,
    TOKEN_TYPE_USER_DEFINED,
};
use crate::ModelError;

/// SentencePiece's visible space.
const SPACE: char = '\u{2581}';

/// A special token the text is cut at.
struct Special {
    text: String,
    id: u32,
    /// Control or unknown: cut at only when special parsing is on.
    control: bool,
}

pub(super) struct SpmEncoder {
    /// Later tokens of the same text win, as in llama.cpp.
    token_to_id: HashMap<String, u32>,
    scores: Vec<f32>,
    byte_tokens: [Option<u32>; 256],
    /// Longest text first.
    specials: Vec<Special>,
    add_space_prefix: bool,
    unknown: Option<u32>,
}

/// The text of a byte token `<0xXX>`.
fn byte_token_text(b: u8) -> String {
    format!("<0x{b:02X}>")
}

/// The byte a `<0xXX>` token stands for.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

impl SpmEncoder {
    pub(super) fn new(spec: &TokenizerSpec) -> Result<Self, ModelError> {
        let tokens = &spec.tokens;
        if spec.scores.len() != tokens.len() {
            return Err(err(format!(
                "a SentencePiece tokenizer needs one score per token ({} scores for {} tokens)",
                spec.scores.len(),
                tokens.len()
            )));
        }
        let mut token_to_id = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            token_to_id.insert(t.clone(), i as u32);
        }
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            let b = b as u8;
            *slot = token_to_id
                .get(&byte_token_text(b))
                .or_else(|| {
                    b.is_ascii()
                        .then(|| token_to_id.get(&char::from(b).to_string()))
                        .flatten()
                })
                .copied();
        }
        let mut specials: Vec<Special> = tokens
            .iter()
            .zip(&spec.token_types)
            .enumerate()
            .filter(|(_, (t, &ty))| {
                !t.is_empty()
                    && matches!(
                        ty,
                        TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED | TOKEN_TYPE_UNKNOWN
                    )
            })
            .map(|(i, (t, &ty))| Special {
                text: t.clone(),
                id: i as u32,
                control: ty != TOKEN_TYPE_USER_DEFINED,
            })
            .collect();
        specials.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));
        let unknown = spec
            .token_types
            .iter()
            .position(|&t| t == TOKEN_TYPE_UNKNOWN)
            .map(|i| i as u32);
        Ok(SpmEncoder {
            token_to_id,
            scores: spec.scores.clone(),
            byte_tokens,
            specials,
            add_space_prefix: spec.add_space_prefix,
            unknown,
        })
    }

    pub(super) fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        let mut prev_special = true;
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    let mut piece = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        piece.push(SPACE);
                    }
                    piece.extend(t.chars().map(|c| if c == ' ' { SPACE } else { c }));
                    self.encode_piece(&piece, &mut out);
                    prev_special = false;
                }
            }
        }
        out
    }

    /// Cut `text` at special tokens, longest first (llama.cpp's `tokenizer_st_partition`).
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut fragments = vec![Fragment::Text(text)];
        for s in &self.specials {
            if (s.control && !parse_special) || !text.contains(s.text.as_str()) {
                continue;
            }
            let mut cut = Vec::with_capacity(fragments.len() + 2);
            for f in fragments {
                let Fragment::Text(mut rest) = f else {
                    cut.push(f);
                    continue;
                };
                while let Some(at) = rest.find(s.text.as_str()) {
                    if at > 0 {
                        cut.push(Fragment::Text(&rest[..at]));
                    }
                    cut.push(Fragment::Token(s.id));
                    rest = &rest[at + s.text.len()..];
                }
                if !rest.is_empty() {
                    cut.push(Fragment::Text(rest));
                }
            }
            fragments = cut;
        }
        fragments
    }

    /// The tokens of one piece of text (spaces already `▁`).
    fn encode_piece(&self, piece: &str, out: &mut Vec<u32>) {
        // one symbol per character: (start, length in bytes, previous, next)
        let mut symbols: Vec<Symbol> = piece
            .char_indices()
            .map(|(start, c)| Symbol {
                start,
                len: c.len_utf8(),
                prev: None,
                next: None,
            })
            .collect();
        let n = symbols.len();
        for (i, s) in symbols.iter_mut().enumerate() {
            s.prev = i.checked_sub(1);
            s.next = (i + 1 < n).then_some(i + 1);
        }
        let mut queue = BinaryHeap::new();
        for i in 1..n {
            self.push_bigram(piece, &symbols, i - 1, i, &mut queue);
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (b.left, b.right);
            // stale: one side was merged since
            if symbols[l].len == 0
                || symbols[r].len == 0
                || symbols[l].len + symbols[r].len != b.size
            {
                continue;
            }
            symbols[l].len += symbols[r].len;
            symbols[r].len = 0;
            symbols[l].next = symbols[r].next;
            if let Some(next) = symbols[r].next {
                symbols[next].prev = Some(l);
            }
            if let Some(prev) = symbols[l].prev {
                self.push_bigram(piece, &symbols, prev, l, &mut queue);
            }
            if let Some(next) = symbols[l].next {
                self.push_bigram(piece, &symbols, l, next, &mut queue);
            }
        }
        let mut i = (n > 0).then_some(0);
        while let Some(at) = i {
            let s = &symbols[at];
            let text = &piece[s.start..s.start + s.len];
            match self.token_to_id.get(text) {
                Some(&id) => out.push(id),
                // a character that is no token (merged symbols always are): its bytes
                None => out.extend(
                    text.bytes()
                        .filter_map(|b| self.byte_tokens[b as usize].or(self.unknown)),
                ),
            }
            i = s.next;
        }
    }

    fn push_bigram(
        &self,
        piece: &str,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let (l, r) = (&symbols[left], &symbols[right]);
        let text = &piece[l.start..r.start + r.len];
        if let Some(&id) = self.token_to_id.get(text) {
            queue.push(Bigram {
                left,
                right,
                score: self.scores[id as usize],
                size: text.len(),
            });
        }
    }
}

enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

struct Symbol {
    start: usize,
    /// Bytes; 0 once merged into the symbol on its left.
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of two adjacent symbols.
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl Ord for Bigram {
    /// Highest score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

/// The raw bytes of every token, as llama.cpp renders them without special tokens:
/// normal tokens with `▁` as a space, byte tokens their byte, user-defined tokens their
/// text, control, unknown and unused tokens nothing.
pub(super) fn token_bytes(spec: &TokenizerSpec) -> Vec<Vec<u8>> {
    spec.tokens
        .iter()
        .zip(&spec.token_types)
        .map(|(t, &ty)| match ty {
            TOKEN_TYPE_NORMAL => t.replace(SPACE, " ").into_bytes(),
            TOKEN_TYPE_USER_DEFINED => t.as_bytes().to_vec(),
            TOKEN_TYPE_BYTE => parse_byte_token(t).map(|b| vec![b]).unwrap_or_default(),
            _ => Vec::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::Tokenizer;
    use super::*;

    /// A small SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, a control and a
    /// user-defined token, byte tokens for `é` (0xC3 0xA9) and `!`, and scored pieces.
    fn spec(add_space_prefix: bool) -> TokenizerSpec {
        let mut tokens: Vec<(&str, i64, f32)> = vec![
            ("<unk>", TOKEN_TYPE_UNKNOWN, 0.0),
            ("<s>", TOKEN_TYPE_CONTROL, 0.0),
            ("</s>", TOKEN_TYPE_CONTROL, 0.0),
            ("<turn>", TOKEN_TYPE_CONTROL, 0.0),
            ("\n\n", TOKEN_TYPE_USER_DEFINED, 0.0),
            ("<0xC3>", TOKEN_TYPE_BYTE, 0.0),
            ("<0xA9>", TOKEN_TYPE_BYTE, 0.0),
            ("<0x21>", TOKEN_TYPE_BYTE, 0.0),
        ];
        for (t, s) in [
            ("▁", -1.0),
            ("h", -5.0),
            ("e", -5.0),
            ("l", -5.0),
            ("o", -5.0),
            ("a", -5.0),
            ("b", -5.0),
            ("\n", -5.0),
            ("he", -3.0),
            ("ll", -2.0),
            ("hell", -2.5),
            ("hello", -1.5),
            ("▁hello", -1.0),
            ("lo", -2.2),
            ("ab", -4.0),
            ("ba", -4.0),
        ] {
            tokens.push((t, TOKEN_TYPE_NORMAL, s));
        }
        TokenizerSpec {
            model: "llama".into(),
            pre: "default".into(),
            tokens: tokens.iter().map(|t| t.0.to_string()).collect(),
            token_types: tokens.iter().map(|t| t.1).collect(),
            merges: Vec::new(),
            scores: tokens.iter().map(|t| t.2).collect(),
            bos: Some(1),
            eos: 2,
            add_bos: true,
            add_space_prefix,
        }
    }

    fn texts(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&i| t.token_text(i).expect("id").to_string())
            .collect()
    }

    #[test]
    fn merges_the_best_scoring_pair_first_and_falls_back_to_bytes() {
        let t = Tokenizer::from_spec(&spec(false)).expect("tokenizer");
        // h e l l o: `ll` (-2) first, then `he` (-3)... `hell` (-2.5) beats `lo`? `lo` is
        // gone once `ll` merged; `hell` then `hello`.
        let ids = t.encode("hello", false).expect("encode");
        assert_eq!(texts(&t, &ids), ["hello"]);
        let ids = t.encode(" hello", false).expect("encode");
        assert_eq!(texts(&t, &ids), ["▁hello"]);
        // ties go to the leftmost pair: `aba` → `ab a`, not `a ba`
        let ids = t.encode("aba", false).expect("encode");
        assert_eq!(texts(&t, &ids), ["ab", "a"]);
        // `é` is no token: its two bytes; `!` likewise
        let ids = t.encode("hé!", false).expect("encode");
        assert_eq!(texts(&t, &ids), ["h", "<0xC3>", "<0xA9>", "<0x21>"]);
        assert_eq!(t.decode(&ids), "hé!");
    }

    #[test]
    fn special_tokens_and_the_space_prefix() {
        let t = Tokenizer::from_spec(&spec(true)).expect("tokenizer");
        // the prefix goes before the text and after each special token
        let ids = t.encode("hello<turn>hello", true).expect("encode");
        assert_eq!(texts(&t, &ids), ["▁hello", "<turn>", "▁hello"]);
        // without special parsing the control token is text (bytes of unknown characters)
        let ids = t.encode("<turn>", false).expect("encode");
        assert!(!ids.contains(&3), "{:?}", texts(&t, &ids));
        // user-defined tokens are cut out even then, and render as their text
        let ids = t.encode("hello\n\nhello", false).expect("encode");
        assert_eq!(texts(&t, &ids), ["▁hello", "\n\n", "▁hello"]);
        assert_eq!(t.decode(&ids), " hello\n\n hello");
        // control tokens render as nothing
        assert_eq!(t.decode(&[1, 3, 2]), "");
    }

    #[test]
    fn a_vocabulary_without_scores_is_refused() {
        let mut s = spec(true);
        s.scores.clear();
        let e = Tokenizer::from_spec(&s).expect_err("no scores").to_string();
        assert!(e.contains("score"), "{e}");
    }
}
