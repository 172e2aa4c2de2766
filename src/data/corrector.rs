//! The text corrector and the error injector: the stand-ins for ChatGPT in Sec. 3.2
//! (prompts in Supp B).  The corrector edits a model answer `y` into `yc` that names
//! only objects in the scene and, when the ground-truth targets are known, segments
//! exactly those, keeping `y`'s sentences and word order wherever they are right:
//! it *modifies* a wrong object into a missing target in place, *modifies* an absent
//! object that is not segmented (the anchor of a relation, "above the phone") into a
//! present non-target object (the ground truth's own, when known), *deletes* a wrong
//! object from its list (or its sentence, when nothing else is left there), treats a
//! target segmented a second time as a wrong object, drops `<seg>`s that follow no
//! object, *adds* missing targets (those no surviving phrase segments) to the answer's
//! first list, fixes counts, and drops a "nothing here" sentence when the question has
//! targets.  The injector does the opposite to a correct answer: one or two errors, the
//! first naming an absent object that co-occurs with what is there (the hallucination
//! a prior-driven model makes) or, with a set probability, deleting a target (the
//! omission a policy pushed toward "nothing" makes).
//!
//! Both read answers through one small grammar — object phrases `the apple <seg>`,
//! `a cup <seg>`, `the two apples <seg> <seg>`, `one cat <seg>`, lists joined by `,`
//! and `and` — which is the grammar the world writes and a model trained on it
//! speaks.  Words outside an object phrase are kept as they are.
use crate::data::sample::SEG;
use crate::data::vocab::lookup;
use crate::data::world::categories::{by_name, CATEGORIES};
use crate::data::world::instructions::{
    capitalize, indefinite, number_word, parse_number_word, NO_TARGET_ANSWERS,
};
use crate::data::world::rng::Rng;

/// Splits text into word, `<seg>` and punctuation tokens.
pub fn tokenize(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with(SEG) {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            out.push(SEG.to_string());
            rest = &rest[SEG.len()..];
            continue;
        }
        if c.is_alphanumeric() || c == '\'' || c == '-' {
            cur.push(c);
        } else {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            if !c.is_whitespace() {
                out.push(c.to_string());
            }
        }
        rest = &rest[c.len_utf8()..];
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn is_punct(t: &str) -> bool {
    matches!(t, "," | "." | ";" | ":" | "!" | "?")
}

/// Joins tokens: punctuation attaches to the word before it, everything else is
/// separated by one space.  `detokenize(tokenize(s)) == s` for the world's answers.
pub fn detokenize(toks: &[String]) -> String {
    let mut s = String::new();
    for t in toks {
        if !s.is_empty() && !is_punct(t) {
            s.push(' ');
        }
        s.push_str(t);
    }
    s
}

/// One object phrase found in a sentence.
#[derive(Clone, Debug, PartialEq)]
struct Mention {
    /// Token range in the sentence, `<seg>`s included.
    start: usize,
    end: usize,
    the: bool,
    /// "a"/"an" opened the phrase.
    article: bool,
    number: Option<usize>,
    canonical: &'static str,
    plural: bool,
    segs: usize,
}

impl Mention {
    /// How many objects the phrase names.
    fn count(&self) -> usize {
        self.number.unwrap_or(if self.plural { 2 } else { 1 })
    }
    fn render(&self) -> Vec<String> {
        let cat = &CATEGORIES[by_name(self.canonical).expect("vocab names a category")];
        let noun = if self.plural { cat.plural } else { cat.name };
        let mut v = Vec::new();
        if self.the {
            v.push("the".to_string());
        } else if self.article {
            v.push(indefinite(noun).to_string());
        }
        if let Some(n) = self.number {
            v.push(number_word(n));
        }
        v.push(noun.to_string());
        v.extend(std::iter::repeat_n(SEG.to_string(), self.segs));
        v
    }
    /// Sets the phrase to name `n` objects (segmenting all of them when it segments).
    /// A single object without "the" reads "one cat" after "there is" (a count
    /// answer) and "a cat" elsewhere.
    fn set_count(&mut self, n: usize, after_there_is: bool) {
        if self.segs > 0 {
            self.segs = n;
        }
        if n == 1 {
            self.plural = false;
            self.number = None;
            if !self.the {
                self.article = !after_there_is;
                if after_there_is {
                    self.number = Some(1);
                }
            }
        } else {
            self.plural = true;
            self.article = false;
            self.number = Some(n);
        }
    }
}

/// Whether the tokens before `at` end with "there is" or "there are".
fn after_there_is(toks: &[String], at: usize) -> bool {
    at >= 2
        && toks[at - 2].eq_ignore_ascii_case("there")
        && (toks[at - 1] == "is" || toks[at - 1] == "are")
}

/// Object phrases of one sentence.
fn parse_mentions(toks: &[String]) -> Vec<Mention> {
    let low: Vec<String> = toks.iter().map(|t| t.to_ascii_lowercase()).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let start = i;
        let mut j = i;
        let (mut the, mut article, mut number) = (false, false, None);
        if low[j] == "the" {
            the = true;
            j += 1;
        } else if low[j] == "a" || low[j] == "an" {
            article = true;
            j += 1;
        }
        if j < toks.len() {
            if let Some(n) = parse_number_word(&low[j]) {
                if !article && j + 1 < toks.len() && lookup(&low[j + 1]).is_some() {
                    number = Some(n);
                    j += 1;
                }
            }
        }
        match low.get(j).and_then(|w| lookup(w)) {
            Some((canonical, plural)) => {
                let mut end = j + 1;
                while end < toks.len() && toks[end] == SEG {
                    end += 1;
                }
                out.push(Mention {
                    start,
                    end,
                    the,
                    article,
                    number,
                    canonical,
                    plural,
                    segs: end - j - 1,
                });
                i = end;
            }
            None => i = start + 1,
        }
    }
    out
}

