//! Inference: encode the images once, generate each answer with the KV cache, read the
//! codebook tokens' hidden states as they are generated, and decode one mask per
//! complete codebook group at the image's own size.
use super::decoder::DecoderImages;
use super::hidden::{HiddenRow, HiddenRows};
use super::model::SegModel;
use super::preprocess::Pixels;
use super::prompt::SegTokenizer;
use crate::backend::{map_jobs, Backend, RowCopy};
use crate::error::{Error, Result};
use crate::nn::llama::{bias_rows, LeftPadded};
use crate::nn::{KvCache, Rng, SamplingCfg, TokenDist};
use num_traits::Float;

/// One generated answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// The answer text, one `<seg>` per complete codebook group.
    pub text: String,
    /// One mask per `<seg>` at the image's size (height·width, 1 = object).
    pub masks: Vec<Vec<u8>>,
    /// Mask logits per `<seg>` (height·width), for ensembles and soft scores.
    pub logits: Vec<Vec<f32>>,
    /// The generated ids (EOS included when generated).
    pub ids: Vec<u32>,
    /// Each id's log-probability under the model (raw logits, whatever the sampling).
    pub logps: Vec<f32>,
}

/// The prompt after one forward: its KV cache, and the logits and last hidden states
/// of the positions whose outputs were computed (all of them after
/// [`SegModel::prefill`], the last alone after a `forward_tail` read); the last row
/// predicts the first answer token.
#[derive(Clone, Debug)]
pub struct Prefill<Buf> {
    /// Keys and values of every position read (batch 1).
    pub cache: KvCache<Buf>,
    /// Logits of the positions computed (T, V).
    pub logits: Buf,
    /// Their last-layer hidden states after the final norm (T, C).
    pub hidden: Buf,
}

/// Generated ids, each one's log-probability and the hidden row that predicted it.
#[derive(Clone, Debug)]
pub struct Decoded<Buf> {
    /// The generated ids (EOS included when generated).
    pub ids: Vec<u32>,
    /// Each id's log-probability under the model.
    pub logps: Vec<f32>,
    /// The hidden state (C) that predicted each id: row `t` predicted `ids[t]`.
    pub rows: HiddenRows<Buf>,
}

/// Answers decoded together ([`SegModel::decode_rows`]): one KV cache of batch B and,
/// per cache row, the logits (V) and hidden state (C) of its last position, the
/// answers it holds (`members`: indices into `rngs`, one answer per sampling stream)
/// and, when the keys are biased, the bias of every key in the cache (a row padded on
/// the left starts with −inf, one per pad: [`SegModel::prefill_rows`]).  A cache row
/// holds several answers while their histories are the same (the K samples of one
/// question start so): they share its forwards until their draws differ.
pub(crate) struct Rows<Buf> {
    pub cache: KvCache<Buf>,
    pub logits: Vec<Vec<f32>>,
    pub hidden: Vec<HiddenRow<Buf>>,
    pub rngs: Vec<Rng>,
    pub members: Vec<Vec<usize>>,
    pub bias: Option<Vec<Vec<f32>>>,
}

impl<Buf> Rows<Buf> {
    /// One answer per cache row: row `r` samples from `rngs[r]`.
    pub(crate) fn one_per_row(
        cache: KvCache<Buf>,
        logits: Vec<Vec<f32>>,
        hidden: Vec<HiddenRow<Buf>>,
        rngs: Vec<Rng>,
        bias: Option<Vec<Vec<f32>>>,
    ) -> Self {
        let members = (0..rngs.len()).map(|r| vec![r]).collect();
        Rows {
            cache,
            logits,
            hidden,
            rngs,
            members,
            bias,
        }
    }
}

/// Masks of one answer (height·width each, 1 = object) and their logits.
pub type AnswerMasks = (Vec<Vec<u8>>, Vec<Vec<f32>>);

