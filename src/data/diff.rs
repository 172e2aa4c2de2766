//! Token-level diff for the text preference data `Pt` (Sec. 3.2): which positions of
//! `y` and of its correction `yc` changed.  The matcher is Python's
//! `difflib.SequenceMatcher` without junk heuristics (`isjunk=None, autojunk=False`):
//! find the longest matching block, recurse on both sides, merge adjacent blocks.
//! As in RLHF-V's training code, matching blocks shorter than [`MIN_BLOCK`] tokens are
//! dropped; every position not covered by a kept block counts as changed.
use std::collections::HashMap;
use std::hash::Hash;

/// Matching blocks shorter than this do not count as unchanged.
pub const MIN_BLOCK: usize = 3;

/// A run `a[a_start..a_start+len] == b[b_start..b_start+len]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// Start of the run in `a`.
    pub a_start: usize,
    /// Start of the run in `b`.
    pub b_start: usize,
    /// Length of the run, in elements.
    pub len: usize,
}

/// The longest common run of `a[alo..ahi]` and `b[blo..bhi]`; among equally long runs
/// the one starting first in `a`, then first in `b` (difflib's tie rule).
fn longest_match<T: Eq + Hash>(
    a: &[T],
    b2j: &HashMap<&T, Vec<usize>>,
    alo: usize,
    ahi: usize,
    blo: usize,
    bhi: usize,
) -> Block {
    let (mut besti, mut bestj, mut bestsize) = (alo, blo, 0usize);
    // j2len[j] = length of the match ending at a[i-1], b[j] (difflib's dict, as a map).
    let mut j2len: HashMap<usize, usize> = HashMap::new();
    for (i, ai) in a.iter().enumerate().take(ahi).skip(alo) {
        let mut newj2len: HashMap<usize, usize> = HashMap::new();
        if let Some(js) = b2j.get(ai) {
            for &j in js {
                if j < blo {
                    continue;
                }
                if j >= bhi {
                    break;
                }
                let k = j
                    .checked_sub(1)
                    .and_then(|p| j2len.get(&p))
                    .copied()
                    .unwrap_or(0)
                    + 1;
                newj2len.insert(j, k);
                if k > bestsize {
                    besti = i + 1 - k;
                    bestj = j + 1 - k;
                    bestsize = k;
                }
            }
        }
        j2len = newj2len;
    }
    Block {
        a_start: besti,
        b_start: bestj,
        len: bestsize,
    }
}

/// difflib's `get_matching_blocks` (without the final zero-length sentinel).
pub fn matching_blocks<T: Eq + Hash>(a: &[T], b: &[T]) -> Vec<Block> {
    let mut b2j: HashMap<&T, Vec<usize>> = HashMap::new();
    for (j, t) in b.iter().enumerate() {
        b2j.entry(t).or_default().push(j);
    }
    let mut queue = vec![(0, a.len(), 0, b.len())];
    let mut blocks = Vec::new();
    while let Some((alo, ahi, blo, bhi)) = queue.pop() {
        let m = longest_match(a, &b2j, alo, ahi, blo, bhi);
        if m.len > 0 {
            blocks.push(m);
            if alo < m.a_start && blo < m.b_start {
                queue.push((alo, m.a_start, blo, m.b_start));
            }
            if m.a_start + m.len < ahi && m.b_start + m.len < bhi {
                queue.push((m.a_start + m.len, ahi, m.b_start + m.len, bhi));
            }
        }
    }
    blocks.sort_by_key(|b| (b.a_start, b.b_start));
    // Merge blocks that touch in both sequences.
    let mut merged: Vec<Block> = Vec::new();
    for b in blocks {
        match merged.last_mut() {
            Some(l) if l.a_start + l.len == b.a_start && l.b_start + l.len == b.b_start => {
                l.len += b.len
            }
            _ => merged.push(b),
        }
    }
    merged
}

