//! The training pass of a [`SegModel`]: forward and backward of
//! `L = CE + 2·BCE + 0.5·Dice` and the auxiliary category losses, and the
//! [`TrainPass`] that other objectives (stage 2, stage 3) read and drive.

use super::decoder::{DecoderActs, DecoderImages};
use super::layout::{Layout, GROUP_OVERHEAD};
use super::model::{Example, LossWeights, SegLoss, SegModel};
use super::preprocess::Pixels;
use crate::backend::{Backend, RowCopy};
use crate::error::{Error, Result};
use crate::kernels::logprob::IGNORE_INDEX;
use crate::model::clip::ClipActs;
use crate::nn::layers::MlpActs;
use crate::nn::llama::LlamaActs;
use num_traits::Float;

/// A training forward's results for the caller's objective (see
/// [`SegModel::forward_pass`]), and what the backward needs.
pub struct TrainPass<Buf> {
    /// Per position of the pass (the examples in groups of similar length, each group
    /// padded to its longest: [`super::layout`]): log p of the next token (the position
    /// before a token predicts it); meaningful where `labelled`.  Index it through
    /// `answer_rows`.
    pub logp: Vec<f64>,
    /// The positions whose next token is an answer token.
    pub labelled: Vec<bool>,
    /// Per example: the positions holding its answer tokens' log-probs, in answer order
    /// (`Encoded::ids[answer_start..]`).
    pub answer_rows: Vec<Vec<usize>>,
    /// Per mask (the examples with masks, in order): (BCE, Dice).
    pub mask_losses: Vec<(f64, f64)>,
    /// The patch-category cross-entropy; `None` without the head or labelled patches.
    pub patch_loss: Option<f64>,
    /// The segmentation embeddings' category cross-entropy; `None` without the head
    /// or labelled targets.
    pub seg_class_loss: Option<f64>,
    /// The segmentation embeddings' place cross-entropy; `None` without the head or
    /// labelled targets.
    pub seg_place_loss: Option<f64>,
    /// Every token the LLM processed (padding excluded; `logp.len()` counts it).
    pub n_tokens: usize,
    acts: StepActs<Buf>,
}

impl<Buf> TrainPass<Buf> {
    /// The segmentation embeddings `f` of the decoded masks, (M, L·D) row-major (one
    /// row per mask, its L scale embeddings side by side), read back from the device.
    pub fn seg_embeddings<F: Float, B: Backend<F, Buf = Buf>>(&self, be: &B) -> Vec<F> {
        self.acts
            .seg
            .as_ref()
            .map_or_else(Vec::new, |s| be.to_vec(&s.emb))
    }
    /// Each decoded mask's logits at its image's size (H·W), read back from the device.
    pub fn mask_logits<F: Float, B: Backend<F, Buf = Buf>>(&self, be: &B) -> Vec<Vec<F>> {
        self.acts.seg.as_ref().map_or_else(Vec::new, |s| {
            s.per_mask.iter().map(|(lg, _)| be.to_vec(lg)).collect()
        })
    }
}

/// ∂L/∂ of the auxiliary heads' losses for [`SegModel::backward_pass`]: the
/// patch-category, the seg-category and the place cross-entropies ([`NONE`](Self::NONE)
/// for an objective without them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadWeights {
    /// ∂L/∂ the patch-category loss.
    pub patch_class: f64,
    /// ∂L/∂ the seg-category loss.
    pub seg_class: f64,
    /// ∂L/∂ the place loss.
    pub seg_place: f64,
}

impl HeadWeights {
    /// No auxiliary term.
    pub const NONE: HeadWeights = HeadWeights {
        patch_class: 0.0,
        seg_class: 0.0,
        seg_place: 0.0,
    };
}

/// What the forward keeps for the backward.
pub struct StepActs<Buf> {
    b: usize,
    /// where each example's positions sit (groups of similar length)
    layout: Layout,
    /// per position of `layout`
    ids: Vec<u32>,
    /// per example and image token (B·K): its position
    image_rows: Vec<usize>,
    vision: ClipActs<Buf>,
    n_states: usize,
    proj: MlpActs<Buf>,
    /// the presence tokens' input, built from the evidence (see
    /// [`super::evidence`]); `None` without presence tokens
    presence: Option<Buf>,
    /// per group of `layout`
    llm: Vec<GroupActs<Buf>>,
    /// per position of `layout`
    targets: Vec<i32>,
    gather_rows: Vec<u32>,
    /// None when the batch has no target
    seg: Option<SegActs<Buf>>,
    patch: Option<super::category::HeadActs<Buf>>,
    seg_class: Option<super::category::HeadActs<Buf>>,
    seg_place: Option<super::category::HeadActs<Buf>>,
    idx: [usize; 3],
}

