//! The ensemble at inference: one image encoding and one prefix forward per question,
//! the K samples decoded together from the shared KV cache, then the text half (Eq. 5)
//! and the segmentation half (Eq. 6) continuing from the same prefix.
use super::scores::{gamma, sentence_index, sentence_scores, token_scores};
use super::EnsembleCfg;
use crate::backend::{map_jobs, Backend};
use crate::error::{Error, Result};
use crate::model::seg::hidden::{HiddenRow, HiddenRows};
use crate::model::seg::infer::{by_groups, decode_set_size, decode_sets, rows_f32, Rows};
use crate::model::seg::{ImageEncoding, Pixels, Prediction, Prefill, SegModel, SegTokenizer};
use crate::nn::llama::bias_rows;
use crate::nn::sample::log_softmax;
use crate::nn::{KvCache, Rng, SamplingCfg};
use num_traits::Float;

/// One ensemble answer: the refined answer, the K samples it was made from, and their
/// scores.
#[derive(Clone, Debug)]
pub struct EnsemblePrediction {
    /// `ỹ` with its masks from `f̃`.
    pub answer: Prediction,
    /// The K sampled answers `y_k`, each with its own masks.
    pub samples: Vec<Prediction>,
    /// `τ` of each sample's tokens (EOS dropped), in [−1, 1].
    pub tau: Vec<Vec<f32>>,
    /// `η` of each sample's targets, one per `<seg>`, in [−1, 1].
    pub eta: Vec<Vec<f32>>,
    /// The refinement did not fit the context: `answer` is the most likely sample.
    pub fallback: bool,
    /// The samples' segmentation embeddings as the segmentation half reads them: each
    /// target's `G` codebook hidden rows (n_f × C, sample by sample, target by target).
    pub f_rows: Vec<f32>,
}

/// What every question of one call shares: `p̂`, the sentence-end table, the header.
struct Fixed<'a, Buf> {
    prompt: Option<&'a Buf>,
    ends: &'a [bool],
    header: Vec<u32>,
}

/// A question's prefix `[image, x]`: its KV cache (batch 1), whose first `pads` keys
/// are the left padding of a batched prefill (hidden by a key bias of −inf), and its
/// last hidden row.
struct Head<Buf> {
    prefix: KvCache<Buf>,
    h_prefix: HiddenRow<Buf>,
    pads: usize,
}

/// Where a question's prefix is: row `r` of the batched prefill `pre`, or, read again
/// alone, the prompt of `question`.
struct PrefixRow<'a, Buf> {
    pre: &'a Rows<Buf>,
    r: usize,
    question: &'a str,
}

impl<Buf> PrefixRow<'_, Buf> {
    /// The keys of the row's left padding.
    fn pads(&self) -> usize {
        let row = self.pre.bias.as_ref().and_then(|b| b.get(self.r));
        row.map_or(0, |b| {
            b.iter().take_while(|&&g| g == f32::NEG_INFINITY).count()
        })
    }
}

/// The K samples and, per sample, the hidden row that predicted each of its tokens.
struct Samples<Buf> {
    preds: Vec<Prediction>,
    rows: Vec<HiddenRows<Buf>>,
}

/// A sample's ids without EOS (what is fed back), and its log-probs.
fn strip_eos(p: &Prediction, eos: u32) -> (&[u32], &[f32]) {
    let n = p.ids.iter().position(|&t| t == eos).unwrap_or(p.ids.len());
    (&p.ids[..n], &p.logps[..n])
}

/// Mean log-probability of an answer (EOS included): which sample is the most likely.
pub fn mean_logp(p: &Prediction) -> f32 {
    if p.logps.is_empty() {
        f32::NEG_INFINITY
    } else {
        p.logps.iter().sum::<f32>() / p.logps.len() as f32
    }
}

/// The index of the sample with the highest [`mean_logp`] (the last of equals; 0 when
/// there are none): the answer without the text half.
pub fn most_likely(samples: &[Prediction]) -> usize {
    (0..samples.len())
        .max_by(|&a, &b| mean_logp(&samples[a]).total_cmp(&mean_logp(&samples[b])))
        .unwrap_or(0)
}

