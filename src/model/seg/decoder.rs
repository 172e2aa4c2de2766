//! PixelLM's light pixel decoder (no SAM image encoder): two ViT feature levels, each
//! projected and refined by a conv neck, decoded at two scales by SAM-style two-way
//! transformers between [a learned mask token, the target's embedding of that scale]
//! and the image tokens; each scale's mask is the dot product of a hypernetwork vector
//! with ×2-upsampled image features; scale 1 runs on upsampled level-1 features gated
//! by `σ(mask₀) + 1`; both scales' logits are resized to the output and averaged.
//!
//! Structure follows PixelLM's `MaskDecoderMultiScale` (model/segment_anything/modeling
//! in its release), with these deviations:
//! - one mask token per scale and no IoU token/head: PixelLM keeps SAM's four mask
//!   tokens and IoU head but uses only the first mask (`multimask_output=False`) and
//!   never trains the IoU head, so they would be parameters without gradient;
//! - no level embedding added to the tokens: each scale has its own transformer and its
//!   own mask token, which already tell the scales apart;
//! - the upscaling keeps D channels (SAM/PixelLM go to D/8): the config has no field for
//!   a second width, and at our sizes the hypernetwork dot product is cheap;
//! - scale 1's image side is level 1 upsampled bilinearly ×2 (PixelLM upsamples with its
//!   `upsample_2x` ConvTranspose): the issue asks for bilinear, so no extra weights;
//! - positions: SAM's random Fourier features (`PositionEmbeddingRandom`, as PixelLM)
//!   with a fixed Gaussian drawn from [`PE_SEED`], not a trained or loaded buffer;
//! - an optional pixel skip ([`PixelDecoderConfig::skip_patch`], off unless the config
//!   asks): the image's own pixels on scale 1's grid, added to that scale's features
//!   (why and what it measured: `PixelSkip`'s doc and docs/stage1.md).
//!
//! Batching: every target runs as one batch row of the transformers (B_t = M), its
//! image's features gathered per target (M is small); the projection and neck run once
//! per image and their gradients are summed over that image's targets.
//!
//! B images, M targets, G = GH·GW grid tokens, Cv vision width, D decoder width,
//! L scales, P = out_h·out_w output pixels.
use crate::backend::{Accum, Act, Backend, MatmulSpec, RowCopy};
use crate::error::{check_len, Error, Result};
use crate::nn::conv::{push_layernorm, push_linear, ConvActs, ConvTActs, NamedParams};
use crate::nn::layers::NormStats;
use crate::nn::layers::{ImageShape, PatchEmbed};
use crate::nn::twoway::TwoWayActs;
use crate::nn::{
    randn, Conv2d, ConvTranspose2x2, LayerNorm, Linear, Rng, Tensor, TwoWayTransformer,
};
use num_traits::Float;
use serde::{Deserialize, Serialize};

/// LayerNorm2d epsilon (SAM's neck and upscaling).
const LN2D_EPS: f32 = 1e-6;
/// Seed of the fixed Gaussian of the random Fourier positional encoding.
pub const PE_SEED: u64 = 0x5eed_0f9e;
/// Number of ViT feature levels and of decoding scales.
pub const LEVELS: usize = 2;
/// Tokens per target in the transformers: [mask token, target embedding].
const TOKENS: usize = 2;
/// Hidden layers of the hypernetwork MLP (SAM: 3 Linear layers, ReLU between).
const HYPER_LAYERS: usize = 3;
/// The activation after the upscaling's LayerNorm2d (SAM: nn.GELU, erf form); also the
/// pixel skip's.
const UPSCALE_ACT: Act = Act::GeluErf;
/// Channels of the pixels the skip reads (RGB).
const PIXEL_CHANNELS: usize = 3;

/// Sizes of the pixel decoder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PixelDecoderConfig {
    /// Cv, the ViT's width.
    pub vision_dim: usize,
    /// D, the decoder's width.
    pub dim: usize,
    /// Two-way blocks per scale (PixelLM: 2).
    pub depth: usize,
    /// Attention heads of the two-way transformers; D/2 must be a multiple of it (the
    /// cross-attentions run at D/2).
    pub heads: usize,
    /// Hidden width of each two-way block's token MLP (D → `mlp_dim` → D, ReLU).
    pub mlp_dim: usize,
    /// L, decoding scales (must be 2, one per feature level).
    pub scales: usize,
    /// The ViT patch grid GH × GW.
    pub grid_h: usize,
    /// GW, the grid's width in patches.
    pub grid_w: usize,
    /// Patch size q of the pixel skip (ours; 0 = none, PixelLM has none): the pixels,
    /// cut into q × q patches on scale 1's output grid (4·GH × 4·GW, so the pixels are
    /// 4·GH·q × 4·GW·q), through `patch embed → LayerNorm → GELU → Linear` to D
    /// channels, are added to scale 1's upscaled features before the hypernetwork's dot
    /// product.  See `PixelSkip`.
    #[serde(default)]
    pub skip_patch: usize,
}

impl PixelDecoderConfig {
    fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(Error::arg("PixelDecoderConfig", format!("{field}: {msg}")))
        };
        if self.scales != LEVELS {
            return bad(
                "scales",
                format!("{} given, the decoder has exactly {LEVELS}", self.scales),
            );
        }
        for (field, v) in [
            ("vision_dim", self.vision_dim),
            ("dim", self.dim),
            ("heads", self.heads),
            ("mlp_dim", self.mlp_dim),
            ("grid_h", self.grid_h),
            ("grid_w", self.grid_w),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        // the Fourier encoding is [sin, cos] halves; the cross-attentions halve D into heads
        let half = self.dim / crate::nn::twoway::CROSS_DOWNSAMPLE;
        if !self.dim.is_multiple_of(2) || !half.is_multiple_of(self.heads) {
            return bad(
                "dim",
                format!(
                    "{} must be even and D/2 a multiple of heads = {}",
                    self.dim, self.heads
                ),
            );
        }
        Ok(())
    }
}