/// Changed positions `(Ly, Lyc)`: indices of `y` and of `yc` not covered by a
/// matching block of at least [`MIN_BLOCK`] tokens.  Both lists ascend.
pub fn changed_positions<T: Eq + Hash>(y: &[T], yc: &[T]) -> (Vec<usize>, Vec<usize>) {
    changed_positions_min(y, yc, MIN_BLOCK)
}

/// [`changed_positions`] with a chosen minimum block length.
pub fn changed_positions_min<T: Eq + Hash>(
    y: &[T],
    yc: &[T],
    min_block: usize,
) -> (Vec<usize>, Vec<usize>) {
    let mut keep_a = vec![false; y.len()];
    let mut keep_b = vec![false; yc.len()];
    for b in matching_blocks(y, yc) {
        if b.len >= min_block {
            keep_a[b.a_start..b.a_start + b.len]
                .iter_mut()
                .for_each(|k| *k = true);
            keep_b[b.b_start..b.b_start + b.len]
                .iter_mut()
                .for_each(|k| *k = true);
        }
    }
    let pick = |k: Vec<bool>| {
        k.iter()
            .enumerate()
            .filter(|(_, &k)| !k)
            .map(|(i, _)| i)
            .collect()
    };
    (pick(keep_a), pick(keep_b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<&str> {
        s.split_whitespace().collect()
    }
    fn blocks(a: &str, b: &str) -> Vec<(usize, usize, usize)> {
        matching_blocks(&w(a), &w(b))
            .iter()
            .map(|b| (b.a_start, b.b_start, b.len))
            .collect()
    }

    // Pairs worked by hand (and equal to difflib.SequenceMatcher(None, a, b,
    // autojunk=False).get_matching_blocks() without its sentinel).
    #[test]
    fn matching_blocks_hand_worked() {
        assert_eq!(
            blocks("a b c d e f g", "a b x d e f g"),
            vec![(0, 0, 2), (3, 3, 4)]
        );
        assert_eq!(
            blocks("the cat sat on the mat", "the cat sat on a mat today"),
            vec![(0, 0, 4), (5, 5, 1)]
        );
        // Only one of two crossing runs can match; the longer wins.
        assert_eq!(blocks("x y z w a b c", "a b c x y z w"), vec![(0, 3, 4)]);
        // Ties go to the earliest run in `a`: the longest run is a[1..6] = b[0..5].
        assert_eq!(blocks("a a a b b b", "a a b b b b"), vec![(1, 0, 5)]);
        assert_eq!(blocks("", "a b"), vec![]);
        assert_eq!(blocks("A B C", "A B C"), vec![(0, 0, 3)]);
    }

    #[test]
    fn short_blocks_count_as_changed() {
        let (a, b) = (w("a b c d e f g"), w("a b x d e f g"));
        // "a b" matches but is shorter than 3 tokens, so it counts as changed.
        assert_eq!(changed_positions(&a, &b), (vec![0, 1, 2], vec![0, 1, 2]));
        let (a, b) = (w("the cat sat on the mat"), w("the cat sat on a mat today"));
        assert_eq!(changed_positions(&a, &b), (vec![4, 5], vec![4, 5, 6]));
        let (a, b) = (w("p q r s t u v"), w("p q r X s t u v"));
        assert_eq!(changed_positions(&a, &b), (vec![], vec![3]));
        assert_eq!(
            changed_positions_min(&w("a b c d e f g"), &w("a b x d e f g"), 1),
            (vec![2], vec![2])
        );
        let same = w("A B C D E F");
        assert_eq!(changed_positions(&same, &same), (vec![], vec![]));
    }

    #[test]
    fn generic_over_token_type() {
        let a: Vec<u32> = vec![5, 6, 7, 8, 9, 10];
        let b: Vec<u32> = vec![5, 6, 7, 99, 8, 9, 10];
        assert_eq!(changed_positions(&a, &b), (vec![], vec![3]));
    }
}
