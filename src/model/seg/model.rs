//! The segmentation model: LLaVA (ViT → projector → LLaMA) + the codebook projection
//! (`seg_head`) + the pixel decoder, with one training step (forward and backward of
//! `L = CE + 2·BCE + 0.5·Dice`) and the pieces inference reuses.
//!
//! B images (one question each) per batch, T tokens per row (image tokens expanded,
//! right-padded), K patches per image, Cv ViT width, H LLM width, D seg width, M targets
//! in the batch, G = S·L codebook tokens per target.
use super::config::{state_index, SegModelConfig};
use super::decoder::PixelDecoder;
use super::preprocess::Pixels;
use super::prompt::Encoded;
use crate::backend::{Backend, Cpu, RowCopy};
use crate::error::{Error, Result};
use crate::model::llava::Llava;
use crate::nn::conv::{push_linear, NamedParams};
use crate::nn::layers::MlpActs;
use crate::nn::{Linear, Mlp};
use num_traits::Float;

/// PixelLM's loss weights: `CE + 2·BCE + 0.5·Dice`.
/// A `[loss]` table may name only some weights: the others keep these defaults.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossWeights {
    /// Weight of the answer tokens' cross-entropy (PixelLM: 1).
    pub ce: f32,
    /// Weight of the masks' BCE (PixelLM: 2).
    pub bce: f32,
    /// Weight of the masks' Dice loss (PixelLM: 0.5).
    pub dice: f32,
    /// The auxiliary patch-category loss (ours; [`super::category`]).  0 = off, as in
    /// PixelLM.
    pub patch_class: f32,
    /// The auxiliary category loss on the segmentation embeddings `f` (ours;
    /// [`super::category`]).  0 = off, as in PixelLM.
    pub seg_class: f32,
    /// The auxiliary place loss on the segmentation embeddings `f` (ours; the place
    /// head of [`super::category::place_labels`]).  0 = off, as in PixelLM.
    pub seg_place: f32,
    /// Score the masks of one category's `<seg>`s against the permutation of its
    /// targets with the least loss, not in the data's order (ours; [`super::matching`]).
    /// Off, as in PixelLM.
    pub instance_matching: bool,
}

impl Default for LossWeights {
    fn default() -> Self {
        LossWeights {
            ce: 1.0,
            bce: 2.0,
            dice: 0.5,
            patch_class: 0.0,
            seg_class: 0.0,
            seg_place: 0.0,
            instance_matching: false,
        }
    }
}

/// One training example: a preprocessed image, its tokenized question and answer, and
/// one ground-truth mask per `<seg>` (at the image's own size, 1 = object).
#[derive(Clone, Debug)]
pub struct Example {
    /// The image resized and padded for the tower.
    pub pixels: Pixels,
    /// Question and answer token ids, with the image token and codebook groups located.
    pub enc: Encoded,
    /// per target (height·width) of 0/1
    pub masks: Vec<Vec<f32>>,
    /// Category labels for the auxiliary heads (empty = this example trains neither).
    pub classes: super::category::Classes,
    /// Per target, its category name ("" or no entries: unknown), for
    /// [`LossWeights::instance_matching`].
    pub categories: Vec<String>,
}

/// The loss of one batch and its parts (means over the batch's tokens and masks).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SegLoss {
    /// The weighted sum of the parts, with [`LossWeights`].
    pub total: f64,
    /// Mean −log p over the labelled tokens.
    pub ce: f64,
    /// Mean over the masks of each mask's BCE-with-logits (itself a mean over pixels).
    pub bce: f64,
    /// Mean over the masks of each mask's Dice loss.
    pub dice: f64,
    /// The patch-category cross-entropy (0 without the head or labels).
    pub patch_class: f64,
    /// The category cross-entropy of the segmentation embeddings (0 without the head
    /// or labels).
    pub seg_class: f64,
    /// The place cross-entropy of the segmentation embeddings (0 without the head or
    /// labels).
    pub seg_place: f64,
    /// Labelled (answer) tokens.
    pub n_labels: usize,
    /// Every token the LLM processed (padding excluded).
    pub n_tokens: usize,
    /// Masks scored (M, one per `<seg>` target).
    pub n_masks: usize,
}

/// Which parts train (`true`) and which are frozen.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Trainable {
    /// The ViT, and the patch-category head with it.
    pub vision: bool,
    /// LLaVA's projector (`linear_1`, `linear_2`).
    pub projector: bool,
    /// The LLaMA decoder: embeddings, blocks and output head.
    pub llm: bool,
    /// The codebook projection `seg_head`, and the seg-class and place heads with it.
    pub seg_head: bool,
    /// The pixel decoder (`mask_decoder.*`).
    pub decoder: bool,
}