/// SAM's neck on one level: 1×1 conv → LayerNorm2d → 3×3 conv → LayerNorm2d, no biases.
#[derive(Clone, Debug)]
struct Neck<F: Float, B: Backend<F>> {
    conv1: Conv2d<F, B>,
    ln1: LayerNorm<F, B>,
    conv3: Conv2d<F, B>,
    ln2: LayerNorm<F, B>,
}

/// ConvTranspose2x2 → LayerNorm2d → GELU.
#[derive(Clone, Debug)]
struct Upscale<F: Float, B: Backend<F>> {
    convt: ConvTranspose2x2<F, B>,
    ln: LayerNorm<F, B>,
}

/// The pixel skip (ours, not PixelLM's): per-pixel-patch features of the input image
/// at scale 1's output resolution, added to that scale's upscaled features.
///
/// Why: the decoder's image side is the ViT's patch tokens (16 × 16 pixels each in the
/// tiny model) upscaled ×4 by learned convs that never see a pixel, so nothing finer
/// than a patch reaches the mask but what the tokens encode.  The world's targets
/// average 2.6 % of the image (about 18 × 18 pixels, one or two patches).  A logit map
/// on the patch grid ×2 bilinearly resized to the image cannot follow such an outline:
/// fitted by gradient descent to each ground-truth mask of the demo's test split, the
/// best 16 × 16 map reaches mean IoU 0.77, a 32 × 32 map 0.95.  PixelLM's CLIP tokens
/// carry fine detail from pretraining and its images are larger; a tower trained from
/// scratch on 2000 images does not.
///
/// pixels (B, 3, H, W) → patches (B·P, 3q²) → Linear → LN → GELU → Linear → (B·P, D).
#[derive(Clone, Debug)]
struct PixelSkip<F: Float, B: Backend<F>> {
    patch: PatchEmbed<F, B>,
    ln: LayerNorm<F, B>,
    out: Linear<F, B>,
}

impl<F: Float, B: Backend<F>> PixelSkip<F, B> {
    /// Whether any of its parameters has a gradient slot (is trainable).
    fn trains(&self) -> bool {
        let p = &self.patch;
        [&p.weight, &self.ln.weight, &self.ln.bias, &self.out.weight]
            .into_iter()
            .chain(p.bias.as_ref())
            .chain(self.out.bias.as_ref())
            .any(|t| t.grad.is_some())
    }
}

#[derive(Clone, Debug)]
struct SkipActs<Buf> {
    patches: Buf,
    y: Buf,
    lns: NormStats<Buf>,
    yn: Buf,
    a: Buf,
}

/// The image side of one decoder call: B images' two ViT feature levels, each
/// (B, GH·GW, Cv) without the class token, and their pixels (B, 3, 4·GH·q, 4·GW·q)
/// when the decoder has a pixel skip (ignored otherwise).
#[derive(Clone, Copy, Debug)]
pub struct DecoderImages<'a, Buf> {
    /// The two feature levels, each (B, GH·GW, Cv).
    pub levels: [&'a Buf; 2],
    /// Pixels (B, 3, 4·GH·q, 4·GW·q) for the pixel skip: required when the decoder has
    /// one, ignored otherwise.
    pub pixels: Option<&'a Buf>,
    /// Number of images B.
    pub b: usize,
}

/// SAM's random Fourier encoding of an h × w grid for the Gaussian `gauss` (2, D/2),
/// rows (x, y): (h·w, D) = [sin(2π·c·G), cos(2π·c·G)] with
/// c = (2(x+½)/w − 1, 2(y+½)/h − 1).
fn grid_encoding<F: Float>(gauss: &[f64], h: usize, w: usize) -> Vec<F> {
    let half = gauss.len() / 2;
    let mut out = Vec::with_capacity(h * w * 2 * half);
    for y in 0..h {
        for x in 0..w {
            let cx = 2.0 * (x as f64 + 0.5) / w as f64 - 1.0;
            let cy = 2.0 * (y as f64 + 0.5) / h as f64 - 1.0;
            let ang: Vec<f64> = (0..half)
                .map(|j| std::f64::consts::TAU * (cx * gauss[j] + cy * gauss[half + j]))
                .collect();
            out.extend(ang.iter().map(|a| F::from(a.sin()).unwrap()));
            out.extend(ang.iter().map(|a| F::from(a.cos()).unwrap()));
        }
    }
    out
}

/// The pixel decoder; parameters listed as `mask_decoder.*`.
#[derive(Clone, Debug)]
pub struct PixelDecoder<F: Float = f32, B: Backend<F> = crate::backend::Cpu> {
    be: B,
    cfg: PixelDecoderConfig,
    proj: Vec<Linear<F, B>>,
    neck: Vec<Neck<F, B>>,
    mask_token: Vec<Tensor<F, B>>,
    transformer: Vec<TwoWayTransformer<F, B>>,
    upscale: Vec<Upscale<F, B>>,
    hyper: Vec<Vec<Linear<F, B>>>,
    skip: Option<PixelSkip<F, B>>,
    /// Each scale's positional encoding (h·w, D), scale s on the (grid_h·2ˢ) ×
    /// (grid_w·2ˢ) grid: fixed ([`PE_SEED`], not a parameter), made once on the backend
    /// and tiled over a call's targets on it ([`Self::pos_encoding`]).
    pe: Vec<B::Buf>,
}

