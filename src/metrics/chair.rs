//! CHAIR (Rohrbach et al. 2018; POPEN Eq. 7): scores over the crate's one vocabulary and
//! word matcher ([`crate::data::vocab`], which the world's corrector uses too).  The
//! rules are in the [module docs of `metrics`](super).
use std::collections::BTreeSet;

pub use crate::data::vocab::{plural, words, Mention, Vocab};

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