/// Per target, teacher-forced: its embedding `f` (L·D) and its mask logits (H·W).
pub type TargetReadout = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// One image encoded once: its projected tokens (K, C) for the LLM, and for the pixel
/// decoder the two ViT feature levels (K, Cv) and the preprocessed pixels (3, S, S)
/// that its pixel skip reads.
#[derive(Clone, Debug)]
pub struct ImageEncoding<Buf> {
    /// The image's tokens after the projector (K, C): what `<image>` stands for.
    pub tokens: Buf,
    /// The decoder's two ViT levels, class token dropped (K, Cv) each.
    pub feats: [Buf; 2],
    /// The preprocessed image (3, S, S).
    pub pixels: Buf,
}

impl<Buf> ImageEncoding<Buf> {
    /// This image as the pixel decoder's input (a batch of one).
    pub fn decoder_images(&self) -> DecoderImages<'_, Buf> {
        DecoderImages {
            levels: [&self.feats[0], &self.feats[1]],
            pixels: Some(&self.pixels),
            b: 1,
        }
    }
}

impl<F: Float, B: Backend<F>> SegModel<F, B> {
    /// Answers each `(image, question)`; images are encoded in one batch, and the
    /// questions are decoded together, one KV cache for all of them (but for prompts
    /// that would reach the context's end; greedy when `cfg.temperature` is 0).  Item
    /// `i` samples from the stream seeded `cfg.seed + i`.
    ///
    /// Shorter prompts are padded on the left, their pads hidden from every query by a
    /// key bias of −inf (`SegModel::prefill_rows`).  A row then computes what it would
    /// alone up to rounding: its positions are shifted by its padding, which RoPE's
    /// scores do not see (they depend on the distance between positions alone), and its
    /// rows share batched matrix products.  `tests/seg_model.rs` checks the ids, texts
    /// and masks are identical.
    pub fn predict(
        &self,
        tok: &SegTokenizer,
        items: &[(&Pixels, &str)],
        cfg: &SamplingCfg,
    ) -> Result<Vec<Prediction>> {
        let px: Vec<&Pixels> = items.iter().map(|x| x.0).collect();
        let encs = self.encode_images(&px)?;
        let prompts = items
            .iter()
            .map(|(_, q)| self.prompt_ids(tok, q, 0))
            .collect::<Result<Vec<_>>>()?;
        // the groups are independent, as are their answers' masks
        let be = &self.llava.be;
        let group = |idx: Vec<usize>| -> Result<Vec<(usize, Prediction)>> {
            let seeds: Vec<u64> = idx
                .iter()
                .map(|&i| cfg.seed.wrapping_add(i as u64))
                .collect();
            let rows = self.prefill_rows(&prompts, &encs, &idx, &seeds, true)?;
            let decoded: Vec<_> = idx
                .iter()
                .copied()
                .zip(self.decode_rows(tok, rows, cfg)?)
                .collect();
            map_jobs(be, decoded, |(i, d)| {
                let p = self.finish_answer(tok, px[i], &encs[i], d.ids, d.logps, &d.rows)?;
                Ok((i, p))
            })
            .into_iter()
            .collect()
        };
        let ctx = self.llava.language_model.cfg.max_position_embeddings;
        let most = decode_set_size(be, 1);
        let sets = decode_sets(&prompts, self.cfg.max_new_tokens, ctx, most);
        by_groups(be, "SegModel::predict", prompts.len(), sets, group)
    }