#[derive(Clone, Debug)]
struct NeckActs<Buf> {
    feat: Buf,
    c1a: ConvActs<Buf>,
    c1: Buf,
    n1: NormStats<Buf>,
    c3a: ConvActs<Buf>,
    c3: Buf,
    n2: NormStats<Buf>,
}

#[derive(Clone, Debug)]
struct ScaleActs<Buf> {
    tr: TwoWayActs<Buf>,
    cta: ConvTActs<Buf>,
    y: Buf,
    lns: NormStats<Buf>,
    yn: Buf,
    /// upscaled features (M·4N, D), N = this scale's image tokens, plus the pixel
    /// skip's on scale 1: what the hypernetwork vector is dotted with
    u: Buf,
    /// hypernetwork inputs of each layer (M, D) and pre-activations
    h_in: Vec<Buf>,
    h_pre: Vec<Buf>,
    /// hypernetwork output (M, D)
    hv: Buf,
    /// this scale's logits (M, 4N)
    logits: Buf,
}

/// What [`PixelDecoder::forward`] saves for the backward.
#[derive(Clone, Debug)]
pub struct DecoderActs<Buf> {
    necks: Vec<NeckActs<Buf>>,
    scales: Vec<ScaleActs<Buf>>,
    /// level-1 features upsampled ×2 and gathered per target (M·4G, D), and the gate
    /// σ(logits₀) + 1 (M·4G)
    g1: Buf,
    gate: Buf,
    skip: Option<SkipActs<Buf>>,
    b: usize,
    img_of: Vec<usize>,
    out_h: usize,
    out_w: usize,
}

/// `idx` as runs of (row j of the stack, row `idx[j]`) ([`RowCopy::from_rows`]).
fn idx_runs(idx: &[usize], r: usize) -> Vec<RowCopy> {
    RowCopy::from_rows(idx.iter().copied().enumerate(), r)
}

/// Rows `idx[j]` of src (·, R) stacked: (len(idx), R); one `copy_rows` per run of `idx`.
fn gather<F: Float, B: Backend<F>>(
    be: &B,
    src: &B::Buf,
    r: usize,
    idx: &[usize],
) -> Result<B::Buf> {
    let mut out = be.uninit(idx.len() * r);
    for c in idx_runs(idx, r) {
        be.copy_rows(&mut out, src, c)?;
    }
    Ok(out)
}

/// Backward of [`gather`]: `dst[idx[j]] += src[j]` over rows of R, per run of `idx`: a
/// run of distinct rows is one [`Backend::add_rows`], a run into one row (stride 0)
/// adds its column sums.
fn scatter_add<F: Float, B: Backend<F>>(
    be: &B,
    dst: &mut B::Buf,
    r: usize,
    src: &B::Buf,
    idx: &[usize],
) -> Result<()> {
    // a gather's run: dst = src's rows (contiguous), src = dst's rows
    for c in idx_runs(idx, r) {
        if c.src_stride == 0 && c.rows > 1 {
            // the run's rows of src, copied out unless they are all of it
            let part;
            let s = if c.dst_off == 0 && c.rows * r == be.len(src) {
                src
            } else {
                part = {
                    let mut p = be.uninit(c.rows * r);
                    be.copy_range(&mut p, 0, src, c.dst_off, c.rows * r)?;
                    p
                };
                &part
            };
            let mut a = be.uninit(r);
            be.copy_range(&mut a, 0, dst, c.src_off, r)?;
            be.bias_bwd(s, &mut a, r)?;
            be.copy_range(dst, c.src_off, &a, 0, r)?;
            continue;
        }
        be.add_rows(dst, src, c.swapped())?;
    }
    Ok(())
}

impl<F: Float, B: Backend<F>> PixelDecoder<F, B> {
    /// A decoder with a seeded init: Linear and conv weights N(0, 1/fan_in), biases 0,
    /// norms 1 and 0, mask tokens N(0, 1).
    pub fn new(be: B, cfg: PixelDecoderConfig, seed: u64) -> Result<Self> {
        let mut dec = Self::zeroed(be, cfg)?;
        dec.init_random(seed);
        Ok(dec)
    }