/// The index of the sample whose answer text most of the samples give: the answer of
/// the `--text-vote` ablation.  Between answers given equally often, the one with the
/// most likely sample ([`mean_logp`]) wins, as between the samples of one answer; so
/// when no two samples agree it is [`most_likely`].
pub fn majority(samples: &[Prediction]) -> usize {
    let votes = |i: usize| samples.iter().filter(|s| s.text == samples[i].text).count();
    (0..samples.len())
        .max_by(|&a, &b| {
            (votes(a).cmp(&votes(b)))
                .then(mean_logp(&samples[a]).total_cmp(&mean_logp(&samples[b])))
        })
        .unwrap_or(0)
}

impl<F: Float, B: Backend<F>> SegModel<F, B> {
    /// Answers each `(image, question)` with the K-way ensemble.  `prompt` is `p̂`
    /// (P·C values, stage 3's); `ends` is [`super::sentence_ends`] of the tokenizer.
    /// Item `i` samples from the streams seeded from `seed + i`.
    pub fn predict_ensemble(
        &self,
        tok: &SegTokenizer,
        items: &[(&Pixels, &str)],
        cfg: &EnsembleCfg,
        seed: u64,
        prompt: Option<&B::Buf>,
        ends: &[bool],
    ) -> Result<Vec<EnsemblePrediction>> {
        if cfg.k == 0 {
            return Err(Error::arg("SegModel::predict_ensemble", "K must be ≥ 1"));
        }
        let hdim = self.llava.cfg.text.hidden_size;
        if let Some(p) = prompt {
            let n = self.llava.be.len(p);
            if n == 0 || !n.is_multiple_of(hdim) {
                return Err(Error::shape(
                    "SegModel::predict_ensemble",
                    format!("prompt of {n} values for hidden size {hdim}"),
                ));
            }
        }
        let fixed = Fixed {
            prompt: if cfg.prompt { prompt } else { None },
            ends,
            header: tok.answer_header()?,
        };
        let px: Vec<&Pixels> = items.iter().map(|x| x.0).collect();
        let encs = self.encode_images(&px)?;
        let answers = self.sampled_groups(
            tok,
            items,
            &px,
            &encs,
            cfg,
            seed,
            &fixed,
            |idx, pre, sampled| {
                let jobs: Vec<_> = idx.iter().copied().enumerate().zip(sampled).collect();
                // the questions are independent: each is refined alone
                map_jobs(&self.llava.be, jobs, |((r, i), samples)| {
                    let question = items[i].1;
                    let at = PrefixRow { pre, r, question };
                    let e = self.refine_one(tok, px[i], &encs[i], at, samples, cfg, &fixed)?;
                    Ok((i, e))
                })
                .into_iter()
                .collect()
            },
        )?;
        Ok(answers)
    }

    /// The K answers the ensemble samples for each `(image, question)` and nothing
    /// more: the same streams as [`Self::predict_ensemble`] with the same `seed` (item
    /// `i` from `seed + i`), `cfg.k`, `cfg.temperature` and `cfg.top_p`, text only (no
    /// masks decoded).  Stage 2's re-read mix reads them (`crate::method::reread`).
    pub fn sample_answers(
        &self,
        tok: &SegTokenizer,
        items: &[(&Pixels, &str)],
        cfg: &EnsembleCfg,
        seed: u64,
    ) -> Result<Vec<Vec<Prediction>>> {
        if cfg.k == 0 {
            return Err(Error::arg("SegModel::sample_answers", "K must be ≥ 1"));
        }
        let cfg = EnsembleCfg {
            sample_masks: false,
            ..*cfg
        };
        let fixed = Fixed {
            prompt: None,
            ends: &[],
            header: tok.answer_header()?,
        };
        let px: Vec<&Pixels> = items.iter().map(|x| x.0).collect();
        let encs = self.encode_images(&px)?;
        self.sampled_groups(
            tok,
            items,
            &px,
            &encs,
            &cfg,
            seed,
            &fixed,
            |idx, _, sampled| {
                Ok(idx
                    .iter()
                    .copied()
                    .zip(sampled.into_iter().map(|s| s.preds))
                    .collect())
            },
        )
    }