/// The LLM's pass over one group of examples: its activations, logits (n·t, V) and
/// log-sum-exps.
struct GroupActs<Buf> {
    acts: LlamaActs<Buf>,
    logits: Buf,
    lse: Buf,
}

struct SegActs<Buf> {
    /// the segmentation embeddings f (M, L, D)
    emb: Buf,
    head: MlpActs<Buf>,
    dec: DecoderActs<Buf>,
    /// per mask: logits at the image's size (H·W) and the 0/1 target
    per_mask: Vec<(Buf, Buf)>,
    /// `per_mask` as the loss launches read it (the masks of one pixel count side by
    /// side), with the forward's sums for the backward
    groups: Vec<MaskGroup<Buf>>,
}

/// The masks of one pixel count side by side: one loss launch forward, one backward.
struct MaskGroup<Buf> {
    /// the masks' indices (into `SegActs::per_mask`), in the order they lie here
    idx: Vec<usize>,
    /// pixels per mask
    p: usize,
    /// (idx.len(), p) each
    logits: Buf,
    target: Buf,
    /// [`crate::backend::MaskLosses::sums`] of `logits` against `target`
    sums: Buf,
}

impl<F: Float, B: Backend<F>> SegModel<F, B> {
    fn vision_trains(&mut self) -> bool {
        self.llava
            .vision_tower
            .params_mut()
            .iter()
            .any(|(_, t)| t.grad.is_some())
    }

    /// The inverse scatter of [`Self::patches_of`]: (B·K, Cv) → (B, 1 + K, Cv), class row 0.
    fn unpatches(&self, d: &B::Buf, b: usize) -> Result<B::Buf> {
        let be = &self.llava.be;
        let v = &self.llava.cfg.vision;
        let (k, cv) = (v.num_patches(), v.hidden_size);
        let mut out = be.zeros(b * (k + 1) * cv);
        be.copy_rows(&mut out, d, Self::patch_rows(b, k, cv).swapped())?;
        Ok(out)
    }

    /// The patch-category loss of a batch on its level-0 patches `f0` (B·K, Cv), through
    /// the head; an example without labels has its patches ignored.
    fn patch_forward(
        &self,
        batch: &[Example],
        f0: &B::Buf,
    ) -> Result<Option<(f64, super::category::HeadActs<B::Buf>)>> {
        let Some(head) = &self.patch_head else {
            return Ok(None);
        };
        if batch.iter().all(|e| e.classes.patches.is_empty()) {
            return Ok(None);
        }
        let k = self.patches_per_image();
        let mut labels = Vec::with_capacity(batch.len() * k);
        for (i, ex) in batch.iter().enumerate() {
            push_labels(&mut labels, &ex.classes.patches, k, || {
                format!("example {i} patch classes")
            })?;
        }
        super::category::forward(&self.llava.be, head, f0.clone(), labels)
    }

    /// The category loss of the segmentation embeddings `emb` (M, L·D) of a batch's
    /// decoded targets (examples with masks, in order); a target of an example without
    /// labels is ignored.
    fn seg_class_forward(
        &self,
        batch: &[Example],
        emb: &B::Buf,
    ) -> Result<Option<(f64, super::category::HeadActs<B::Buf>)>> {
        let Some(head) = &self.seg_class_head else {
            return Ok(None);
        };
        let labels = per_target(batch, |c| &c.targets, "classes")?;
        super::category::forward(&self.llava.be, head, emb.clone(), labels)
    }

    /// The place loss of the segmentation embeddings `emb` (M, L·D), as
    /// [`Self::seg_class_forward`]; `order` (M) gives, per mask, the index of the
    /// target it is scored against among the batch's targets (instance matching may
    /// permute alike targets), `None` = in order.
    fn seg_place_forward(
        &self,
        batch: &[Example],
        emb: &B::Buf,
        order: Option<&[usize]>,
    ) -> Result<Option<(f64, super::category::HeadActs<B::Buf>)>> {
        let Some(head) = &self.seg_place_head else {
            return Ok(None);
        };
        let mut labels = per_target(batch, |c| &c.places, "places")?;
        if let Some(order) = order {
            crate::error::check_len("SegModel", "target order", order.len(), labels.len())?;
            labels = order.iter().map(|&t| labels[t]).collect();
        }
        super::category::forward(&self.llava.be, head, emb.clone(), labels)
    }

