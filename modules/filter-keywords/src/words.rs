//! Banned-word matching and masking, free of any Wasm or WIT types.

/// What to do with a message containing a banned word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Reject,
    Mask,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Reject => "reject",
            Mode::Mask => "mask",
        }
    }
}

/// The verdict on one body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accept,
    Reject(String),
    Rewrite(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Word {
    /// As configured (trimmed), for the rejection reason.
    text: String,
    /// Lower-cased, char by char, for matching.
    lower: Vec<char>,
}

/// A configured filter.
#[derive(Debug, Clone)]
pub struct Filter {
    words: Vec<Word>,
    mode: Mode,
}

/// One banned word found in a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hit {
    start: usize,
    end: usize,
    word: usize,
}

impl Filter {
    /// Builds the filter from `key = value` params: `words` (required) and
    /// `mode` (`reject` or `mask`, default `reject`).
    pub fn from_params<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, String> {
        let mut words = None;
        let mut mode = Mode::Reject;
        for (k, v) in params {
            match k {
                "words" => words = Some(v),
                "mode" => {
                    mode = match v.trim() {
                        "reject" => Mode::Reject,
                        "mask" => Mode::Mask,
                        other => return Err(format!("mode: `{other}` is not `reject` or `mask`")),
                    }
                }
                other => return Err(format!("unknown param `{other}` (known: words, mode)")),
            }
        }
        let words = words.ok_or("missing param `words` (a comma-separated list)")?;
        let words: Vec<Word> = words
            .split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .map(|w| Word {
                text: w.to_owned(),
                lower: w.chars().flat_map(char::to_lowercase).collect(),
            })
            .collect();
        if words.is_empty() {
            return Err("words: the list is empty".to_owned());
        }
        Ok(Self { words, mode })
    }

    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Judges one message body.
    pub fn judge(&self, body: &[u8]) -> Outcome {
        let Ok(text) = std::str::from_utf8(body) else {
            return Outcome::Accept;
        };
        let hits = self.find(text);
        let Some(first) = hits.first() else {
            return Outcome::Accept;
        };
        match self.mode {
            Mode::Reject => Outcome::Reject(format!("contains a banned word: {}", self.words[first.word].text)),
            Mode::Mask => Outcome::Rewrite(mask(text, &hits).into_bytes()),
        }
    }

    /// Every banned word in `text`, left to right, not overlapping; where
    /// several words match at one place, the longest.
    fn find(&self, text: &str) -> Vec<Hit> {
        let mut hits = Vec::new();
        let mut i = 0;
        let mut after_alnum = false;
        while let Some(c) = text[i..].chars().next() {
            if !after_alnum {
                let longest = self
                    .words
                    .iter()
                    .enumerate()
                    .filter_map(|(w, word)| match_at(text, i, &word.lower).map(|end| (end, w)))
                    .max_by_key(|&(end, w)| (end, std::cmp::Reverse(w)));
                if let Some((end, word)) = longest {
                    hits.push(Hit { start: i, end, word });
                    after_alnum = text[..end].chars().next_back().is_some_and(char::is_alphanumeric);
                    i = end;
                    continue;
                }
            }
            after_alnum = c.is_alphanumeric();
            i += c.len_utf8();
        }
        hits
    }
}

/// If `text[start..]` begins with `word` (lower-cased chars), compared
/// case-insensitively and ending at a word boundary, where it ends.
fn match_at(text: &str, start: usize, word: &[char]) -> Option<usize> {
    if word.is_empty() {
        return None;
    }
    let mut pos = 0;
    for (off, c) in text[start..].char_indices() {
        if c.is_ascii() {
            // Most chat is ASCII: skip the Unicode case tables.
            if word.get(pos) != Some(&c.to_ascii_lowercase()) {
                return None;
            }
            pos += 1;
        } else {
            for lc in c.to_lowercase() {
                if word.get(pos) != Some(&lc) {
                    return None;
                }
                pos += 1;
            }
        }
        if pos == word.len() {
            let end = start + off + c.len_utf8();
            let bounded = text[end..].chars().next().is_none_or(|n| !n.is_alphanumeric());
            return bounded.then_some(end);
        }
    }
    None
}

