//! Greedy decoding checked against drafts: when the answer being decoded is likely to
//! repeat text the caller already has (the ensemble's refined answer `ỹ` mostly
//! re-says one of its K samples), the continuation a draft proposes is fed in one
//! forward and kept as far as greedy decoding would have produced it.
//!
//! Each round feeds `[t, d_1 … d_m]`: `t`, the token greedy decoding just chose, and the
//! draft tokens that follow `t`'s best match in the drafts (the sample position whose
//! preceding tokens agree longest with the answer so far).  Row `j` of that forward
//! predicts the token after `d_j`; `d_{j+1}` is kept while it is that row's argmax, so
//! the kept tokens are exactly those greedy decoding would choose one at a time, and
//! the first row that disagrees gives the next `t`.  The KV cache is cut back to the
//! kept tokens.  Same ids, log-probabilities and hidden rows as [`SegModel::decode`]
//! with greedy sampling, up to the rounding of a many-row forward against one-row ones;
//! a forward per round instead of per token.
use super::hidden::{HiddenRow, HiddenRows};
use super::infer::{last_row_f32, rows_f32, Decoded, Prefill};
use super::model::SegModel;
use super::prompt::SegTokenizer;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::{sample_token, Rng, SamplingCfg};
use num_traits::Float;

/// Draft tokens fed per round at most.
pub const MAX_DRAFT: usize = 16;

/// The continuation the drafts propose after `answer` (whose last token was just
/// chosen): in each draft, every position `p` whose token `draft[p − 1]` is the
/// answer's last token, scored by how many tokens before it also agree with the answer;
/// the longest agreement wins (the first draft and position among equals), and its
/// draft's tokens from `p` on, at most `max` of them, are proposed.  Empty when no
/// draft holds the last token.
pub fn propose<'a>(answer: &[u32], drafts: &[&'a [u32]], max: usize) -> &'a [u32] {
    let Some(&last) = answer.last() else {
        return &[];
    };
    let mut best: Option<(usize, &'a [u32])> = None;
    for d in drafts {
        for p in 1..=d.len() {
            if d[p - 1] != last {
                continue;
            }
            let agree = answer
                .iter()
                .rev()
                .zip(d[..p].iter().rev())
                .take_while(|(a, b)| a == b)
                .count();
            if best.is_none_or(|(n, _)| agree > n) {
                best = Some((agree, &d[p..]));
            }
        }
    }
    best.map_or(&[], |(_, rest)| &rest[..rest.len().min(max)])
}