    /// (BCE, Dice) of each `(logits, target)` pair: the masks of one pixel count side by
    /// side in one launch, so a batch makes one read-back per image size, not per mask.
    /// The groups, with the sums the backward needs, come back too.
    #[allow(clippy::type_complexity)]
    fn mask_losses(
        &self,
        per_mask: &[(&B::Buf, &B::Buf)],
    ) -> Result<(Vec<(f64, f64)>, Vec<MaskGroup<B::Buf>>)> {
        let be = &self.llava.be;
        let mut by_size: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (i, (lg, _)) in per_mask.iter().enumerate() {
            by_size.entry(be.len(lg)).or_default().push(i);
        }
        let mut out = vec![(f64::NAN, f64::NAN); per_mask.len()];
        let mut groups = Vec::with_capacity(by_size.len());
        for (p, idx) in by_size {
            let (mut lg, mut tg) = (be.uninit(idx.len() * p), be.uninit(idx.len() * p));
            for (j, &i) in idx.iter().enumerate() {
                be.copy_range(&mut lg, j * p, per_mask[i].0, 0, p)?;
                be.copy_range(&mut tg, j * p, per_mask[i].1, 0, p)?;
            }
            let r = be.mask_loss_fwd(&lg, &tg, idx.len(), p)?;
            for (&i, &(bce, dice)) in idx.iter().zip(&r.losses) {
                out[i] = (
                    bce.to_f64().unwrap_or(f64::NAN),
                    dice.to_f64().unwrap_or(f64::NAN),
                );
            }
            groups.push(MaskGroup {
                idx,
                p,
                logits: lg,
                target: tg,
                sums: r.sums,
            });
        }
        Ok((out, groups))
    }

    /// [`LossWeights::instance_matching`]: within each set of alike targets
    /// ([`super::matching::alike_sets`] of an example's categories), the masks take the
    /// permutation of the set's targets with the least `w.bce·BCE + w.dice·Dice`; the
    /// pass's targets and mask losses are replaced by the permuted ones, so the
    /// backward follows.  One launch per image size scores every pair of every set that
    /// the forward pass did not (a mask against another target of its set).  Returns,
    /// per mask, the index of the target it is now scored against (`None`: no set).
    fn match_instances(
        &self,
        batch: &[Example],
        pass: &mut TrainPass<B::Buf>,
        w: LossWeights,
    ) -> Result<Option<Vec<usize>>> {
        let Some(sa) = pass.acts.seg.as_mut() else {
            return Ok(None);
        };
        let mut sets: Vec<Vec<usize>> = Vec::new();
        let mut first = 0;
        for (i, ex) in batch.iter().enumerate() {
            if ex.masks.is_empty() {
                continue;
            }
            if !ex.categories.is_empty() && ex.categories.len() != ex.masks.len() {
                return Err(Error::arg(
                    "SegModel::step",
                    format!(
                        "example {i} has {} masks but {} target categories",
                        ex.masks.len(),
                        ex.categories.len()
                    ),
                ));
            }
            for set in super::matching::alike_sets(&ex.categories) {
                sets.push(set.into_iter().map(|j| first + j).collect());
            }
            first += ex.masks.len();
        }
        if sets.is_empty() {
            return Ok(None);
        }
        let mut order: Vec<usize> = (0..sa.per_mask.len()).collect();
        // the pairs off the diagonal: the forward pass scored each mask's own target
        let pm = &sa.per_mask;
        let pairs: Vec<(&B::Buf, &B::Buf)> = sets
            .iter()
            .flat_map(|s| {
                s.iter().flat_map(move |&i| {
                    s.iter()
                        .filter(move |&&j| j != i)
                        .map(move |&j| (&pm[i].0, &pm[j].1))
                })
            })
            .collect();
        let mut off_diagonal = self.mask_losses(&pairs)?.0.into_iter();
        for s in &sets {
            let n = s.len();
            let mut pair = Vec::with_capacity(n * n);
            for &i in s {
                for &j in s {
                    pair.push(if j == i {
                        pass.mask_losses[i]
                    } else {
                        off_diagonal
                            .next()
                            .ok_or_else(|| Error::arg("SegModel::step", "a pair loss is missing"))?
                    });
                }
            }
            let cost: Vec<f64> = pair
                .iter()
                .map(|(b, d)| w.bce as f64 * b + w.dice as f64 * d)
                .collect();
            let perm = super::matching::min_cost_assignment(&cost, n)?;
            let targets: Vec<B::Buf> = perm.iter().map(|&p| sa.per_mask[s[p]].1.clone()).collect();
            for ((k, &i), tgt) in s.iter().enumerate().zip(targets) {
                sa.per_mask[i].1 = tgt;
                pass.mask_losses[i] = pair[k * n + perm[k]];
                order[i] = s[perm[k]];
            }
        }
        if order.iter().enumerate().any(|(i, &t)| t != i) {
            // the backward reads the groups: score them on the permuted targets
            let pm: Vec<(&B::Buf, &B::Buf)> = sa.per_mask.iter().map(|(l, t)| (l, t)).collect();
            sa.groups = self.mask_losses(&pm)?.1;
        }
        Ok(Some(order))
    }

