//! The presence tokens (ours, not PixelLM's; `[model] presence_tokens`): more image
//! tokens per image that say, per object category, how sure the patch-category head is
//! that the category is somewhere in the image: one token for all categories
//! (`"one"`), or one per category (`"per_category"`).
//!
//! Why: the tiny LLM trained from scratch does not learn to check whether an object a
//! question names is in the image.  The patch-category head ([`super::category`]) does
//! recognize objects patch by patch, but "is there an X anywhere?" asks the LLM to find,
//! among K image tokens, those of a category it must match against the question's
//! word.  Measured on the world (docs/stage2.md, "What the presence mix teaches"): with
//! the presence questions in the data the model rejects absent objects that do not
//! belong to the scene (ROC AUC 85–88 %) and not the absent objects that usually come
//! with it (62 %), so it learns the scene's kind, not the object.  The tokens hand it
//! the per-category evidence directly, as a detector's tags would.  Measured (same
//! section): the evidence tells present from absent categories with a ROC AUC of 0.97;
//! what the LLM makes of it is in that section.  Off by default.
//!
//! forward, per image b with level-0 patch features `f0[b, p]` (p < Kp):
//!
//! ```text
//! q[b, p, ·]  = softmax(patch_head(f0[b, p]))   (1 + C classes, 0 = background)
//! e[b, c]     = max_p q[b, p, 1 + c]             (c < C)
//! "one":          row[b]    = W e[b] + bias                 (Linear(C, H))
//! "per_category": row[b, c] = W [onehot(c), e[b, c]]        (Linear(C + 1, H), no bias)
//!                           = E[c] + e[b, c] · v            (E: W's first C columns)
//! ```
//!
//! and the rows are image tokens Kp, Kp + 1, …, after the patch tokens.  With one
//! token per category, a question's word for c can find its token by attention (a key
//! `E[c]`) and read `e[b, c]` there, where the one token would ask the LLM to pick a
//! coordinate out of a C-vector.
//!
//! The evidence is read through a stop-gradient: `e` is a constant for the backward, so
//! the LLM's loss trains `presence_proj` and nothing upstream of it; the patch head keeps
//! learning from its own labels only (its calibration is what the LLM reads).  The
//! backward is therefore `presence_proj`'s parameter gradients for its input x
//! ([`crate::nn::Linear::backward`]: `dW += drowᵀ x`, `db += Σ drow`), and a gradient
//! check is exact only where the patch head and the tower are frozen (the test freezes
//! the vision part; `tests/seg_model.rs`).
use super::config::PresenceTokens;
use super::model::SegModel;
use crate::backend::Backend;
use crate::error::Result;
use num_traits::Float;

impl<F: Float, B: Backend<F>> SegModel<F, B> {
    /// The presence projection's input for a batch's level-0 patches `f0` (B·Kp, Cv),
    /// or `None` without presence tokens: the evidence `e` (B, C) for one token, the
    /// rows `[onehot(c), e[b, c]]` (B·C, C + 1) for one token per category.
    pub(crate) fn presence_input(&self, f0: &B::Buf, b: usize) -> Result<Option<B::Buf>> {
        let (Some(_), Some(head)) = (&self.presence_proj, &self.patch_head) else {
            return Ok(None);
        };
        let be = &self.llava.be;
        let (kp, n) = (self.patches_per_image(), head.fan_out());
        let logits = be.to_vec(&head.forward(be, f0)?); // (B·Kp, 1 + C)
        crate::error::check_len("SegModel::presence_input", "f0", logits.len() / n, b * kp)?;
        let e = max_class_probs(&logits, b, kp, n);
        let input = match self.cfg.presence_tokens {
            PresenceTokens::Off => return Ok(None),
            PresenceTokens::One => e,
            PresenceTokens::PerCategory => per_category_rows(&e, n - 1),
        };
        Ok(Some(be.from_slice(&input)))
    }

    /// The image tokens (B·K, H) of a batch: each image's Kp patch rows of `patches`
    /// (B·Kp, H), then its P presence rows, read from the level-0 patches `f0` (B·Kp,
    /// Cv); and the presence projection's input ([`Self::presence_input`]), which the
    /// backward needs.  Without presence tokens, `patches` as they are.
    pub(crate) fn image_tokens(
        &self,
        patches: B::Buf,
        f0: &B::Buf,
        b: usize,
    ) -> Result<(B::Buf, Option<B::Buf>)> {
        let (Some(x), Some(proj)) = (self.presence_input(f0, b)?, &self.presence_proj) else {
            return Ok((patches, None));
        };
        let be = &self.llava.be;
        let rows = proj.forward(be, &x)?; // (B·P, H)
        let (kp, h) = (self.patches_per_image(), self.llava.cfg.text.hidden_size);
        let np = self.cfg.presence_tokens_per_image();
        let k = kp + np;
        let mut out = be.zeros(b * k * h);
        for i in 0..b {
            be.copy_range(&mut out, i * k * h, &patches, i * kp * h, kp * h)?;
            be.copy_range(&mut out, (i * k + kp) * h, &rows, i * np * h, np * h)?;
        }
        Ok((out, Some(x)))
    }

