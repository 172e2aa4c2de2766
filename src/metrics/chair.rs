//! CHAIR (Rohrbach et al. 2018; POPEN Eq. 7): vocabulary, mention matching, scores.
//! The rules are in the [module docs of `metrics`](super).
use crate::error::{Error, Result};
use std::collections::{BTreeSet, HashMap};

/// The embedded vocabulary, used when `popen eval` gets no `--vocab`: the 33
/// categories of the embedded world with their plurals and synonyms, in the format and
/// order of the world's `data::vocab::vocab_text()` (copied from the world's category
/// table while that module is on another branch; switch [`Vocab::embedded`] to it once
/// merged).
pub const DEFAULT_VOCAB: &str = "\
# canonical, plural, synonyms ...  (one object per line; see popen::metrics docs)
apple, apples
banana, bananas
orange, oranges, tangerine, tangerines
carrot, carrots
broccoli, broccolis
cake, cakes, cupcake, cupcakes
bread, breads, loaf, loaves
fork, forks
knife, knives
spoon, spoons, teaspoon, teaspoons
cup, cups, mug, mugs
plate, plates, dish, dishes
bowl, bowls
bottle, bottles
laptop, laptops, notebook, notebooks
mouse, mice
keyboard, keyboards
book, books, novel, novels
lamp, lamps
phone, phones, smartphone, smartphones, cellphone, cellphones
clock, clocks
candle, candles
chair, chairs, stool, stools
couch, couches, sofa, sofas
tv, tvs, television, televisions
plant, plants, houseplant, houseplants
vase, vases
cat, cats, kitten, kittens
dog, dogs, puppy, puppies
violin, violins, fiddle, fiddles
guitar, guitars
drum, drums
pillow, pillows, cushion, cushions
";

/// A parsed vocabulary: term (as words) → canonical object index.
#[derive(Clone, Debug)]
pub struct Vocab {
    /// Canonical names, in file order.
    pub canonical: Vec<String>,
    /// Written terms and their plural forms (written terms win), as word sequences.
    terms: HashMap<Vec<String>, usize>,
    /// Longest term, in words.
    max_words: usize,
}

/// Lower-case `text` and split it into words of alphabetic characters only.
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
        let mut terms: HashMap<Vec<String>, usize> = HashMap::new();
        let mut sorted: Vec<(&Vec<String>, &(usize, usize))> = written.iter().collect();
        // deterministic when two plural forms collide: the earlier line wins
        sorted.sort_by_key(|(w, &(o, l))| (std::cmp::Reverse(l), o, (*w).clone()));
        for (ws, &(o, _)) in &sorted {
            let mut pl = (*ws).clone();
            let last = pl.pop().expect("terms are non-empty");
            pl.push(plural(&last));
            terms.insert(pl, o);
        }
        for (ws, &(o, _)) in &sorted {
            terms.insert((*ws).clone(), o);
        }
        let max_words = terms.keys().map(Vec::len).max().unwrap_or(1);
        Ok(Vocab {
            canonical,
            terms,
            max_words,
        })
    }

    /// The embedded vocabulary ([`DEFAULT_VOCAB`]).
    pub fn embedded() -> Vocab {
        Vocab::parse(DEFAULT_VOCAB, "<embedded vocabulary>").expect("embedded vocabulary parses")
    }

    /// Mentions in `text`, left to right, longest term first at each position.
    pub fn mentions(&self, text: &str) -> Vec<Mention> {
        let ws = words(text);
        let mut out = Vec::new();
        let mut i = 0;
        while i < ws.len() {
            let mut hit = None;
            for len in (1..=self.max_words.min(ws.len() - i)).rev() {
                if let Some(&o) = self.terms.get(&ws[i..i + len]) {
                    hit = Some((len, o));
                    break;
                }
            }
            match hit {
                Some((len, object)) => {
                    out.push(Mention {
                        word: i,
                        len,
                        object,
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

/// CHAIR counts of one response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChairCounts {
    /// All mentions.
    pub mentions: u64,
    /// Mentions of objects not in the image.
    pub hallucinated: u64,
}

/// Count the mentions of `text` and those of objects absent from `present`.
pub fn chair_counts(vocab: &Vocab, text: &str, present: &BTreeSet<String>) -> ChairCounts {
    let mut c = ChairCounts::default();
    for m in vocab.mentions(text) {
        c.mentions += 1;
        if !present.contains(&vocab.canonical[m.object]) {
            c.hallucinated += 1;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plural_rules() {
        assert_eq!(plural("glass"), "glasses");
        assert_eq!(plural("box"), "boxes");
        assert_eq!(plural("watch"), "watches");
        assert_eq!(plural("dish"), "dishes");
        assert_eq!(plural("strawberry"), "strawberries");
        assert_eq!(plural("toy"), "toies"); // literal rule, documented
        assert_eq!(plural("cup"), "cups");
    }

    #[test]
    fn words_are_letters_only() {
        assert_eq!(words("A T-shirt, 2 Cups!"), vec!["a", "t", "shirt", "cups"]);
    }

    #[test]
    fn longest_term_wins_and_consumes() {
        let v = Vocab::parse("glass\nwine glass, goblet\nwine\n", "v").unwrap();
        let m = v.mentions("Two wine glasses and wine, one glass.");
        let objs: Vec<&str> = m.iter().map(|m| v.canonical[m.object].as_str()).collect();
        // "wine glasses" is one mention of `wine glass`, not `wine` + `glass`
        assert_eq!(objs, vec!["wine glass", "wine", "glass"]);
        assert_eq!(m[0].len, 2);
    }

    #[test]
    fn written_term_beats_plural_form() {
        // "glasses" (eyewear) is written; it is also the plural form of "glass"
        let v = Vocab::parse("glass\nglasses, spectacles\n", "v").unwrap();
        let m = v.mentions("glasses");
        assert_eq!(v.canonical[m[0].object], "glasses");
    }

    #[test]
    fn duplicate_term_is_an_error_naming_the_line() {
        let e = Vocab::parse("cup, mug\n\nmug\n", "vocab.txt").unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("vocab.txt") && s.contains("line 3") && s.contains("mug"),
            "{s}"
        );
    }

    #[test]
    fn objects_of_categories() {
        let v = Vocab::parse("cup, mug\ntable\n", "v").unwrap();
        let o = v.objects_of(["Mug", "dining table", "Zebra"]);
        let o: Vec<&str> = o.iter().map(String::as_str).collect();
        assert_eq!(o, vec!["cup", "table", "zebra"]);
    }

    #[test]
    fn counts_hallucinations() {
        let v = Vocab::parse("cup, mug\nfork\nknife\n", "v").unwrap();
        let present: BTreeSet<String> = ["cup".to_string(), "knife".to_string()].into();
        let c = chair_counts(&v, "Two mugs, a fork and forks; a knife.", &present);
        assert_eq!(
            c,
            ChairCounts {
                mentions: 4,
                hallucinated: 2
            }
        );
    }

    #[test]
    fn embedded_vocabulary_parses() {
        let v = Vocab::embedded();
        assert_eq!(v.canonical.len(), 33);
        // listed irregular plurals are terms of their object
        let m = v.mentions("two mice and three knives");
        let objs: Vec<&str> = m.iter().map(|m| v.canonical[m.object].as_str()).collect();
        assert_eq!(objs, vec!["mouse", "knife"]);
    }
}
