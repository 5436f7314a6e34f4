//! Stop sequences, applied on text as OpenAI does (not on token ids): text is released only
//! once no stop sequence can still begin inside it.

/// Watches generated text for any of `stops`.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not released: it could be the start of a stop sequence.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Add a piece of generated text; returns the text now safe to release and whether a
    /// stop sequence was met (the text up to it is released, the rest dropped).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.held.push_str(piece);
        // the earliest stop sequence in what is held
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // keep the longest tail that is a prefix of some stop sequence
        let keep = self
            .stops
            .iter()
            .map(|s| longest_prefix_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// The end of generation: whatever is held is released.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `stop`, cut at a
/// character boundary of `text`.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && stop.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let (text, stop) = m.push(p);
            out.push(text);
            if stop {
                return (out, true, String::new());
            }
        }
        let rest = m.finish();
        (out, false, rest)
    }

    #[test]
    fn a_stop_split_across_pieces_is_found_and_never_released() {
        let (out, stopped, _) = run(&["\nUser:"], &["Hello", " there\n", "Us", "er: more"]);
        assert!(stopped);
        assert_eq!(out.concat(), "Hello there");
        // the newline was held back until it turned out to start the stop sequence
        assert_eq!(out, vec!["Hello", " there", "", ""]);
    }

    #[test]
    fn held_text_that_does_not_stop_is_released() {
        let (out, stopped, rest) = run(&["END"], &["the E", "ND", "ING"]);
        assert!(stopped);
        assert_eq!(out.concat(), "the ");
        assert_eq!(rest, "");
        let (out, stopped, rest) = run(&["END"], &["the E", "ast", " wind E"]);
        assert!(!stopped);
        assert_eq!(out.concat() + &rest, "the East wind E");
        assert_eq!(rest, "E");
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_no_stops_pass_everything() {
        let (out, stopped, _) = run(&["b", "a"], &["xxab"]);
        assert!(stopped);
        assert_eq!(out.concat(), "xx");
        let (out, stopped, rest) = run(&[], &["any", "thing"]);
        assert!(!stopped);
        assert_eq!(out.concat() + &rest, "anything");
        let (out, _, rest) = run(&[""], &["empty stops are ignored"]);
        assert_eq!(out.concat() + &rest, "empty stops are ignored");
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        let (out, stopped, rest) = run(&["éz"], &["café", " é", "t"]);
        assert!(!stopped);
        assert_eq!(out.concat() + &rest, "café ét");
        let (out, stopped, _) = run(&["éz"], &["caf", "éz!"]);
        assert!(stopped);
        assert_eq!(out.concat(), "caf");
    }
}