    /// The prompts `idx` with their images' tokens in place, through the LLM as one
    /// batch with a fresh KV cache: the rows ready to decode, row `r` sampling from the
    /// stream seeded `seeds[r]`.  Prompts shorter than the longest (T) are padded on
    /// the left with their first id, and the rows then carry a key bias that is −inf
    /// on the pads and 0 elsewhere (`Rows::bias`, which grows by 0 with each decoded
    /// key): no query sees a pad, and a pad's own query sees nothing (its output is 0).
    /// Prompts all of one length take no bias.  Without `read_logits` the logits are
    /// not read back (`Rows::logits` is empty): for a caller that feeds more tokens
    /// before it draws, or only reads the cache.
    pub(crate) fn prefill_rows(
        &self,
        prompts: &[(Vec<u32>, usize)],
        encs: &[ImageEncoding<B::Buf>],
        idx: &[usize],
        seeds: &[u64],
        read_logits: bool,
    ) -> Result<Rows<B::Buf>> {
        let be = &self.llava.be;
        let lm = &self.llava.language_model;
        let (hdim, v) = (
            self.llava.cfg.text.hidden_size,
            self.llava.cfg.text.vocab_size,
        );
        let k = self.tokens_per_image();
        let b = idx.len();
        let padded = LeftPadded::new(
            "SegModel::prefill_rows",
            idx.iter().map(|&i| prompts[i].0.as_slice()),
        )?;
        let t = padded.t;
        let mut x = lm.embed(&padded.ids)?;
        for (r, (&i, &pad)) in idx.iter().zip(&padded.pads).enumerate() {
            let pos = pad + prompts[i].1;
            be.copy_range(&mut x, (r * t + pos) * hdim, &encs[i].tokens, 0, k * hdim)?;
        }
        let bias = padded.bias();
        let bias_buf = bias.as_ref().map(|rows| bias_rows(be, rows));
        let mut cache = lm.new_cache(b);
        // only each prompt's last row predicts
        let (logits, hidden) = lm.forward_tail(x, b, t, 1, None, bias_buf.as_ref(), &mut cache)?;
        let logits = if read_logits {
            rows_f32(be, &logits, &(0..b).collect::<Vec<_>>(), v)
        } else {
            Vec::new()
        };
        let hidden = HiddenRow::each_of(be, hidden, b, hdim)?;
        Ok(Rows::one_per_row(
            cache,
            logits,
            hidden,
            seeds.iter().map(|&s| Rng::new(s)).collect(),
            bias,
        ))
    }

    /// The segmentation embeddings `f` of every target of `examples`, read
    /// teacher-forced on each example's answer, and each target's mask logits at its
    /// image's size: one row of `f` (L·D, the scales side by side) and one logit map
    /// (H·W) per target, examples in order.
    pub fn target_embeddings(&self, examples: &[super::model::Example]) -> Result<TargetReadout> {
        let m: usize = examples.iter().map(|e| e.masks.len()).sum();
        if m == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let be = &self.llava.be;
        let pass = self.forward_pass(examples)?;
        let emb = pass.seg_embeddings(be);
        let e = emb.len() / m;
        let to_f32 =
            |r: &[F]| -> Vec<f32> { r.iter().map(|x| x.to_f32().unwrap_or(f32::NAN)).collect() };
        let f = emb.chunks(e.max(1)).take(m).map(to_f32).collect();
        let logits = pass.mask_logits(be).iter().map(|l| to_f32(l)).collect();
        Ok((f, logits))
    }

