//! Instructions that need reasoning, and their answers with one `<seg>` per target.
//!
//! Families: function/affordance ("I lack vitamins, what should I eat?"), spatial
//! ("the cup to the left of the laptop"), counting, attribute (colour), multi-target,
//! scene description (many targets) and no-target questions whose honest answer
//! segments nothing.  Answers follow one small grammar that the corrector parses:
//! object phrases `the apple <seg>` / `a cup <seg>` / `the two apples <seg> <seg>`,
//! joined into lists by `, ` and ` and `, inside fixed sentence frames that use no
//! verb whose form depends on the list's length.  No-target answers never name an
//! object, so that an honest "nothing" mentions nothing CHAIR could count.
use super::categories::{Attr, CATEGORIES};
use super::rng::Rng;
use super::scenes::{tempting_absent, SCENES};
use crate::data::sample::SEG;

/// Instruction family of a question.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// Function or affordance: what serves a need ("I lack vitamins, what should I eat?").
    Function,
    /// One object by its position relative to another ("the cup to the left of the
    /// laptop").
    Spatial,
    /// Every instance of one category, counted ("How many apples are there?").
    Counting,
    /// Everything of one colour.
    Attribute,
    /// Two or three named categories at once.
    MultiTarget,
    /// A description of the scene, segmenting each object.
    Describe,
    /// A question nothing in the image answers; the answer segments nothing.
    NoTarget,
}

impl Family {
    /// Snake-case name (`function`, …, `multi_target`, `no_target`).
    pub fn name(self) -> &'static str {
        match self {
            Family::Function => "function",
            Family::Spatial => "spatial",
            Family::Counting => "counting",
            Family::Attribute => "attribute",
            Family::MultiTarget => "multi_target",
            Family::Describe => "describe",
            Family::NoTarget => "no_target",
        }
    }
}

/// A placed object as the instruction generator sees it.
#[derive(Clone, Debug)]
pub struct ObjView {
    /// Category id into [`CATEGORIES`].
    pub category: usize,
    /// The instance's colour word ("red").
    pub colour: &'static str,
    /// Mask centroid (x, y) in pixels.
    pub centre: (f32, f32),
}

/// One question with its answer; `targets` index the scene's objects in `<seg>` order.
#[derive(Clone, Debug, PartialEq)]
pub struct Qa {
    /// The instruction family the question was drawn from.
    pub family: Family,
    /// The instruction text.
    pub question: String,
    /// The answer text, with one [`SEG`] per target.
    pub answer: String,
    /// Indices into the scene's objects, one per `<seg>` of `answer`, in order.
    pub targets: Vec<usize>,
}

/// Honest answers to a question with no target.  The corrector falls back to the first.
pub const NO_TARGET_ANSWERS: [&str; 3] = [
    "There is nothing like that in this image.",
    "I cannot find anything in this image that fits.",
    "Nothing in this image matches your request.",
];

const NUMBER_WORDS: [&str; 11] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];

/// "two" for 2; digits beyond ten.
pub fn number_word(n: usize) -> String {
    NUMBER_WORDS
        .get(n)
        .map(|s| s.to_string())
        .unwrap_or_else(|| n.to_string())
}

/// Inverse of [`number_word`] for words (`None` for other words).
pub fn parse_number_word(w: &str) -> Option<usize> {
    NUMBER_WORDS.iter().position(|&x| x == w)
}

/// "a" or "an" before `word`.
pub fn indefinite(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// How an object phrase opens: `the apple` / `an apple`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Det {
    /// Definite: `the apple`, `the two apples`.
    The,
    /// Indefinite: `an apple`, `two cups` (a bare number when more than one).
    A,
}

/// `the apple <seg>`, `the two apples <seg> <seg>`, `a cup <seg>`, `two cups <seg> <seg>`
/// (`segs` false leaves the `<seg>`s out).
pub fn object_phrase(category: usize, n: usize, det: Det, segs: bool) -> String {
    let cat = &CATEGORIES[category];
    let mut s = match (det, n) {
        (Det::The, 1) => format!("the {}", cat.name),
        (Det::The, _) => format!("the {} {}", number_word(n), cat.plural),
        (Det::A, 1) => format!("{} {}", indefinite(cat.name), cat.name),
        (Det::A, _) => format!("{} {}", number_word(n), cat.plural),
    };
    if segs {
        for _ in 0..n {
            s.push(' ');
            s.push_str(SEG);
        }
    }
    s
}

