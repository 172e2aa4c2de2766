//! The world's object vocabulary for CHAIR and the corrector: each category's canonical
//! name with its plural and synonyms, and a word matcher that finds object mentions in
//! text.  [`vocab_text`] writes the `canonical, synonym, ...` one-line-per-object format
//! that the evaluator reads by default.
use crate::data::world::categories::CATEGORIES;

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

/// The vocabulary as text: one object per line, `canonical, synonym, ...`.
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

/// Canonical name and whether the word is a plural form, for one lower-case word.
pub fn lookup(word: &str) -> Option<(&'static str, bool)> {
    for c in CATEGORIES.iter() {
        if word == c.name {
            return Some((c.name, false));
        }
        if word == c.plural {
            return Some((c.name, true));
        }
        // Synonyms come in (singular, plural) pairs.
        for (i, &s) in c.synonyms.iter().enumerate() {
            if word == s {
                return Some((c.name, i % 2 == 1));
            }
        }
    }
    None
}

/// Words of `text`, lower-cased, split on anything that is not a letter (so `<seg>`
/// and punctuation separate words but never form one).
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_ascii_lowercase())
        .collect()
}

/// Canonical names of every object mention in `text`, in order, repeats kept.
pub fn mentions(text: &str) -> Vec<&'static str> {
    words(text)
        .iter()
        .filter_map(|w| lookup(w).map(|x| x.0))
        .collect()
}

/// Mentioned objects that are not in `present` (canonical names), in order, unique.
pub fn hallucinated(text: &str, present: &[&str]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for m in mentions(text) {
        if !present.contains(&m) && !out.contains(&m) {
            out.push(m);
        }
    }
    out
}