    /// Encodes a batch of images once: per image, its projected tokens for the LLM and
    /// the two ViT feature levels for the pixel decoder.
    pub fn encode_images(&self, px: &[&Pixels]) -> Result<Vec<ImageEncoding<B::Buf>>> {
        if px.is_empty() {
            return Ok(Vec::new());
        }
        let be = &self.llava.be;
        let b = px.len();
        let idx = self.state_indices()?;
        let upto = idx.iter().copied().max().unwrap_or(0);
        let pixels = self.stack_pixels(px)?;
        let out = self.llava.vision_tower.forward(&pixels, b, upto)?;
        let hs = &out.hidden_states;
        let (img, _) = self
            .llava
            .projector
            .forward(be, self.patches_of(&hs[idx[0]], b)?)?;
        let f0 = self.patches_of(&hs[idx[1]], b)?;
        let f1 = self.patches_of(&hs[idx[2]], b)?;
        let (img, _) = self.image_tokens(img, &f0, b)?;
        let v = self.llava.cfg.vision.clone();
        let (k, cv) = (v.num_patches(), v.hidden_size);
        let kt = self.tokens_per_image();
        let hdim = self.llava.cfg.text.hidden_size;
        let npix = be.len(&pixels) / b;
        (0..b)
            .map(|i| {
                let mut tokens = be.uninit(kt * hdim);
                be.copy_range(&mut tokens, 0, &img, i * kt * hdim, kt * hdim)?;
                let mut g0 = be.uninit(k * cv);
                be.copy_range(&mut g0, 0, &f0, i * k * cv, k * cv)?;
                let mut g1 = be.uninit(k * cv);
                be.copy_range(&mut g1, 0, &f1, i * k * cv, k * cv)?;
                let mut pix = be.uninit(npix);
                be.copy_range(&mut pix, 0, &pixels, i * npix, npix)?;
                Ok(ImageEncoding {
                    tokens,
                    feats: [g0, g1],
                    pixels: pix,
                })
            })
            .collect()
    }

    /// Patches (B·K, Cv) of a hidden state, class token dropped.
    pub fn patches_of(&self, h: &B::Buf, b: usize) -> Result<B::Buf> {
        let be = &self.llava.be;
        let v = &self.llava.cfg.vision;
        let (k, cv) = (v.num_patches(), v.hidden_size);
        let mut f = be.uninit(b * k * cv);
        be.copy_rows(&mut f, h, Self::patch_rows(b, k, cv))?;
        Ok(f)
    }

    /// Each image's K patch rows of Cv, from (B, 1 + K, Cv) to (B·K, Cv) (back with
    /// [`RowCopy::swapped`]).
    pub(crate) fn patch_rows(b: usize, k: usize, cv: usize) -> RowCopy {
        RowCopy {
            rows: b,
            width: k * cv,
            dst_off: 0,
            dst_stride: k * cv,
            src_off: cv,
            src_stride: (k + 1) * cv,
        }
    }

    /// The prompt of `question` with the image's tokens in place, through the LLM with
    /// a fresh KV cache (batch 1): the cache and the logits of its last position.
    pub fn prefill(
        &self,
        tok: &SegTokenizer,
        question: &str,
        enc: &ImageEncoding<B::Buf>,
    ) -> Result<Prefill<B::Buf>> {
        let be = &self.llava.be;
        let lm = &self.llava.language_model;
        let hdim = self.llava.cfg.text.hidden_size;
        let k = self.tokens_per_image();
        let (ids, image_pos) = self.prompt_ids(tok, question, 0)?;
        let mut x = lm.embed(&ids)?;
        be.copy_range(&mut x, image_pos * hdim, &enc.tokens, 0, k * hdim)?;
        let mut cache = lm.new_cache(1);
        let (logits, acts) = lm.forward_embeds(x, 1, ids.len(), None, None, Some(&mut cache))?;
        Ok(Prefill {
            cache,
            logits,
            hidden: acts.hidden,
        })
    }

    /// The prompt of `question` as ids, `<image>` repeated once per image token, and
    /// the position of the first image token; the last `hold` tokens are left out.  A
    /// prompt that fills the context is an error.
    pub(crate) fn prompt_ids(
        &self,
        tok: &SegTokenizer,
        question: &str,
        hold: usize,
    ) -> Result<(Vec<u32>, usize)> {
        let k = self.tokens_per_image();
        let (prompt, image_pos) = tok.prompt(&self.cfg.system_prompt, question)?;
        let mut ids = Vec::with_capacity(prompt.len() + k);
        ids.extend_from_slice(&prompt[..image_pos]);
        ids.extend(std::iter::repeat_n(prompt[image_pos], k));
        ids.extend_from_slice(&prompt[image_pos + 1..]);
        let ctx = self.llava.language_model.cfg.max_position_embeddings;
        if ids.len() >= ctx {
            return Err(Error::arg(
                "SegModel::predict",
                format!(
                    "the prompt takes {} positions ({k} image tokens), the context holds {ctx}",
                    ids.len()
                ),
            ));
        }
        if hold >= ids.len() - image_pos - k {
            return Err(Error::arg(
                "SegModel::prefill",
                format!("holding back {hold} of the prompt's tokens after the image"),
            ));
        }
        ids.truncate(ids.len() - hold);
        Ok((ids, image_pos))
    }