    /// The prefix `[image, x]` and the K samples of the questions, handed to `then`
    /// with the group's item indices (question `i` seeded `seed + i`), which gives each
    /// question's result with its index; the results in the items' order.  The
    /// questions are grouped as `SegModel::predict` groups them: the prompts with room
    /// for the header and `max_new_tokens` after them in one group, padded on the left
    /// (the prefix rows then carry the pads' −inf key bias), the others by length.  The
    /// groups are independent and may run at once ([`map_jobs`]).
    #[allow(clippy::too_many_arguments)]
    fn sampled_groups<R: Send>(
        &self,
        tok: &SegTokenizer,
        items: &[(&Pixels, &str)],
        px: &[&Pixels],
        encs: &[ImageEncoding<B::Buf>],
        cfg: &EnsembleCfg,
        seed: u64,
        fixed: &Fixed<'_, B::Buf>,
        then: impl Fn(&[usize], &Rows<B::Buf>, Vec<Samples<B::Buf>>) -> Result<Vec<(usize, R)>>
            + Sync
            + Send,
    ) -> Result<Vec<R>> {
        // [image, x] without the answer header: the header follows whatever is read next
        let bodies = items
            .iter()
            .map(|(_, q)| self.prompt_ids(tok, q, fixed.header.len()))
            .collect::<Result<Vec<_>>>()?;
        let group = |idx: Vec<usize>| {
            let seeds: Vec<u64> = idx.iter().map(|&i| seed.wrapping_add(i as u64)).collect();
            // with a header, the logits the samples draw from are the header's
            let read = fixed.header.is_empty();
            let pre = self.prefill_rows(&bodies, encs, &idx, &seeds, read)?;
            let sampled = self.sample_k(tok, px, encs, &idx, &pre, cfg, &seeds, fixed)?;
            then(&idx, &pre, sampled)
        };
        let be = &self.llava.be;
        let ctx = self.llava.language_model.cfg.max_position_embeddings;
        let room = fixed.header.len() + self.cfg.max_new_tokens;
        let groups = decode_sets(&bodies, room, ctx, decode_set_size(be, cfg.k));
        by_groups(be, "SegModel::sampled_groups", bodies.len(), groups, group)
    }

    /// The prefix `[image, x]` as `at` holds it (its row's cache with its `pads` and its
    /// last hidden state), or, with `pads` None, its prompt read again alone, unpadded.
    fn head_of(
        &self,
        tok: &SegTokenizer,
        at: &PrefixRow<'_, B::Buf>,
        pads: Option<usize>,
        enc: &ImageEncoding<B::Buf>,
        fixed: &Fixed<'_, B::Buf>,
    ) -> Result<Head<B::Buf>> {
        if let Some(pads) = pads {
            let lm = &self.llava.language_model;
            return Ok(Head {
                prefix: lm.select_cache_rows(&at.pre.cache, &[at.r])?,
                h_prefix: at.pre.hidden[at.r].clone(),
                pads,
            });
        }
        let body = self.prompt_ids(tok, at.question, fixed.header.len())?;
        let mut one = self.prefill_rows(&[body], std::slice::from_ref(enc), &[0], &[0], false)?;
        Ok(Head {
            prefix: one.cache,
            h_prefix: one.hidden.remove(0),
            pads: 0,
        })
    }

