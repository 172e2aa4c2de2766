//! Inference: encode the images once, generate each answer with the KV cache, read the
//! codebook tokens' hidden states as they are generated, and decode one mask per
//! complete codebook group at the image's own size.
use super::model::SegModel;
use super::preprocess::Pixels;
use super::prompt::SegTokenizer;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::{sample_token, KvCache, Rng, SamplingCfg};
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
    /// The generated ids (EOS included when generated) and each one's log-probability.
    pub ids: Vec<u32>,
    pub logps: Vec<f32>,
}

/// The prompt after one forward: its KV cache, and the logits and last hidden states
/// of its positions (the last row predicts the first answer token).
#[derive(Clone, Debug)]
pub struct Prefill<Buf> {
    pub cache: KvCache<Buf>,
    pub logits: Buf,
    pub hidden: Buf,
}

/// Generated ids, each one's log-probability and the hidden row that predicted it.
pub(crate) struct Decoded<Buf> {
    pub ids: Vec<u32>,
    pub logps: Vec<f32>,
    pub rows: Vec<Buf>,
}

/// Masks of one answer (height·width each, 1 = object) and their logits.
pub type AnswerMasks = (Vec<Vec<u8>>, Vec<Vec<f32>>);

/// One image encoded once: its projected tokens (K, C) for the LLM and the two ViT
/// feature levels (K, Cv) for the pixel decoder.
#[derive(Clone, Debug)]
pub struct ImageEncoding<Buf> {
    pub tokens: Buf,
    pub feats: [Buf; 2],
}

impl<F: Float, B: Backend<F>> SegModel<F, B> {
    /// Answers each `(image, question)`; images are encoded in one batch, answers are
    /// generated one by one with the KV cache (greedy when `cfg.temperature` is 0).
    /// Item `i` samples from the stream seeded `cfg.seed + i`.
    pub fn predict(
        &self,
        tok: &SegTokenizer,
        items: &[(&Pixels, &str)],
        cfg: &SamplingCfg,
    ) -> Result<Vec<Prediction>> {
        let px: Vec<&Pixels> = items.iter().map(|x| x.0).collect();
        self.encode_images(&px)?
            .iter()
            .zip(items)
            .enumerate()
            .map(|(i, (enc, (p, q)))| {
                let mut c = *cfg;
                c.seed = cfg.seed.wrapping_add(i as u64);
                self.answer_one(tok, p, q, enc, &c)
            })
            .collect()
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
            .forward(be, &self.patches_of(&hs[idx[0]], b)?)?;
        let f0 = self.patches_of(&hs[idx[1]], b)?;
        let f1 = self.patches_of(&hs[idx[2]], b)?;
        let v = self.llava.cfg.vision.clone();
        let (k, cv) = (v.num_patches(), v.hidden_size);
        let hdim = self.llava.cfg.text.hidden_size;
        (0..b)
            .map(|i| {
                let mut tokens = be.zeros(k * hdim);
                be.copy_range(&mut tokens, 0, &img, i * k * hdim, k * hdim)?;
                let mut g0 = be.zeros(k * cv);
                be.copy_range(&mut g0, 0, &f0, i * k * cv, k * cv)?;
                let mut g1 = be.zeros(k * cv);
                be.copy_range(&mut g1, 0, &f1, i * k * cv, k * cv)?;
                Ok(ImageEncoding {
                    tokens,
                    feats: [g0, g1],
                })
            })
            .collect()
    }

    /// Patches (B·K, Cv) of a hidden state, class token dropped.
    pub fn patches_of(&self, h: &B::Buf, b: usize) -> Result<B::Buf> {
        let be = &self.llava.be;
        let v = &self.llava.cfg.vision;
        let (k, cv) = (v.num_patches(), v.hidden_size);
        let mut f = be.zeros(b * k * cv);
        for i in 0..b {
            be.copy_range(&mut f, i * k * cv, h, (i * (k + 1) + 1) * cv, k * cv)?;
        }
        Ok(f)
    }

    /// The prompt of `question` with the image's tokens in place, through the LLM with
    /// a fresh KV cache (batch 1): the cache and the logits of its last position.
    pub fn prefill(
        &self,
        tok: &SegTokenizer,
        question: &str,
        enc: &ImageEncoding<B::Buf>,
    ) -> Result<Prefill<B::Buf>> {
        self.prefill_holding(tok, question, enc, 0)
    }

