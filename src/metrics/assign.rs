//! The deterministic maximum-IoU assignment of the MUSE protocol.
//!
//! Weights are integers (`⌊SCALE · I / U⌋`) so that Kuhn–Munkres is exact; ties between
//! maximizing assignments are broken lexicographically (prediction 0 takes the
//! lowest-indexed ground truth it can, "unmatched" last, then prediction 1, ...), so the
//! result depends on the weight matrix alone, not on the solver's internals.
use pathfinding::kuhn_munkres::kuhn_munkres;
use pathfinding::matrix::Matrix;

/// Fixed-point scale of IoU weights: distinct IoUs of masks with fewer than 10⁶ pixels
/// differ by at least 10⁻¹², so they stay distinct after scaling.
pub const IOU_SCALE: u64 = 1_000_000_000_000;

/// `⌊IOU_SCALE · inter / union⌋`, and `IOU_SCALE` for `union == 0` (empty vs empty).
pub fn iou_weight(inter: u64, union: u64) -> i64 {
    if union == 0 {
        return IOU_SCALE as i64;
    }
    (inter.min(union) as u128 * IOU_SCALE as u128 / union as u128) as i64
}

/// Optimum of the sub-problem on `rows` × `cols` of `w` (P, G), row-major, padded with
/// zeros to a square.
fn best(w: &[i64], g: usize, rows: &[usize], cols: &[usize]) -> i128 {
    if rows.is_empty() || cols.is_empty() {
        return 0;
    }
    let n = rows.len().max(cols.len());
    let mut data = vec![0i128; n * n];
    for (i, &r) in rows.iter().enumerate() {
        for (j, &c) in cols.iter().enumerate() {
            data[i * n + j] = w[r * g + c] as i128;
        }
    }
    // n ≥ 1 and data.len() == n·n, so from_vec cannot fail
    let m = Matrix::from_vec(n, n, data).expect("square matrix");
    kuhn_munkres(&m).0
}

/// The assignment when no two positive entries share a row or a column (masks that
/// each overlap at most one mask of the other side, the common case): every maximizing
/// assignment takes all of them — leaving one out loses its weight and nothing can
/// replace it — so the answer is unique and needs no solver.  `None` otherwise.
fn disjoint_pairs(w: &[i64], p: usize, g: usize) -> Option<Vec<Option<usize>>> {
    let mut out = vec![None; p];
    // at most a few dozen columns per question: a linear scan beats a set
    let mut col_used = vec![false; g];
    for (r, row) in w.chunks_exact(g).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            if x > 0 {
                if out[r].is_some() || col_used[c] {
                    return None;
                }
                out[r] = Some(c);
                col_used[c] = true;
            }
        }
    }
    Some(out)
}