impl Trainable {
    /// Nothing trains (inference; stage 3, which trains only its prompt).
    pub fn frozen() -> Self {
        Trainable {
            vision: false,
            projector: false,
            llm: false,
            seg_head: false,
            decoder: false,
        }
    }
}

impl Default for Trainable {
    /// Stage 1 of the tiny model: everything trains (there is no pretrained tower).
    fn default() -> Self {
        Trainable {
            vision: true,
            projector: true,
            llm: true,
            seg_head: true,
            decoder: true,
        }
    }
}

/// The model.
#[derive(Clone, Debug)]
pub struct SegModel<F: Float = f32, B: Backend<F> = Cpu> {
    /// The `[model]` configuration it was built from.
    pub cfg: SegModelConfig,
    /// ViT → projector → LLaMA.
    pub llava: Llava<F, B>,
    /// `Linear(H,H) → ReLU → Linear(H,D)` on a codebook token's hidden state.
    pub seg_head: Mlp<F, B>,
    /// Decodes each target's `f` and the ViT's two feature levels into a mask.
    pub decoder: PixelDecoder<F, B>,
    /// The auxiliary patch-category head `Linear(Cv, 1 + C)` (present when
    /// `cfg.classes` is not empty; trains with the vision tower).
    pub patch_head: Option<Linear<F, B>>,
    /// The auxiliary category head on `f`, `Linear(L·D, 1 + C)` (present when
    /// `cfg.classes` is not empty; trains with the codebook head).
    pub seg_class_head: Option<Linear<F, B>>,
    /// The presence tokens' projection of the per-category evidence: `Linear(C, H)` for
    /// one token, `Linear(C + 1, H)` without bias for one per category (present unless
    /// `cfg.presence_tokens` is off; trains with the projector; [`super::evidence`]).
    pub presence_proj: Option<Linear<F, B>>,
    /// The auxiliary place head on `f`, `Linear(L·D, K)` over the K tower patches
    /// (present when `cfg.place_head`; trains with the codebook head).
    pub seg_place_head: Option<Linear<F, B>>,
}

impl<F: Float, B: Backend<F>> SegModel<F, B> {
    /// Hidden-state indices: [LLM features, decoder level 0, decoder level 1].
    pub fn state_indices(&self) -> Result<[usize; 3]> {
        let n = self.llava.cfg.vision.num_hidden_layers + 1;
        let get = |i: i64, what: &str| {
            state_index(i, n).ok_or_else(|| {
                Error::arg(
                    "SegModel",
                    format!("{what} = {i} is not one of the tower's {n} hidden states"),
                )
            })
        };
        Ok([
            get(self.cfg.llm_feature_layer, "llm_feature_layer")?,
            get(self.cfg.decoder_layers[0], "decoder_layers[0]")?,
            get(self.cfg.decoder_layers[1], "decoder_layers[1]")?,
        ])
    }

    /// Readies the LLM's frozen layers for reading ([`crate::nn::Llama::pack_frozen`]):
    /// each block's q, k and v become one product and its gate and up another, and on
    /// the CPU every weight is packed, so that the products of decoding and of the
    /// ensemble's reads, most of a prediction's time, skip gemm's repacking of each
    /// weight and make four launches per layer where they made seven.  The products
    /// agree up to rounding (the demo's prediction files were byte-identical).  Call it
    /// once the weights are final; [`Self::params_mut`] and [`Self::set_trainable`]
    /// undo it (so a stage that trains the LLM, or saves, sees plain tensors).  Returns
    /// how many Linear layers it packed or fused.
    pub fn pack_frozen(&mut self) -> Result<usize> {
        self.llava.language_model.pack_frozen()
    }

