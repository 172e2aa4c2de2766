//! Stage 3's loss (Supp, Eq. 8 and 9) and its gradient with respect to the learnable
//! prompt `p̂` alone: the model is frozen, the K samples, their segmentation embeddings
//! and the refined answer `ỹ` are data (drawn by the ensemble, then held fixed), and
//! the loss reads them through the two refinement sequences of Sec. 3.3:
//!
//! - text: `[image, x, y_1 … y_K, p̂, ASSISTANT:, ỹ]` with `γ(τ)` on the `y` keys;
//!   `p(ỹ) = exp(mean_j log p(ỹ_j))`, the length-normalised probability (the paper's
//!   "probability of the LVLM generating ỹ"; a product over tokens would vanish with
//!   the length).  `Lti = −1/K Σ_k log σ(10·p(ỹ)·(cos(h̃, h_g) − cos(h_k, h_g)))`, the
//!   cosine gaps `Δ_k` computed once from frozen sentence features;
//! - segmentation: `[image, x, y_1 … y_K, p̂, {f_k^n}, ASSISTANT:, ỹ]` with `γ(η)` on
//!   the `f` keys; `f̃` at `ỹ`'s codebook positions → decoder → soft IoU (the mask
//!   kernel's twin) against the matched ground truth.  `Lsi = −1/(K·N) Σ_n Σ_k
//!   log σ(10·(IoU(M̃_n, M_g) − IoU(M_k^n, M_g)))`, the samples' IoUs hard and fixed.
//!
//! Backward, with `z` the argument of each `log σ`: `∂(−log σ(z))/∂z = σ(z) − 1`;
//! `∂p/∂log p(ỹ_j) = p / T`; the rest is the model's own backward with its weights
//! frozen, down to the input embeddings, whose `p̂` rows are the gradient.
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::kernels::mask::{soft_iou_bwd_cpu, soft_iou_from_sums, soft_iou_sums_cpu};
use crate::model::seg::{ImageEncoding, Pixels, SegModel, SegTokenizer};
use num_traits::Float;

/// The scale inside both `log σ` (Eq. 8, 9).
pub const IMPROVEMENT_SCALE: f64 = 10.0;

/// One question's stage-3 data: what the ensemble drew with the frozen model.
#[derive(Clone, Debug)]
pub struct RefineData {
    /// The question's preprocessed image.
    pub pixels: Pixels,
    /// The question `x`.
    pub question: String,
    /// `y_1 … y_K` end to end (EOS dropped) and the bias on each of their keys.
    pub ys: Vec<u32>,
    /// `γ = σ(τ) − 0.5` of each id of `ys` (0 with `gamma` off).
    pub y_bias: Vec<f32>,
    /// The samples' codebook hidden rows (n_f × C) and the bias on each.
    pub f_rows: Vec<f32>,
    /// `γ = σ(η) − 0.5` of each row of `f_rows`, its target's `η` over all its `G` rows
    /// (n_f values; 0 with `gamma` off).
    pub f_bias: Vec<f32>,
    /// `ỹ` as generated (EOS included when generated) and its groups' start positions.
    pub answer: Vec<u32>,
    /// One per target of `ỹ`: the index in `answer` where its codebook group starts.
    pub answer_groups: Vec<usize>,
    /// `Δ_k = cos(h̃, h_g) − cos(h_k, h_g)`, one per sample; empty: no `Lti`.
    pub delta_text: Vec<f64>,
    /// `ỹ`'s targets matched to ground truth; empty: no `Lsi`.
    pub seg_pairs: Vec<SegPair>,
}

/// One refined target and its ground truth.
#[derive(Clone, Debug)]
pub struct SegPair {
    /// Index among `ỹ`'s targets.
    pub target: usize,
    /// The ground-truth mask at the image's size (1 = object).
    pub gt: Vec<u8>,
    /// `IoU(M_k^n, M_g)` of each sample's mask matched to the same ground truth (0 when
    /// the sample has none).
    pub orig: Vec<f64>,
}

/// The loss of one question.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RefineLoss {
    /// `Lti` (Eq. 8); `None` when not computed (no cosine gaps, no answer, or the text
    /// sequence does not fit the context).
    pub lti: Option<f64>,
    /// `Lsi` (Eq. 9); `None` when not computed (no matched pair, no codebook group, or
    /// the segmentation sequence does not fit the context).
    pub lsi: Option<f64>,
}