/// Groups mentions into lists: runs joined only by `,`, `and` or `, and`.
fn lists(toks: &[String], ms: &[Mention]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (k, m) in ms.iter().enumerate() {
        let joined = k > 0 && {
            let gap: Vec<&str> = toks[ms[k - 1].end..m.start]
                .iter()
                .map(|s| s.as_str())
                .collect();
            matches!(gap.as_slice(), [","] | ["and"] | [",", "and"])
        };
        if joined {
            out.last_mut().expect("k > 0").push(k);
        } else {
            out.push(vec![k]);
        }
    }
    out
}

/// What the corrector knows: objects in the scene and, when known, the targets of
/// the ground-truth answer (canonical name, number of instances).
#[derive(Clone, Debug, Default)]
pub struct Context {
    /// Objects in the scene: canonical name and number of instances.
    pub present: Vec<(String, usize)>,
    /// `None`: unknown (only hallucinated objects and wrong counts are fixed);
    /// `Some(empty)`: a no-target question.
    pub targets: Option<Vec<(String, usize)>>,
    /// Objects the ground-truth answer names (Supp B's "object list"), targets or not:
    /// the first choice when an absent object that is not segmented (the anchor of a
    /// relation, "above the phone") must be replaced.  Empty when unknown.
    pub mentioned: Vec<String>,
}

/// The canonical names of the objects `text` names, in order (repeats kept).
pub fn mentioned_objects(text: &str) -> Vec<String> {
    parse_mentions(&tokenize(text))
        .iter()
        .map(|m| m.canonical.to_string())
        .collect()
}