    /// Every parameter: the LLaVA part under Hugging Face names, then `seg_head.*` and
    /// `mask_decoder.*`.
    pub fn params_mut(&mut self) -> NamedParams<'_, F, B> {
        let SegModel {
            llava,
            seg_head,
            decoder,
            patch_head,
            seg_class_head,
            presence_proj,
            seg_place_head,
            ..
        } = self;
        let mut out = llava.params_mut();
        out.extend(own_params(
            seg_head,
            decoder,
            [
                ("patch_head", patch_head),
                ("seg_class_head", seg_class_head),
                ("presence_proj", presence_proj),
                ("seg_place_head", seg_place_head),
            ],
        ));
        out
    }

    /// The parameters POPEN adds to LLaVA: `seg_head.*`, `mask_decoder.*` and the
    /// category heads.
    pub(super) fn own_params_mut(&mut self) -> NamedParams<'_, F, B> {
        own_params(
            &mut self.seg_head,
            &mut self.decoder,
            [
                ("patch_head", &mut self.patch_head),
                ("seg_class_head", &mut self.seg_class_head),
                ("presence_proj", &mut self.presence_proj),
                ("seg_place_head", &mut self.seg_place_head),
            ],
        )
    }

    /// Freezes or unfreezes each part.
    pub fn set_trainable(&mut self, t: Trainable) {
        let be = self.llava.be.clone();
        self.llava.vision_tower.set_trainable(t.vision);
        for lin in [&mut self.llava.projector.fc1, &mut self.llava.projector.fc2] {
            lin.weight.set_trainable(&be, t.projector);
            if let Some(b) = &mut lin.bias {
                b.set_trainable(&be, t.projector);
            }
        }
        self.llava.language_model.set_trainable(t.llm);
        for lin in [&mut self.seg_head.fc1, &mut self.seg_head.fc2] {
            lin.weight.set_trainable(&be, t.seg_head);
            if let Some(b) = &mut lin.bias {
                b.set_trainable(&be, t.seg_head);
            }
        }
        for (_, p) in self.decoder.params_mut() {
            p.set_trainable(&be, t.decoder);
        }
        for (head, on) in [
            (&mut self.patch_head, t.vision),
            (&mut self.seg_class_head, t.seg_head),
            (&mut self.presence_proj, t.projector),
            (&mut self.seg_place_head, t.seg_head),
        ] {
            if let Some(l) = head {
                l.weight.set_trainable(&be, on);
                if let Some(b) = &mut l.bias {
                    b.set_trainable(&be, on);
                }
            }
        }
    }

    /// Image tokens per image (K): one per patch, then the presence tokens
    /// ([`SegModelConfig::presence_tokens_per_image`]).
    pub fn tokens_per_image(&self) -> usize {
        self.patches_per_image() + self.cfg.presence_tokens_per_image()
    }

    /// The vision tower's patches per image (the patch head's and the decoder's grid).
    pub fn patches_per_image(&self) -> usize {
        self.llava.cfg.vision.num_patches()
    }

    /// The most token ids an example may have: the model's context less the image's K
    /// positions, plus the one image token that stands for them (the model's own
    /// values, so a pretrained LLaVA's, not a config's).
    pub fn max_ids(&self) -> usize {
        (self.llava.cfg.text.max_position_embeddings + 1).saturating_sub(self.tokens_per_image())
    }

    /// `ids` with its one image token expanded to K positions.
    pub fn expand_ids(&self, enc: &Encoded) -> Vec<u32> {
        let k = self.tokens_per_image();
        let img = enc.ids[enc.image_pos];
        let mut out = Vec::with_capacity(enc.ids.len() + k - 1);
        out.extend_from_slice(&enc.ids[..enc.image_pos]);
        out.extend(std::iter::repeat_n(img, k));
        out.extend_from_slice(&enc.ids[enc.image_pos + 1..]);
        out
    }

    /// Stacks the images of a batch into (B, 3, S, S).
    pub fn stack_pixels(&self, px: &[&Pixels]) -> Result<B::Buf> {
        let s = self.cfg.image_size;
        let mut all = Vec::with_capacity(px.len() * 3 * s * s);
        for p in px {
            crate::error::check_len("SegModel", "pixels", p.data.len(), 3 * s * s)?;
            all.extend(p.data.iter().map(|&x| F::from(x).unwrap()));
        }
        Ok(self.llava.be.from_slice(&all))
    }

    /// Codebook embeddings (M, L, D) from hidden states: `rows` are the hidden-state rows
    /// (M·G) that predict each codebook token, in group order.
    pub fn seg_embeddings(
        &self,
        hidden: &B::Buf,
        rows: &[u32],
    ) -> Result<(B::Buf, MlpActs<B::Buf>)> {
        let be = &self.llava.be;
        let h = self.llava.cfg.text.hidden_size;
        let mut g = be.uninit(rows.len() * h);
        be.embedding_fwd(rows, hidden, h, &mut g)?;
        let (out, acts) = self.seg_head.forward(be, g)?; // (M·G, D)
        Ok((self.average_scales(&out, rows.len())?, acts))
    }

    /// (M·G, D) → (M, L, D): the S tokens of each scale averaged.
    fn average_scales(&self, out: &B::Buf, n_rows: usize) -> Result<B::Buf> {
        let be = &self.llava.be;
        let (s, d) = (self.cfg.tokens_per_scale, self.cfg.seg_dim);
        let ml = n_rows / s;
        let mut emb = be.zeros(ml * d);
        let inv = F::from(1.0 / s as f64).unwrap();
        // token si of every (m, l), added in the order of s: the sums a row at a time made
        let mut rows = be.uninit(ml * d);
        for si in 0..s {
            be.copy_rows(&mut rows, out, Self::scale_rows(si, ml, s, d))?;
            be.axpy(&mut emb, inv, &rows)?;
        }
        Ok(emb)
    }

    /// Token `si` of each of the `ml` (m, l) groups of S rows of D: from (M·L·S, D) to
    /// (M·L, D) (back with [`RowCopy::swapped`]).
    fn scale_rows(si: usize, ml: usize, s: usize, d: usize) -> RowCopy {
        RowCopy {
            rows: ml,
            width: d,
            dst_off: 0,
            dst_stride: d,
            src_off: si * d,
            src_stride: s * d,
        }
    }

    /// forward: emb[m,l] = 1/S Σ_s out[m,l,s]   so: dout[m,l,s] = demb[m,l] / S.
    pub(crate) fn average_scales_bwd(&self, demb: &B::Buf, m: usize) -> Result<B::Buf> {
        let be = &self.llava.be;
        let (s, l, d) = (self.cfg.tokens_per_scale, self.cfg.scales, self.cfg.seg_dim);
        let mut dout = be.uninit(m * l * s * d);
        let inv = F::from(1.0 / s as f64).unwrap();
        let mut rows = be.uninit(m * l * d);
        be.copy(&mut rows, demb)?;
        be.scale(&mut rows, inv);
        for si in 0..s {
            be.copy_rows(
                &mut dout,
                &rows,
                Self::scale_rows(si, m * l, s, d).swapped(),
            )?;
        }
        Ok(dout)
    }

    /// Logits (S·S) of one target → logits at the image's own size (H·W): crop to the
    /// valid region, resize bilinearly when the image was resized.
    pub fn to_image_logits(&self, logits: &B::Buf, off: usize, px: &Pixels) -> Result<B::Buf> {
        let be = &self.llava.be;
        let s = self.cfg.image_size;
        let (vh, vw) = (px.valid_h, px.valid_w);
        let mut crop = be.uninit(vh * vw);
        be.copy_rows(&mut crop, logits, crop_copy(vh, vw, s, off, 0))?;
        if (vh, vw) == (px.height, px.width) {
            return Ok(crop);
        }
        let mut out = be.uninit(px.height * px.width);
        be.resize_bilinear(&crop, 1, vh, vw, 1, px.height, px.width, &mut out)?;
        Ok(out)
    }

    /// Backward of [`Self::to_image_logits`]: the gradient of one image's logits,
    /// `d[d_off..d_off + H·W]`, written into `dlogits` at `off` (the valid crop of the
    /// `S×S` map; the rest is left as it is).
    pub(crate) fn to_image_logits_bwd(
        &self,
        d: &B::Buf,
        d_off: usize,
        off: usize,
        px: &Pixels,
        dlogits: &mut B::Buf,
    ) -> Result<()> {
        let be = &self.llava.be;
        let s = self.cfg.image_size;
        let (vh, vw) = (px.valid_h, px.valid_w);
        if (vh, vw) == (px.height, px.width) {
            return be.copy_rows(dlogits, d, crop_copy(vh, vw, s, off, d_off).swapped());
        }
        let (h, w) = (px.height, px.width);
        let staged;
        let dimg = if d_off == 0 && be.len(d) == h * w {
            d
        } else {
            let mut one = be.uninit(h * w);
            be.copy_range(&mut one, 0, d, d_off, h * w)?;
            staged = one;
            &staged
        };
        let mut dc = be.uninit(vh * vw);
        be.resize_bilinear_bwd(dimg, 1, vh, vw, 1, h, w, &mut dc)?;
        be.copy_rows(dlogits, &dc, crop_copy(vh, vw, s, off, 0).swapped())
    }
}

