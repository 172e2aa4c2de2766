//! The samples' consensus on objects (`--consensus`, ours, not the paper's): the answer
//! keeps only the objects that more than half of the K samples name.
//!
//! Sec. 3.3 rests on the observation that the hallucinations of different samples "vary
//! in location", and Eq. 5 asks the model to find the parts the samples agree on by
//! re-reading them.  This edit uses the agreement itself, at the level of objects,
//! without asking the model to read.
//!
//! What it buys, measured on the seed-0 demo's 600 fresh test questions (docs/demo.md,
//! "Agreement as a filter"): with the most likely of K = 3 samples at T = 0.7, CHAIR_s
//! 33.2 → 23.3 (the greedy POPEN† answer: 30.2), gIoU 24.7 → 21.7 — mostly by naming
//! less: precision 71.0 → 73.5 %, recall over the target categories 59.0 → 47.0 %, and
//! 103 of 524 answers to questions with targets name nothing (10 without it).  The edit
//! drops 34.5 % of the absent mentions and 24.0 % of the present ones: agreement is an
//! uncertainty signal, about 1.35–1.6 times as likely to remove an absent object as a
//! present one, not a hallucination detector.  Emptying the least likely answers until
//! recall is the same (`tools/likelihood_filter.py`) removes absent objects more
//! selectively (2.1 times as often as present ones; CHAIR_s 22.2), at 1.2 gIoU less:
//! agreement adds nothing to what the answer's own likelihood knows.  Off by default.
//!
//! The edit is the corrector's ([`crate::data::corrector::correct`]) with the consensus
//! as the scene: an object phrase whose object too few samples name leaves its list with
//! its `<seg>`s (a sentence whose list empties goes; an answer left with nothing becomes
//! the world's first no-target answer), and an unsegmented mention of one (a relation's
//! anchor) becomes an agreed object.  Counts are left as the answer says them.  Objects
//! are read with CHAIR's vocabulary and matcher ([`crate::data::vocab::mentions`]), so
//! the objects removed are exactly the ones CHAIR could count; words outside the
//! vocabulary are never touched.
use crate::data::corrector::{correct, Context};
use crate::data::vocab::mentions;

/// The objects (canonical names) that more than half of `samples` name, in order of
/// first mention.  A sample naming an object twice counts once.
pub fn consensus_objects(samples: &[&str]) -> Vec<&'static str> {
    let named: Vec<Vec<&'static str>> = samples.iter().map(|s| mentions(s)).collect();
    let mut out: Vec<&'static str> = Vec::new();
    for &c in named.iter().flatten() {
        let votes = named.iter().filter(|n| n.contains(&c)).count();
        if 2 * votes > samples.len() && !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// `answer` without the objects that at most half of `samples` name (the module docs
/// say how), or `None` when it names none of those and stays as it is.
pub fn consensus_answer(answer: &str, samples: &[&str]) -> Option<String> {
    let agreed = consensus_objects(samples);
    if mentions(answer).iter().all(|c| agreed.contains(c)) {
        return None;
    }
    let ctx = Context {
        // counts are only ever lowered to what the scene holds: none here
        present: agreed.iter().map(|c| (c.to_string(), usize::MAX)).collect(),
        targets: None,
        mentioned: Vec::new(),
    };
    Some(correct(answer, &ctx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::world::instructions::NO_TARGET_ANSWERS;

    #[test]
    fn objects_named_by_more_than_half_of_the_samples() {
        let s = [
            "I found the apple <seg> and the banana <seg>.",
            "I found the two apples <seg> <seg>.",
            "I found the apple <seg>, the apple <seg> and the orange <seg>.",
        ];
        assert_eq!(consensus_objects(&s), ["apple"]);
        assert_eq!(consensus_objects(&s[..2]), ["apple"]);
        // one sample: everything it names is the consensus
        assert_eq!(consensus_objects(&s[..1]), ["apple", "banana"]);
        // two of four is not more than half
        let four = [
            s[0],
            s[0],
            "I found the orange <seg>.",
            "I found the orange <seg>.",
        ];
        assert_eq!(consensus_objects(&four), Vec::<&str>::new());
        assert_eq!(consensus_objects(&[]), Vec::<&str>::new());
    }

    #[test]
    fn an_object_too_few_samples_name_leaves_the_answer_with_its_segs() {
        let s = [
            "I found the apple <seg> and the banana <seg>.",
            "I found the two apples <seg> <seg>.",
            "I found the apple <seg> and the orange <seg>.",
        ];
        assert_eq!(
            consensus_answer(s[0], &s).as_deref(),
            Some("I found the apple <seg>.")
        );
        // the count the answer says stays
        assert_eq!(consensus_answer(s[1], &s), None);
        let three = "I found the two apples <seg> <seg> and the orange <seg>.";
        assert_eq!(
            consensus_answer(three, &s).as_deref(),
            Some("I found the two apples <seg> <seg>.")
        );
        // nothing agreed on: the answer names nothing
        let apart = ["The cup <seg>.", "The lamp <seg>.", "The cat <seg>."];
        assert_eq!(
            consensus_answer(apart[0], &apart).as_deref(),
            Some(NO_TARGET_ANSWERS[0])
        );
        // words outside the vocabulary are not objects
        let plain = ["Nothing here fits.", "Nothing here fits.", "No."];
        assert_eq!(consensus_answer(plain[0], &plain), None);
    }

    #[test]
    fn an_unagreed_anchor_becomes_an_agreed_object() {
        let s = [
            "The cup <seg> is left of the lamp.",
            "The cup <seg> is left of the clock.",
            "I found the cup <seg> and the clock <seg>.",
        ];
        let got = consensus_answer(s[0], &s).unwrap();
        assert_eq!(got, "The cup <seg> is left of the clock.");
        assert!(mentions(&got).iter().all(|c| ["cup", "clock"].contains(c)));
    }
}