    /// [`Self::prefill`] with the prompt's last `hold` tokens not fed (the ensemble feeds
    /// the answer header `ASSISTANT:` after its own inputs).
    pub fn prefill_holding(
        &self,
        tok: &SegTokenizer,
        question: &str,
        enc: &ImageEncoding<B::Buf>,
        hold: usize,
    ) -> Result<Prefill<B::Buf>> {
        let be = &self.llava.be;
        let lm = &self.llava.language_model;
        let hdim = self.llava.cfg.text.hidden_size;
        let k = self.tokens_per_image();
        let (prompt, image_pos) = tok.prompt(&self.cfg.system_prompt, question)?;
        let mut ids = Vec::with_capacity(prompt.len() + k);
        ids.extend_from_slice(&prompt[..image_pos]);
        ids.extend(std::iter::repeat_n(prompt[image_pos], k));
        ids.extend_from_slice(&prompt[image_pos + 1..]);
        let ctx = lm.cfg.max_position_embeddings;
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

    fn answer_one(
        &self,
        tok: &SegTokenizer,
        px: &Pixels,
        question: &str,
        enc: &ImageEncoding<B::Buf>,
        cfg: &SamplingCfg,
    ) -> Result<Prediction> {
        let pre = self.prefill(tok, question, enc)?;
        let d = self.decode(tok, pre, cfg, None)?;
        self.finish_answer(tok, px, &enc.feats, d.ids, d.logps, &d.rows)
    }

    /// Generates after `pre` (batch 1) with its KV cache until EOS, `max_new_tokens` or
    /// the context's end: the ids, each one's log-probability, and the hidden row that
    /// predicted each.  `bias`, when given, covers every key already in the cache and
    /// grows by 0 for each generated key.
    pub(crate) fn decode(
        &self,
        tok: &SegTokenizer,
        pre: Prefill<B::Buf>,
        cfg: &SamplingCfg,
        mut bias: Option<Vec<f32>>,
    ) -> Result<Decoded<B::Buf>> {
        let be = &self.llava.be;
        let lm = &self.llava.language_model;
        let (hdim, v) = (
            self.llava.cfg.text.hidden_size,
            self.llava.cfg.text.vocab_size,
        );
        let ctx = lm.cfg.max_position_embeddings;
        let Prefill {
            mut cache,
            mut logits,
            hidden: mut last_hidden,
        } = pre;
        let mut rng = Rng::new(cfg.seed);
        let (mut gen, mut logps, mut hidden_rows) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.cfg.max_new_tokens {
            let last = last_row_f32(be, &logits, v);
            let (t, lp) = sample_token(&last, cfg, &mut rng)?;
            // the hidden state of the position that predicts `t`
            let n = be.len(&last_hidden) / hdim;
            let mut h = be.zeros(hdim);
            be.copy_range(&mut h, 0, &last_hidden, (n - 1) * hdim, hdim)?;
            hidden_rows.push(h);
            gen.push(t);
            logps.push(lp);
            if t == tok.tok.eos || cache.len() + 1 >= ctx {
                break;
            }
            let b = match &mut bias {
                Some(b) => {
                    b.push(0.0);
                    let f: Vec<F> = b
                        .iter()
                        .map(|&x| F::from(x).unwrap_or_else(F::zero))
                        .collect();
                    Some(be.from_slice(&f))
                }
                None => None,
            };
            let x = lm.embed(&[t])?;
            let (lg, acts) = lm.forward_embeds(x, 1, 1, None, b.as_ref(), Some(&mut cache))?;
            (logits, last_hidden) = (lg, acts.hidden);
        }
        Ok(Decoded {
            ids: gen,
            logps,
            rows: hidden_rows,
        })
    }

    /// Text and masks of generated ids: each complete codebook group's hidden rows
    /// (`hidden_rows[t]` predicted `ids[t]`) → embedding → mask at the image's size.
    pub fn finish_answer(
        &self,
        tok: &SegTokenizer,
        px: &Pixels,
        feats: &[B::Buf; 2],
        ids: Vec<u32>,
        logps: Vec<f32>,
        hidden_rows: &[B::Buf],
    ) -> Result<Prediction> {
        let (text, groups) = tok.decode_answer(&ids)?;
        let (masks, logits) = self.masks_of_groups(px, feats, &groups, hidden_rows)?;
        Ok(Prediction {
            text,
            masks,
            logits,
            ids,
            logps,
        })
    }

    /// Masks (thresholded at logit 0) and mask logits at the image's size, one per group
    /// starting at `groups[i]` in `hidden_rows`.
    pub fn masks_of_groups(
        &self,
        px: &Pixels,
        feats: &[B::Buf; 2],
        groups: &[usize],
        hidden_rows: &[B::Buf],
    ) -> Result<AnswerMasks> {
        let be = &self.llava.be;
        let hdim = self.llava.cfg.text.hidden_size;
        let g = self.cfg.group_len();
        let m = groups.len();
        let (mut masks, mut mlogits) = (Vec::with_capacity(m), Vec::with_capacity(m));
        if m == 0 {
            return Ok((masks, mlogits));
        }
        let mut hid = be.zeros(m * g * hdim);
        for (gi, &g0) in groups.iter().enumerate() {
            for j in 0..g {
                let row = hidden_rows.get(g0 + j).ok_or_else(|| {
                    Error::shape(
                        "SegModel::masks_of_groups",
                        format!("group at {g0} of {g} rows, {} rows", hidden_rows.len()),
                    )
                })?;
                be.copy_range(&mut hid, (gi * g + j) * hdim, row, 0, hdim)?;
            }
        }
        let rows: Vec<u32> = (0..(m * g) as u32).collect();
        let (emb, _) = self.seg_embeddings(&hid, &rows)?;
        let s = self.cfg.image_size;
        let (dl, _) = self
            .decoder
            .forward([&feats[0], &feats[1]], 1, &emb, &vec![0; m], s, s)?;
        for mi in 0..m {
            let lg = be.to_vec(&self.to_image_logits(&dl, mi * s * s, px)?);
            let lg: Vec<f32> = lg.iter().map(|x| x.to_f32().unwrap_or(f32::NAN)).collect();
            masks.push(lg.iter().map(|&x| u8::from(x > 0.0)).collect());
            mlogits.push(lg);
        }
        Ok((masks, mlogits))
    }
}

/// The last row (width `v`) of a row-major buffer, as f32: the logits of the position
/// that predicts the next token.
pub(crate) fn last_row_f32<F: Float, B: Backend<F>>(be: &B, x: &B::Buf, v: usize) -> Vec<f32> {
    let all = be.to_vec(x);
    all[all.len() - v..]
        .iter()
        .map(|x| x.to_f32().unwrap_or(f32::NAN))
        .collect()
}
