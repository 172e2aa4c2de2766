//! The corrector's idea of a hallucinated object is CHAIR's: one vocabulary and one
//! word matcher (`popen::data::vocab`) for both, checked on every term of the world.
use std::collections::BTreeSet;

use popen::data::corrector::{correct, Context};
use popen::data::vocab::{lookup, plural, vocab, vocab_text, Vocab};
use popen::data::world::categories::CATEGORIES;
use popen::metrics::chair::chair_counts;

/// Every term of every category as CHAIR matches it: the written forms and the plural
/// form of each.
fn terms() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for (name, syn) in vocab() {
        for w in std::iter::once(name).chain(syn) {
            out.push((name, w.to_string()));
            out.push((name, plural(w)));
        }
    }
    out
}

fn present(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn chair_uses_the_worlds_vocabulary() {
    let v = Vocab::embedded();
    let names: Vec<&str> = CATEGORIES.iter().map(|c| c.name).collect();
    assert_eq!(v.canonical, names);
    assert_eq!(vocab_text().lines().count(), CATEGORIES.len());
}

#[test]
fn corrector_and_chair_agree_on_every_term() {
    let chair = Vocab::world();
    let all = terms();
    assert!(all.len() >= 2 * (33 + 33), "{}", all.len());
    for (canonical, term) in &all {
        // an object the scene surely holds that is not this one
        let other = if *canonical == "lamp" {
            "clock"
        } else {
            "lamp"
        };
        let text = format!("I see the {term} <seg> and the {other} <seg>.");

        // the same word names the same object for both
        let (found, _) = lookup(term).unwrap_or_else(|| panic!("corrector misses {term:?}"));
        assert_eq!(found, *canonical, "{term}");
        let m = chair.mentions(&text);
        assert_eq!(chair.canonical[m[0].object], *canonical, "{term}");

        // absent: CHAIR counts one hallucination, and the corrector removes it
        let absent = Context {
            present: vec![(other.to_string(), 1)],
            targets: None,
            mentioned: vec![],
        };
        let c = chair_counts(chair, &text, &present(&[other]));
        assert_eq!((c.mentions, c.hallucinated), (2, 1), "{text}");
        let fixed = correct(&text, &absent);
        let c = chair_counts(chair, &fixed, &present(&[other]));
        assert_eq!(c.hallucinated, 0, "{text:?} -> {fixed:?}");
        assert!(
            c.mentions >= 1,
            "{text:?} -> {fixed:?}: the present object went too"
        );

        // present: nothing for CHAIR to count, and the object stays named
        let here = Context {
            present: vec![(canonical.to_string(), 1), (other.to_string(), 1)],
            targets: None,
            mentioned: vec![],
        };
        let both = present(&[canonical, other]);
        assert_eq!(chair_counts(chair, &text, &both).hallucinated, 0, "{text}");
        let kept = correct(&text, &here);
        let c = chair_counts(chair, &kept, &both);
        assert_eq!((c.mentions, c.hallucinated), (2, 0), "{text:?} -> {kept:?}");
    }
}

#[test]
fn plural_marks_follow_the_category_table() {
    for c in CATEGORIES.iter() {
        assert_eq!(lookup(c.name), Some((c.name, false)), "{}", c.name);
        assert_eq!(lookup(c.plural), Some((c.name, true)), "{}", c.plural);
        for pair in c.synonyms.chunks(2) {
            assert_eq!(lookup(pair[0]), Some((c.name, false)), "{}", pair[0]);
            if let Some(p) = pair.get(1) {
                assert_eq!(lookup(p), Some((c.name, true)), "{p}");
            }
        }
    }
    // a made plural form is plural; a word outside the vocabulary is nothing
    assert_eq!(lookup("knifes"), Some(("knife", true)));
    assert_eq!(lookup("table"), None);
}
