//! Inference: encode the images once, generate each answer with the KV cache, read the
//! codebook tokens' hidden states as they are generated, and decode one mask per
//! complete codebook group at the image's own size.
use super::model::SegModel;
use super::preprocess::Pixels;
use super::prompt::SegTokenizer;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::{sample_token, Rng, SamplingCfg};
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
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let be = &self.llava.be;
        let b = items.len();
        let idx = self.state_indices()?;
        let upto = idx.iter().copied().max().unwrap_or(0);
        let px: Vec<&Pixels> = items.iter().map(|x| x.0).collect();
        let pixels = self.stack_pixels(&px)?;
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
        items
            .iter()
            .enumerate()
            .map(|(i, (p, q))| {
                let mut im = be.zeros(k * hdim);
                be.copy_range(&mut im, 0, &img, i * k * hdim, k * hdim)?;
                let mut g0 = be.zeros(k * cv);
                be.copy_range(&mut g0, 0, &f0, i * k * cv, k * cv)?;
                let mut g1 = be.zeros(k * cv);
                be.copy_range(&mut g1, 0, &f1, i * k * cv, k * cv)?;
                let mut c = *cfg;
                c.seed = cfg.seed.wrapping_add(i as u64);
                self.answer_one(tok, p, q, &im, [&g0, &g1], &c)
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

    fn answer_one(
        &self,
        tok: &SegTokenizer,
        px: &Pixels,
        question: &str,
        img: &B::Buf,
        feats: [&B::Buf; 2],
        cfg: &SamplingCfg,
    ) -> Result<Prediction> {
        let be = &self.llava.be;
        let lm = &self.llava.language_model;
        let (hdim, v) = (
            self.llava.cfg.text.hidden_size,
            self.llava.cfg.text.vocab_size,
        );
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
        let mut x = lm.embed(&ids)?;
        be.copy_range(&mut x, image_pos * hdim, img, 0, k * hdim)?;
        let mut cache = lm.new_cache(1);
        let (mut logits, mut acts) =
            lm.forward_embeds(x, 1, ids.len(), None, None, Some(&mut cache))?;
        let mut rng = Rng::new(cfg.seed);
        let (mut gen, mut logps, mut hidden_rows) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.cfg.max_new_tokens {
            let all = be.to_vec(&logits);
            let last: Vec<f32> = all[all.len() - v..]
                .iter()
                .map(|x| x.to_f32().unwrap_or(f32::NAN))
                .collect();
            let (t, lp) = sample_token(&last, cfg, &mut rng)?;
            // the hidden state of the position that predicts `t`
            let n = be.len(&acts.hidden) / hdim;
            let mut h = be.zeros(hdim);
            be.copy_range(&mut h, 0, &acts.hidden, (n - 1) * hdim, hdim)?;
            hidden_rows.push(h);
            gen.push(t);
            logps.push(lp);
            if t == tok.tok.eos || cache.len() + 1 >= ctx {
                break;
            }
            let x = lm.embed(&[t])?;
            (logits, acts) = lm.forward_embeds(x, 1, 1, None, None, Some(&mut cache))?;
        }
        let (text, groups) = tok.decode_answer(&gen)?;
        let g = self.cfg.group_len();
        let m = groups.len();
        let (mut masks, mut mlogits) = (Vec::with_capacity(m), Vec::with_capacity(m));
        if m > 0 {
            let mut hid = be.zeros(m * g * hdim);
            for (gi, &g0) in groups.iter().enumerate() {
                for j in 0..g {
                    be.copy_range(&mut hid, (gi * g + j) * hdim, &hidden_rows[g0 + j], 0, hdim)?;
                }
            }
            let rows: Vec<u32> = (0..(m * g) as u32).collect();
            let (emb, _) = self.seg_embeddings(&hid, &rows)?;
            let s = self.cfg.image_size;
            let (dl, _) = self.decoder.forward(feats, 1, &emb, &vec![0; m], s, s)?;
            for mi in 0..m {
                let lg = be.to_vec(&self.to_image_logits(&dl, mi * s * s, px)?);
                let lg: Vec<f32> = lg.iter().map(|x| x.to_f32().unwrap_or(f32::NAN)).collect();
                masks.push(lg.iter().map(|&x| u8::from(x > 0.0)).collect());
                mlogits.push(lg);
            }
        }
        Ok(Prediction {
            text,
            masks,
            logits: mlogits,
            ids: gen,
            logps,
        })
    }
}