    /// One training forward (and, with `backward`, the backward: parameter gradients
    /// accumulate, scaled by `scale`) over a batch.  Returns the batch's loss.
    ///
    /// forward: `L = w_ce·CE + w_bce·BCE + w_dice·Dice`, CE the mean over the labelled
    /// tokens of −log p, BCE and Dice the means over the masks; so the backward feeds
    /// `∂L/∂logp = −w_ce·scale/n_labels` on the labels and `w·scale/M` per mask term
    /// into [`SegModel::backward_pass`].
    pub fn step(
        &mut self,
        batch: &[Example],
        w: LossWeights,
        scale: f32,
        backward: bool,
    ) -> Result<SegLoss> {
        let mut pass = self.forward_pass(batch)?;
        if w.instance_matching {
            let order = self.match_instances(batch, &mut pass, w)?;
            // the place labels follow the targets the masks are now scored against
            let moved = order
                .filter(|o| o.iter().enumerate().any(|(i, &t)| i != t))
                .zip(pass.acts.seg.as_ref());
            if let Some((order, sa)) = moved {
                (pass.seg_place_loss, pass.acts.seg_place) = self
                    .seg_place_forward(batch, &sa.emb, Some(&order))?
                    .unzip();
            }
        }
        let n_labels = pass.labelled.iter().filter(|&&x| x).count();
        let ce = -pass
            .logp
            .iter()
            .zip(&pass.labelled)
            .filter(|(_, &l)| l)
            .map(|(x, _)| *x)
            .sum::<f64>()
            / n_labels.max(1) as f64;
        let m = pass.mask_losses.len();
        let mf = m.max(1) as f64;
        let bce = pass.mask_losses.iter().map(|x| x.0).sum::<f64>() / mf;
        let dice = pass.mask_losses.iter().map(|x| x.1).sum::<f64>() / mf;
        let patch_class = pass.patch_loss.unwrap_or(0.0);
        let seg_class = pass.seg_class_loss.unwrap_or(0.0);
        let seg_place = pass.seg_place_loss.unwrap_or(0.0);
        let total = w.ce as f64 * ce
            + w.bce as f64 * bce
            + w.dice as f64 * dice
            + w.patch_class as f64 * patch_class
            + w.seg_class as f64 * seg_class
            + w.seg_place as f64 * seg_place;
        let loss = SegLoss {
            total,
            ce,
            bce,
            dice,
            patch_class,
            seg_class,
            seg_place,
            n_labels,
            n_tokens: pass.n_tokens,
            n_masks: m,
        };
        if backward {
            let wl = -(w.ce as f64) * scale as f64 / n_labels.max(1) as f64;
            let dlogp: Vec<f64> = pass
                .labelled
                .iter()
                .map(|&l| if l { wl } else { 0.0 })
                .collect();
            let wm = scale as f64 / mf;
            let mask_w = (w.bce as f64 * wm, w.dice as f64 * wm);
            let heads = HeadWeights {
                patch_class: w.patch_class as f64 * scale as f64,
                seg_class: w.seg_class as f64 * scale as f64,
                seg_place: w.seg_place as f64 * scale as f64,
            };
            self.backward_pass(batch, pass, &dlogp, mask_w, None, heads)?;
        }
        Ok(loss)
    }

    /// The training forward without a loss: each position's next-token log-prob and
    /// each mask's BCE and Dice, for an objective of the caller's (stage 2 weighs the
    /// answer tokens of two responses against each other).  An example with no masks
    /// is text only: its `<seg>` groups are not decoded.
    ///
    /// The LLM runs once per group of examples of similar length, each group padded to
    /// its longest ([`super::layout::length_groups`]), rather than once over the batch
    /// padded to its longest example: on the world's stage 1 (a re-read example in most
    /// batches of 16) that cut the positions processed from 1.63 × the real tokens to
    /// 1.06 ×, in 3.2 groups per batch (its first 30 batches).  No example's result
    /// depends on the grouping (a test checks every example's log-probs, mask losses
    /// and gradients against its own pass).
    pub fn forward_pass(&self, batch: &[Example]) -> Result<TrainPass<B::Buf>> {
        self.forward_train(batch)
    }

