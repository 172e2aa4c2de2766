//! Does an embedding carry its target's category?  A diagnostic for the segmentation
//! embeddings `f` (`popen probe-embeddings`): a model whose `f` is the same vector for
//! every target cannot tell its decoder which object to segment, however good the text.
//!
//! Over items `(category, group, vector)` (a group is an image: items of one image are
//! never compared, since two questions about one image often share their target):
//! - `cos_same` / `cos_diff`: the mean cosine similarity over pairs from different
//!   images with the same / a different category;
//! - `nn_accuracy`: leave-one-out nearest-neighbour accuracy (by cosine, among the items
//!   of other images; the first of tied neighbours) at naming an item's category;
//!   `chance` is the accuracy of always naming the most frequent category.

/// What [`separability`] measures.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Separability {
    /// Items `(category, group, vector)` given.
    pub items: usize,
    /// Distinct categories among the items.
    pub categories: usize,
    /// Mean cosine over cross-image pairs of the same category; `None` without such a pair.
    pub cos_same: Option<f64>,
    /// Mean cosine over cross-image pairs of different categories; `None` without such a
    /// pair.
    pub cos_diff: Option<f64>,
    /// Leave-one-out nearest-neighbour accuracy over the items that have a neighbour in
    /// another image; `None` when none has.
    pub nn_accuracy: Option<f64>,
    /// Share of the most frequent category (0 when there are no items).
    pub chance: f64,
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        d += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        d / (na.sqrt() * nb.sqrt())
    }
}

/// See the module documentation.  Vectors are compared over their common length.
pub fn separability(items: &[(String, usize, Vec<f32>)]) -> Separability {
    let n = items.len();
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for (c, _, _) in items {
        *counts.entry(c.as_str()).or_default() += 1;
    }
    let (mut same, mut n_same, mut diff, mut n_diff) = (0f64, 0u64, 0f64, 0u64);
    // best[i] = (cosine, index) of i's nearest neighbour in another group
    let mut best: Vec<Option<(f64, usize)>> = vec![None; n];
    for i in 0..n {
        for j in i + 1..n {
            if items[i].1 == items[j].1 {
                continue;
            }
            let c = cosine(&items[i].2, &items[j].2);
            if items[i].0 == items[j].0 {
                same += c;
                n_same += 1;
            } else {
                diff += c;
                n_diff += 1;
            }
            for (a, b) in [(i, j), (j, i)] {
                if best[a].is_none_or(|(bc, _)| c > bc) {
                    best[a] = Some((c, b));
                }
            }
        }
    }
    let judged: Vec<bool> = (0..n)
        .filter_map(|i| best[i].map(|(_, j)| items[i].0 == items[j].0))
        .collect();
    let mean = |s: f64, k: u64| (k > 0).then(|| s / k as f64);
    Separability {
        items: n,
        categories: counts.len(),
        cos_same: mean(same, n_same),
        cos_diff: mean(diff, n_diff),
        nn_accuracy: mean(
            judged.iter().filter(|&&h| h).count() as f64,
            judged.len() as u64,
        ),
        chance: counts.values().max().map_or(0.0, |&m| m as f64 / n as f64),
    }
}