    /// Backward of [`Self::image_tokens`] and of the presence projection: splits the
    /// image tokens' gradient `dimg` (B·K, H) into the patch rows' (B·Kp, H), which it
    /// returns, and the presence rows', which it sends into `presence_proj`'s parameter
    /// gradients (input `x`, built from the stop-gradient evidence).
    pub(crate) fn image_tokens_bwd(
        &mut self,
        dimg: B::Buf,
        x: Option<&B::Buf>,
        b: usize,
    ) -> Result<B::Buf> {
        let (kp, h) = (self.patches_per_image(), self.llava.cfg.text.hidden_size);
        let np = self.cfg.presence_tokens_per_image();
        let be = self.llava.be.clone();
        let (Some(x), Some(proj)) = (x, &mut self.presence_proj) else {
            return Ok(dimg);
        };
        let k = kp + np;
        let mut dpatch = be.zeros(b * kp * h);
        let mut drows = be.zeros(b * np * h);
        for i in 0..b {
            be.copy_range(&mut dpatch, i * kp * h, &dimg, i * k * h, kp * h)?;
            be.copy_range(&mut drows, i * np * h, &dimg, (i * k + kp) * h, np * h)?;
        }
        proj.backward(&be, x, &drows, false)?;
        Ok(dpatch)
    }
}

/// The per-category tokens' input: for each image's evidence `e[b]` (C values) the C
/// rows `[onehot(c), e[b, c]]`, (B·C, C + 1).
fn per_category_rows<F: Float>(e: &[F], c: usize) -> Vec<F> {
    let mut x = vec![F::zero(); e.len() * (c + 1)];
    for (r, (row, &ec)) in x.chunks_mut(c + 1).zip(e).enumerate() {
        row[r % c] = F::one();
        row[c] = ec;
    }
    x
}

/// `e[b, c] = max_p softmax(logits[b, p, ·])[1 + c]` for logits (B·Kp, n) with n = 1 + C
/// classes, class 0 the background: (B, C), the softmax in f64.
pub fn max_class_probs<F: Float>(logits: &[F], b: usize, kp: usize, n: usize) -> Vec<F> {
    let c = n.saturating_sub(1);
    let mut e = vec![0f64; b * c];
    let mut q = vec![0f64; n];
    for (r, row) in logits.chunks(n).take(b * kp).enumerate() {
        let img = r / kp;
        let m = row
            .iter()
            .map(|x| x.to_f64().unwrap_or(f64::NAN))
            .fold(f64::NEG_INFINITY, f64::max);
        let mut z = 0.0;
        for (qj, x) in q.iter_mut().zip(row) {
            *qj = (x.to_f64().unwrap_or(f64::NAN) - m).exp();
            z += *qj;
        }
        for j in 0..c {
            let p = q[1 + j] / z;
            let slot = &mut e[img * c + j];
            // a NaN probability stays NaN (f64::max would drop it), so the step's NaN
            // check sees it
            if p.is_nan() || p > *slot {
                *slot = p;
            }
        }
    }
    e.into_iter()
        .map(|x| F::from(x).unwrap_or_else(F::nan))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{max_class_probs, per_category_rows};

    #[test]
    fn each_category_row_is_its_one_hot_key_and_its_evidence() {
        // 2 images, 3 categories
        let x = per_category_rows(&[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 3);
        assert_eq!(x.len(), 6 * 4);
        for (r, row) in x.chunks(4).enumerate() {
            let mut want = [0.0; 4];
            want[r % 3] = 1.0;
            want[3] = 0.1 * (r + 1) as f64;
            assert!(
                row.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
                "{r}: {row:?}"
            );
        }
    }

    #[test]
    fn the_evidence_is_each_class_highest_probability_over_the_image_patches() {
        // 2 images × 2 patches, background + 2 classes
        let l = [
            [0.0, 0.0, 0.0],          // image 0, patch 0: 1/3 each
            [0.0, 2.0_f64.ln(), 0.0], // patch 1: class 1 at 1/2
            [0.0, 0.0, 3.0_f64.ln()], // image 1, patch 0: class 2 at 3/5
            [1e3, 0.0, 0.0],          // patch 1: background, large logit (no overflow)
        ];
        let flat: Vec<f64> = l.iter().flatten().copied().collect();
        let e = max_class_probs(&flat, 2, 2, 3);
        let want = [0.5, 1.0 / 3.0, 0.2, 0.6];
        for (x, w) in e.iter().zip(want) {
            assert!((x - w).abs() < 1e-12, "{e:?}");
        }
        // a NaN logit makes its image's evidence NaN
        let mut bad = flat.clone();
        bad[4] = f64::NAN;
        let e = max_class_probs(&bad, 2, 2, 3);
        assert!(e[0].is_nan() && e[1].is_nan(), "{e:?}");
        assert!(e[2..].iter().all(|x| x.is_finite()), "{e:?}");
    }
}
