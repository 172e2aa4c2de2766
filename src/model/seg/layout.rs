//! Where a training batch's token positions sit: the examples grouped by length, each
//! group padded to its own longest and the groups laid end to end.
//!
//! A batch padded to its longest example wastes the LLM's work on the padding: on the
//! world's stage 1, whose re-read examples carry three answers in their prompt, a batch
//! of 16 was 1.63 × its real tokens.  The LLM runs once per group instead
//! ([`crate::model::seg::SegModel::forward_pass`]); a group costs a fixed overhead (one
//! more forward and backward of every layer), so groups are chosen to minimize
//! `padded positions + overhead × groups` ([`length_groups`]).  Examples do not interact
//! in the LLM (causal attention, padding on the right, no batch statistics), so the
//! grouping changes no example's result, only the order in which the weight gradients
//! sum.

/// The cost of one more group, in padded positions: what one more forward and backward
/// of every LLM layer costs beside the positions it processes (measured on the world's
/// stage 1, see [`crate::model::seg::SegModel::forward_pass`]).
pub const GROUP_OVERHEAD: usize = 64;

/// Splits examples of lengths `lens` into groups that minimize
/// `Σ_g |g| · max_len(g) + overhead · (number of groups)`.  Each group holds examples of
/// consecutive length (in the order of length, ties by index); groups come shortest first
/// and list their examples in index order.  Among splits of equal cost the one with the
/// fewest groups wins.  Empty `lens` gives no group.
pub fn length_groups(lens: &[usize], overhead: usize) -> Vec<Vec<usize>> {
    let n = lens.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (lens[i], i));
    // best[j]: the least cost of the first j examples in length order; from[j]: where
    // the last group of that split starts
    let mut best = vec![0usize; n + 1];
    let mut from = vec![0usize; n + 1];
    for j in 1..=n {
        let longest = lens[order[j - 1]];
        let (mut c, mut at) = (usize::MAX, 0);
        for (i, &b) in best[..j].iter().enumerate() {
            let ci = b + (j - i) * longest + overhead;
            if ci < c {
                (c, at) = (ci, i);
            }
        }
        (best[j], from[j]) = (c, at);
    }
    let mut groups = Vec::new();
    let mut j = n;
    while j > 0 {
        let i = from[j];
        let mut g = order[i..j].to_vec();
        g.sort_unstable();
        groups.push(g);
        j = i;
    }
    groups.reverse();
    groups
}

/// One group: its examples (batch indices, in order), the length they are padded to
/// and the pass position of its first slot.
#[derive(Clone, Debug)]
pub(crate) struct Group {
    pub members: Vec<usize>,
    pub t: usize,
    pub off: usize,
}

impl Group {
    /// The pass positions of the group's examples.
    pub fn span(&self) -> std::ops::Range<usize> {
        self.off..self.off + self.members.len() * self.t
    }
}

/// The positions of one pass: group by group, example by example, `t` per example.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub groups: Vec<Group>,
    /// per example: (group, slot within it)
    at: Vec<(usize, usize)>,
    /// every position of the pass, padding included
    pub len: usize,
}

impl Layout {
    /// The layout of examples of lengths `lens`, grouped by [`length_groups`].
    pub fn new(lens: &[usize], overhead: usize) -> Self {
        let mut at = vec![(0, 0); lens.len()];
        let mut off = 0;
        let groups = length_groups(lens, overhead)
            .into_iter()
            .enumerate()
            .map(|(gi, members)| {
                let t = members.iter().map(|&r| lens[r]).max().unwrap_or(0);
                for (s, &r) in members.iter().enumerate() {
                    at[r] = (gi, s);
                }
                let g = Group { t, off, members };
                off += g.members.len() * t;
                g
            })
            .collect();
        Self {
            groups,
            at,
            len: off,
        }
    }

    /// The pass position of example `r`'s token `p`.
    pub fn pos(&self, r: usize, p: usize) -> usize {
        let (g, s) = self.at[r];
        let g = &self.groups[g];
        g.off + s * g.t + p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(lens: &[usize], groups: &[Vec<usize>], overhead: usize) -> usize {
        groups
            .iter()
            .map(|g| g.len() * g.iter().map(|&i| lens[i]).max().unwrap() + overhead)
            .sum()
    }

    /// Every split of the length order into consecutive runs, by brute force.
    fn brute(lens: &[usize], overhead: usize) -> usize {
        let mut order: Vec<usize> = (0..lens.len()).collect();
        order.sort_by_key(|&i| (lens[i], i));
        let n = lens.len();
        (0u32..1 << n.saturating_sub(1))
            .map(|cuts| {
                let mut groups = vec![vec![order[0]]];
                for (j, &o) in order.iter().enumerate().skip(1) {
                    if cuts >> (j - 1) & 1 == 1 {
                        groups.push(Vec::new());
                    }
                    groups.last_mut().unwrap().push(o);
                }
                cost(lens, &groups, overhead)
            })
            .min()
            .unwrap()
    }

    #[test]
    fn the_groups_cover_the_batch_at_the_least_cost() {
        let mut rng = crate::nn::Rng::new(3);
        for case in 0..200 {
            let n = 1 + case % 9;
            let lens: Vec<usize> = (0..n)
                .map(|_| 10 + (rng.uniform() * 200.0) as usize)
                .collect();
            let overhead = [0, 1, 64, 1000][case % 4];
            let groups = length_groups(&lens, overhead);
            let mut all: Vec<usize> = groups.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..n).collect::<Vec<_>>(), "{lens:?}");
            assert_eq!(
                cost(&lens, &groups, overhead),
                brute(&lens, overhead),
                "{lens:?}"
            );
            for g in &groups {
                assert!(g.windows(2).all(|w| w[0] < w[1]), "{groups:?}");
            }
        }
    }

    #[test]
    fn equal_lengths_or_a_large_overhead_keep_one_group() {
        assert_eq!(length_groups(&[7, 7, 7], 0), vec![vec![0, 1, 2]]);
        assert_eq!(length_groups(&[10, 200, 12], 10_000), vec![vec![0, 1, 2]]);
        assert_eq!(
            length_groups(&[10, 200, 12], 0),
            vec![vec![0], vec![2], vec![1]]
        );
        assert_eq!(length_groups(&[10, 200, 12], 5), vec![vec![0, 2], vec![1]]);
        assert!(length_groups(&[], 64).is_empty());
    }

    #[test]
    fn positions_are_distinct_and_fill_the_layout() {
        let lens = [30, 90, 31, 88, 5];
        let l = Layout::new(&lens, 16);
        assert!(l.groups.len() > 1);
        let mut seen = vec![false; l.len];
        for (r, &n) in lens.iter().enumerate() {
            for p in 0..n {
                let q = l.pos(r, p);
                assert!(!seen[q]);
                seen[q] = true;
            }
        }
        let padded: usize = l.groups.iter().map(|g| g.span().len()).sum();
        assert_eq!(padded, l.len);
        assert!(l.len < lens.len() * 90);
    }
}