    /// Generates after `pre` (batch 1) with its KV cache until EOS, `max_new_tokens` or
    /// the context's end: the ids, each one's log-probability, and the hidden row that
    /// predicted each.  `bias`, when given, covers every key already in the cache and
    /// grows by 0 for each generated key.
    pub fn decode(
        &self,
        tok: &SegTokenizer,
        pre: Prefill<B::Buf>,
        cfg: &SamplingCfg,
        bias: Option<Vec<f32>>,
    ) -> Result<Decoded<B::Buf>> {
        let be = &self.llava.be;
        let (hdim, v) = (
            self.llava.cfg.text.hidden_size,
            self.llava.cfg.text.vocab_size,
        );
        let n = be.len(&pre.hidden) / hdim;
        if n == 0 || be.len(&pre.logits) < v {
            return Err(Error::shape(
                "SegModel::decode",
                format!(
                    "a prefill of {} hidden and {} logit values (rows of {hdim} and {v})",
                    be.len(&pre.hidden),
                    be.len(&pre.logits)
                ),
            ));
        }
        let rows = Rows::one_per_row(
            pre.cache,
            vec![last_row_f32(be, &pre.logits, v)],
            vec![HiddenRow::one(pre.hidden, n - 1)],
            vec![Rng::new(cfg.seed)],
            bias.map(|b| vec![b]),
        );
        let mut d = self.decode_rows(tok, rows, cfg)?;
        d.pop()
            .ok_or_else(|| Error::shape("SegModel::decode", "no row decoded"))
    }