/// `A`, `A and B`, `A, B and C`.
pub fn join_list(items: &[String]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        n => format!("{} and {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

/// Upper-cases the first letter.
pub fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Groups object indices by category, groups ordered by their leftmost member and
/// members left to right, so answers read the scene from left to right.
fn groups(objs: &[ObjView], idx: &[usize]) -> Vec<(usize, Vec<usize>)> {
    let mut sorted: Vec<usize> = idx.to_vec();
    sorted.sort_by(|&a, &b| {
        objs[a]
            .centre
            .0
            .total_cmp(&objs[b].centre.0)
            .then(a.cmp(&b))
    });
    let mut out: Vec<(usize, Vec<usize>)> = Vec::new();
    for i in sorted {
        let c = objs[i].category;
        match out.iter_mut().find(|g| g.0 == c) {
            Some(g) => g.1.push(i),
            None => out.push((c, vec![i])),
        }
    }
    out
}

/// The list phrase for `idx` and the target order it implies.
fn list_phrase(objs: &[ObjView], idx: &[usize], det: Det) -> (String, Vec<usize>) {
    let gs = groups(objs, idx);
    let items: Vec<String> = gs
        .iter()
        .map(|(c, m)| object_phrase(*c, m.len(), det, true))
        .collect();
    let order = gs.into_iter().flat_map(|(_, m)| m).collect();
    (join_list(&items), order)
}

/// Question phrasings and the answer frame (`{}` = the list) for each attribute, and
/// whether the list opens the sentence.
fn function_text(a: Attr) -> (&'static [&'static str], &'static str) {
    use Attr::*;
    match a {
        Vitamins => (
            &[
                "I lack vitamins, what should I eat?",
                "Which food here would give me vitamins?",
                "I want something healthy with vitamins. What in the picture can I eat?",
            ],
            "You could eat {}, rich in vitamins.",
        ),
        Food => (
            &[
                "I'm hungry. What can I eat here?",
                "What in this picture is something to eat?",
                "Is there any food I could have? Segment it.",
            ],
            "You can eat {}.",
        ),
        Sweet => (
            &[
                "I want something sweet. What could I have?",
                "What here would satisfy a sweet tooth?",
                "Which things here taste sweet?",
            ],
            "You could have {}.",
        ),
        EatUtensil => (
            &[
                "What can I use to eat fruit?",
                "Which tools here help me eat my meal?",
                "I want to eat my salad. What should I pick up?",
            ],
            "You can use {} to eat.",
        ),
        Cut => (
            &[
                "What could I use to cut the bread?",
                "Which object here can cut things?",
                "I need to slice something. What should I use?",
            ],
            "{} can cut it.",
        ),
        Drink => (
            &[
                "I'm thirsty, what could hold my drink?",
                "What here can I drink from?",
                "Where could I pour some water?",
            ],
            "You could drink from {}.",
        ),
        HoldFood => (
            &[
                "Where can I put my food?",
                "What here could I serve a meal on or in?",
                "I need something to hold my snacks. What can I use?",
            ],
            "You can put food in or on {}.",
        ),
        Light => (
            &[
                "It is too dark to read. What can give me light?",
                "Which things here are a source of light?",
                "What could I use to light up the room?",
            ],
            "{} can give you light.",
        ),
        Seat => (
            &[
                "I'm tired, where can I sit?",
                "Where could a guest sit down here?",
                "Which objects here are made for sitting?",
            ],
            "You can sit on {}.",
        ),
        Music => (
            &[
                "I want to play some music. What could I play?",
                "Which objects here make music?",
                "What here could a musician use?",
            ],
            "You could play {}.",
        ),
        Type => (
            &[
                "I need to write an email. What should I use?",
                "What here could I type on?",
                "Which objects here help me type a letter?",
            ],
            "You can use {} to type.",
        ),
        Read => (
            &[
                "I'm bored, what could I read?",
                "Is there something here I could read? Segment it.",
                "What here would a reader pick up?",
            ],
            "You could read {}.",
        ),
        Time => (
            &[
                "How can I find out what time it is?",
                "What here shows the time?",
                "I'm late. What could tell me the time?",
            ],
            "You can look at {} to see the time.",
        ),
        Pet => (
            &[
                "Is there a pet I could play with?",
                "Which animals are in this picture?",
                "What here could I stroke and feed?",
            ],
            "You could play with {}.",
        ),
        Water => (
            &[
                "What here needs watering?",
                "Which thing here is alive and needs water?",
                "I have a watering can. What should I water?",
            ],
            "You should water {}.",
        ),
        Watch => (
            &[
                "I want to watch a film. What should I turn on?",
                "What here has a screen for watching videos?",
                "Where could I watch the news?",
            ],
            "You could watch it on {}.",
        ),
        Rest => (
            &[
                "Where could I rest my head?",
                "What here is soft enough to lie on?",
                "I want a nap. What could I put my head on?",
            ],
            "You could rest your head on {}.",
        ),
        Call => (
            &[
                "I need to call a friend. What can I use?",
                "What here can make a phone call?",
                "How could I call for help from here?",
            ],
            "You can use {} to call.",
        ),
    }
}

fn fill_frame(frame: &str, list: &str) -> String {
    let s = frame.replacen("{}", list, 1);
    if frame.starts_with("{}") {
        capitalize(&s)
    } else {
        s
    }
}

const SPATIAL: [(&str, &str); 4] = [
    ("left", "to the left of"),
    ("right", "to the right of"),
    ("above", "above"),
    ("below", "below"),
];

/// Fraction of the image size two centres must differ by for a spatial relation.
const SPATIAL_MARGIN: f32 = 0.08;

/// Generates `n` questions (distinct) about a scene.
pub fn generate(
    scene: usize,
    objs: &[ObjView],
    height: usize,
    width: usize,
    n: usize,
    rng: &mut Rng,
) -> Vec<Qa> {
    const WEIGHTS: [(Family, f32); 7] = [
        (Family::Function, 3.0),
        (Family::Spatial, 2.0),
        (Family::Counting, 2.0),
        (Family::Attribute, 1.2),
        (Family::MultiTarget, 1.5),
        (Family::Describe, 1.5),
        (Family::NoTarget, 1.5),
    ];
    let mut out: Vec<Qa> = Vec::new();
    let w: Vec<f32> = WEIGHTS.iter().map(|x| x.1).collect();
    for _ in 0..n * 20 {
        if out.len() == n {
            break;
        }
        let fam = WEIGHTS[rng.weighted(&w)].0;
        let qa = match fam {
            Family::Function => function(objs, rng),
            Family::Spatial => spatial(objs, height, width, rng),
            Family::Counting => counting(objs, rng),
            Family::Attribute => attribute(objs, rng),
            Family::MultiTarget => multi(objs, rng),
            Family::Describe => describe(scene, objs, rng),
            Family::NoTarget => no_target(scene, objs, rng),
        };
        if let Some(qa) = qa {
            if !out
                .iter()
                .any(|q| q.question == qa.question || q.answer == qa.answer)
            {
                out.push(qa);
            }
        }
    }
    out
}

fn present_cats(objs: &[ObjView]) -> Vec<usize> {
    let mut c: Vec<usize> = objs.iter().map(|o| o.category).collect();
    c.sort_unstable();
    c.dedup();
    c
}

fn function(objs: &[ObjView], rng: &mut Rng) -> Option<Qa> {
    let attrs: Vec<Attr> = super::categories::ALL_ATTRS
        .iter()
        .copied()
        .filter(|&a| objs.iter().any(|o| CATEGORIES[o.category].has(a)))
        .collect();
    if attrs.is_empty() {
        return None;
    }
    let a = *rng.pick(&attrs);
    let idx: Vec<usize> = (0..objs.len())
        .filter(|&i| CATEGORIES[objs[i].category].has(a))
        .collect();
    let (qs, frame) = function_text(a);
    let (list, targets) = list_phrase(objs, &idx, Det::The);
    Some(Qa {
        family: Family::Function,
        question: rng.pick(qs).to_string(),
        answer: fill_frame(frame, &list),
        targets,
    })
}

fn spatial(objs: &[ObjView], h: usize, w: usize, rng: &mut Rng) -> Option<Qa> {
    let count = |c: usize| objs.iter().filter(|o| o.category == c).count();
    let holds = |a: &ObjView, b: &ObjView, rel: usize| -> bool {
        let (dx, dy) = (a.centre.0 - b.centre.0, a.centre.1 - b.centre.1);
        let (mx, my) = (SPATIAL_MARGIN * w as f32, SPATIAL_MARGIN * h as f32);
        match rel {
            0 => dx < -mx,
            1 => dx > mx,
            2 => dy < -my,
            _ => dy > my,
        }
    };
    let mut cands = Vec::new();
    for (ai, a) in objs.iter().enumerate() {
        for (bi, b) in objs.iter().enumerate() {
            if a.category == b.category || count(b.category) != 1 {
                continue;
            }
            for rel in 0..4 {
                let unique = objs
                    .iter()
                    .enumerate()
                    .filter(|(_, o)| o.category == a.category)
                    .all(|(k, o)| (k == ai) == holds(o, b, rel));
                if unique {
                    // Prefer targets that need the relation to be told apart.
                    let weight = if count(a.category) > 1 { 3 } else { 1 };
                    for _ in 0..weight {
                        cands.push((ai, bi, rel));
                    }
                }
            }
        }
    }
    if cands.is_empty() {
        return None;
    }
    let &(ai, bi, rel) = rng.pick(&cands);
    let (an, bn) = (
        CATEGORIES[objs[ai].category].name,
        CATEGORIES[objs[bi].category].name,
    );
    let r = SPATIAL[rel].1;
    let q = match rng.below(3) {
        0 => format!("Please segment the {an} {r} the {bn}."),
        1 => format!("Which {an} is {r} the {bn}? Segment it."),
        _ => format!("Find the {an} that is {r} the {bn}."),
    };
    Some(Qa {
        family: Family::Spatial,
        question: q,
        answer: format!("The {an} {SEG} is {r} the {bn}."),
        targets: vec![ai],
    })
}

fn counting_question(cat: usize, rng: &mut Rng) -> String {
    let pl = CATEGORIES[cat].plural;
    match rng.below(3) {
        0 => format!("How many {pl} are there? Segment each of them."),
        1 => format!("Count the {pl} in the picture and segment them."),
        _ => format!("Can you find all the {pl}?"),
    }
}

fn counting(objs: &[ObjView], rng: &mut Rng) -> Option<Qa> {
    let cats = present_cats(objs);
    if cats.is_empty() {
        return None;
    }
    let multi: Vec<usize> = cats
        .iter()
        .copied()
        .filter(|&c| objs.iter().filter(|o| o.category == c).count() > 1)
        .collect();
    let cat = if !multi.is_empty() && rng.chance(0.7) {
        *rng.pick(&multi)
    } else {
        *rng.pick(&cats)
    };
    Some(count_qa(objs, cat, rng))
}

/// A counting question about category `cat`, answered for this scene: its instances
/// left to right with one `<seg>` each (family `Counting`), or, when none is here, a
/// no-target answer (family `NoTarget`).  The world's counting family asks it about a
/// present category; stage 1's presence mix ([`crate::method::presence::presence_samples`])
/// asks it about present and absent ones alike.
pub fn count_qa(objs: &[ObjView], cat: usize, rng: &mut Rng) -> Qa {
    let idx: Vec<usize> = (0..objs.len())
        .filter(|&i| objs[i].category == cat)
        .collect();
    let (_, targets) = list_phrase(objs, &idx, Det::A);
    let n = idx.len();
    let answer = match n {
        0 => rng.pick(&NO_TARGET_ANSWERS).to_string(),
        // "one apple" rather than "an apple": the count is the point of the answer.
        1 => format!("There is one {} {SEG}.", CATEGORIES[cat].name),
        _ => format!("There are {}.", object_phrase(cat, n, Det::A, true)),
    };
    Qa {
        family: if n == 0 {
            Family::NoTarget
        } else {
            Family::Counting
        },
        question: counting_question(cat, rng),
        answer,
        targets,
    }
}

fn attribute(objs: &[ObjView], rng: &mut Rng) -> Option<Qa> {
    // "orange" is also a fruit's name; asking for it would blur CHAIR's word matching.
    let mut colours: Vec<&'static str> = objs
        .iter()
        .map(|o| o.colour)
        .filter(|&c| c != "orange")
        .collect();
    colours.sort_unstable();
    colours.dedup();
    if colours.is_empty() {
        return None;
    }
    let col = *rng.pick(&colours);
    let idx: Vec<usize> = (0..objs.len()).filter(|&i| objs[i].colour == col).collect();
    let (list, targets) = list_phrase(objs, &idx, Det::The);
    let q = match rng.below(3) {
        0 => format!("Which objects here are {col}?"),
        1 => format!("Segment everything that is {col}."),
        _ => format!("Find all the {col} things in the picture."),
    };
    Some(Qa {
        family: Family::Attribute,
        question: q,
        answer: format!("I can see {list} in {col}."),
        targets,
    })
}

fn multi(objs: &[ObjView], rng: &mut Rng) -> Option<Qa> {
    let mut cats = present_cats(objs);
    if cats.len() < 2 {
        return None;
    }
    rng.shuffle(&mut cats);
    let k = if cats.len() >= 3 && rng.chance(0.4) {
        3
    } else {
        2
    };
    let chosen = &cats[..k];
    let idx: Vec<usize> = (0..objs.len())
        .filter(|&i| chosen.contains(&objs[i].category))
        .collect();
    let (list, targets) = list_phrase(objs, &idx, Det::The);
    let names: Vec<String> = chosen
        .iter()
        .map(|&c| {
            let n = objs.iter().filter(|o| o.category == c).count();
            format!("the {}", CATEGORIES[c].noun(n))
        })
        .collect();
    let q = match rng.below(3) {
        0 => format!("Segment {}.", join_list(&names)),
        1 => format!("Where are {}?", join_list(&names)),
        _ => format!("Please find {} in this image.", join_list(&names)),
    };
    Some(Qa {
        family: Family::MultiTarget,
        question: q,
        answer: format!("Sure, I found {list}."),
        targets,
    })
}

fn describe(scene: usize, objs: &[ObjView], rng: &mut Rng) -> Option<Qa> {
    if objs.is_empty() {
        return None;
    }
    let name = SCENES[scene].name;
    let idx: Vec<usize> = (0..objs.len()).collect();
    let (list, targets) = list_phrase(objs, &idx, Det::A);
    let q = match rng.below(3) {
        0 => "What is in this picture? Segment every object.".to_string(),
        1 => format!("Describe this {name} and segment each object."),
        _ => "List everything you can see and segment it.".to_string(),
    };
    Some(Qa {
        family: Family::Describe,
        question: q,
        answer: format!("This {name} has {list}."),
        targets,
    })
}

fn no_target(scene: usize, objs: &[ObjView], rng: &mut Rng) -> Option<Qa> {
    let present = present_cats(objs);
    let tempting = tempting_absent(scene, &present);
    let answer = rng.pick(&NO_TARGET_ANSWERS).to_string();
    let question = match rng.below(3) {
        0 => {
            // A function question none of whose answers is here, preferring one a
            // tempting absent object would answer.
            let attrs: Vec<Attr> = super::categories::ALL_ATTRS
                .iter()
                .copied()
                .filter(|&a| !objs.iter().any(|o| CATEGORIES[o.category].has(a)))
                .collect();
            if attrs.is_empty() {
                return None;
            }
            let pref: Vec<Attr> = attrs
                .iter()
                .copied()
                .filter(|&a| tempting.iter().take(3).any(|&c| CATEGORIES[c].has(a)))
                .collect();
            let a = if !pref.is_empty() {
                *rng.pick(&pref)
            } else {
                *rng.pick(&attrs)
            };
            rng.pick(function_text(a).0).to_string()
        }
        1 => {
            let cat = *tempting.get(rng.below(tempting.len().clamp(1, 3)))?;
            counting_question(cat, rng)
        }
        _ => {
            let cat = *tempting.get(rng.below(tempting.len().clamp(1, 3)))?;
            let name = CATEGORIES[cat].name;
            match present.first() {
                Some(&p) if rng.chance(0.5) => {
                    format!(
                        "Please segment the {name} next to the {}.",
                        CATEGORIES[p].name
                    )
                }
                _ => format!("Segment the {name} in this image."),
            }
        }
    };
    Some(Qa {
        family: Family::NoTarget,
        question,
        answer,
        targets: vec![],
    })
}