impl Context {
    fn present_count(&self, name: &str) -> Option<usize> {
        self.present.iter().find(|p| p.0 == name).map(|p| p.1)
    }
    /// The targets (in order, with their counts) whose name is not in `named`.
    fn targets_not_in(&self, named: &[&str]) -> Vec<(String, usize)> {
        self.targets
            .iter()
            .flatten()
            .filter(|t| !named.contains(&t.0.as_str()))
            .cloned()
            .collect()
    }
    fn target_count(&self, name: &str) -> Option<usize> {
        self.targets
            .as_ref()?
            .iter()
            .find(|p| p.0 == name)
            .map(|p| p.1)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Fate {
    Keep,
    Drop,
}

struct Sentence {
    toks: Vec<String>,
    ms: Vec<Mention>,
    fate: Vec<Fate>,
    lists: Vec<Vec<usize>>,
    deleted: bool,
}

impl Sentence {
    /// A sentence's tokens read into phrases and lists, every phrase kept.
    fn parse(toks: Vec<String>) -> Self {
        let ms = parse_mentions(&toks);
        let lists = lists(&toks, &ms);
        let fate = vec![Fate::Keep; ms.len()];
        Sentence {
            toks,
            ms,
            fate,
            lists,
            deleted: false,
        }
    }

    /// A dropped phrase leaves its list; a sentence whose list empties goes.
    fn settle_drops(&mut self) {
        if self
            .lists
            .iter()
            .any(|l| l.iter().all(|&k| self.fate[k] == Fate::Drop))
        {
            self.deleted = true;
        }
    }
}

/// The answer's surviving sentences, joined; `None` when nothing is left of it.
fn render_answer(sents: &[Sentence]) -> Option<String> {
    let out: Vec<String> = sents
        .iter()
        .filter(|s| !s.deleted)
        .map(render_sentence)
        .collect();
    if out.iter().all(|s| s.trim().is_empty()) {
        return None;
    }
    Some(out.join(" "))
}

fn sentences(toks: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for t in toks {
        cur.push(t.clone());
        if matches!(t.as_str(), "." | "!" | "?") {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A present object that is not a target and not named in `s`: the first of the ground
/// truth's [`Context::mentioned`], else the first present one.
fn anchor_for(ctx: &Context, s: &Sentence) -> Option<String> {
    let is_target = |n: &str| ctx.target_count(n).is_some();
    let in_sentence = |n: &str| s.ms.iter().any(|m| m.canonical == n);
    ctx.mentioned
        .iter()
        .chain(ctx.present.iter().map(|p| &p.0))
        .find(|n| ctx.present_count(n).is_some() && !is_target(n) && !in_sentence(n))
        .cloned()
}

/// Corrects `y` against `ctx` (see the module docs).  A correct answer comes back
/// unchanged (up to spacing around punctuation).
pub fn correct(y: &str, ctx: &Context) -> String {
    let mut sents: Vec<Sentence> = sentences(&tokenize(y))
        .into_iter()
        .map(|toks| Sentence::parse(drop_orphan_segs(toks)))
        .collect();
    // 0. A question with targets gets no "nothing here" sentence.
    if ctx.targets.as_ref().is_some_and(|t| !t.is_empty()) {
        for s in sents.iter_mut() {
            let text = detokenize(&s.toks);
            if NO_TARGET_ANSWERS
                .iter()
                .any(|a| a.eq_ignore_ascii_case(&text))
            {
                s.deleted = true;
            }
        }
    }
    // 1. Judge each phrase; fix counts of the ones that stay.
    let mut bad: Vec<(usize, usize)> = Vec::new();
    let mut named_ok: Vec<&'static str> = Vec::new();
    for (si, s) in sents.iter_mut().enumerate() {
        let toks = &s.toks;
        for (mi, m) in s.ms.iter_mut().enumerate() {
            let ati = after_there_is(toks, m.start);
            let Some(have) = ctx.present_count(m.canonical) else {
                bad.push((si, mi));
                continue;
            };
            let want = if m.segs > 0 && ctx.targets.is_some() {
                match ctx.target_count(m.canonical) {
                    // A target already segmented by an earlier phrase is named twice:
                    // the repeat is wrong (the ground truth names each target once).
                    Some(n) if !named_ok.contains(&m.canonical) => Some(n),
                    _ => {
                        bad.push((si, mi));
                        continue;
                    }
                }
            } else if m.count() > have && (m.number.is_some() || m.segs > 1) {
                // Without the targets a count can only be known to be too high.
                Some(have)
            } else {
                None
            };
            if let Some(n) = want {
                if m.count() != n || (m.segs > 0 && m.segs != n) {
                    m.set_count(n, ati);
                }
            }
            if m.segs > 0 {
                named_ok.push(m.canonical);
            }
        }
    }
    // 2. Wrong phrases become missing targets in place while any are left, else go.
    let mut missing = ctx.targets_not_in(&named_ok);
    missing.reverse();
    for &(si, mi) in &bad {
        let ati = after_there_is(&sents[si].toks, sents[si].ms[mi].start);
        if sents[si].ms[mi].segs == 0 {
            // an absent object that is not segmented (a relation's anchor): modified
            // into a present one that is not a target, the ground truth's first
            if let Some(name) = anchor_for(ctx, &sents[si]) {
                let have = ctx.present_count(&name).unwrap_or(1);
                let m = &mut sents[si].ms[mi];
                m.canonical = CATEGORIES[by_name(&name).unwrap_or(0)].name;
                let n = m.count().min(have).max(1);
                m.set_count(n, ati);
                continue;
            }
        }
        let m = &mut sents[si].ms[mi];
        if m.segs > 0 {
            if let Some((name, n)) = missing.pop() {
                m.canonical = CATEGORIES[by_name(&name).unwrap_or(0)].name;
                m.set_count(n, ati);
                m.segs = n;
                continue;
            }
        }
        sents[si].fate[mi] = Fate::Drop;
    }
    // 3. A dropped phrase leaves its list; a sentence whose list empties goes.
    sents.iter_mut().for_each(Sentence::settle_drops);
    // A target is missing when no surviving phrase segments it: a sentence that went
    // may have taken a right target with it.
    let covered: Vec<&str> = sents
        .iter()
        .filter(|s| !s.deleted)
        .flat_map(|s| {
            s.ms.iter()
                .zip(&s.fate)
                .filter(|(m, f)| **f == Fate::Keep && m.segs > 0)
                .map(|(m, _)| m.canonical)
        })
        .collect();
    let mut missing = ctx.targets_not_in(&covered);
    // 4. Missing targets join the first surviving list that segments something.
    if !missing.is_empty() {
        let spot = sents.iter().enumerate().find_map(|(si, s)| {
            if s.deleted {
                return None;
            }
            s.lists
                .iter()
                .position(|l| {
                    l.iter()
                        .any(|&k| s.fate[k] == Fate::Keep && s.ms[k].segs > 0)
                })
                .map(|li| (si, li))
        });
        match spot {
            Some((si, li)) => {
                let s = &mut sents[si];
                let first = &s.ms[s.lists[li][0]];
                let (the, article) = (
                    first.the,
                    first.article || (!first.the && first.number.is_none()),
                );
                let at = s.ms[*s.lists[li].last().expect("non-empty list")].end;
                for (name, n) in missing.drain(..) {
                    let mut m = Mention {
                        start: at,
                        end: at,
                        the,
                        article,
                        number: None,
                        canonical: CATEGORIES[by_name(&name).unwrap_or(0)].name,
                        plural: false,
                        segs: 1,
                    };
                    m.set_count(n, false);
                    s.ms.push(m);
                    s.fate.push(Fate::Keep);
                    let k = s.ms.len() - 1;
                    s.lists[li].push(k);
                }
            }
            None => {
                let items: Vec<String> = missing
                    .iter()
                    .map(|(name, n)| {
                        crate::data::world::instructions::object_phrase(
                            by_name(name).unwrap_or(0),
                            *n,
                            crate::data::world::instructions::Det::The,
                            true,
                        )
                    })
                    .collect();
                let text = format!(
                    "I found {}.",
                    crate::data::world::instructions::join_list(&items)
                );
                sents.push(Sentence::parse(tokenize(&text)));
            }
        }
    }
    render_answer(&sents).unwrap_or_else(|| NO_TARGET_ANSWERS[0].to_string())
}

/// Drops the `<seg>`s that follow no object phrase: they segment nothing the answer
/// names (the ground truth never has one).
fn drop_orphan_segs(toks: Vec<String>) -> Vec<String> {
    let ms = parse_mentions(&toks);
    let covered = |i: usize| ms.iter().any(|m| (m.start..m.end).contains(&i));
    toks.into_iter()
        .enumerate()
        .filter(|(i, t)| t != SEG || covered(*i))
        .map(|(_, t)| t)
        .collect()
}

/// Rebuilds a sentence with its lists re-joined from the surviving phrases.
fn render_sentence(s: &Sentence) -> String {
    let mut toks: Vec<String> = Vec::new();
    let mut i = 0;
    let list_of = |k: usize| s.lists.iter().position(|l| l[0] == k);
    let mut li_done = vec![false; s.lists.len()];
    while i < s.toks.len() {
        let at_list = s.ms.iter().position(|m| m.start == i).and_then(list_of);
        match at_list {
            Some(li) if !li_done[li] => {
                li_done[li] = true;
                let l = &s.lists[li];
                let keep: Vec<&Mention> = l
                    .iter()
                    .filter(|&&k| s.fate[k] == Fate::Keep)
                    .map(|&k| &s.ms[k])
                    .collect();
                let total: usize = keep.iter().map(|m| m.count()).sum();
                fix_there_is(&mut toks, total);
                let start_of_sentence = toks.is_empty();
                for (n, m) in keep.iter().enumerate() {
                    if n > 0 {
                        if n + 1 == keep.len() {
                            toks.push("and".into());
                        } else {
                            toks.push(",".into());
                        }
                    }
                    toks.extend(m.render());
                }
                if start_of_sentence {
                    if let Some(t) = toks.first_mut() {
                        *t = capitalize(t);
                    }
                }
                // Skip the original list (phrases and joiners, appended ones included).
                let orig_end = l.iter().map(|&k| s.ms[k].end).max().unwrap_or(i);
                i = orig_end.max(i + 1);
            }
            _ => {
                toks.push(s.toks[i].clone());
                i += 1;
            }
        }
    }
    detokenize(&toks)
}

/// "There is" / "There are" right before a list agrees with the list's count.
fn fix_there_is(toks: &mut [String], total: usize) {
    let n = toks.len();
    if n >= 2
        && toks[n - 2].eq_ignore_ascii_case("there")
        && (toks[n - 1] == "is" || toks[n - 1] == "are")
    {
        toks[n - 1] = if total == 1 { "is" } else { "are" }.to_string();
    }
}

/// One error the injector made.
#[derive(Clone, Debug, PartialEq)]
pub enum Injected {
    /// An object replaced by an absent one: `(was, now)`.
    Replace(String, String),
    /// An absent object added to a list, or a whole hallucinated answer.
    Add(String),
    /// A count raised by one: `(object, new count)`.
    Count(String, usize),
    /// A target deleted with its `<seg>`s (an omission).
    Omit(String),
}

/// Introduces one or two errors into a correct answer `yg` (Supp B: "modify, add, or
/// delete certain words or sentences").  The first error names an object from `absent`
/// (absent objects, most tempting first) — by replacing an object, adding one to a
/// list, or adding a sentence about one — except that, with probability `omit` and
/// when `yg` has targets, it *deletes* a target instead: the phrase and its `<seg>`s
/// leave their list, the sentence goes when its list empties, and an answer left with
/// no sentence becomes a "nothing here" answer.  The second error (with probability ½)
/// is another hallucination or a wrong count.  Deterministic in `seed`; with
/// `omit = 0` no draw is spent on it.  Returns the answer and what was done; `None`
/// when `absent` is empty.
pub fn inject(yg: &str, absent: &[&str], omit: f32, seed: u64) -> Option<(String, Vec<Injected>)> {
    if absent.is_empty() {
        return None;
    }
    let mut rng = Rng::new(seed);
    let mut sents: Vec<Sentence> = sentences(&tokenize(yg))
        .into_iter()
        .map(Sentence::parse)
        .collect();
    let mut pool: Vec<&str> = absent.iter().take(3).copied().collect();
    let mut done = Vec::new();
    let n_err = if rng.chance(0.5) { 2 } else { 1 };
    for e in 0..n_err {
        let segged: Vec<(usize, usize)> = sents
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.deleted)
            .flat_map(|(si, s)| {
                s.ms.iter()
                    .enumerate()
                    .filter(|&(mi, m)| m.segs > 0 && s.fate[mi] == Fate::Keep)
                    .map(move |(mi, _)| (si, mi))
            })
            .collect();
        if segged.is_empty() && !done.is_empty() {
            // everything segmented was deleted: one error is enough
            break;
        }
        if e == 0 && !segged.is_empty() && omit > 0.0 && rng.chance(omit) {
            let (si, mi) = segged[rng.below(segged.len())];
            let s = &mut sents[si];
            s.fate[mi] = Fate::Drop;
            s.settle_drops();
            done.push(Injected::Omit(s.ms[mi].canonical.to_string()));
            continue;
        }
        if segged.is_empty() {
            // A no-target answer: hallucinate a whole answer.
            let name = pool[rng.below(pool.len())];
            let text = match rng.below(3) {
                0 => format!("I found the {name} {SEG}."),
                1 => format!("You can see the {name} {SEG} here."),
                _ => format!("There is {} {name} {SEG} in this image.", indefinite(name)),
            };
            return Some((text, vec![Injected::Add(name.to_string())]));
        }
        // 0 replace an object, 1 add one to a list, 2 add a sentence about one, 3 count.
        let kind = if e == 0 { rng.below(3) } else { rng.below(4) };
        let pick = pool.remove(rng.below(pool.len()));
        if pool.is_empty() {
            pool.push(pick);
        }
        let (si, mi) = segged[rng.below(segged.len())];
        let s = &mut sents[si];
        match kind {
            0 => {
                let m = &mut s.ms[mi];
                let was = m.canonical.to_string();
                if done
                    .iter()
                    .any(|d| matches!(d, Injected::Replace(_, now) if now == &was))
                {
                    continue;
                }
                m.canonical = CATEGORIES[by_name(pick).unwrap_or(0)].name;
                done.push(Injected::Replace(was, pick.to_string()));
            }
            1 => {
                let li = s
                    .lists
                    .iter()
                    .position(|l| l.contains(&mi))
                    .expect("every mention is in a list");
                let first = &s.ms[s.lists[li][0]];
                let at = s.ms[*s.lists[li].last().expect("non-empty")].end;
                let m = Mention {
                    start: at,
                    end: at,
                    the: first.the,
                    article: !first.the,
                    number: None,
                    canonical: CATEGORIES[by_name(pick).unwrap_or(0)].name,
                    plural: false,
                    segs: 1,
                };
                s.ms.push(m);
                s.fate.push(Fate::Keep);
                let k = s.ms.len() - 1;
                s.lists[li].push(k);
                done.push(Injected::Add(pick.to_string()));
            }
            2 => {
                let text = format!("There is also {} {pick} {SEG}.", indefinite(pick));
                sents.push(Sentence::parse(tokenize(&text)));
                done.push(Injected::Add(pick.to_string()));
            }
            _ => {
                let m = &mut s.ms[mi];
                let n = m.count() + 1;
                m.set_count(n, false);
                done.push(Injected::Count(m.canonical.to_string(), n));
            }
        }
    }
    let text = render_answer(&sents)
        .unwrap_or_else(|| NO_TARGET_ANSWERS[rng.below(NO_TARGET_ANSWERS.len())].to_string());
    Some((text, done))
}

/// One text-preference example's token side: `y` and `yc` as ids and the changed
/// positions `Ly`, `Lyc` (Sec. 3.2) from the token diff.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    /// Token ids of the sampled answer `y` (no special tokens added).
    pub y: Vec<u32>,
    /// Token ids of its correction `yc`.
    pub yc: Vec<u32>,
    /// `Ly`: ascending indices into `y` of the changed tokens.
    pub ly: Vec<usize>,
    /// `Lyc`: ascending indices into `yc` of the changed tokens.
    pub lyc: Vec<usize>,
}

/// Tokenizes `y` and its correction `yc` and marks the tokens that differ.
pub fn preference_pair(
    tok: &crate::data::tokenizer::Tok,
    y: &str,
    yc: &str,
) -> crate::Result<PreferencePair> {
    let (a, b) = (tok.encode(y)?, tok.encode(yc)?);
    let (ly, lyc) = crate::data::diff::changed_positions(&a, &b);
    Ok(PreferencePair {
        y: a,
        yc: b,
        ly,
        lyc,
    })
}
