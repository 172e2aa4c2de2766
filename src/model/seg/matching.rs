//! Instance matching for the mask loss (ours; `[loss] instance_matching`, off by default
//! as in PixelLM, which scores the `n`-th mask against the `n`-th ground truth).
//!
//! "There are three apples `<seg> <seg> <seg>`": the three groups differ only by their
//! place in the answer, so in-order scoring asks the model to rank the apples the way
//! the data lists them (the world: left to right by centroid).  With matching, the
//! targets of one category in one answer form a set, and the masks of that set's
//! `<seg>`s are scored against the permutation of its targets with the least loss
//! (`bce·BCE + dice·Dice`, the step's own weights), as DETR scores its queries.  The
//! permutation is chosen, then held fixed for the backward, so the gradient is the
//! in-order one with the targets permuted.  A target of another category never takes
//! part: the answer's text names which category each `<seg>` is.  `popen eval` matches
//! predictions to ground truth by maximum IoU over all targets, so the order was never
//! scored there.
use crate::error::{Error, Result};
use pathfinding::kuhn_munkres::kuhn_munkres_min;
use pathfinding::matrix::Matrix;

/// The sets of interchangeable targets of one answer: for each category named by at
/// least two targets, their indices, sets in order of first appearance.  An empty
/// name (category unknown) is never matched.
pub fn alike_sets(categories: &[String]) -> Vec<Vec<usize>> {
    let mut sets: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, c) in categories.iter().enumerate() {
        if c.is_empty() {
            continue;
        }
        match sets.iter_mut().find(|s| s.0 == c) {
            Some(s) => s.1.push(i),
            None => sets.push((c, vec![i])),
        }
    }
    sets.into_iter()
        .map(|s| s.1)
        .filter(|s| s.len() > 1)
        .collect()
}

/// Fixed-point scale of a loss in [`min_cost_assignment`]: losses that differ by more
/// than 10⁻⁹ stay apart.
const COST_SCALE: f64 = 1e9;

/// The assignment `p` (prediction `i` takes target `p[i]`) of least `Σ cost[i·n + p[i]]`
/// for an `n × n` cost matrix.  Of equal-cost assignments the one that moves the fewest
/// targets wins, so equal losses keep the data's order.  A non-finite cost is an error
/// (a NaN loss must stop the step, not pick an arbitrary order).
pub fn min_cost_assignment(cost: &[f64], n: usize) -> Result<Vec<usize>> {
    let op = "min_cost_assignment";
    crate::error::check_len(op, "cost (n·n)", cost.len(), n * n)?;
    if let Some(bad) = cost.iter().find(|c| !c.is_finite()) {
        return Err(Error::arg(op, format!("a mask loss of {bad}")));
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let lo = cost.iter().copied().fold(f64::INFINITY, f64::min);
    // doubled, plus one for every target moved off its place: the tie-break
    let w: Vec<i64> = cost
        .iter()
        .enumerate()
        .map(|(k, &c)| 2 * ((c - lo) * COST_SCALE).round() as i64 + i64::from(k / n != k % n))
        .collect();
    let m = Matrix::from_vec(n, n, w).map_err(|e| Error::arg(op, e.to_string()))?;
    Ok(kuhn_munkres_min(&m).1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn sets_are_the_categories_named_twice_or_more() {
        let c = names(&["apple", "lamp", "apple", "", "", "cup", "lamp", "apple"]);
        assert_eq!(alike_sets(&c), vec![vec![0, 2, 7], vec![1, 6]]);
        assert!(alike_sets(&names(&["a", "b", ""])).is_empty());
        assert!(alike_sets(&[]).is_empty());
    }

    /// Every permutation of `n` (Heap's algorithm is not needed at these sizes).
    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![Vec::new()];
        }
        let mut out = Vec::new();
        for p in permutations(n - 1) {
            for at in 0..n {
                let mut q = p.clone();
                q.insert(at, n - 1);
                out.push(q);
            }
        }
        out
    }

    #[test]
    fn the_assignment_is_the_cheapest_permutation() {
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for n in 1..=5 {
            for _ in 0..20 {
                let cost: Vec<f64> = (0..n * n).map(|_| 3.0 * next()).collect();
                let p = min_cost_assignment(&cost, n).unwrap();
                let total = |p: &[usize]| {
                    p.iter()
                        .enumerate()
                        .map(|(i, &j)| cost[i * n + j])
                        .sum::<f64>()
                };
                let best = permutations(n)
                    .iter()
                    .map(|q| total(q))
                    .fold(f64::INFINITY, f64::min);
                let mut seen = p.clone();
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "not a permutation: {p:?}");
                assert!(
                    (total(&p) - best).abs() < 1e-8,
                    "n {n}: {} vs {best}",
                    total(&p)
                );
            }
        }
    }

    #[test]
    fn equal_losses_keep_the_order_and_a_swap_is_found() {
        assert_eq!(min_cost_assignment(&[1.0; 9], 3).unwrap(), vec![0, 1, 2]);
        // prediction 0 fits target 1 and prediction 1 target 0
        let c = [0.9, 0.1, 0.2, 0.8];
        assert_eq!(min_cost_assignment(&c, 2).unwrap(), vec![1, 0]);
        assert!(min_cost_assignment(&c, 3).is_err());
        assert!(min_cost_assignment(&[0.1, f64::NAN, 0.2, 0.3], 2).is_err());
        assert_eq!(min_cost_assignment(&[], 0).unwrap(), Vec::<usize>::new());
    }
}