    /// Every weight zero (norms 1 and 0): the shape a checkpoint is read into, with
    /// nothing drawn (the positional encoding's fixed Gaussian is not a parameter).
    pub fn zeroed(be: B, cfg: PixelDecoderConfig) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.dim;
        let per_scale =
            |_| -> Result<_> { TwoWayTransformer::new(&be, cfg.depth, d, cfg.heads, cfg.mlp_dim) };
        let transformer = (0..LEVELS).map(per_scale).collect::<Result<_>>()?;
        let mut pe_rng = Rng::new(PE_SEED);
        let pe_gauss: Vec<f64> = (0..d).map(|_| pe_rng.normal()).collect();
        let pe = (0..LEVELS)
            .map(|s| {
                let (h, w) = (cfg.grid_h << s, cfg.grid_w << s);
                be.from_slice(&grid_encoding::<F>(&pe_gauss, h, w))
            })
            .collect();
        let dec = PixelDecoder {
            proj: (0..LEVELS)
                .map(|_| Linear::new(&be, cfg.vision_dim, d, true))
                .collect(),
            neck: (0..LEVELS)
                .map(|_| Neck {
                    conv1: Conv2d::new(&be, d, d, 1, 0, false),
                    ln1: LayerNorm::new(&be, d, LN2D_EPS),
                    conv3: Conv2d::new(&be, d, d, 3, 1, false),
                    ln2: LayerNorm::new(&be, d, LN2D_EPS),
                })
                .collect(),
            mask_token: (0..LEVELS).map(|_| Tensor::zeros(&be, &[d])).collect(),
            transformer,
            upscale: (0..LEVELS)
                .map(|_| Upscale {
                    convt: ConvTranspose2x2::new(&be, d, d),
                    ln: LayerNorm::new(&be, d, LN2D_EPS),
                })
                .collect(),
            hyper: (0..LEVELS)
                .map(|_| {
                    (0..HYPER_LAYERS)
                        .map(|_| Linear::new(&be, d, d, true))
                        .collect()
                })
                .collect(),
            skip: (cfg.skip_patch > 0).then(|| PixelSkip {
                patch: PatchEmbed::new(&be, PIXEL_CHANNELS, d, cfg.skip_patch, true),
                ln: LayerNorm::new(&be, d, LN2D_EPS),
                out: Linear::new(&be, d, d, true),
            }),
            pe,
            be,
            cfg,
        };
        Ok(dec)
    }

    /// [`Self::new`]'s draws: Linear and conv weights N(0, 1/fan_in), mask tokens
    /// N(0, 1), in parameter order.
    pub fn init_random(&mut self, seed: u64) {
        let mut rng = Rng::new(seed);
        let be = self.be.clone();
        for (name, t) in self.params_mut() {
            if name.contains(".mask_tokens.") {
                t.data = be.from_slice(&randn::<F>(&mut rng, t.numel(), 1.0));
            } else if name.ends_with(".weight") && t.shape.len() >= 2 {
                // (out, in) or a conv's (out, ch, q, q): fan_in is everything but `out`
                let fan_in = (t.numel() / t.shape[0]) as f64;
                t.data = be.from_slice(&randn::<F>(&mut rng, t.numel(), 1.0 / fan_in.sqrt()));
            }
        }
    }

    /// The sizes the decoder was built with.
    pub fn config(&self) -> &PixelDecoderConfig {
        &self.cfg
    }

    /// Every parameter under its name (`mask_decoder.*`).
    pub fn params_mut(&mut self) -> NamedParams<'_, F, B> {
        let mut out: NamedParams<'_, F, B> = Vec::new();
        let p = "mask_decoder";
        for (l, lin) in self.proj.iter_mut().enumerate() {
            push_linear(&mut out, &format!("{p}.feature_proj.{l}"), lin);
        }
        for (l, n) in self.neck.iter_mut().enumerate() {
            push_linear(&mut out, &format!("{p}.neck.{l}.0"), &mut n.conv1.lin);
            push_layernorm(&mut out, &format!("{p}.neck.{l}.1"), &mut n.ln1);
            push_linear(&mut out, &format!("{p}.neck.{l}.2"), &mut n.conv3.lin);
            push_layernorm(&mut out, &format!("{p}.neck.{l}.3"), &mut n.ln2);
        }
        for (s, t) in self.mask_token.iter_mut().enumerate() {
            out.push((format!("{p}.mask_tokens.{s}.weight"), t));
        }
        for (s, t) in self.transformer.iter_mut().enumerate() {
            t.push_params(&mut out, &format!("{p}.transformer.{s}"));
        }
        for (s, u) in self.upscale.iter_mut().enumerate() {
            push_linear(
                &mut out,
                &format!("{p}.output_upscaling.{s}.0"),
                &mut u.convt.lin,
            );
            out.push((
                format!("{p}.output_upscaling.{s}.0.bias"),
                &mut u.convt.bias,
            ));
            push_layernorm(&mut out, &format!("{p}.output_upscaling.{s}.1"), &mut u.ln);
        }
        if let Some(sk) = &mut self.skip {
            out.push((format!("{p}.pixel_skip.0.weight"), &mut sk.patch.weight));
            if let Some(bias) = &mut sk.patch.bias {
                out.push((format!("{p}.pixel_skip.0.bias"), bias));
            }
            push_layernorm(&mut out, &format!("{p}.pixel_skip.1"), &mut sk.ln);
            push_linear(&mut out, &format!("{p}.pixel_skip.3"), &mut sk.out);
        }
        for (s, h) in self.hyper.iter_mut().enumerate() {
            for (i, lin) in h.iter_mut().enumerate() {
                push_linear(
                    &mut out,
                    &format!("{p}.output_hypernetworks_mlps.{s}.layers.{i}"),
                    lin,
                );
            }
        }
        out
    }

    /// Scale `s`'s positional encoding (h·w, D) tiled over `m` targets: (m·h·w, D), one
    /// copy on the backend (a source stride of 0).
    fn pos_encoding(&self, s: usize, m: usize) -> Result<B::Buf> {
        let be = &self.be;
        let one = &self.pe[s];
        let n = be.len(one);
        let mut tiled = be.uninit(m * n);
        let runs = RowCopy {
            rows: m,
            width: n,
            dst_off: 0,
            dst_stride: n,
            src_off: 0,
            src_stride: 0,
        };
        be.copy_rows(&mut tiled, one, runs)?;
        Ok(tiled)
    }

    /// img: the B images' feature levels (level 0 → scale 0 (coarse), level 1 → scale 1)
    /// and pixels; emb: (M, L, D) one embedding per target and scale; img_of: (M) which
    /// image each target belongs to.  Returns logits (M, out_h·out_w) at out_h × out_w
    /// (the padded square input size) and the saved activations.
    pub fn forward(
        &self,
        img: DecoderImages<'_, B::Buf>,
        emb: &B::Buf,
        img_of: &[usize],
        out_h: usize,
        out_w: usize,
    ) -> Result<(B::Buf, DecoderActs<B::Buf>)> {
        let be = &self.be;
        let (d, gh, gw) = (self.cfg.dim, self.cfg.grid_h, self.cfg.grid_w);
        let (g, m, b) = (gh * gw, img_of.len(), img.b);
        check_len(
            "PixelDecoder::forward",
            "emb (M, L, D)",
            be.len(emb),
            m * LEVELS * d,
        )?;
        if let Some((t, &i)) = img_of.iter().enumerate().find(|(_, &i)| i >= b) {
            return Err(Error::arg(
                "PixelDecoder::forward",
                format!("target {t} belongs to image {i} of a batch of {b}"),
            ));
        }
        if out_h == 0 || out_w == 0 {
            return Err(Error::arg(
                "PixelDecoder::forward",
                format!("output size {out_h}x{out_w}"),
            ));
        }
        // per image: projection and neck of each level → z (B·G, D)
        let mut necks = Vec::with_capacity(LEVELS);
        let mut z = Vec::with_capacity(LEVELS);
        for (l, feat) in img.levels.iter().enumerate() {
            check_len(
                "PixelDecoder::forward",
                "feats (B, GH·GW, Cv)",
                be.len(feat),
                b * g * self.cfg.vision_dim,
            )?;
            let n = &self.neck[l];
            let p = self.proj[l].forward(be, feat)?;
            let (c1, c1a) = n.conv1.forward(be, &p, b, gh, gw)?;
            let (n1o, n1) = n.ln1.forward(be, &c1)?;
            let (c3, c3a) = n.conv3.forward(be, &n1o, b, gh, gw)?;
            let (zl, n2) = n.ln2.forward(be, &c3)?;
            let feat = (*feat).clone();
            necks.push(NeckActs {
                feat,
                c1a,
                c1,
                n1,
                c3a,
                c3,
                n2,
            });
            z.push(zl);
        }
        // scale 0 on the grid
        let keys0 = gather(be, &z[0], g * d, img_of)?;
        let s0 = self.run_scale(0, &keys0, emb, m, gh, gw, None)?;
        // scale 1 on level 1 upsampled ×2, gated by σ(mask₀) + 1 (mask₀ is at that size)
        let mut up1 = be.uninit(b * 4 * g * d);
        be.resize_bilinear(&z[1], b, gh, gw, d, 2 * gh, 2 * gw, &mut up1)?;
        let g1 = gather(be, &up1, 4 * g * d, img_of)?;
        let mut gate = be.uninit(m * 4 * g);
        be.act_fwd(Act::Sigmoid, &s0.logits, &mut gate)?;
        let mut one = be.uninit(m * 4 * g);
        be.fill(&mut one, F::one());
        be.axpy(&mut gate, F::one(), &one)?;
        let mut keys1 = be.uninit(be.len(&g1));
        be.mul_rows(&g1, &gate, d, &mut keys1)?;
        let skip = self.skip_forward(img.pixels, b)?;
        let skip_rows = match &skip {
            Some((sf, _)) => Some(gather(be, sf, 16 * g * d, img_of)?),
            None => None,
        };
        let s1 = self.run_scale(1, &keys1, emb, m, 2 * gh, 2 * gw, skip_rows.as_ref())?;
        // each scale's logits resized to the output, averaged
        let mut out = be.zeros(m * out_h * out_w);
        for (s, sa) in [&s0, &s1].into_iter().enumerate() {
            let (h, w) = (gh << (s + 1), gw << (s + 1));
            let mut r = be.uninit(m * out_h * out_w);
            be.resize_bilinear(&sa.logits, m, h, w, 1, out_h, out_w, &mut r)?;
            be.axpy(&mut out, F::from(1.0 / LEVELS as f64).unwrap(), &r)?;
        }
        let acts = DecoderActs {
            necks,
            scales: vec![s0, s1],
            g1,
            gate,
            skip: skip.map(|(_, a)| a),
            b,
            img_of: img_of.to_vec(),
            out_h,
            out_w,
        };
        Ok((out, acts))
    }

    /// The pixel skip's features (B·16·GH·GW, D) of pixels (B, 3, 4·GH·q, 4·GW·q), with
    /// what its backward needs; None without a skip.
    #[allow(clippy::type_complexity)]
    fn skip_forward(
        &self,
        pixels: Option<&B::Buf>,
        b: usize,
    ) -> Result<Option<(B::Buf, SkipActs<B::Buf>)>> {
        let Some(sk) = &self.skip else {
            return Ok(None);
        };
        let be = &self.be;
        let shape = self.skip_shape(b);
        let pixels = pixels.ok_or_else(|| {
            Error::arg(
                "PixelDecoder::forward",
                "the decoder has a pixel skip and was given no pixels",
            )
        })?;
        check_len(
            "PixelDecoder::forward",
            "pixels (B, 3, 4·GH·q, 4·GW·q)",
            be.len(pixels),
            b * PIXEL_CHANNELS * shape.h * shape.w,
        )?;
        let (patches, y) = sk.patch.forward(be, pixels, shape)?;
        let (yn, lns) = sk.ln.forward(be, &y)?;
        let mut a = be.uninit(be.len(&yn));
        be.act_fwd(UPSCALE_ACT, &yn, &mut a)?;
        let out = sk.out.forward(be, &a)?;
        Ok(Some((
            out,
            SkipActs {
                patches,
                y,
                lns,
                yn,
                a,
            },
        )))
    }

    /// The pixels' shape the skip reads for B images.
    fn skip_shape(&self, b: usize) -> ImageShape {
        let q = self.cfg.skip_patch;
        ImageShape {
            b,
            h: 4 * self.cfg.grid_h * q,
            w: 4 * self.cfg.grid_w * q,
        }
    }

    /// One scale: tokens [mask token, emb[:, s]] against keys (M·h·w, D) → logits
    /// (M, 4hw); `skip` (M·4hw, D), when given, is added to the upscaled features.
    #[allow(clippy::too_many_arguments)]
    fn run_scale(
        &self,
        s: usize,
        keys: &B::Buf,
        emb: &B::Buf,
        m: usize,
        h: usize,
        w: usize,
        skip: Option<&B::Buf>,
    ) -> Result<ScaleActs<B::Buf>> {
        let be = &self.be;
        let d = self.cfg.dim;
        let n = h * w;
        // tokens[t] = [mask_token, emb[t, s]]: the mask token to every mask (a source
        // stride of 0), then the embeddings
        let mut tokens = be.uninit(m * TOKENS * d);
        let to_tokens = |slot: usize, src_off: usize, src_stride: usize| RowCopy {
            rows: m,
            width: d,
            dst_off: slot * d,
            dst_stride: TOKENS * d,
            src_off,
            src_stride,
        };
        be.copy_rows(&mut tokens, &self.mask_token[s].data, to_tokens(0, 0, 0))?;
        be.copy_rows(&mut tokens, emb, to_tokens(1, s * d, LEVELS * d))?;
        check_len(
            "PixelDecoder::run_scale",
            "positional encoding (h·w, D)",
            be.len(&self.pe[s]),
            n * d,
        )?;
        let pe = self.pos_encoding(s, m)?;
        let (q, k, tr) = self.transformer[s].forward(be, &tokens, keys, &pe, m, TOKENS, n)?;
        // image side: ×2 upsampling
        let up = &self.upscale[s];
        let (y, cta) = up.convt.forward(be, &k, m, h, w)?;
        let (yn, lns) = up.ln.forward(be, &y)?;
        let mut u = be.uninit(be.len(&yn));
        be.act_fwd(UPSCALE_ACT, &yn, &mut u)?;
        if let Some(sk) = skip {
            be.axpy(&mut u, F::one(), sk)?;
        }
        // token side: the mask token's output through the hypernetwork MLP
        let idx: Vec<usize> = (0..m).map(|t| t * TOKENS).collect();
        let mut x = gather(be, &q, d, &idx)?;
        let (mut h_in, mut h_pre) = (Vec::new(), Vec::new());
        for (i, lin) in self.hyper[s].iter().enumerate() {
            let pre = lin.forward(be, &x)?;
            h_in.push(x);
            x = if i + 1 < HYPER_LAYERS {
                let mut a = be.uninit(be.len(&pre));
                be.act_fwd(Act::Relu, &pre, &mut a)?;
                a
            } else {
                pre.clone()
            };
            h_pre.push(pre);
        }
        let hv = x;
        // logits[t, p] = u[t, p, :] · hv[t, :], a product per mask
        let np = 4 * n;
        let mut logits = be.uninit(m * np);
        let spec = MatmulSpec {
            m: np,
            k: d,
            n: 1,
            ta: false,
            tb: false,
        };
        be.matmul_batched(spec, m, &u, &hv, &mut logits, Accum::Replace)?;
        Ok(ScaleActs {
            tr,
            cta,
            y,
            lns,
            yn,
            u,
            h_in,
            h_pre,
            hv,
            logits,
        })
    }

    /// Backward of one scale from dlogits (M, 4hw): accumulates parameter gradients,
    /// writes d emb[:, s] into `demb`, returns d keys (M·h·w, D) and d u (M·4hw, D),
    /// which is also d skip.
    fn run_scale_bwd(
        &mut self,
        s: usize,
        a: &ScaleActs<B::Buf>,
        dlogits: &B::Buf,
        m: usize,
        demb: &mut B::Buf,
    ) -> Result<(B::Buf, B::Buf)> {
        let be = self.be.clone();
        let d = self.cfg.dim;
        let np = be.len(dlogits) / m.max(1);
        // forward: logits[t, p] = u[t, p, :]·hv[t, :]
        // so:      du[t, p, :] = dlogits[t, p]·hv[t, :],  dhv[t, :] = Σ_p dlogits[t, p]·u[t, p, :]
        let mut du = be.uninit(be.len(&a.u));
        let mut dhv = be.uninit(m * d);
        let outer = MatmulSpec {
            m: np,
            k: 1,
            n: d,
            ta: false,
            tb: false,
        };
        be.matmul_batched(outer, m, dlogits, &a.hv, &mut du, Accum::Replace)?;
        let red = MatmulSpec {
            m: d,
            k: np,
            n: 1,
            ta: true,
            tb: false,
        };
        be.matmul_batched(red, m, &a.u, dlogits, &mut dhv, Accum::Replace)?;
        // hypernetwork, last layer first: x_{i+1} = relu(lin_i(x_i)) (no relu on the last)
        let mut dx = dhv;
        for i in (0..HYPER_LAYERS).rev() {
            let dpre = if i + 1 < HYPER_LAYERS {
                let mut dp = be.uninit(be.len(&dx));
                be.act_bwd(Act::Relu, &a.h_pre[i], &dx, &mut dp)?;
                dp
            } else {
                dx
            };
            dx = self.hyper[s][i]
                .backward(&be, &a.h_in[i], &dpre, true)?
                .expect("dx requested");
        }
        let idx: Vec<usize> = (0..m).map(|t| t * TOKENS).collect();
        let mut dq = be.zeros(m * TOKENS * d);
        scatter_add(&be, &mut dq, d, &dx, &idx)?;
        // forward: u = gelu(ln(convt(k)))
        let mut dyn_ = be.uninit(be.len(&du));
        be.act_bwd(UPSCALE_ACT, &a.yn, &du, &mut dyn_)?;
        let up = &mut self.upscale[s];
        let dy = up.ln.backward(&be, &a.y, &a.lns, &dyn_)?;
        let dk = up.convt.backward(&be, &a.cta, &dy)?;
        let (dtokens, dkeys) = self.transformer[s].backward(&be, &a.tr, &dq, &dk)?;
        // forward: tokens[t] = [mask_token, emb[t, s]]
        let from_tokens = |slot: usize, dst_off: usize, dst_stride: usize| RowCopy {
            rows: m,
            width: d,
            dst_off,
            dst_stride,
            src_off: slot * d,
            src_stride: TOKENS * d,
        };
        if let Some(gm) = &mut self.mask_token[s].grad {
            let mut rows = be.uninit(m * d);
            be.copy_rows(&mut rows, &dtokens, from_tokens(0, 0, d))?;
            be.bias_bwd(&rows, gm, d)?;
        }
        be.copy_rows(demb, &dtokens, from_tokens(1, s * d, LEVELS * d))?;
        Ok((dkeys, du))
    }

    /// Backward from dlogits (M, out_h·out_w): accumulates parameter gradients (skipped
    /// for frozen tensors) and returns d feats (both levels, (B, GH·GW, Cv), overwritten)
    /// and d emb (M, L, D).
    pub fn backward(
        &mut self,
        acts: &DecoderActs<B::Buf>,
        dlogits: &B::Buf,
    ) -> Result<([B::Buf; 2], B::Buf)> {
        let be = self.be.clone();
        let (d, gh, gw) = (self.cfg.dim, self.cfg.grid_h, self.cfg.grid_w);
        let (g, m, b) = (gh * gw, acts.img_of.len(), acts.b);
        let (oh, ow) = (acts.out_h, acts.out_w);
        check_len(
            "PixelDecoder::backward",
            "dlogits",
            be.len(dlogits),
            m * oh * ow,
        )?;
        // forward: out = (1/L) Σ_s resize(logits_s)
        let mut dl = Vec::with_capacity(LEVELS);
        for s in 0..LEVELS {
            let (h, w) = (gh << (s + 1), gw << (s + 1));
            let mut dr = dlogits.clone();
            be.scale(&mut dr, F::from(1.0 / LEVELS as f64).unwrap());
            let mut dls = be.uninit(m * h * w);
            be.resize_bilinear_bwd(&dr, m, h, w, 1, oh, ow, &mut dls)?;
            dl.push(dls);
        }
        let mut demb = be.zeros(m * LEVELS * d);
        // scale 1
        let (dkeys1, du1) = self.run_scale_bwd(1, &acts.scales[1], &dl[1], m, &mut demb)?;
        // forward: u₁ += gather(out(gelu(ln(patch(pixels)))), img_of)
        let shape = self.skip_shape(b);
        // the skip reads only inputs, so a frozen skip has nothing to compute
        let skip = self.skip.as_mut().filter(|sk| sk.trains());
        if let (Some(sk), Some(sa)) = (skip, &acts.skip) {
            let mut dout = be.zeros(b * 16 * g * d);
            scatter_add(&be, &mut dout, 16 * g * d, &du1, &acts.img_of)?;
            let da = sk
                .out
                .backward(&be, &sa.a, &dout, true)?
                .expect("dx requested");
            let mut dyn_ = be.uninit(be.len(&da));
            be.act_bwd(UPSCALE_ACT, &sa.yn, &da, &mut dyn_)?;
            let dy = sk.ln.backward(&be, &sa.y, &sa.lns, &dyn_)?;
            sk.patch.backward(&be, &sa.patches, &dy, shape, false)?;
        }
        // forward: keys1 = g1 · gate, gate = σ(logits₀) + 1
        let (mut dg1, mut dgate) = (be.uninit(be.len(&acts.g1)), be.uninit(be.len(&acts.gate)));
        be.mul_rows_bwd(&acts.g1, &acts.gate, &dkeys1, d, &mut dg1, &mut dgate)?;
        let mut dl0 = be.uninit(be.len(&dgate));
        be.act_bwd(Act::Sigmoid, &acts.scales[0].logits, &dgate, &mut dl0)?;
        be.axpy(&mut dl0, F::one(), &dl[0])?;
        let mut dup1 = be.zeros(b * 4 * g * d);
        scatter_add(&be, &mut dup1, 4 * g * d, &dg1, &acts.img_of)?;
        let mut dz1 = be.uninit(b * g * d);
        be.resize_bilinear_bwd(&dup1, b, gh, gw, d, 2 * gh, 2 * gw, &mut dz1)?;
        // scale 0
        let (dkeys0, _) = self.run_scale_bwd(0, &acts.scales[0], &dl0, m, &mut demb)?;
        let mut dz0 = be.zeros(b * g * d);
        scatter_add(&be, &mut dz0, g * d, &dkeys0, &acts.img_of)?;
        // necks and projections
        let mut dfeats = Vec::with_capacity(LEVELS);
        for (l, dz) in [dz0, dz1].into_iter().enumerate() {
            let (a, n) = (&acts.necks[l], &mut self.neck[l]);
            let dc3 = n.ln2.backward(&be, &a.c3, &a.n2, &dz)?;
            let dn1 = n.conv3.backward(&be, &a.c3a, &dc3)?;
            let dc1 = n.ln1.backward(&be, &a.c1, &a.n1, &dn1)?;
            let dp = n.conv1.backward(&be, &a.c1a, &dc1)?;
            dfeats.push(
                self.proj[l]
                    .backward(&be, &a.feat, &dp, true)?
                    .expect("dx requested"),
            );
        }
        let d1 = dfeats.pop().expect("two levels");
        let d0 = dfeats.pop().expect("two levels");
        Ok(([d0, d1], demb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    #[test]
    fn idx_runs_cover_idx_in_order() {
        // (j, count, idx[j], stride) as the runs' rows of 1
        let runs = |idx: &[usize]| -> Vec<(usize, usize, usize, usize)> {
            idx_runs(idx, 1)
                .iter()
                .map(|c| {
                    (
                        c.dst_off,
                        c.rows,
                        c.src_off,
                        if c.rows > 1 { c.src_stride } else { 0 },
                    )
                })
                .collect()
        };
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(runs(&[5]), vec![(0, 1, 5, 0)]);
        assert_eq!(runs(&[0, 2, 4, 6]), vec![(0, 4, 0, 2)]);
        assert_eq!(
            runs(&[0, 0, 0, 1, 1, 3]),
            vec![(0, 3, 0, 0), (3, 2, 1, 0), (5, 1, 3, 0)]
        );
        // a step down starts a new run
        assert_eq!(runs(&[3, 1, 2]), vec![(0, 1, 3, 0), (1, 2, 1, 1)]);
    }

    /// gather and scatter_add against a row at a time, with repeated, unsorted and
    /// strided indices.
    #[test]
    fn gather_and_scatter_add_are_row_by_row() {
        let r = 3;
        let src: Vec<f64> = (0..8 * r).map(|i| (i * i % 11) as f64 - 4.5).collect();
        for idx in [
            vec![2, 0, 2, 1, 1, 1, 3, 5, 7],
            vec![0, 2, 4, 6],
            vec![4, 4],
            vec![],
        ] {
            let got = gather(&Cpu, &src, r, &idx).unwrap();
            let want: Vec<f64> = idx
                .iter()
                .flat_map(|&i| src[i * r..][..r].to_vec())
                .collect();
            assert_eq!(got, want, "gather {idx:?}");
            let g: Vec<f64> = (0..idx.len() * r).map(|i| 0.25 * i as f64 + 1.0).collect();
            let mut dst = src.clone();
            scatter_add(&Cpu, &mut dst, r, &g, &idx).unwrap();
            let mut want = src.clone();
            for (j, &i) in idx.iter().enumerate() {
                for c in 0..r {
                    want[i * r + c] += g[j * r + c];
                }
            }
            assert_eq!(dst, want, "scatter_add {idx:?}");
        }
    }

    /// SAM's Fourier features of a 2 × 3 grid against the formula cell by cell, and the
    /// decoder's tiles: each target's rows are its scale's grid encoding, the Gaussian
    /// drawn from `PE_SEED`.
    #[test]
    fn positional_encoding_is_fourier_features_tiled_over_targets() {
        // D = 4: the Gaussian's x row (0.5, −1), y row (2, 0.25)
        let gauss = [0.5, -1.0, 2.0, 0.25];
        let (h, w) = (2, 3);
        let e = grid_encoding::<f64>(&gauss, h, w);
        assert_eq!(e.len(), h * w * 4);
        for y in 0..h {
            for x in 0..w {
                let (cx, cy) = (
                    (2 * x + 1) as f64 / w as f64 - 1.0,
                    (2 * y + 1) as f64 / h as f64 - 1.0,
                );
                let row = &e[(y * w + x) * 4..][..4];
                for j in 0..2 {
                    let a = std::f64::consts::TAU * (cx * gauss[j] + cy * gauss[2 + j]);
                    assert!((row[j] - a.sin()).abs() < 1e-15, "sin ({x}, {y}) {j}");
                    assert!((row[2 + j] - a.cos()).abs() < 1e-15, "cos ({x}, {y}) {j}");
                }
            }
        }
        let cfg = PixelDecoderConfig {
            vision_dim: 5,
            dim: 8,
            depth: 1,
            heads: 2,
            mlp_dim: 7,
            scales: 2,
            grid_h: 3,
            grid_w: 5,
            skip_patch: 0,
        };
        let dec = PixelDecoder::<f64, Cpu>::zeroed(Cpu, cfg.clone()).unwrap();
        let mut rng = Rng::new(PE_SEED);
        let g: Vec<f64> = (0..cfg.dim).map(|_| rng.normal()).collect();
        for s in 0..LEVELS {
            let one = grid_encoding::<f64>(&g, cfg.grid_h << s, cfg.grid_w << s);
            assert_eq!(dec.pe[s], one, "scale {s}");
            for m in [0, 1, 3] {
                let tiled = dec.pos_encoding(s, m).unwrap();
                assert_eq!(tiled.len(), m * one.len(), "scale {s}, {m} targets");
                for (t, rows) in tiled.chunks(one.len()).enumerate() {
                    assert_eq!(rows, &one[..], "scale {s}, target {t} of {m}");
                }
            }
        }
    }
}