    fn forward_train(&self, batch: &[Example]) -> Result<TrainPass<B::Buf>> {
        let be = self.llava.be.clone();
        let op = "SegModel::step";
        let b = batch.len();
        if b == 0 {
            return Err(Error::arg(op, "empty batch"));
        }
        let idx = self.state_indices()?;
        let upto = idx.iter().copied().max().unwrap_or(0);
        let k = self.tokens_per_image();
        let hdim = self.llava.cfg.text.hidden_size;
        let v = self.llava.cfg.text.vocab_size;
        let g = self.cfg.group_len();
        for (i, ex) in batch.iter().enumerate() {
            if !ex.masks.is_empty() && ex.masks.len() != ex.enc.groups.len() {
                return Err(Error::arg(
                    op,
                    format!(
                        "example {i}: {} masks for {} <seg> groups",
                        ex.masks.len(),
                        ex.enc.groups.len()
                    ),
                ));
            }
            for (j, m) in ex.masks.iter().enumerate() {
                crate::error::check_len(
                    op,
                    &format!("example {i} mask {j}"),
                    m.len(),
                    ex.pixels.height * ex.pixels.width,
                )?;
            }
        }
        // vision
        let px: Vec<&Pixels> = batch.iter().map(|e| &e.pixels).collect();
        let pixels = self.stack_pixels(&px)?;
        let vision = self.llava.vision_tower.forward_train(&pixels, b, upto)?;
        let hs = |i: usize| {
            vision.hidden_state(i).ok_or_else(|| {
                Error::arg(op, format!("hidden state {i} past the {upto} blocks run"))
            })
        };
        // decoder level 0's patches: the pixel decoder's and the patch head's input
        let f0 = self.patches_of(hs(idx[1])?, b)?;
        let (patch_loss, patch) = self.patch_forward(batch, &f0)?.unzip();
        let (img, proj) = self
            .llava
            .projector
            .forward(&be, self.patches_of(hs(idx[0])?, b)?)?; // (B·Kp, H)
        let (img, presence) = self.image_tokens(img, &f0, b)?; // (B·K, H)
        let rows: Vec<Vec<u32>> = batch.iter().map(|e| self.expand_ids(&e.enc)).collect();
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if t > self.llava.cfg.text.max_position_embeddings {
            return Err(Error::arg(
                op,
                format!(
                    "a sequence of {t} tokens ({k} of them image tokens) is longer than the \
                     context of {}",
                    self.llava.cfg.text.max_position_embeddings
                ),
            ));
        }
        // tokens: expanded; the examples in groups of similar length, each group
        // right-padded with EOS to its longest (causal attention never looks right)
        let layout = Layout::new(
            &rows.iter().map(|r| r.len()).collect::<Vec<_>>(),
            GROUP_OVERHEAD,
        );
        let pad = batch[0].enc.ids.last().copied().unwrap_or(0);
        let mut ids = vec![pad; layout.len];
        let mut targets = vec![IGNORE_INDEX; layout.len];
        let mut label_w = vec![false; layout.len];
        let mut gather_rows = Vec::new();
        let mut answer_rows = Vec::with_capacity(b);
        let mut n_tokens = 0;
        let shift = k - 1; // positions after the image token move by K − 1
        for (r, (row, ex)) in rows.iter().zip(batch).enumerate() {
            n_tokens += row.len();
            let at = layout.pos(r, 0);
            ids[at..at + row.len()].copy_from_slice(row);
            for p in ex.enc.answer_start + shift..row.len() {
                // position p − 1 predicts token p
                targets[at + p - 1] = row[p] as i32;
                label_w[at + p - 1] = true;
            }
            answer_rows.push(
                (ex.enc.answer_start + shift..row.len())
                    .map(|p| at + p - 1)
                    .collect(),
            );
            // a text-only example (no masks) decodes none of its groups
            let groups: &[usize] = if ex.masks.is_empty() {
                &[]
            } else {
                &ex.enc.groups
            };
            for &g0 in groups {
                for j in 0..g {
                    gather_rows.push((at + g0 + shift + j - 1) as u32);
                }
            }
        }
        if let Some(&bad) = targets.iter().find(|&&x| x >= 0 && x as usize >= v) {
            return Err(Error::arg(
                op,
                format!("token {bad} is outside the vocabulary of {v}"),
            ));
        }
        // the LLM once per group; each example's image rows (B·K) from the projector
        let image_rows: Vec<usize> = (0..b)
            .flat_map(|r| (0..k).map(move |j| (r, j)))
            .map(|(r, j)| layout.pos(r, batch[r].enc.image_pos + j))
            .collect();
        let lm = &self.llava.language_model;
        let mut llm = Vec::with_capacity(layout.groups.len());
        let mut lp = Vec::with_capacity(layout.len);
        for grp in &layout.groups {
            let span = grp.span();
            let mut x = lm.embed(&ids[span.clone()])?;
            let rows = grp.members.iter().flat_map(|&r| r * k..(r + 1) * k);
            for c in RowCopy::from_rows(rows.map(|j| (image_rows[j] - grp.off, j)), hdim) {
                be.copy_rows(&mut x, &img, c)?;
            }
            let (logits, acts) =
                lm.forward_embeds(x, grp.members.len(), grp.t, None, None, None)?;
            // the log-prob of every next token
            let n = span.len();
            let (mut logp, mut lse) = (be.uninit(n), be.uninit(n));
            be.logprob_fwd(&logits, &targets[span], v, &mut logp, &mut lse)?;
            lp.extend(
                be.to_vec(&logp)
                    .iter()
                    .map(|x| x.to_f64().unwrap_or(f64::NAN)),
            );
            llm.push(GroupActs { acts, logits, lse });
        }
        // every group's last hidden states, in pass positions
        let hidden = if let [one] = &llm[..] {
            one.acts.hidden.clone()
        } else {
            let mut h = be.zeros(layout.len * hdim);
            for (grp, ga) in layout.groups.iter().zip(&llm) {
                let n = grp.span().len() * hdim;
                be.copy_range(&mut h, grp.off * hdim, &ga.acts.hidden, 0, n)?;
            }
            h
        };
        // masks
        let m = gather_rows.len() / g;
        let img_of: Vec<usize> = batch
            .iter()
            .enumerate()
            .flat_map(|(r, e)| std::iter::repeat_n(r, e.masks.len()))
            .collect();
        let mut mask_losses = Vec::with_capacity(m);
        let (mut seg_class_loss, mut seg_class) = (None, None);
        let (mut seg_place_loss, mut seg_place) = (None, None);
        let seg = if m > 0 {
            let (emb, head) = self.seg_embeddings(&hidden, &gather_rows)?;
            (seg_class_loss, seg_class) = self.seg_class_forward(batch, &emb)?.unzip();
            (seg_place_loss, seg_place) = self.seg_place_forward(batch, &emb, None)?.unzip();
            let f1 = self.patches_of(hs(idx[2])?, b)?;
            let s = self.cfg.image_size;
            let images = DecoderImages {
                levels: [&f0, &f1],
                pixels: Some(&pixels),
                b,
            };
            let (dl, dec) = self.decoder.forward(images, &emb, &img_of, s, s)?;
            // every target in one upload, then each mask's logits at its image's size
            let all: Vec<F> = batch
                .iter()
                .flat_map(|ex| ex.masks.iter().flatten())
                .map(|&x| F::from(x).unwrap_or_else(F::nan))
                .collect();
            let all = be.from_slice(&all);
            let (mut mi, mut off) = (0, 0);
            let mut per_mask = Vec::with_capacity(m);
            for ex in batch {
                for mask in &ex.masks {
                    let lg = self.to_image_logits(&dl, mi * s * s, &ex.pixels)?;
                    crate::error::check_len(
                        "SegModel::forward_pass",
                        "mask",
                        mask.len(),
                        be.len(&lg),
                    )?;
                    let mut tgt = be.uninit(mask.len());
                    be.copy_range(&mut tgt, 0, &all, off, mask.len())?;
                    per_mask.push((lg, tgt));
                    (mi, off) = (mi + 1, off + mask.len());
                }
            }
            let groups;
            (mask_losses, groups) =
                self.mask_losses(&per_mask.iter().map(|(l, t)| (l, t)).collect::<Vec<_>>())?;
            Some(SegActs {
                emb,
                head,
                dec,
                per_mask,
                groups,
            })
        } else {
            None
        };
        Ok(TrainPass {
            logp: lp,
            labelled: label_w,
            answer_rows,
            mask_losses,
            patch_loss,
            seg_class_loss,
            seg_place_loss,
            n_tokens,
            acts: StepActs {
                b,
                layout,
                ids,
                image_rows,
                vision,
                n_states: upto + 1,
                proj,
                presence,
                llm,
                targets,
                gather_rows,
                seg,
                patch,
                seg_class,
                seg_place,
                idx,
            },
        })
    }