    /// The text half (Eq. 5) and the segmentation half (Eq. 6) of one question, from
    /// its prefix `[image, x]` and its K samples.
    ///
    /// A padded prefix serves as it is when everything either half reads or writes fits
    /// the context after its pads as well: its keys then sit `pads` positions later than
    /// alone, which RoPE's scores do not see, every bias hides the pads, and every
    /// context check passes, as it does alone.  Otherwise (and with `--consensus`, whose
    /// edited answer has no length bound) the question's prompt is read again alone, so
    /// the halves decide as they would alone.
    #[allow(clippy::too_many_arguments)]
    fn refine_one(
        &self,
        tok: &SegTokenizer,
        px: &Pixels,
        enc: &ImageEncoding<B::Buf>,
        at: PrefixRow<'_, B::Buf>,
        sampled: Samples<B::Buf>,
        cfg: &EnsembleCfg,
        fixed: &Fixed<'_, B::Buf>,
    ) -> Result<EnsemblePrediction> {
        let be = &self.llava.be;
        let lm = &self.llava.language_model;
        let hdim = self.llava.cfg.text.hidden_size;
        let ctx = lm.cfg.max_position_embeddings;
        let eos = tok.tok.eos;
        let (prompt, ends, header) = (fixed.prompt, fixed.ends, &fixed.header[..]);
        let Samples {
            preds: samples,
            rows: sample_rows,
        } = sampled;
        // scores
        let (mut tau, mut eta) = (Vec::with_capacity(cfg.k), Vec::with_capacity(cfg.k));
        for s in &samples {
            let (ids, lps) = strip_eos(s, eos);
            let sent = sentence_index(ids, ends);
            tau.push(token_scores(lps, &sent, cfg.tau));
            let sc = sentence_scores(lps, &sent);
            let (_, groups) = tok.decode_answer(ids)?;
            eta.push(groups.iter().map(|&g| sc[sent[g]]).collect());
        }
        let best = if cfg.vote {
            majority(&samples)
        } else {
            most_likely(&samples)
        };
        let g = |s: f32| if cfg.gamma { gamma(s) } else { 0.0 };
        // [y_1 … y_K, p̂, header] after the prefix, with γ(τ) on the y keys
        let mut ys: Vec<u32> = Vec::new();
        let mut y_bias: Vec<f32> = Vec::new();
        for (s, t) in samples.iter().zip(&tau) {
            let (ids, _) = strip_eos(s, eos);
            ys.extend_from_slice(ids);
            y_bias.extend(t.iter().map(|&x| g(x)));
        }
        let n_prompt = prompt.map_or(0, |p| be.len(p) / hdim);
        let read_len = ys.len() + n_prompt + header.len();
        // room for an answer as long as the longest sample (EOS included): with less, `ỹ`
        // would be cut off mid-sentence by the context's end
        let longest = samples
            .iter()
            .map(|s| s.ids.len())
            .max()
            .unwrap_or(0)
            .max(1);
        // the samples' codebook rows the segmentation half reads, with γ(η) on each
        let gl = self.cfg.group_len();
        let mut f_src = HiddenRows::default();
        let mut f_bias: Vec<f32> = Vec::new();
        for ((s, e), hr) in samples.iter().zip(&eta).zip(&sample_rows) {
            let (ids, _) = strip_eos(s, eos);
            let (_, groups) = tok.decode_answer(ids)?;
            for (&g0, &eta_n) in groups.iter().zip(e) {
                f_src.extend_from(hr, g0..g0 + gl)?;
                f_bias.extend(std::iter::repeat_n(g(eta_n), gl));
            }
        }
        // the f rows side by side (n_f × C), read back in one copy
        let n_f = f_src.len();
        let f_rows = (n_f > 0).then(|| f_src.gather_all(be, hdim)).transpose()?;
        let f_host: Vec<f32> = f_rows
            .iter()
            .flat_map(|r| be.to_vec(r))
            .map(|x| x.to_f32().unwrap_or(f32::NAN))
            .collect();
        // the prefix as it is, or read again alone (see above): the halves add at most
        // read_len + n_f + max_new_tokens keys after it
        let worst = read_len + n_f + self.cfg.max_new_tokens + 1;
        let pads = at.pads();
        let alone = pads > 0 && (cfg.consensus || at.pre.cache.len() + worst >= ctx);
        let keep = (!alone).then_some(pads);
        let Head {
            prefix,
            h_prefix,
            pads,
        } = self.head_of(tok, &at, keep, enc, fixed)?;
        // the prefix keys' bias: the pads hidden.  A padded prefix passes every context
        // check below (it has room for `worst` more keys), as it does alone.
        let mut prefix_bias = vec![f32::NEG_INFINITY; pads];
        prefix_bias.resize(prefix.len(), 0.0);
        let fits = prefix.len() + read_len + longest < ctx;
        // the answer is the most likely sample without the text ensemble or room for it
        let fallback = cfg.text && !fits;
        // `ỹ` and the hidden row that predicted each of its tokens
        let (mut answer, mut answer_rows) = if !cfg.text || !fits {
            (samples[best].clone(), sample_rows[best].clone())
        } else {
            let chunk = self.read_chunk(&ys, prompt, None, header)?;
            let mut bias = prefix_bias.clone();
            bias.extend_from_slice(&y_bias);
            bias.extend(std::iter::repeat_n(0.0, n_prompt + header.len()));
            let drafts: Vec<&[u32]> = samples.iter().map(|s| s.ids.as_slice()).collect();
            self.decode_refined(tok, prefix.clone(), chunk, read_len, bias, &drafts)?
        };
        // `--consensus`: the objects too few samples name leave the answer
        if cfg.consensus {
            let texts: Vec<&str> = samples.iter().map(|s| s.text.as_str()).collect();
            if let Some(text) = super::consensus_answer(&answer.text, &texts) {
                let mut ids = tok.answer_ids(&text)?;
                ids.push(eos);
                // an edit that would not fit the context is not made
                // (a consensus answer reads an unpadded prefix: pads is 0 here)
                if prefix.len() + header.len() + ids.len() < ctx {
                    // without a header the prefix's last row predicts the first token:
                    // its log-prob is known where a sample drew the same token
                    let first = samples
                        .iter()
                        .find(|s| s.ids.first() == ids.first())
                        .and_then(|s| s.logps.first().copied())
                        .unwrap_or(f32::NAN);
                    (answer, answer_rows) =
                        self.read_answer(tok, prefix.clone(), &h_prefix, header, ids, first)?;
                }
            }
        }
        // the segmentation half: [y_1 … y_K, p̂, {f}, header, ỹ] with γ(η) on the f keys
        let (ans_ids, _) = strip_eos(&answer, eos);
        let (_, ans_groups) = tok.decode_answer(ans_ids)?;
        let mut seg_done = false;
        if cfg.seg && !ans_groups.is_empty() {
            let n = read_len + n_f + ans_ids.len();
            if prefix.len() + n < ctx {
                let tail = [header, ans_ids].concat();
                let chunk = self.read_chunk(&ys, prompt, f_rows.as_ref(), &tail)?;
                let mut bias = prefix_bias.clone();
                bias.resize(prefix.len() + ys.len() + n_prompt, 0.0);
                bias.extend_from_slice(&f_bias);
                bias.extend(std::iter::repeat_n(0.0, tail.len()));
                let mut cache = prefix.clone();
                let bias = be.from_slice(&to_f::<F>(&bias));
                // the row that predicts ỹ's token t sits just before it: only the
                // chunk's last |ỹ| + 1 rows are read
                let start = read_len + n_f;
                let m = (ans_ids.len() + 1).min(n);
                let (_, tail) = lm.forward_tail(chunk, 1, n, m, None, Some(&bias), &mut cache)?;
                let tail = HiddenRow::each_of(be, tail, m, hdim)?;
                let mut rows = HiddenRows::default();
                for t in 0..ans_ids.len() {
                    rows.push(match start + t {
                        0 => h_prefix.clone(),
                        i => tail[i - 1 - (n - m)].clone(),
                    });
                }
                (answer.masks, answer.logits) =
                    self.masks_of_groups(px, enc, &ans_groups, &rows)?;
                seg_done = true;
            }
        }
        // without the segmentation half, `ỹ`'s own masks (a sample's may already be in)
        if !seg_done && answer.masks.len() != ans_groups.len() {
            (answer.masks, answer.logits) =
                self.masks_of_groups(px, enc, &ans_groups, &answer_rows)?;
        }
        Ok(EnsemblePrediction {
            answer,
            samples,
            tau,
            eta,
            fallback,
            f_rows: f_host,
        })
    }

