//! The object vocabulary and the word matcher, one of each for CHAIR
//! ([`crate::metrics::chair`]) and the world's corrector ([`crate::data::corrector`]),
//! so that the corrector removes exactly what CHAIR counts as a hallucination.
//!
//! A vocabulary is one object per line, `canonical, synonym, ...` ([`Vocab::parse`]);
//! the world's is [`vocab_text`], built from its category table, and [`Vocab::world`]
//! is that text parsed (CHAIR's default).  Text is lower-cased and split into
//! alphabetic words ([`words`]); at each position the longest term wins and is consumed;
//! a term also matches its plural ([`plural`]; a written term wins over another's
//! plural form).
use crate::data::world::categories::CATEGORIES;
use crate::error::{Error, Result};
use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

/// `(canonical, [plural, synonyms...])` for every category of the world.
pub fn vocab() -> Vec<(&'static str, Vec<&'static str>)> {
    CATEGORIES
        .iter()
        .map(|c| {
            let mut syn = vec![c.plural];
            syn.extend(c.synonyms.iter().copied());
            (c.name, syn)
        })
        .collect()
}

/// The world's vocabulary as text: one object per line, `canonical, synonym, ...`.
pub fn vocab_text() -> String {
    let mut s = String::new();
    for (name, syn) in vocab() {
        s.push_str(name);
        for w in syn {
            s.push_str(", ");
            s.push_str(w);
        }
        s.push('\n');
    }
    s
}

/// Lower-case `text` and split it into words of alphabetic characters only (so
/// `<seg>` and punctuation separate words but never form one).
pub fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphabetic())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The plural of one word: `es` after s, x, ch, sh; `y` → `ies`; otherwise `s`.
pub fn plural(word: &str) -> String {
    if word.ends_with('s') || word.ends_with('x') || word.ends_with("ch") || word.ends_with("sh") {
        format!("{word}es")
    } else if let Some(stem) = word.strip_suffix('y') {
        format!("{stem}ies")
    } else {
        format!("{word}s")
    }
}

/// One mention found in a text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mention {
    /// Index of the first word.
    pub word: usize,
    /// Number of words matched.
    pub len: usize,
    /// Canonical object index into [`Vocab::canonical`].
    pub object: usize,
    /// Whether the matched term is a plural form: one made by [`plural`], or, in the
    /// world's vocabulary, a category's written plural.  Only the corrector reads it.
    pub plural: bool,
}

/// A parsed vocabulary: term (as words) → canonical object.
#[derive(Clone, Debug)]
pub struct Vocab {
    /// Canonical names, in file order.
    pub canonical: Vec<String>,
    /// Written terms and their plural forms (written terms win), as word sequences →
    /// (object, is a plural form).
    terms: HashMap<Vec<String>, (usize, bool)>,
    /// Longest term, in words.
    max_words: usize,
}

impl Vocab {
    /// Parse the vocabulary format; `source` names the file in errors.
    pub fn parse(text: &str, source: &str) -> Result<Vocab> {
        let bad = |line: usize, msg: String| Error::Data {
            path: source.into(),
            field: format!("line {line}"),
            msg,
        };
        let mut canonical = Vec::new();
        let mut written: HashMap<Vec<String>, (usize, usize)> = HashMap::new(); // → (object, line)
        for (ln, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let obj = canonical.len();
            let mut first = None;
            for entry in line.split(',') {
                let ws = words(entry);
                if ws.is_empty() {
                    return Err(bad(
                        ln + 1,
                        format!("empty term in {line:?} (a term needs at least one letter)"),
                    ));
                }
                if first.is_none() {
                    first = Some(ws.join(" "));
                }
                if let Some(&(o, l)) = written.get(&ws) {
                    if o != obj {
                        return Err(bad(
                            ln + 1,
                            format!(
                                "term {:?} is already listed on line {l} for another object",
                                ws.join(" ")
                            ),
                        ));
                    }
                }
                written.insert(ws, (obj, ln + 1));
            }
            canonical.push(first.expect("a non-empty line has a first term"));
        }
        if canonical.is_empty() {
            return Err(bad(0, "the vocabulary has no objects".into()));
        }
        // plural forms first, then the written terms over them: a written term wins
        let mut terms: HashMap<Vec<String>, (usize, bool)> = HashMap::new();
        let mut sorted: Vec<(&Vec<String>, &(usize, usize))> = written.iter().collect();
        // deterministic when two plural forms collide: the earlier line wins
        sorted.sort_by_key(|(w, &(o, l))| (std::cmp::Reverse(l), o, (*w).clone()));
        for (ws, &(o, _)) in &sorted {
            let mut pl = (*ws).clone();
            let last = pl.pop().expect("terms are non-empty");
            pl.push(plural(&last));
            terms.insert(pl, (o, true));
        }
        for (ws, &(o, _)) in &sorted {
            terms.insert((*ws).clone(), (o, false));
        }
        let max_words = terms.keys().map(Vec::len).max().unwrap_or(1);
        Ok(Vocab {
            canonical,
            terms,
            max_words,
        })
    }

