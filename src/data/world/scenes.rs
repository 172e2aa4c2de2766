//! Scene types and their co-occurrence priors.  A scene draws each of its categories
//! with its own probability, then applies the pair rules in order: "if A is present,
//! B is present with probability p" (overriding B's own draw).  Each rule target is the
//! target of one rule only and is never a source of an earlier rule, so the rule's `p`
//! is exactly P(B | A) before placement (placement failures drop a few objects; the
//! world test checks the measured value stays near `p`).
use super::categories::by_name;
use super::rng::Rng;

/// One scene type.
#[derive(Debug)]
pub struct SceneKind {
    /// The scene type's name ("kitchen table", "desk").
    pub name: &'static str,
    /// `(category, probability of presence)`
    pub items: &'static [(&'static str, f32)],
    /// Wall colour (RGB).
    pub wall: [u8; 3],
    /// Floor or table colour (RGB), textured by `floor_tex`.
    pub floor: [u8; 3],
    /// Floor texture: 0 wood grain, 1 carpet noise, 2 tiles.
    pub floor_tex: u8,
    /// Horizon (wall/floor split) as a fraction of the height.
    pub horizon: f32,
}

/// A co-occurrence prior: if `source` is present, `target` is present with `p`.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// Category name whose presence triggers the rule.
    pub source: &'static str,
    /// Category name made present (or absent) by the rule, overriding its own draw.
    pub target: &'static str,
    /// P(target | source), before placement.
    pub p: f32,
}

/// The pair priors, applied in this order in every scene type.
pub static RULES: [Rule; 9] = [
    Rule {
        source: "knife",
        target: "fork",
        p: 0.85,
    },
    Rule {
        source: "fork",
        target: "plate",
        p: 0.75,
    },
    Rule {
        source: "laptop",
        target: "mouse",
        p: 0.85,
    },
    Rule {
        source: "tv",
        target: "couch",
        p: 0.8,
    },
    Rule {
        source: "couch",
        target: "pillow",
        p: 0.7,
    },
    Rule {
        source: "violin",
        target: "guitar",
        p: 0.6,
    },
    Rule {
        source: "cake",
        target: "candle",
        p: 0.7,
    },
    Rule {
        source: "keyboard",
        target: "lamp",
        p: 0.6,
    },
    Rule {
        source: "cup",
        target: "spoon",
        p: 0.6,
    },
];

/// The scene types.
pub static SCENES: [SceneKind; 6] = [
    SceneKind {
        name: "kitchen table",
        items: &[
            ("knife", 0.55),
            ("plate", 0.3),
            ("bowl", 0.3),
            ("cup", 0.45),
            ("bottle", 0.3),
            ("apple", 0.35),
            ("banana", 0.3),
            ("orange", 0.3),
            ("bread", 0.25),
            ("cake", 0.2),
            ("carrot", 0.15),
            ("broccoli", 0.15),
            ("vase", 0.1),
            ("fork", 0.15),
            ("spoon", 0.1),
        ],
        wall: [225, 215, 190],
        floor: [150, 100, 60],
        floor_tex: 0,
        horizon: 0.3,
    },
    SceneKind {
        name: "desk",
        items: &[
            ("laptop", 0.6),
            ("keyboard", 0.3),
            ("book", 0.5),
            ("lamp", 0.25),
            ("phone", 0.35),
            ("cup", 0.35),
            ("clock", 0.2),
            ("plant", 0.2),
            ("apple", 0.15),
            ("mouse", 0.1),
            ("bottle", 0.15),
        ],
        wall: [200, 210, 220],
        floor: [110, 75, 45],
        floor_tex: 0,
        horizon: 0.4,
    },
    SceneKind {
        name: "living room",
        items: &[
            ("tv", 0.5),
            ("couch", 0.35),
            ("chair", 0.3),
            ("cat", 0.35),
            ("dog", 0.25),
            ("lamp", 0.3),
            ("plant", 0.35),
            ("clock", 0.3),
            ("book", 0.2),
            ("vase", 0.2),
            ("phone", 0.15),
            ("pillow", 0.15),
        ],
        wall: [215, 200, 170],
        floor: [120, 60, 55],
        floor_tex: 1,
        horizon: 0.45,
    },
    SceneKind {
        name: "music corner",
        items: &[
            ("violin", 0.55),
            ("guitar", 0.25),
            ("drum", 0.4),
            ("chair", 0.45),
            ("lamp", 0.3),
            ("book", 0.3),
            ("candle", 0.2),
            ("clock", 0.25),
            ("cat", 0.15),
            ("plant", 0.2),
        ],
        wall: [180, 150, 120],
        floor: [90, 60, 40],
        floor_tex: 0,
        horizon: 0.5,
    },
    SceneKind {
        name: "kitchen counter",
        items: &[
            ("bowl", 0.45),
            ("apple", 0.45),
            ("banana", 0.4),
            ("orange", 0.4),
            ("carrot", 0.35),
            ("broccoli", 0.35),
            ("knife", 0.35),
            ("bottle", 0.3),
            ("bread", 0.3),
            ("cup", 0.25),
            ("plant", 0.15),
        ],
        wall: [235, 235, 230],
        floor: [170, 170, 175],
        floor_tex: 2,
        horizon: 0.35,
    },
    SceneKind {
        name: "bedroom",
        items: &[
            ("pillow", 0.6),
            ("lamp", 0.45),
            ("book", 0.45),
            ("clock", 0.35),
            ("phone", 0.35),
            ("cat", 0.25),
            ("candle", 0.25),
            ("plant", 0.2),
            ("cup", 0.2),
            ("dog", 0.15),
            ("chair", 0.15),
        ],
        wall: [205, 195, 225],
        floor: [160, 130, 100],
        floor_tex: 1,
        horizon: 0.5,
    },
];