    /// An answer given rather than generated, read teacher-forced after the prefix
    /// `[image, x]` and the answer header: its log-probabilities and the hidden row
    /// that predicts each of its tokens (as a decoded answer's), no masks yet.  With no
    /// header the first token is predicted by the prefix's last row, `h_prefix`, whose
    /// logits are not kept: its log-prob is `first_logp`.
    fn read_answer(
        &self,
        tok: &SegTokenizer,
        mut cache: KvCache<B::Buf>,
        h_prefix: &HiddenRow<B::Buf>,
        header: &[u32],
        ids: Vec<u32>,
        first_logp: f32,
    ) -> Result<(Prediction, HiddenRows<B::Buf>)> {
        let be = &self.llava.be;
        let lm = &self.llava.language_model;
        let (hdim, v) = (
            self.llava.cfg.text.hidden_size,
            self.llava.cfg.text.vocab_size,
        );
        let chunk = [header, &ids].concat();
        let n = chunk.len();
        let (logits, hidden) =
            lm.forward_tail(lm.embed(&chunk)?, 1, n, n, None, None, &mut cache)?;
        // chunk row p predicts chunk token p + 1 (the last row, after EOS, nothing); the
        // prefix's last row the first one
        let lg = rows_f32(be, &logits, &(0..n - 1).collect::<Vec<_>>(), v);
        let hidden = HiddenRow::each_of(be, hidden, n, hdim)?;
        let (mut rows, mut logps) = (HiddenRows::default(), Vec::with_capacity(ids.len()));
        for (t, &id) in ids.iter().enumerate() {
            match (header.len() + t).checked_sub(1) {
                None => {
                    rows.push(h_prefix.clone());
                    logps.push(first_logp);
                }
                Some(p) => {
                    rows.push(hidden[p].clone());
                    // the score a sampled token gets (`sample_token`)
                    logps.push(log_softmax(&lg[p])[id as usize] as f32);
                }
            }
        }
        Ok((self.finish_text(tok, ids, logps)?, rows))
    }