    /// The world's vocabulary ([`vocab_text`]), parsed once; written plurals (a
    /// category's plural and the second of each synonym pair) are marked plural.
    pub fn world() -> &'static Vocab {
        static WORLD: OnceLock<Vocab> = OnceLock::new();
        WORLD.get_or_init(|| {
            let mut v = Vocab::parse(&vocab_text(), "<world vocabulary>")
                .expect("the world's vocabulary parses");
            for c in CATEGORIES.iter() {
                // synonyms come in (singular, plural) pairs
                let plurals =
                    std::iter::once(c.plural).chain(c.synonyms.iter().skip(1).step_by(2).copied());
                for p in plurals {
                    if let Some(t) = v.terms.get_mut(&words(p)) {
                        t.1 = true;
                    }
                }
            }
            v
        })
    }

    /// The embedded vocabulary of `popen eval` (without `--vocab`): [`Vocab::world`].
    pub fn embedded() -> Vocab {
        Vocab::world().clone()
    }

    /// The longest term starting at `ws[i]`, if any: `(words matched, object, plural)`.
    pub fn match_at(&self, ws: &[String], i: usize) -> Option<(usize, usize, bool)> {
        (1..=self.max_words.min(ws.len().saturating_sub(i)))
            .rev()
            .find_map(|len| self.terms.get(&ws[i..i + len]).map(|&(o, p)| (len, o, p)))
    }

    /// Mentions in `text`, left to right, longest term first at each position.
    pub fn mentions(&self, text: &str) -> Vec<Mention> {
        let ws = words(text);
        let mut out = Vec::new();
        let mut i = 0;
        while i < ws.len() {
            match self.match_at(&ws, i) {
                Some((len, object, plural)) => {
                    out.push(Mention {
                        word: i,
                        len,
                        object,
                        plural,
                    });
                    i += len;
                }
                None => i += 1,
            }
        }
        out
    }

    /// The canonical objects named by category names: the objects the matcher finds in
    /// each name, or the lower-cased name itself (as an out-of-vocabulary object) when
    /// it has none.  Returned as names, since out-of-vocabulary names have no index.
    pub fn objects_of<'a>(
        &self,
        categories: impl IntoIterator<Item = &'a str>,
    ) -> BTreeSet<String> {
        let mut set = BTreeSet::new();
        for c in categories {
            let m = self.mentions(c);
            if m.is_empty() {
                set.insert(words(c).join(" "));
            } else {
                set.extend(m.iter().map(|m| self.canonical[m.object].clone()));
            }
        }
        set
    }
}

/// Canonical name and whether it is a plural form, for one word under the world's
/// vocabulary (the corrector's matcher: [`Vocab::match_at`] on that word).
pub fn lookup(word: &str) -> Option<(&'static str, bool)> {
    let v = Vocab::world();
    let ws = words(word);
    // a token that is not exactly one word (`fork's`, `t-shirt`) is not an object word
    // for the corrector; CHAIR splits it, and the agreement test covers the world's
    // terms, which are all single letters-only words
    if ws.len() != 1 {
        return None;
    }
    match v.match_at(&ws, 0) {
        Some((1, o, p)) => Some((v.canonical[o].as_str(), p)),
        _ => None,
    }
}

/// Canonical names of every object mention in `text` (the world's vocabulary), in
/// order, repeats kept.
pub fn mentions(text: &str) -> Vec<&'static str> {
    let v = Vocab::world();
    v.mentions(text)
        .iter()
        .map(|m| v.canonical[m.object].as_str())
        .collect()
}

/// Mentioned objects that are not in `present` (canonical names), in order, unique:
/// CHAIR's hallucinations of `text` under the world's vocabulary.
pub fn hallucinated(text: &str, present: &[&str]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for m in mentions(text) {
        if !present.contains(&m) && !out.contains(&m) {
            out.push(m);
        }
    }
    out
}
