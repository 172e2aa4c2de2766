//! A convolutional stem for the CLIP tower (ours, not CLIP's; off unless the config's
//! `popen_stem_channels` is above 0): its output is added to the patch embedding, so a
//! tower with a stem is still a CLIP tower whose every patch token also sees
//! weight-shared local features.
//!
//! Why: CLIP's patch embedding is one linear map of a P × P patch, so a tower trained
//! from scratch has to learn each local detector once per offset inside the patch, from
//! the few objects that happen to fall at that offset.  A convolution shares one detector
//! across every position.  On the world (docs/stage1.md) the tiny tower's patch head
//! names 95 % of the object patches of its training images and 74 % of the test
//! images': recognition does not carry over to unseen images.  Early convolutions are
//! the usual cure of a ViT trained on little data; this stem measures whether they are
//! here.
//!
//! pixels (B, 3, H, W) → cells of Q × Q pixels (B, G, G, 3Q²) → Linear (+ bias) → LN →
//! GELU → 3 × 3 conv (pad 1, no bias) → LN → GELU → space-to-depth by R = P / Q
//! (B, G/R, G/R, R²·C1) → Linear (no bias) → (B·NP, C), in the patch order of
//! [`crate::nn::PatchEmbed`].  G = H / Q, C1 the stem's channels, C the tower's width.
use crate::backend::{Act, Backend};
use crate::error::{Error, Result};
use crate::nn::conv::{Conv2d, ConvActs};
use crate::nn::layers::{ImageShape, NormStats};
use crate::nn::{LayerNorm, Linear, PatchEmbed, Tensor};
use num_traits::Float;

/// Side of a stem cell in pixels (Q).
pub const STEM_CELL: usize = 4;
/// LayerNorm epsilon of the stem (CLIP's).
const STEM_EPS: f32 = 1e-5;
/// The stem's activation (erf GELU, as the pixel decoder's).
const STEM_ACT: Act = Act::GeluErf;

/// The stem; parameters listed as `embeddings.stem.*` by the tower.
#[derive(Clone, Debug)]
pub struct ConvStem<F: Float = f32, B: Backend<F> = crate::backend::Cpu> {
    /// (C1, 3, Q, Q) + bias
    pub cell: PatchEmbed<F, B>,
    /// LayerNorm over the C1 channels of each cell, before the first GELU.
    pub layer_norm1: LayerNorm<F, B>,
    /// (C1, 9·C1) in im2col order (ky, kx, c), no bias
    pub conv: Conv2d<F, B>,
    /// LayerNorm over the C1 channels after the 3 × 3 conv, before the second GELU.
    pub layer_norm2: LayerNorm<F, B>,
    /// (C, R²·C1), input ordered (dy, dx, c), no bias
    pub merge: Linear<F, B>,
    /// R = P / Q cells per patch side
    r: usize,
}

/// What [`ConvStem::forward`] saves for the backward.
#[derive(Clone, Debug)]
pub struct StemActs<Buf> {
    img: ImageShape,
    cells: Buf,
    y1: Buf,
    st1: NormStats<Buf>,
    n1: Buf,
    conv: ConvActs<Buf>,
    y2: Buf,
    st2: NormStats<Buf>,
    n2: Buf,
    merged_in: Buf,
}

impl<F: Float, B: Backend<F>> ConvStem<F, B> {
    /// Zero-initialised (norms at 1/0), trainable; `ch` image channels, `c1` stem
    /// channels, `c` the tower's width, `patch` its patch size (a multiple of
    /// [`STEM_CELL`]).
    pub fn new(be: &B, ch: usize, c1: usize, c: usize, patch: usize) -> Result<Self> {
        if c1 == 0 || patch == 0 || !patch.is_multiple_of(STEM_CELL) {
            return Err(Error::arg(
                "ConvStem::new",
                format!(
                    "a stem of {c1} channels on patches of {patch} pixels: needs channels > 0 \
                     and a patch size that is a multiple of the {STEM_CELL}-pixel cell"
                ),
            ));
        }
        let r = patch / STEM_CELL;
        Ok(ConvStem {
            cell: PatchEmbed::new(be, ch, c1, STEM_CELL, true),
            layer_norm1: LayerNorm::new(be, c1, STEM_EPS),
            conv: Conv2d::new(be, c1, c1, 3, 1, false),
            layer_norm2: LayerNorm::new(be, c1, STEM_EPS),
            merge: Linear::new(be, r * r * c1, c, false),
            r,
        })
    }