    /// The backward of [`SegModel::forward_pass`] for a loss `L` given by its gradient:
    /// `dlogp` = ∂L/∂logp per position (as many as `logp`; zero where not labelled), `mask_w` =
    /// (∂L/∂BCE_m, ∂L/∂Dice_m), the same for every mask, and `d_emb` = ∂L/∂f for the
    /// segmentation embeddings (M, L·D, as [`TrainPass::seg_embeddings`]; stage 2's
    /// `Ls`), and `heads` = ∂L/∂ of the auxiliary heads' losses ([`HeadWeights::NONE`]
    /// when the objective has no such term).  Parameter gradients accumulate.
    pub fn backward_pass(
        &mut self,
        batch: &[Example],
        pass: TrainPass<B::Buf>,
        dlogp: &[f64],
        mask_w: (f64, f64),
        d_emb: Option<&[f64]>,
        heads: HeadWeights,
    ) -> Result<()> {
        let a = pass.acts;
        let be = self.llava.be.clone();
        let hdim = self.llava.cfg.text.hidden_size;
        let v = self.llava.cfg.text.vocab_size;
        let s = self.cfg.image_size;
        let b = a.b;
        let n_pos = a.layout.len;
        crate::error::check_len("SegModel::backward_pass", "dlogp", dlogp.len(), n_pos)?;
        let m = pass.mask_losses.len();
        if a.seg.is_none() && d_emb.is_some_and(|d| !d.is_empty()) {
            return Err(Error::arg(
                "SegModel::backward_pass",
                "a gradient for segmentation embeddings, but the batch decoded no mask",
            ));
        }
        let mut dhidden = be.zeros(n_pos * hdim);
        let mut dfeats = None;
        if let Some(sa) = &a.seg {
            // ∂L/∂bce_m and ∂L/∂dice_m for every mask
            let mut dlogits_mask = be.zeros(m * s * s);
            let (wb, wd) = (F::from(mask_w.0).unwrap(), F::from(mask_w.1).unwrap());
            let pixels: Vec<&super::Pixels> = batch
                .iter()
                .flat_map(|ex| ex.masks.iter().map(move |_| &ex.pixels))
                .collect();
            crate::error::check_len("SegModel::backward_pass", "masks", pixels.len(), m)?;
            for g in &sa.groups {
                let n = g.idx.len();
                let mut d = be.uninit(n * g.p);
                be.mask_loss_bwd(&g.logits, &g.target, &g.sums, n, g.p, wb, wd, &mut d)?;
                for (j, &mi) in g.idx.iter().enumerate() {
                    self.to_image_logits_bwd(
                        &d,
                        j * g.p,
                        mi * s * s,
                        pixels[mi],
                        &mut dlogits_mask,
                    )?;
                }
            }
            // decoder → codebook embeddings → the hidden states that predicted them
            let (df, mut demb) = self.decoder.backward(&sa.dec, &dlogits_mask)?;
            if let Some(de) = d_emb {
                crate::error::check_len(
                    "SegModel::backward_pass",
                    "d_emb",
                    de.len(),
                    be.len(&demb),
                )?;
                let de: Vec<F> = de.iter().map(|&x| F::from(x).unwrap()).collect();
                be.axpy(&mut demb, F::one(), &be.from_slice(&de))?;
            }
            for (acts, head, w) in [
                (&a.seg_class, &mut self.seg_class_head, heads.seg_class),
                (&a.seg_place, &mut self.seg_place_head, heads.seg_place),
            ] {
                if let (Some(ha), Some(head)) = (acts, head) {
                    if w != 0.0 {
                        let d = super::category::backward(&be, head, ha, w)?;
                        be.axpy(&mut demb, F::one(), &d)?;
                    }
                }
            }
            let dout = self.average_scales_bwd(&demb, m)?;
            let dg = self.seg_head.backward(&be, &sa.head, &dout)?;
            be.embedding_bwd(&a.gather_rows, &dg, hdim, &mut dhidden)?;
            dfeats = Some(df);
        }
        // the LLM group by group; image positions send their gradient to the projector,
        // not to a token row
        let k = self.tokens_per_image();
        let lm = &mut self.llava.language_model;
        let mut dimg = be.zeros(a.image_rows.len() * hdim);
        let zero = be.zeros(hdim);
        for (grp, ga) in a.layout.groups.iter().zip(&a.llm) {
            let span = grp.span();
            let n = span.len();
            let dl: Vec<F> = dlogp[span.clone()]
                .iter()
                .map(|&x| F::from(x).unwrap())
                .collect();
            let mut dlogits = be.uninit(n * v);
            let targets = &a.targets[span.clone()];
            be.logprob_bwd(
                &ga.logits,
                targets,
                v,
                &ga.lse,
                &be.from_slice(&dl),
                &mut dlogits,
            )?;
            let mut dh = be.uninit(n * hdim);
            be.copy_range(&mut dh, 0, &dhidden, grp.off * hdim, n * hdim)?;
            let mut dx = lm.backward_with_hidden(&ga.acts, &dlogits, Some(&dh))?; // (n·t, H)
            let rows = grp.members.iter().flat_map(|&r| r * k..(r + 1) * k);
            for c in RowCopy::from_rows(rows.map(|j| (j, a.image_rows[j] - grp.off)), hdim) {
                be.copy_rows(&mut dimg, &dx, c)?;
                // the image rows of dx, zeroed: every run from one zero row
                let from_zero = RowCopy {
                    dst_off: c.src_off,
                    dst_stride: c.src_stride,
                    src_off: 0,
                    src_stride: 0,
                    ..c
                };
                be.copy_rows(&mut dx, &zero, from_zero)?;
            }
            lm.embed_tokens.backward(&be, &a.ids[span], &dx)?;
        }
        let dimg = self.image_tokens_bwd(dimg, a.presence.as_ref(), b)?; // (B·Kp, H)
        let proj_trains = self.llava.projector.fc1.weight.grad.is_some();
        let vision_trains = self.vision_trains();
        if !(proj_trains || vision_trains) {
            return Ok(());
        }
        let dfeat_llm = self.llava.projector.backward(&be, &a.proj, &dimg)?; // (B·K, Cv)
        if !vision_trains {
            return Ok(());
        }
        let mut dstates: Vec<Option<B::Buf>> = vec![None; a.n_states];
        let mut add = |i: usize, d: B::Buf| -> Result<()> {
            match &mut dstates[i] {
                Some(x) => be.axpy(x, F::one(), &d),
                slot @ None => {
                    *slot = Some(d);
                    Ok(())
                }
            }
        };
        add(a.idx[0], self.unpatches(&dfeat_llm, b)?)?;
        if let Some([d0, d1]) = dfeats {
            add(a.idx[1], self.unpatches(&d0, b)?)?;
            add(a.idx[2], self.unpatches(&d1, b)?)?;
        }
        if let (Some(pa), Some(head)) = (&a.patch, &mut self.patch_head) {
            if heads.patch_class != 0.0 {
                let dx = super::category::backward(&be, head, pa, heads.patch_class)?;
                add(a.idx[1], self.unpatches(&dx, b)?)?;
            }
        }
        self.llava.vision_tower.backward(&a.vision, &dstates)?;
        Ok(())
    }
}