    /// Generates the answers of `rows` at once, each until its EOS, `max_new_tokens` or
    /// the context's end: per answer (in the order of `rows.rngs`) the ids, each one's
    /// log-probability and the hidden row that predicted each.  Each answer draws from
    /// its own stream; the answers of one cache row draw from its logits, and those
    /// that draw the same token go on sharing one cache row, while the others each take
    /// a copy of it.  An answer that ends leaves the batch (a cache row whose answers
    /// all ended is dropped), so the others run on.  Every answer is what it would be
    /// decoded alone, up to the rounding of a batched matrix product.  With
    /// `rows.bias`, each cache row's bias covers every key in the cache and grows by 0
    /// for each generated key.
    pub(crate) fn decode_rows(
        &self,
        tok: &SegTokenizer,
        rows: Rows<B::Buf>,
        cfg: &SamplingCfg,
    ) -> Result<Vec<Decoded<B::Buf>>> {
        let be = &self.llava.be;
        let lm = &self.llava.language_model;
        let (hdim, v) = (
            self.llava.cfg.text.hidden_size,
            self.llava.cfg.text.vocab_size,
        );
        let ctx = lm.cfg.max_position_embeddings;
        let Rows {
            mut cache,
            mut logits,
            mut hidden,
            mut rngs,
            members,
            mut bias,
        } = rows;
        let (b, n_out) = (cache.b, rngs.len());
        let mut named: Vec<usize> = members.iter().flatten().copied().collect();
        named.sort_unstable();
        let each_once = named.into_iter().eq(0..n_out);
        if logits.len() != b
            || hidden.len() != b
            || members.len() != b
            || members.iter().any(|m| m.is_empty())
            || !each_once
        {
            return Err(Error::shape(
                "SegModel::decode_rows",
                format!(
                    "a cache of batch {b} with {} logit rows, {} hidden rows, {} member lists \
                     (each non-empty, together naming each of {n_out} streams once)",
                    logits.len(),
                    hidden.len(),
                    members.len(),
                ),
            ));
        }
        let mut out: Vec<Decoded<B::Buf>> = (0..n_out)
            .map(|_| Decoded {
                ids: Vec::new(),
                logps: Vec::new(),
                rows: HiddenRows::default(),
            })
            .collect();
        // `live[j]`: the answers that cache row j decodes
        let mut live = members;
        for _ in 0..self.cfg.max_new_tokens {
            // per new cache row: the row it continues, its token, its answers
            let (mut src, mut next, mut groups) =
                (Vec::new(), Vec::new(), Vec::<Vec<usize>>::new());
            for (j, (answers, h)) in live.iter().zip(hidden.drain(..)).enumerate() {
                let dist = TokenDist::new(&logits[j], cfg)?;
                let first = next.len();
                // each answer keeps (a handle on) the row that predicted its token
                for &r in answers {
                    let (t, lp) = dist.draw(&mut rngs[r]);
                    out[r].ids.push(t);
                    out[r].logps.push(lp);
                    out[r].rows.push(h.clone());
                    if t == tok.tok.eos {
                        continue;
                    }
                    match next[first..].iter().position(|&u| u == t) {
                        Some(g) => groups[first + g].push(r),
                        None => {
                            src.push(j);
                            next.push(t);
                            groups.push(vec![r]);
                        }
                    }
                }
            }
            if next.is_empty() || cache.len() + 1 >= ctx {
                break;
            }
            // unless every row goes on as it is: one token each, none ended
            if !src.iter().copied().eq(0..live.len()) {
                cache = lm.select_cache_rows(&cache, &src)?;
                if let Some(bs) = &mut bias {
                    *bs = src.iter().map(|&j| bs[j].clone()).collect();
                }
            }
            live = groups;
            let bias_buf = bias.as_mut().map(|bs| {
                bs.iter_mut().for_each(|row| row.push(0.0));
                bias_rows(be, bs)
            });
            let x = lm.embed(&next)?;
            let n = next.len();
            let (lg, acts) =
                lm.forward_embeds(x, n, 1, None, bias_buf.as_ref(), Some(&mut cache))?;
            logits = rows_f32(be, &lg, &(0..n).collect::<Vec<_>>(), v);
            hidden = HiddenRow::each_of(be, acts.hidden, n, hdim)?;
        }
        Ok(out)
    }

    /// Text and masks of generated ids: each complete codebook group's hidden rows
    /// (row `t` of `hidden_rows` predicted `ids[t]`) → embedding → mask at the image's
    /// size.
    pub fn finish_answer(
        &self,
        tok: &SegTokenizer,
        px: &Pixels,
        enc: &ImageEncoding<B::Buf>,
        ids: Vec<u32>,
        logps: Vec<f32>,
        hidden_rows: &HiddenRows<B::Buf>,
    ) -> Result<Prediction> {
        let (text, groups) = tok.decode_answer(&ids)?;
        let (masks, logits) = self.masks_of_groups(px, enc, &groups, hidden_rows)?;
        Ok(Prediction {
            text,
            masks,
            logits,
            ids,
            logps,
        })
    }

    /// [`Self::finish_answer`] without the masks: the text of generated ids, `masks`
    /// and `logits` left empty.
    pub fn finish_text(
        &self,
        tok: &SegTokenizer,
        ids: Vec<u32>,
        logps: Vec<f32>,
    ) -> Result<Prediction> {
        let (text, _) = tok.decode_answer(&ids)?;
        Ok(Prediction {
            text,
            masks: Vec::new(),
            logits: Vec::new(),
            ids,
            logps,
        })
    }