    fn channels(&self) -> usize {
        self.layer_norm1.weight.numel()
    }

    /// Every parameter with its name under the stem (`cell.weight`, …), fixed order.
    pub fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor<F, B>)> {
        let mut out: Vec<(&'static str, &mut Tensor<F, B>)> =
            vec![("cell.weight", &mut self.cell.weight)];
        if let Some(b) = &mut self.cell.bias {
            out.push(("cell.bias", b));
        }
        out.push(("layer_norm1.weight", &mut self.layer_norm1.weight));
        out.push(("layer_norm1.bias", &mut self.layer_norm1.bias));
        out.push(("conv.weight", &mut self.conv.lin.weight));
        out.push(("layer_norm2.weight", &mut self.layer_norm2.weight));
        out.push(("layer_norm2.bias", &mut self.layer_norm2.bias));
        out.push(("merge.weight", &mut self.merge.weight));
        out
    }

    /// pixels (B, CH, H, W) → (B·NP, C) and what the backward needs.
    pub fn forward(
        &self,
        be: &B,
        pixels: &B::Buf,
        img: ImageShape,
    ) -> Result<(B::Buf, StemActs<B::Buf>)> {
        let (c1, r) = (self.channels(), self.r);
        let p = r * STEM_CELL;
        if !img.h.is_multiple_of(p) || !img.w.is_multiple_of(p) {
            return Err(Error::shape(
                "ConvStem::forward",
                format!(
                    "image {}x{} is not a whole number of {p}-pixel patches",
                    img.h, img.w
                ),
            ));
        }
        let (gh, gw) = (img.h / STEM_CELL, img.w / STEM_CELL);
        let (cells, y1) = self.cell.forward(be, pixels, img)?; // (B·G·G, C1)
        let (n1, st1) = self.layer_norm1.forward(be, &y1)?;
        let mut a1 = be.uninit(be.len(&n1));
        be.act_fwd(STEM_ACT, &n1, &mut a1)?;
        let (y2, conv) = self.conv.forward(be, &a1, img.b, gh, gw)?;
        let (n2, st2) = self.layer_norm2.forward(be, &y2)?;
        let mut a2 = be.uninit(be.len(&n2));
        be.act_fwd(STEM_ACT, &n2, &mut a2)?;
        // space-to-depth is the inverse permutation of depth-to-space, i.e. its backward
        let mut merged_in = be.uninit(be.len(&a2));
        be.depth_to_space_bwd(&a2, img.b, gh / r, gw / r, c1, r, &mut merged_in)?;
        let out = self.merge.forward(be, &merged_in)?;
        Ok((
            out,
            StemActs {
                img,
                cells,
                y1,
                st1,
                n1,
                conv,
                y2,
                st2,
                n2,
                merged_in,
            },
        ))
    }

    /// forward: out = merge(s2d(gelu(ln2(conv(gelu(ln1(cell(pixels))))))))
    /// so, from dout (B·NP, C): ds = dout·merge, then back through each step in turn
    /// (depth-to-space undoes space-to-depth); the pixels get no gradient.
    pub fn backward(&mut self, be: &B, acts: &StemActs<B::Buf>, dout: &B::Buf) -> Result<()> {
        let (c1, r, img) = (self.channels(), self.r, acts.img);
        let (gh, gw) = (img.h / STEM_CELL, img.w / STEM_CELL);
        let ds = self
            .merge
            .backward(be, &acts.merged_in, dout, true)?
            .expect("dx requested");
        let mut da2 = be.uninit(be.len(&ds));
        be.depth_to_space(&ds, img.b, gh / r, gw / r, c1, r, &mut da2)?;
        let mut dn2 = be.uninit(be.len(&da2));
        be.act_bwd(STEM_ACT, &acts.n2, &da2, &mut dn2)?;
        let dy2 = self.layer_norm2.backward(be, &acts.y2, &acts.st2, &dn2)?;
        let da1 = self.conv.backward(be, &acts.conv, &dy2)?;
        let mut dn1 = be.uninit(be.len(&da1));
        be.act_bwd(STEM_ACT, &acts.n1, &da1, &mut dn1)?;
        let dy1 = self.layer_norm1.backward(be, &acts.y1, &acts.st1, &dn1)?;
        self.cell.backward(be, &acts.cells, &dy1, img, false)?;
        Ok(())
    }
}