    /// Embeddings of `[ids, prompt rows, extra rows, tail ids]`.
    fn read_chunk(
        &self,
        ids: &[u32],
        prompt: Option<&B::Buf>,
        extra: Option<&B::Buf>,
        tail: &[u32],
    ) -> Result<B::Buf> {
        let be = &self.llava.be;
        let lm = &self.llava.language_model;
        let mut x = if ids.is_empty() {
            be.zeros(0)
        } else {
            lm.embed(ids)?
        };
        if let Some(p) = prompt {
            x = concat(be, &x, p)?;
        }
        if let Some(r) = extra {
            x = concat(be, &x, r)?;
        }
        if !tail.is_empty() {
            x = concat(be, &x, &lm.embed(tail)?)?;
        }
        Ok(x)
    }

    /// The K answers of every question of a group, decoded together: the answer header
    /// is fed after the bodies' cache `pre` (under its pads' bias, when padded), and the
    /// B·K answers decode as one batch, the K of a question sharing its cache row while
    /// their draws agree ([`SegModel::decode_rows`]).  Sample `j` of the question seeded `s`
    /// draws from the stream seeded `splitmix64(s) + j`.  Returns one set per row of
    /// `pre`, in order.
    #[allow(clippy::too_many_arguments)]
    fn sample_k(
        &self,
        tok: &SegTokenizer,
        px: &[&Pixels],
        encs: &[ImageEncoding<B::Buf>],
        idx: &[usize],
        pre: &Rows<B::Buf>,
        cfg: &EnsembleCfg,
        seeds: &[u64],
        fixed: &Fixed<'_, B::Buf>,
    ) -> Result<Vec<Samples<B::Buf>>> {
        let be = &self.llava.be;
        let lm = &self.llava.language_model;
        let (hdim, v) = (
            self.llava.cfg.text.hidden_size,
            self.llava.cfg.text.vocab_size,
        );
        let (b, k, header) = (idx.len(), cfg.k, &fixed.header[..]);
        let (mut cache, mut logits, mut hidden) =
            (pre.cache.clone(), pre.logits.clone(), pre.hidden.clone());
        // the pads' bias (when padded) covers the header's keys too, with 0
        let bias = pre.bias.clone().map(|mut rows| {
            for row in &mut rows {
                row.resize(row.len() + header.len(), 0.0);
            }
            rows
        });
        if !header.is_empty() {
            let ids: Vec<u32> = (0..b).flat_map(|_| header.iter().copied()).collect();
            let hl = header.len();
            let g = bias.as_ref().map(|rows| bias_rows(be, rows));
            let (lg, hd) =
                lm.forward_tail(lm.embed(&ids)?, b, hl, 1, None, g.as_ref(), &mut cache)?;
            logits = rows_f32(be, &lg, &(0..b).collect::<Vec<_>>(), v);
            hidden = HiddenRow::each_of(be, hd, b, hdim)?;
        }
        // the K samples of a question share its cache row until their draws differ
        let rows = Rows {
            cache,
            logits,
            hidden,
            rngs: seeds
                .iter()
                .flat_map(|&s| {
                    let base = crate::rng::splitmix64(s);
                    (0..k as u64).map(move |j| Rng::new(base.wrapping_add(j)))
                })
                .collect(),
            members: (0..b).map(|r| (r * k..(r + 1) * k).collect()).collect(),
            bias,
        };
        let sampling = SamplingCfg {
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            seed: 0,
        };
        let mut decoded = self.decode_rows(tok, rows, &sampling)?.into_iter();
        let mut out = Vec::with_capacity(b);
        for &i in idx {
            let (mut preds, mut rows) = (Vec::with_capacity(k), Vec::with_capacity(k));
            for d in decoded.by_ref().take(k) {
                let p = if cfg.sample_masks {
                    self.finish_answer(tok, px[i], &encs[i], d.ids, d.logps, &d.rows)?
                } else {
                    self.finish_text(tok, d.ids, d.logps)?
                };
                preds.push(p);
                rows.push(d.rows);
            }
            out.push(Samples { preds, rows });
        }
        Ok(out)
    }