impl<F: Float, B: Backend<F>> SegModel<F, B> {
    /// Greedy decoding after `pre` (batch 1) with draft checking (see the module): the
    /// ids (EOS included when generated), each one's log-probability and the hidden row
    /// that predicted it, as [`SegModel::decode`] gives them with greedy sampling.
    /// `bias`, when given, covers every key already in the cache and is 0 on the
    /// generated keys.
    pub fn decode_drafted(
        &self,
        tok: &SegTokenizer,
        pre: Prefill<B::Buf>,
        mut bias: Option<Vec<f32>>,
        drafts: &[&[u32]],
    ) -> Result<Decoded<B::Buf>> {
        let be = &self.llava.be;
        let lm = &self.llava.language_model;
        let (hdim, v) = (
            self.llava.cfg.text.hidden_size,
            self.llava.cfg.text.vocab_size,
        );
        let ctx = lm.cfg.max_position_embeddings;
        let (eos, greedy) = (tok.tok.eos, SamplingCfg::greedy());
        let mut rng = Rng::new(0);
        let Prefill {
            mut cache,
            logits,
            hidden,
        } = pre;
        if cache.b != 1 {
            return Err(Error::shape(
                "SegModel::decode_drafted",
                format!("a cache of batch {}, not 1", cache.b),
            ));
        }
        if let Some(b) = &bias {
            crate::error::check_len("SegModel::decode_drafted", "bias", b.len(), cache.len())?;
        }
        let n = be.len(&hidden) / hdim;
        if n == 0 || be.len(&logits) < v {
            return Err(Error::shape(
                "SegModel::decode_drafted",
                format!(
                    "a prefill of {} hidden and {} logit values (rows of {hdim} and {v})",
                    be.len(&hidden),
                    be.len(&logits)
                ),
            ));
        }
        let mut logits = last_row_f32(be, &logits, v);
        let mut hidden = HiddenRow::one(hidden, n - 1);
        let mut out = Decoded {
            ids: Vec::new(),
            logps: Vec::new(),
            rows: HiddenRows::default(),
        };
        while out.ids.len() < self.cfg.max_new_tokens {
            let (t, lp) = sample_token(&logits, &greedy, &mut rng)?;
            out.ids.push(t);
            out.logps.push(lp);
            out.rows.push(hidden);
            if t == eos || cache.len() + 1 >= ctx {
                break;
            }
            // fed: t and m draft tokens; each kept one is generated, and the cache must
            // stay within the context as it does one token at a time
            let room = (self.cfg.max_new_tokens - out.ids.len()).min(ctx - 2 - cache.len());
            let draft = propose(&out.ids, drafts, room.min(MAX_DRAFT));
            let fed: Vec<u32> = std::iter::once(t).chain(draft.iter().copied()).collect();
            let len0 = cache.len();
            let bias_buf = bias.as_ref().map(|b| {
                let all: Vec<F> = b
                    .iter()
                    .map(|&x| F::from(x).unwrap_or_else(F::zero))
                    .chain(std::iter::repeat_n(F::zero(), fed.len()))
                    .collect();
                be.from_slice(&all)
            });
            let (lg, acts) = lm.forward_embeds(
                lm.embed(&fed)?,
                1,
                fed.len(),
                None,
                bias_buf.as_ref(),
                Some(&mut cache),
            )?;
            let rows = rows_f32(be, &lg, &(0..fed.len()).collect::<Vec<_>>(), v);
            let fed_rows = HiddenRow::each_of(be, acts.hidden, fed.len(), hdim)?;
            // row j predicts what follows fed[j]; keep draft[j] while it is the argmax
            let mut kept = 0;
            let mut ended = false;
            while kept < draft.len() {
                let (g, lp) = sample_token(&rows[kept], &greedy, &mut rng)?;
                if g != draft[kept] {
                    break;
                }
                out.ids.push(g);
                out.logps.push(lp);
                out.rows.push(fed_rows[kept].clone());
                kept += 1;
                if g == eos {
                    ended = true;
                    break;
                }
            }
            if ended {
                break;
            }
            if kept < draft.len() {
                lm.truncate_cache(&mut cache, len0 + 1 + kept)?;
            }
            if let Some(b) = &mut bias {
                b.resize(cache.len(), 0.0);
            }
            logits = rows[kept].clone();
            hidden = fed_rows[kept].clone();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::propose;

    #[test]
    fn the_longest_agreement_wins_and_the_draft_is_cut() {
        let a: &[u32] = &[9, 1, 2, 3, 4, 5];
        let b: &[u32] = &[7, 2, 3, 8, 8];
        // answer ends "… 2 3": a agrees on 2 tokens (1 2 3 vs 7 2 3 in b: also 2)
        assert_eq!(propose(&[5, 2, 3], &[a, b], 16), &[4, 5]);
        // "1 2 3" agrees for 3 tokens in a, 2 in b
        assert_eq!(propose(&[1, 2, 3], &[b, a], 16), &[4, 5]);
        // "7 2 3" agrees for 3 in b
        assert_eq!(propose(&[7, 2, 3], &[a, b], 16), &[8, 8]);
        assert_eq!(propose(&[7, 2, 3], &[a, b], 1), &[8]);
        // the last token nowhere: nothing; at a draft's end: nothing left to propose
        assert!(propose(&[6], &[a, b], 16).is_empty());
        assert!(propose(&[5], &[a], 16).is_empty());
        assert!(propose(&[], &[a], 16).is_empty());
        // a repeated token: the position with the longer agreement
        let c: &[u32] = &[3, 1, 3, 2];
        assert_eq!(propose(&[1, 3], &[c], 16), &[2]);
        assert_eq!(propose(&[4, 3], &[c], 16), &[1, 3, 2]);
    }
}