    /// Masks (thresholded at logit 0) and mask logits at the image's size, one per group
    /// starting at `groups[i]` in `hidden_rows`.
    pub fn masks_of_groups(
        &self,
        px: &Pixels,
        enc: &ImageEncoding<B::Buf>,
        groups: &[usize],
        hidden_rows: &HiddenRows<B::Buf>,
    ) -> Result<AnswerMasks> {
        let be = &self.llava.be;
        let hdim = self.llava.cfg.text.hidden_size;
        let g = self.cfg.group_len();
        let m = groups.len();
        let (mut masks, mut mlogits) = (Vec::with_capacity(m), Vec::with_capacity(m));
        if m == 0 {
            return Ok((masks, mlogits));
        }
        if let Some(&g0) = groups.iter().find(|&&g0| g0 + g > hidden_rows.len()) {
            return Err(Error::shape(
                "SegModel::masks_of_groups",
                format!("group at {g0} of {g} rows, {} rows", hidden_rows.len()),
            ));
        }
        let ts: Vec<usize> = groups.iter().flat_map(|&g0| g0..g0 + g).collect();
        let hid = hidden_rows.gather(be, &ts, hdim)?;
        let rows: Vec<u32> = (0..(m * g) as u32).collect();
        let (emb, _) = self.seg_embeddings(&hid, &rows)?;
        let s = self.cfg.image_size;
        let (dl, _) = self
            .decoder
            .forward(enc.decoder_images(), &emb, &vec![0; m], s, s)?;
        for mi in 0..m {
            let lg = be.to_vec(&self.to_image_logits(&dl, mi * s * s, px)?);
            let lg: Vec<f32> = lg.iter().map(|x| x.to_f32().unwrap_or(f32::NAN)).collect();
            masks.push(lg.iter().map(|&x| u8::from(x > 0.0)).collect());
            mlogits.push(lg);
        }
        Ok((masks, mlogits))
    }
}

/// `group` of each of `groups` (indices of n questions; the groups side by side where
/// the backend gains from it, [`map_jobs`]), which gives each of its questions' result
/// with the question's index; the results in the questions' order.  A question left
/// without one is an error.
pub(crate) fn by_groups<F: Float, B: Backend<F>, R: Send>(
    be: &B,
    what: &'static str,
    n: usize,
    groups: Vec<Vec<usize>>,
    group: impl Fn(Vec<usize>) -> Result<Vec<(usize, R)>> + Sync + Send,
) -> Result<Vec<R>> {
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    for done in map_jobs(be, groups, group) {
        for (i, r) in done? {
            out[i] = Some(r);
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.ok_or_else(|| Error::shape(what, format!("no answer for question {i} of {n}")))
        })
        .collect()
}

/// The questions of `prompts` that are decoded together (`SegModel::predict`): the
/// prompts with room for `max_new` tokens after them in a context of `ctx` positions,
/// shortest first, in sets of at most `most` (each padded to its longest; the sets as
/// near one size as they can be), then the others by length.  A padded row stops when
/// its set's longest prompt reaches the context's end, so only prompts that never reach
/// it, whatever they are padded to, share a set with shorter ones.
pub(crate) fn decode_sets(
    prompts: &[(Vec<u32>, usize)],
    max_new: usize,
    ctx: usize,
    most: usize,
) -> Vec<Vec<usize>> {
    // None (the prompts that fit) sorts before every length
    let mut sets: std::collections::BTreeMap<Option<usize>, Vec<usize>> = Default::default();
    for (i, (ids, _)) in prompts.iter().enumerate() {
        let key = (ids.len() + max_new > ctx).then_some(ids.len());
        sets.entry(key).or_default().push(i);
    }
    let mut fit = sets.remove(&None).unwrap_or_default();
    fit.sort_by_key(|&i| prompts[i].0.len());
    let parts = fit.len().div_ceil(most.max(1));
    let mut out = Vec::with_capacity(parts + sets.len());
    let mut rest = &fit[..];
    for p in (1..=parts).rev() {
        let (set, after) = rest.split_at(rest.len().div_ceil(p));
        out.push(set.to_vec());
        rest = after;
    }
    out.extend(sets.into_values());
    out
}