impl RefineLoss {
    /// `Lti + Lsi`, a term not computed counting as 0.
    pub fn total(&self) -> f64 {
        self.lti.unwrap_or(0.0) + self.lsi.unwrap_or(0.0)
    }
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// `−log σ(z)`, stable for large |z|.
fn neg_log_sigmoid(z: f64) -> f64 {
    if z > 0.0 {
        (-z).exp().ln_1p()
    } else {
        -z + z.exp().ln_1p()
    }
}

impl<F: Float, B: Backend<F>> SegModel<F, B> {
    /// Stage 3's loss of one question under prompt `p̂` (P·C values) and, with
    /// `backward`, its gradient with respect to `p̂` (P·C).  The model's own weights
    /// must be frozen (`set_trainable(Trainable::none())`): their gradients are not
    /// wanted and would otherwise accumulate.
    pub fn refine_loss(
        &mut self,
        tok: &SegTokenizer,
        d: &RefineData,
        prompt: &[F],
        backward: bool,
    ) -> Result<(RefineLoss, Option<Vec<F>>)> {
        let hdim = self.llava.cfg.text.hidden_size;
        let op = "SegModel::refine_loss";
        if prompt.is_empty() || !prompt.len().is_multiple_of(hdim) {
            return Err(Error::shape(
                op,
                format!("prompt of {} values, hidden size {hdim}", prompt.len()),
            ));
        }
        crate::error::check_len(op, "y_bias", d.y_bias.len(), d.ys.len())?;
        crate::error::check_len(op, "f_rows", d.f_rows.len(), d.f_bias.len() * hdim)?;
        let mut loss = RefineLoss::default();
        let mut grad = vec![F::zero(); prompt.len()];
        // the frozen tower's encoding, shared by both halves
        let enc = self.encode_images(&[&d.pixels])?.remove(0);
        // a term whose sequence does not fit the context is skipped, as the ensemble
        // skips that half at inference
        if !d.delta_text.is_empty() && !d.answer.is_empty() {
            if let Some((l, g)) = self.text_term(tok, d, &enc, prompt, backward)? {
                loss.lti = Some(l);
                add(&mut grad, &g);
            }
        }
        if !d.seg_pairs.is_empty() && !d.answer_groups.is_empty() {
            if let Some((l, g)) = self.seg_term(tok, d, &enc, prompt, backward)? {
                loss.lsi = Some(l);
                add(&mut grad, &g);
            }
        }
        if !loss.total().is_finite() {
            return Err(Error::NonFinite {
                what: format!("stage-3 loss of `{}`", d.question),
            });
        }
        Ok((loss, backward.then_some(grad)))
    }

    /// The input embeddings and key bias of `[body, ys, p̂, extra rows, header, tail]`,
    /// and where `p̂` and `tail` start.
    fn refine_sequence(
        &self,
        tok: &SegTokenizer,
        d: &RefineData,
        enc: &ImageEncoding<B::Buf>,
        prompt: &[F],
        extra: (&[f32], &[f32]),
        tail: &[u32],
    ) -> Result<Option<Sequence<B::Buf>>> {
        let be = &self.llava.be;
        let lm = &self.llava.language_model;
        let hdim = self.llava.cfg.text.hidden_size;
        let k = self.tokens_per_image();
        let (p, image_pos) = tok.prompt(&self.cfg.system_prompt, &d.question)?;
        let header = tok.answer_header()?;
        let body = &p[..p.len() - header.len()];
        let mut ids: Vec<u32> = body[..image_pos].to_vec();
        ids.extend(std::iter::repeat_n(body[image_pos], k));
        ids.extend_from_slice(&body[image_pos + 1..]);
        let mut bias = vec![0f32; ids.len()];
        ids.extend_from_slice(&d.ys);
        bias.extend_from_slice(&d.y_bias);
        let p_at = ids.len();
        let n_p = prompt.len() / hdim;
        let n_x = extra.1.len();
        ids.extend(std::iter::repeat_n(tok.tok.eos, n_p + n_x)); // rows overwritten below
        bias.extend(std::iter::repeat_n(0.0, n_p));
        bias.extend_from_slice(extra.1);
        ids.extend_from_slice(&header);
        let tail_at = ids.len();
        ids.extend_from_slice(tail);
        bias.resize(ids.len(), 0.0);
        let ctx = self.llava.cfg.text.max_position_embeddings;
        if ids.len() >= ctx {
            return Ok(None);
        }
        let mut x = lm.embed(&ids)?;
        be.copy_range(&mut x, image_pos * hdim, &enc.tokens, 0, k * hdim)?;
        be.copy_range(&mut x, p_at * hdim, &be.from_slice(prompt), 0, prompt.len())?;
        if n_x > 0 {
            let rows: Vec<F> = extra
                .0
                .iter()
                .map(|&v| F::from(v).unwrap_or_else(F::zero))
                .collect();
            be.copy_range(
                &mut x,
                (p_at + n_p) * hdim,
                &be.from_slice(&rows),
                0,
                rows.len(),
            )?;
        }
        let bias: Vec<F> = bias
            .iter()
            .map(|&v| F::from(v).unwrap_or_else(F::zero))
            .collect();
        Ok(Some(Sequence {
            x,
            bias: be.from_slice(&bias),
            t: ids.len(),
            p_at,
            tail_at,
        }))
    }