/// The valid `vh × vw` crop of an S-wide map at `map_off`, as runs out of the map into a
/// packed `vh·vw` buffer at `packed_off` (back into the map with [`RowCopy::swapped`]).
fn crop_copy(vh: usize, vw: usize, s: usize, map_off: usize, packed_off: usize) -> RowCopy {
    RowCopy {
        rows: vh,
        width: vw,
        dst_off: packed_off,
        dst_stride: vw,
        src_off: map_off,
        src_stride: s,
    }
}

/// The parts POPEN adds to LLaVA, named as a run directory stores them (one list for
/// [`SegModel::params_mut`] and [`SegModel::own_params_mut`]).
fn own_params<'a, F: Float, B: Backend<F>>(
    seg_head: &'a mut Mlp<F, B>,
    decoder: &'a mut PixelDecoder<F, B>,
    heads: [(&str, &'a mut Option<Linear<F, B>>); 4],
) -> NamedParams<'a, F, B> {
    let mut own = Vec::new();
    push_linear(&mut own, "seg_head.fc1", &mut seg_head.fc1);
    push_linear(&mut own, "seg_head.fc2", &mut seg_head.fc2);
    own.extend(decoder.params_mut());
    for (name, head) in heads {
        if let Some(l) = head {
            push_linear(&mut own, name, l);
        }
    }
    own
}