/// The most questions one decode takes on `be` ([`decode_sets`]) when each decodes
/// `rows` answers: all of them on a device, where a step's launches cost the same for
/// one row as for many; on a backend whose callers run side by side (the CPU's),
/// [`CPU_DECODE_ROWS`] rows' worth (one question at least), so that a batch makes jobs
/// for several threads ([`map_jobs`]) and its products stay the size that keeps them
/// busy.
pub(crate) fn decode_set_size<F: Float, B: Backend<F>>(be: &B, rows: usize) -> usize {
    if be.concurrent_callers() {
        (CPU_DECODE_ROWS / rows.max(1)).max(1)
    } else {
        usize::MAX
    }
}

/// Answers per decode on the CPU ([`decode_set_size`]).  Measured on the 2-core host
/// with a demo-sized model: `popen predict` of 180 world questions (batches of 16), one
/// answer, 1.12 / 1.03 / 1.20 s in sets of 4 / 8 / 16 questions (1.50 s by prompt
/// length, unpadded); the ensemble (K = 3) 2.78 / 2.79 / 4.4 s in sets of 4 / 8 / 16
/// questions and 2.76 s in sets of 2 (3.0 s by length); 24 questions in batches of 8
/// with K = 4, 0.67 s in sets of 8 questions, 0.48 s in sets of 2 (0.51 s by length).
pub(crate) const CPU_DECODE_ROWS: usize = 8;

/// The last row (width `v`) of a row-major buffer, as f32: the logits of the position
/// that predicts the next token.
pub(crate) fn last_row_f32<F: Float, B: Backend<F>>(be: &B, x: &B::Buf, v: usize) -> Vec<f32> {
    let n = be.len(x) / v.max(1);
    rows_f32(be, x, &[n.saturating_sub(1)], v).remove(0)
}

/// Rows `rows` (width `v`) of a row-major buffer, as f32, read back in one copy.
pub(crate) fn rows_f32<F: Float, B: Backend<F>>(
    be: &B,
    x: &B::Buf,
    rows: &[usize],
    v: usize,
) -> Vec<Vec<f32>> {
    let all = be.to_vec(x);
    rows.iter()
        .map(|&r| {
            all[r * v..(r + 1) * v]
                .iter()
                .map(|x| x.to_f32().unwrap_or(f32::NAN))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::decode_sets;

    fn prompts(lens: &[usize]) -> Vec<(Vec<u32>, usize)> {
        lens.iter().map(|&n| (vec![7; n], 0)).collect()
    }

    #[test]
    fn prompts_with_room_decode_in_one_set_the_others_by_length() {
        // room for 10 new tokens in 30 positions: lengths up to 20 fit
        let p = prompts(&[12, 25, 20, 5, 25, 21, 12]);
        let all = usize::MAX;
        assert_eq!(
            decode_sets(&p, 10, 30, all),
            vec![vec![3, 0, 6, 2], vec![5], vec![1, 4]]
        );
        // all fit, or none
        assert_eq!(decode_sets(&p, 1, 30, all), vec![vec![3, 0, 6, 2, 5, 1, 4]]);
        assert_eq!(
            decode_sets(&p, 30, 30, all),
            vec![vec![3], vec![0, 6], vec![2], vec![5], vec![1, 4]]
        );
        // at most 3 a set: 7 in sets of 3, 2 and 2, shortest first; 4 in 2 and 2
        assert_eq!(
            decode_sets(&p, 1, 30, 3),
            vec![vec![3, 0, 6], vec![2, 5], vec![1, 4]]
        );
        assert_eq!(
            decode_sets(&p, 10, 30, 3),
            vec![vec![3, 0], vec![6, 2], vec![5], vec![1, 4]]
        );
        assert_eq!(decode_sets(&p, 1, 30, 0).len(), 7, "at least one a set");
        assert!(decode_sets(&[], 10, 30, all).is_empty());
    }
}