/// The matched pairs of a (P, G) weight matrix `w` (row-major, entries ≥ 0): for each
/// prediction, `Some(ground truth)` when it is assigned with a positive weight, `None`
/// otherwise.  Maximizes `Σ w`; ties broken lexicographically as in the module docs.
///
/// Cost: one Kuhn–Munkres solve per positive entry tried, `O(n³)` each, `n = max(P, G)`.
#[track_caller]
pub fn assign(w: &[i64], p: usize, g: usize) -> Vec<Option<usize>> {
    assert_eq!(w.len(), p * g, "assign: weight matrix is not P×G");
    assert!(w.iter().all(|&x| x >= 0), "assign: negative weight");
    let mut out = vec![None; p];
    if p == 0 || g == 0 || w.iter().all(|&x| x == 0) {
        return out;
    }
    if let Some(m) = disjoint_pairs(w, p, g) {
        return m;
    }
    if p == 1 || g == 1 {
        // one side has a single mask: the optimum is the largest weight, and the tie
        // rule gives it to the lowest index (column for p = 1, row for g = 1)
        let best = *w.iter().max().expect("w is not empty");
        let k = w.iter().position(|&x| x == best).expect("max is in w");
        let (r, c) = if p == 1 { (0, k) } else { (k, 0) };
        out[r] = Some(c);
        return out;
    }
    let all_rows: Vec<usize> = (0..p).collect();
    let mut cols: Vec<usize> = (0..g).collect();
    let target = best(w, g, &all_rows, &cols);
    let mut fixed: i128 = 0;
    for r in 0..p {
        let rest = &all_rows[r + 1..];
        // An optimum consistent with the choices so far exists (invariant).  Take the
        // lowest column that keeps it; when none does, every such optimum leaves `r`
        // with weight 0, i.e. unmatched.
        let mut chosen = None;
        for (k, &c) in cols.iter().enumerate() {
            let wc = w[r * g + c] as i128;
            if wc == 0 {
                continue;
            }
            let others: Vec<usize> = cols
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != k)
                .map(|(_, &x)| x)
                .collect();
            if fixed + wc + best(w, g, rest, &others) == target {
                chosen = Some((k, c, wc));
                break;
            }
        }
        if let Some((k, c, wc)) = chosen {
            fixed += wc;
            cols.remove(k);
            out[r] = Some(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(w: &[i64], g: usize, a: &[Option<usize>]) -> i64 {
        a.iter()
            .enumerate()
            .filter_map(|(r, c)| c.map(|c| w[r * g + c]))
            .sum()
    }

    #[test]
    fn weight_is_exact_floor() {
        assert_eq!(iou_weight(1, 3), 333_333_333_333);
        assert_eq!(iou_weight(2, 3), 666_666_666_666);
        assert_eq!(iou_weight(0, 0), IOU_SCALE as i64);
        assert_eq!(iou_weight(5, 5), IOU_SCALE as i64);
        // distinct IoUs near the largest union of a 480×640 image stay distinct
        let u = 480 * 640;
        assert_ne!(iou_weight(u - 1, u), iou_weight(u - 2, u - 1));
    }

    #[test]
    fn beats_greedy() {
        // greedy takes (0,0)=9 then (1,1)=1: 10; the optimum is 8+8 = 16
        let w = [9, 8, 8, 1];
        assert_eq!(assign(&w, 2, 2), vec![Some(1), Some(0)]);
    }

    #[test]
    fn ties_are_lexicographic() {
        // every pairing totals 2: prediction 0 takes gt 0
        let w = [1, 1, 1, 1];
        assert_eq!(assign(&w, 2, 2), vec![Some(0), Some(1)]);
        // (0,1)+(1,0) = 10 ties (0,0)+(1,1) = 10 → prediction 0 takes gt 0
        let w = [4, 5, 5, 6];
        assert_eq!(assign(&w, 2, 2), vec![Some(0), Some(1)]);
        // prediction 0 could take gt 0 but only optimally when it takes gt 1
        let w = [1, 3, 3, 0];
        assert_eq!(assign(&w, 2, 2), vec![Some(1), Some(0)]);
    }

    #[test]
    fn zero_weights_are_unmatched_and_rectangles_work() {
        let w = [0, 0, 0, 7, 0, 0];
        assert_eq!(assign(&w, 2, 3), vec![None, Some(0)]);
        // 3 predictions, 1 ground truth: the best prediction wins, ties to the first
        let w = [2, 5, 5];
        assert_eq!(assign(&w, 3, 1), vec![None, Some(0), None]);
        assert_eq!(assign(&[], 0, 4), Vec::<Option<usize>>::new());
        assert_eq!(assign(&[], 3, 0), vec![None; 3]);
    }

    #[test]
    fn matches_brute_force_on_random_matrices() {
        // tiny LCG so the test needs no RNG crate; few distinct values force many ties
        let mut s: u64 = 0x9e3779b97f4a7c15;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as i64
        };
        for case in 0..300 {
            let p = (case % 4) + 1;
            let g = (case / 4 % 4) + 1;
            let w: Vec<i64> = (0..p * g).map(|_| next() % 4).collect();
            let a = assign(&w, p, g);
            // brute force over all partial injections, lexicographic on (col or g)
            let mut best_key: Option<(i64, Vec<usize>)> = None;
            let mut cur = vec![g; p];
            fn rec(
                r: usize,
                p: usize,
                g: usize,
                w: &[i64],
                used: &mut Vec<bool>,
                cur: &mut Vec<usize>,
                best: &mut Option<(i64, Vec<usize>)>,
            ) {
                if r == p {
                    let t: i64 = (0..p)
                        .filter(|&i| cur[i] < g)
                        .map(|i| w[i * g + cur[i]])
                        .sum();
                    // unmatched or zero-weight pairs are written as g
                    let key: Vec<usize> = (0..p)
                        .map(|i| {
                            if cur[i] < g && w[i * g + cur[i]] > 0 {
                                cur[i]
                            } else {
                                g
                            }
                        })
                        .collect();
                    let better = match best {
                        None => true,
                        Some((bt, bk)) => t > *bt || (t == *bt && key < *bk),
                    };
                    if better {
                        *best = Some((t, key));
                    }
                    return;
                }
                for c in 0..=g {
                    if c < g && used[c] {
                        continue;
                    }
                    if c < g {
                        used[c] = true;
                    }
                    cur[r] = c;
                    rec(r + 1, p, g, w, used, cur, best);
                    if c < g {
                        used[c] = false;
                    }
                }
            }
            rec(0, p, g, &w, &mut vec![false; g], &mut cur, &mut best_key);
            let (bt, bk) = best_key.unwrap();
            let got: Vec<usize> = a.iter().map(|c| c.unwrap_or(g)).collect();
            assert_eq!(total(&w, g, &a), bt, "case {case} w {w:?}");
            assert_eq!(got, bk, "case {case} w {w:?}");
        }
    }
}