    /// `Lti` and its gradient.
    fn text_term(
        &mut self,
        tok: &SegTokenizer,
        d: &RefineData,
        enc: &ImageEncoding<B::Buf>,
        prompt: &[F],
        backward: bool,
    ) -> Result<Option<(f64, Vec<F>)>> {
        let be = self.llava.be.clone();
        let hdim = self.llava.cfg.text.hidden_size;
        let v = self.llava.cfg.text.vocab_size;
        let n = d.answer.len();
        let Some(seq) =
            self.refine_sequence(tok, d, enc, prompt, (&[], &[]), &d.answer[..n - 1])?
        else {
            return Ok(None);
        };
        let lm = &mut self.llava.language_model;
        let (logits, acts) = lm.forward_embeds(seq.x, 1, seq.t, None, Some(&seq.bias), None)?;
        let mut targets = vec![crate::kernels::logprob::IGNORE_INDEX; seq.t];
        for (j, &a) in d.answer.iter().enumerate() {
            targets[seq.tail_at - 1 + j] = a as i32;
        }
        let (mut logp, mut lse) = (be.uninit(seq.t), be.uninit(seq.t));
        be.logprob_fwd(&logits, &targets, v, &mut logp, &mut lse)?;
        let lp = be.to_vec(&logp);
        let mean = (0..n)
            .map(|j| lp[seq.tail_at - 1 + j].to_f64().unwrap_or(f64::NAN))
            .sum::<f64>()
            / n as f64;
        let p = mean.exp();
        let kk = d.delta_text.len() as f64;
        let (mut loss, mut dl_dp) = (0.0, 0.0);
        for &delta in &d.delta_text {
            let z = IMPROVEMENT_SCALE * p * delta;
            loss += neg_log_sigmoid(z) / kk;
            dl_dp += (sigmoid(z) - 1.0) * IMPROVEMENT_SCALE * delta / kk;
        }
        if !backward {
            return Ok(Some((loss, Vec::new())));
        }
        let mut dlogp = vec![F::zero(); seq.t];
        let c = F::from(dl_dp * p / n as f64).unwrap_or_else(F::zero);
        for j in 0..n {
            dlogp[seq.tail_at - 1 + j] = c;
        }
        let mut dlogits = be.uninit(seq.t * v);
        be.logprob_bwd(
            &logits,
            &targets,
            v,
            &lse,
            &be.from_slice(&dlogp),
            &mut dlogits,
        )?;
        let dx = lm.backward_with_hidden(&acts, &dlogits, None)?;
        Ok(Some((
            loss,
            prompt_rows(&be, &dx, seq.p_at, hdim, prompt.len())?,
        )))
    }