    /// `ỹ` (its masks not yet decoded) and the hidden row that predicted each of its
    /// tokens: the read chunk through the prefix cache with `bias` on every key, then
    /// greedy decoding (new keys unbiased), checked against the samples as drafts
    /// ([`crate::model::seg::draft`]).
    #[allow(clippy::too_many_arguments)]
    fn decode_refined(
        &self,
        tok: &SegTokenizer,
        mut cache: KvCache<B::Buf>,
        chunk: B::Buf,
        n: usize,
        bias: Vec<f32>,
        drafts: &[&[u32]],
    ) -> Result<(Prediction, HiddenRows<B::Buf>)> {
        let be = &self.llava.be;
        let lm = &self.llava.language_model;
        let b = be.from_slice(&to_f::<F>(&bias));
        // only the chunk's last row predicts
        let (logits, hidden) = lm.forward_tail(chunk, 1, n, 1, None, Some(&b), &mut cache)?;
        let pre = Prefill {
            cache,
            logits,
            hidden,
        };
        let d = self.decode_drafted(tok, pre, Some(bias), drafts)?;
        Ok((self.finish_text(tok, d.ids, d.logps)?, d.rows))
    }
}

/// `[a, b]` end to end.
fn concat<F: Float, B: Backend<F>>(be: &B, a: &B::Buf, b: &B::Buf) -> Result<B::Buf> {
    let (na, nb) = (be.len(a), be.len(b));
    let mut x = be.zeros(na + nb);
    be.copy_range(&mut x, 0, a, 0, na)?;
    be.copy_range(&mut x, na, b, 0, nb)?;
    Ok(x)
}

fn to_f<F: Float>(v: &[f32]) -> Vec<F> {
    v.iter()
        .map(|&x| F::from(x).unwrap_or_else(F::zero))
        .collect()
}