/// Scene type id by name.
pub fn scene_by_name(name: &str) -> Option<usize> {
    SCENES.iter().position(|s| s.name == name)
}

/// Which categories (ids) a scene of type `kind` holds, before placement: the
/// independent draws followed by the pair rules.
pub fn draw_categories(kind: usize, rng: &mut Rng) -> Vec<usize> {
    let scene = &SCENES[kind];
    let n = super::categories::CATEGORIES.len();
    let mut present = vec![false; n];
    for &(name, p) in scene.items {
        let id = by_name(name).expect("scene item names a category");
        present[id] = rng.chance(p);
    }
    for r in RULES.iter() {
        let s = by_name(r.source).expect("rule source names a category");
        let t = by_name(r.target).expect("rule target names a category");
        // Draw always, so the random stream does not depend on which rules fire.
        let hit = rng.chance(r.p);
        if present[s] {
            present[t] = hit;
        }
    }
    if !present.iter().any(|&p| p) {
        // An empty scene teaches nothing: fall back to the scene's most likely item.
        let best = scene
            .items
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .expect("scene has items");
        present[by_name(best.0).expect("category")] = true;
    }
    (0..n).filter(|&i| present[i]).collect()
}

/// Categories that co-occur with something present in the scene but are absent: the
/// objects a model that learned the priors would hallucinate.  Most tempting first.
pub fn tempting_absent(kind: usize, present: &[usize]) -> Vec<usize> {
    let mut out: Vec<(f32, usize)> = Vec::new();
    let is_present = |id: usize| present.contains(&id);
    for r in RULES.iter() {
        let s = by_name(r.source).expect("category");
        let t = by_name(r.target).expect("category");
        if is_present(s) && !is_present(t) {
            out.push((1.0 + r.p, t));
        }
        if is_present(t) && !is_present(s) {
            out.push((0.5 + r.p, s));
        }
    }
    for &(name, p) in SCENES[kind].items {
        let id = by_name(name).expect("category");
        if !is_present(id) {
            out.push((p, id));
        }
    }
    out.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut seen = Vec::new();
    for (_, id) in out {
        if !seen.contains(&id) {
            seen.push(id);
        }
    }
    seen
}

/// [`tempting_absent`] when only the objects are known (a data file, not a scene): the
/// scene type is the one whose items include the most of them (ties: the first).
pub fn tempting_absent_for(present: &[usize]) -> Vec<usize> {
    let covered = |k: usize| {
        SCENES[k]
            .items
            .iter()
            .filter(|(n, _)| by_name(n).is_some_and(|id| present.contains(&id)))
            .count()
    };
    let kind = (0..SCENES.len())
        .max_by_key(|&k| (covered(k), std::cmp::Reverse(k)))
        .unwrap_or(0);
    tempting_absent(kind, present)
}