    /// `Lsi` and its gradient.
    fn seg_term(
        &mut self,
        tok: &SegTokenizer,
        d: &RefineData,
        enc: &ImageEncoding<B::Buf>,
        prompt: &[F],
        backward: bool,
    ) -> Result<Option<(f64, Vec<F>)>> {
        let be = self.llava.be.clone();
        let hdim = self.llava.cfg.text.hidden_size;
        let v = self.llava.cfg.text.vocab_size;
        let g = self.cfg.group_len();
        let s = self.cfg.image_size;
        let eos = tok.tok.eos;
        let ans: Vec<u32> = d.answer.iter().copied().take_while(|&t| t != eos).collect();
        let Some(seq) = self.refine_sequence(tok, d, enc, prompt, (&d.f_rows, &d.f_bias), &ans)?
        else {
            return Ok(None);
        };
        let (_, acts) = self.llava.language_model.forward_embeds(
            seq.x,
            1,
            seq.t,
            None,
            Some(&seq.bias),
            None,
        )?;
        let m = d.answer_groups.len();
        let rows: Vec<u32> = d
            .answer_groups
            .iter()
            .flat_map(|&g0| (0..g).map(move |j| (seq.tail_at + g0 + j - 1) as u32))
            .collect();
        let (emb, head) = self.seg_embeddings(&acts.hidden, &rows)?;
        let (dl, dec) = self
            .decoder
            .forward(enc.decoder_images(), &emb, &vec![0; m], s, s)?;
        let px = &d.pixels;
        let npx = px.height * px.width;
        let kk = d.seg_pairs.first().map_or(1, |p| p.orig.len()).max(1) as f64;
        let nn = d.seg_pairs.len() as f64;
        let mut loss = 0.0;
        let mut dlogits_mask = be.zeros(m * s * s);
        for pair in &d.seg_pairs {
            if pair.target >= m || pair.gt.len() != npx {
                return Err(Error::shape(
                    "SegModel::refine_loss",
                    format!(
                        "pair for target {} of {m}, mask of {} for {npx} pixels",
                        pair.target,
                        pair.gt.len()
                    ),
                ));
            }
            let lg = self.to_image_logits(&dl, pair.target * s * s, px)?;
            // the soft IoU in f64 on the host (the mask kernel's CPU twin)
            let prob: Vec<f64> = be
                .to_vec(&lg)
                .iter()
                .map(|&x| sigmoid(x.to_f64().unwrap_or(f64::NAN)))
                .collect();
            let mut sums = vec![0f64; 3];
            soft_iou_sums_cpu(&prob, &pair.gt, 1, npx, &mut sums)?;
            let iou = soft_iou_from_sums(&sums);
            let mut d_iou = 0.0;
            for &o in &pair.orig {
                let z = IMPROVEMENT_SCALE * (iou - o);
                loss += neg_log_sigmoid(z) / (kk * nn);
                d_iou += (sigmoid(z) - 1.0) * IMPROVEMENT_SCALE / (kk * nn);
            }
            if backward {
                let mut dprob = vec![0f64; npx];
                soft_iou_bwd_cpu(&pair.gt, &sums, &[d_iou], 1, npx, &mut dprob)?;
                // σ' = p(1 − p)
                let dlg: Vec<F> = dprob
                    .iter()
                    .zip(&prob)
                    .map(|(&dp, &p)| F::from(dp * p * (1.0 - p)).unwrap_or_else(F::zero))
                    .collect();
                self.to_image_logits_bwd(
                    &be.from_slice(&dlg),
                    0,
                    pair.target * s * s,
                    px,
                    &mut dlogits_mask,
                )?;
            }
        }
        if !backward {
            return Ok(Some((loss, Vec::new())));
        }
        let (_, demb) = self.decoder.backward(&dec, &dlogits_mask)?;
        let dout = self.average_scales_bwd(&demb, m)?;
        let dgath = self.seg_head.backward(&be, &head, &dout)?;
        let mut dhidden = be.zeros(seq.t * hdim);
        be.embedding_bwd(&rows, &dgath, hdim, &mut dhidden)?;
        let dlogits = be.zeros(seq.t * v);
        let dx = self
            .llava
            .language_model
            .backward_with_hidden(&acts, &dlogits, Some(&dhidden))?;
        Ok(Some((
            loss,
            prompt_rows(&be, &dx, seq.p_at, hdim, prompt.len())?,
        )))
    }
}

/// One refinement sequence, ready for the LLM.
struct Sequence<Buf> {
    x: Buf,
    bias: Buf,
    t: usize,
    p_at: usize,
    tail_at: usize,
}

/// The `p̂` rows of an input-embedding gradient: `n` values from row `p_at` (width `w`).
fn prompt_rows<F: Float, B: Backend<F>>(
    be: &B,
    dx: &B::Buf,
    p_at: usize,
    w: usize,
    n: usize,
) -> Result<Vec<F>> {
    let mut out = be.uninit(n);
    be.copy_range(&mut out, 0, dx, p_at * w, n)?;
    Ok(be.to_vec(&out))
}

fn add<F: Float>(acc: &mut [F], g: &[F]) {
    for (a, &b) in acc.iter_mut().zip(g) {
        *a = *a + b;
    }
}