/// One head label per decoded target of `batch` (examples with masks, in order), read
/// by `pick` from each example's labels (`what` names them in errors).
fn per_target(
    batch: &[Example],
    pick: impl Fn(&super::category::Classes) -> &[i32],
    what: &str,
) -> Result<Vec<i32>> {
    let mut labels = Vec::new();
    for (i, ex) in batch
        .iter()
        .enumerate()
        .filter(|(_, e)| !e.masks.is_empty())
    {
        push_labels(&mut labels, pick(&ex.classes), ex.masks.len(), || {
            format!("example {i} target {what}")
        })?;
    }
    Ok(labels)
}

/// Appends one example's `n` category labels: its own (which must be `n`), or `n` ignored
/// ones when it has none.
fn push_labels(
    labels: &mut Vec<i32>,
    own: &[i32],
    n: usize,
    what: impl FnOnce() -> String,
) -> Result<()> {
    if own.is_empty() {
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, n));
    } else {
        crate::error::check_len("SegModel", &what(), own.len(), n)?;
        labels.extend_from_slice(own);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::backend::RowCopy;

    #[test]
    fn row_runs_join_only_pairs_that_advance_together() {
        // two sequences' image rows: 3 consecutive, then 2 after a gap on the dst side;
        // then a pair whose src does not follow, and one that goes back
        let pairs = [(4, 0), (5, 1), (6, 2), (9, 3), (10, 4), (11, 7), (3, 8)];
        let runs: Vec<_> = RowCopy::from_rows(pairs, 1)
            .iter()
            .map(|c| (c.dst_off, c.src_off, c.rows))
            .collect();
        assert_eq!(runs, [(4, 0, 3), (9, 3, 2), (11, 7, 1), (3, 8, 1)]);
        assert!(RowCopy::from_rows([], 1).is_empty());
    }
}