/// `text` with each hit replaced by as many `*` as it has characters.
fn mask(text: &str, hits: &[Hit]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for h in hits {
        out.push_str(&text[last..h.start]);
        out.extend(std::iter::repeat_n('*', text[h.start..h.end].chars().count()));
        last = h.end;
    }
    out.push_str(&text[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(words: &str, mode: &str) -> Filter {
        Filter::from_params([("words", words), ("mode", mode)]).unwrap()
    }

    fn rewrite(f: &Filter, body: &str) -> String {
        match f.judge(body.as_bytes()) {
            Outcome::Rewrite(b) => String::from_utf8(b).unwrap(),
            other => panic!("expected a rewrite of {body:?}, got {other:?}"),
        }
    }

    #[test]
    fn params_are_checked() {
        assert!(Filter::from_params([]).is_err());
        assert!(Filter::from_params([("words", "")]).is_err());
        assert!(Filter::from_params([("words", " , ,")]).is_err());
        assert!(Filter::from_params([("words", "x"), ("mode", "shout")]).is_err());
        assert!(Filter::from_params([("words", "x"), ("colour", "red")]).is_err());
        let f = Filter::from_params([("words", " spam , eggs,")]).unwrap();
        assert_eq!(f.word_count(), 2);
        assert_eq!(f.mode(), Mode::Reject);
        assert_eq!(filter("x", " mask ").mode(), Mode::Mask);
    }

    #[test]
    fn rejects_whole_words_case_insensitively() {
        let f = filter("Spam, eggs", "reject");
        assert_eq!(
            f.judge(b"I like SPAM."),
            Outcome::Reject("contains a banned word: Spam".to_owned())
        );
        assert_eq!(
            f.judge(b"eggs"),
            Outcome::Reject("contains a banned word: eggs".to_owned())
        );
        assert_eq!(f.judge(b"spammer eggsy xeggs spam2"), Outcome::Accept);
        assert_eq!(f.judge(b"hello"), Outcome::Accept);
        assert_eq!(f.judge(b""), Outcome::Accept);
    }

    #[test]
    fn reject_names_the_first_word_in_the_text() {
        let f = filter("spam, eggs", "reject");
        assert_eq!(
            f.judge(b"eggs and spam"),
            Outcome::Reject("contains a banned word: eggs".to_owned())
        );
    }

    #[test]
    fn masks_every_occurrence_with_as_many_stars_as_chars() {
        let f = filter("spam,crème", "mask");
        assert_eq!(rewrite(&f, "Spam, spam; SPAM!"), "****, ****; ****!");
        assert_eq!(rewrite(&f, "la CRÈME brûlée"), "la ***** brûlée");
        assert_eq!(rewrite(&f, "spam-spam"), "****-****");
        assert_eq!(f.judge(b"spamspam"), Outcome::Accept);
    }

    #[test]
    fn longest_word_wins_and_phrases_match() {
        let f = filter("bad, bad word", "mask");
        assert_eq!(rewrite(&f, "a bad word here"), "a ******** here");
        assert_eq!(rewrite(&f, "a bad thing"), "a *** thing");
    }

    #[test]
    fn unicode_word_boundaries() {
        let f = filter("kot", "reject");
        // Letters outside ASCII are alphanumeric: no match inside "kotä" or "ßkot".
        assert_eq!(f.judge("kotä ßkot".as_bytes()), Outcome::Accept);
        assert!(matches!(f.judge("«kot»".as_bytes()), Outcome::Reject(_)));
    }

    #[test]
    fn non_utf8_bodies_are_accepted() {
        let f = filter("spam", "reject");
        assert_eq!(f.judge(b"spam \xff"), Outcome::Accept);
    }
}
