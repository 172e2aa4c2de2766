//! 2-D layers on channels-last feature maps (B, H, W, C) = B·H·W rows of C: a stride-1
//! convolution (im2col + Linear), a 2×2 stride-2 transposed convolution (Linear +
//! depth-to-space), and SAM-style attention between two token sets.  Each forward saves
//! what its backward needs; backward follows the gradient rule in [`crate::nn`].
//!
//! B batch, H × W pixels, IC/OC in/out channels, K kernel, Tq/Tk query/key tokens,
//! C channels, NH heads, HS head size.
use super::layers::Linear;
use super::Tensor;
use crate::backend::{AttnLayout, AttnShape, Backend, Conv2dGeom};
use crate::error::{check_len, Error, Result};
use num_traits::Float;

/// Stride-1 convolution with a square kernel and zero padding, as `im2col` then a
/// [`Linear`].
///
/// The weight is stored (OC, K·K·IC) in im2col order (ky, kx, ic) — **not** PyTorch's
/// (OC, IC, K, K); [`Conv2d::from_torch_layout`] converts.
#[derive(Clone, Debug)]
pub struct Conv2d<F: Float = f32, B: Backend<F> = crate::backend::Cpu> {
    /// weight (OC, K·K·IC), bias (OC) or None
    pub lin: Linear<F, B>,
    /// kernel side K
    pub k: usize,
    /// zero padding on every side
    pub pad: usize,
}

/// What a [`Conv2d`] forward saves: the im2col matrix (B·Ho·Wo, K·K·IC) and the geometry.
#[derive(Clone, Debug)]
pub struct ConvActs<Buf> {
    /// im2col of the input, (B·Ho·Wo, K·K·IC)
    pub cols: Buf,
    /// input size, kernel and padding of the call
    pub geom: Conv2dGeom,
}

impl<F: Float, B: Backend<F>> Conv2d<F, B> {
    /// Zero-initialised, trainable.
    pub fn new(be: &B, ic: usize, oc: usize, k: usize, pad: usize, bias: bool) -> Self {
        Conv2d {
            lin: Linear::new(be, k * k * ic, oc, bias),
            k,
            pad,
        }
    }
    /// IC, from the weight's width K·K·IC.
    pub fn in_channels(&self) -> usize {
        self.lin.fan_in() / (self.k * self.k).max(1)
    }
    /// OC, the weight's rows.
    pub fn out_channels(&self) -> usize {
        self.lin.fan_out()
    }

    /// A PyTorch Conv2d weight (OC, IC, K, K) → this layer's (OC, K·K·IC).
    pub fn from_torch_layout(w: &[F], oc: usize, ic: usize, k: usize) -> Result<Vec<F>> {
        check_len(
            "Conv2d::from_torch_layout",
            "weight",
            w.len(),
            oc * ic * k * k,
        )?;
        let mut out = vec![F::zero(); w.len()];
        for o in 0..oc {
            for c in 0..ic {
                for ky in 0..k {
                    for kx in 0..k {
                        out[o * k * k * ic + (ky * k + kx) * ic + c] =
                            w[((o * ic + c) * k + ky) * k + kx];
                    }
                }
            }
        }
        Ok(out)
    }

    /// x (B,H,W,IC) → y (B,Ho,Wo,OC), Ho = H + 2·pad − K + 1.
    pub fn forward(
        &self,
        be: &B,
        x: &B::Buf,
        b: usize,
        h: usize,
        w: usize,
    ) -> Result<(B::Buf, ConvActs<B::Buf>)> {
        let geom = Conv2dGeom {
            b,
            h,
            w,
            c: self.in_channels(),
            k: self.k,
            pad: self.pad,
        };
        let (ho, wo) = geom.out_hw()?;
        let mut cols = be.uninit(b * ho * wo * geom.col_width());
        be.im2col(x, &geom, &mut cols)?;
        let y = self.lin.forward(be, &cols)?;
        Ok((y, ConvActs { cols, geom }))
    }

    /// forward: y = im2col(x) Wᵀ + b
    /// so:      dW += dyᵀ cols, db += Σ dy, dx = im2col_bwd(dy W).
    pub fn backward(&mut self, be: &B, acts: &ConvActs<B::Buf>, dy: &B::Buf) -> Result<B::Buf> {
        let dcols = self
            .lin
            .backward(be, &acts.cols, dy, true)?
            .expect("dx requested");
        let g = acts.geom;
        let mut dx = be.uninit(g.b * g.h * g.w * g.c);
        be.im2col_bwd(&dcols, &g, &mut dx)?;
        Ok(dx)
    }
}

/// Transposed convolution with kernel 2, stride 2 (SAM's and PixelLM's upscaling): a
/// bias-free [`Linear`] IC → 4·OC whose output channels are ordered (dy, dx, oc), then
/// depth-to-space, then one bias (OC) shared by the four sub-pixels as in PyTorch.
#[derive(Clone, Debug)]
pub struct ConvTranspose2x2<F: Float = f32, B: Backend<F> = crate::backend::Cpu> {
    /// weight (4·OC, IC), rows ordered (dy, dx, oc)
    pub lin: Linear<F, B>,
    /// bias (OC)
    pub bias: Tensor<F, B>,
}

/// Upsampling factor of [`ConvTranspose2x2`].
const UP: usize = 2;

/// What a [`ConvTranspose2x2`] forward saves: its input and the map size.
#[derive(Clone, Debug)]
pub struct ConvTActs<Buf> {
    /// the input x (B,H,W,IC)
    pub x: Buf,
    /// batch B
    pub b: usize,
    /// input height H
    pub h: usize,
    /// input width W
    pub w: usize,
}

impl<F: Float, B: Backend<F>> ConvTranspose2x2<F, B> {
    /// Zero-initialised, trainable.
    pub fn new(be: &B, ic: usize, oc: usize) -> Self {
        ConvTranspose2x2 {
            lin: Linear::new(be, ic, UP * UP * oc, false),
            bias: Tensor::zeros(be, &[oc]),
        }
    }
    /// OC, the bias's length.
    pub fn out_channels(&self) -> usize {
        self.bias.numel()
    }

    /// A PyTorch ConvTranspose2d(k=2, s=2) weight (IC, OC, 2, 2) → this layer's (4·OC, IC).
    pub fn from_torch_layout(w: &[F], ic: usize, oc: usize) -> Result<Vec<F>> {
        check_len(
            "ConvTranspose2x2::from_torch_layout",
            "weight",
            w.len(),
            ic * oc * UP * UP,
        )?;
        let mut out = vec![F::zero(); w.len()];
        for c in 0..ic {
            for o in 0..oc {
                for dy in 0..UP {
                    for dx in 0..UP {
                        out[((dy * UP + dx) * oc + o) * ic + c] =
                            w[((c * oc + o) * UP + dy) * UP + dx];
                    }
                }
            }
        }
        Ok(out)
    }

    /// x (B,H,W,IC) → y (B,2H,2W,OC).
    pub fn forward(
        &self,
        be: &B,
        x: &B::Buf,
        b: usize,
        h: usize,
        w: usize,
    ) -> Result<(B::Buf, ConvTActs<B::Buf>)> {
        let oc = self.out_channels();
        check_len(
            "ConvTranspose2x2::forward",
            "x",
            be.len(x),
            b * h * w * self.lin.fan_in(),
        )?;
        let z = self.lin.forward(be, x)?;
        let mut y = be.uninit(b * h * w * UP * UP * oc);
        be.depth_to_space(&z, b, h, w, oc, UP, &mut y)?;
        be.add_bias(&mut y, &self.bias.data, oc)?;
        let acts = ConvTActs {
            x: x.clone(),
            b,
            h,
            w,
        };
        Ok((y, acts))
    }

    /// forward: y = d2s(x Wᵀ) + b
    /// so:      db += Σ dy, dz = d2s_bwd(dy), dW += dzᵀ x, dx = dz W.
    pub fn backward(&mut self, be: &B, acts: &ConvTActs<B::Buf>, dy: &B::Buf) -> Result<B::Buf> {
        let oc = self.out_channels();
        if let Some(db) = &mut self.bias.grad {
            be.bias_bwd(dy, db, oc)?;
        }
        let mut dz = be.uninit(be.len(dy));
        be.depth_to_space_bwd(dy, acts.b, acts.h, acts.w, oc, UP, &mut dz)?;
        Ok(self
            .lin
            .backward(be, &acts.x, &dz, true)?
            .expect("dx requested"))
    }
}

/// SAM's attention between token sets: q, k, v projected from three inputs (C →
/// C/downsample_rate), split into NH heads, bidirectional softmax attention, merged,
/// projected back to C.  No RoPE (positions enter as added encodings).  Cross-attention
/// from x to y is `forward(x, y, y)`; self-attention is `forward(x, x, x)`, with the
/// input gradients summed by the caller.
#[derive(Clone, Debug)]
pub struct CrossAttention<F: Float = f32, B: Backend<F> = crate::backend::Cpu> {
    /// query projection C → C/downsample_rate
    pub q: Linear<F, B>,
    /// key projection C → C/downsample_rate
    pub k: Linear<F, B>,
    /// value projection C → C/downsample_rate
    pub v: Linear<F, B>,
    /// output projection C/downsample_rate → C
    pub o: Linear<F, B>,
    /// number of heads NH
    pub nh: usize,
    /// head size, (C / downsample_rate) / NH
    pub hs: usize,
}

/// An input of [`CrossAttention::forward`], which keeps its inputs for the backward.
#[derive(Debug)]
pub enum CrossIn<'a, Buf> {
    /// a buffer the caller has no more use for: kept as it is, no copy
    Own(Buf),
    /// a buffer the caller goes on using: copied
    Lend(&'a Buf),
    /// the previous input again (the keys: the queries; the values: the keys), kept
    /// once; not for the queries
    Same,
}

/// What a [`CrossAttention`] forward saves.
#[derive(Clone, Debug)]
pub struct CrossActs<Buf> {
    /// the query input (B·Tq, C)
    pub xq: Buf,
    /// key input (B·Tk, C); None: the query input ([`CrossIn::Same`])
    pub xk: Option<Buf>,
    /// value input (B·Tk, C); None: the key input
    pub xv: Option<Buf>,
    /// the projections, read by attention in place (token-major): q (B·Tq, NH·HS), k and
    /// v (B·Tk, NH·HS); attention output y (B·Tq, NH·HS), lse (B,NH,Tq)
    pub q: Buf,
    /// keys (B·Tk, NH·HS)
    pub k: Buf,
    /// values (B·Tk, NH·HS)
    pub v: Buf,
    /// attention output (B·Tq, NH·HS): the output projection's input
    pub y: Buf,
    /// log-sum-exp of each query's scores (B,NH,Tq)
    pub lse: Buf,
    /// batch B
    pub b: usize,
    /// query tokens Tq
    pub tq: usize,
    /// key tokens Tk
    pub tk: usize,
}

impl<Buf> CrossActs<Buf> {
    /// The key input.
    pub fn xk(&self) -> &Buf {
        self.xk.as_ref().unwrap_or(&self.xq)
    }
    /// The value input.
    pub fn xv(&self) -> &Buf {
        self.xv.as_ref().unwrap_or_else(|| self.xk())
    }
}

impl<F: Float, B: Backend<F>> CrossAttention<F, B> {
    /// Zero-initialised, trainable, with biases.  C/downsample_rate must split into NH
    /// whole heads.
    pub fn new(be: &B, c: usize, nh: usize, downsample_rate: usize) -> Result<Self> {
        if downsample_rate == 0
            || nh == 0
            || !c.is_multiple_of(downsample_rate)
            || c / downsample_rate == 0
            || !(c / downsample_rate).is_multiple_of(nh)
        {
            return Err(Error::arg(
                "CrossAttention::new",
                format!("{c} channels / downsample rate {downsample_rate} do not split into {nh} whole heads"),
            ));
        }
        let inner = c / downsample_rate;
        Ok(CrossAttention {
            q: Linear::new(be, c, inner, true),
            k: Linear::new(be, c, inner, true),
            v: Linear::new(be, c, inner, true),
            o: Linear::new(be, inner, c, true),
            nh,
            hs: inner / nh,
        })
    }

    fn shape(&self, b: usize, tq: usize, tk: usize) -> AttnShape {
        AttnShape {
            b,
            nh: self.nh,
            nkv: self.nh,
            tq,
            tk,
            kv_stride: tk,
            hs: self.hs,
            causal: false,
            scale: 1.0 / (self.hs as f32).sqrt(),
            // the projections' outputs, read and written in place: no split, no merge
            layout: AttnLayout::TOKENS,
        }
    }

    /// xq (B·Tq, C), xk and xv (B·Tk, C) → (B·Tq, C).  The activations keep the
    /// inputs: handed over ([`CrossIn::Own`]) or one buffer read twice
    /// ([`CrossIn::Same`]), an input is kept without a copy.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        be: &B,
        xq: CrossIn<'_, B::Buf>,
        xk: CrossIn<'_, B::Buf>,
        xv: CrossIn<'_, B::Buf>,
        b: usize,
        tq: usize,
        tk: usize,
    ) -> Result<(B::Buf, CrossActs<B::Buf>)> {
        const OP: &str = "CrossAttention::forward";
        let (nh, hs) = (self.nh, self.hs);
        let c = self.q.fan_in();
        let keep = |x: CrossIn<'_, B::Buf>| match x {
            CrossIn::Own(x) => Some(x),
            CrossIn::Lend(x) => Some(x.clone()),
            CrossIn::Same => None,
        };
        let Some(xq) = keep(xq) else {
            return Err(Error::arg(OP, "the queries cannot be the previous input"));
        };
        let (xk, xv) = (keep(xk), keep(xv));
        let kin = xk.as_ref().unwrap_or(&xq);
        let vin = xv.as_ref().unwrap_or(kin);
        check_len(OP, "xq", be.len(&xq), b * tq * c)?;
        check_len(OP, "xk", be.len(kin), b * tk * c)?;
        check_len(OP, "xv", be.len(vin), b * tk * c)?;
        let (q, k, v) = (
            self.q.forward(be, &xq)?,
            self.k.forward(be, kin)?,
            self.v.forward(be, vin)?,
        );
        let s = self.shape(b, tq, tk);
        let (mut y, mut lse) = (be.uninit(b * tq * nh * hs), be.uninit(b * nh * tq));
        be.attention_fwd(&s, &q, &k, &v, None, None, &mut y, &mut lse)?;
        let out = self.o.forward(be, &y)?;
        let acts = CrossActs {
            xq,
            xk,
            xv,
            q,
            k,
            v,
            y,
            lse,
            b,
            tq,
            tk,
        };
        Ok((out, acts))
    }

    /// forward: out = o(attn(q(xq), k(xk), v(xv))), attention reading the projections
    ///          in place (token-major)
    /// so:      back through each step; returns (dxq, dxk, dxv), overwritten.
    pub fn backward(
        &mut self,
        be: &B,
        a: &CrossActs<B::Buf>,
        dout: &B::Buf,
    ) -> Result<(B::Buf, B::Buf, B::Buf)> {
        let dy = self
            .o
            .backward(be, &a.y, dout, true)?
            .expect("dx requested");
        let s = self.shape(a.b, a.tq, a.tk);
        let (mut dq, mut dk, mut dv) = (
            be.uninit(be.len(&a.q)),
            be.uninit(be.len(&a.k)),
            be.uninit(be.len(&a.v)),
        );
        be.attention_bwd(
            &s, &a.q, &a.k, &a.v, None, None, &a.y, &a.lse, &dy, &mut dq, &mut dk, &mut dv, None,
        )?;
        // dq, dk, dv are token-major: the projections' output gradients as they are
        let dxq = self
            .q
            .backward(be, &a.xq, &dq, true)?
            .expect("dx requested");
        let dxk = self
            .k
            .backward(be, a.xk(), &dk, true)?
            .expect("dx requested");
        let dxv = self
            .v
            .backward(be, a.xv(), &dv, true)?
            .expect("dx requested");
        Ok((dxq, dxk, dxv))
    }
}

/// A named-parameter list, as every model's `params_mut` returns it.
pub type NamedParams<'a, F, B> = Vec<(String, &'a mut Tensor<F, B>)>;

/// Appends `{prefix}.weight` and, when present, `{prefix}.bias` of a [`Linear`].
pub fn push_linear<'a, F: Float, B: Backend<F>>(
    out: &mut NamedParams<'a, F, B>,
    prefix: &str,
    l: &'a mut Linear<F, B>,
) {
    out.push((format!("{prefix}.weight"), &mut l.weight));
    if let Some(b) = &mut l.bias {
        out.push((format!("{prefix}.bias"), b));
    }
}

/// Appends `{prefix}.weight` and `{prefix}.bias` of a [`LayerNorm`](super::LayerNorm).
pub fn push_layernorm<'a, F: Float, B: Backend<F>>(
    out: &mut NamedParams<'a, F, B>,
    prefix: &str,
    l: &'a mut super::LayerNorm<F, B>,
) {
    out.push((format!("{prefix}.weight"), &mut l.weight));
    out.push((format!("{prefix}.bias"), &mut l.bias));
}

impl<F: Float, B: Backend<F>> CrossAttention<F, B> {
    /// `{prefix}.{q,k,v,out}_proj.{weight,bias}` (SAM's names).
    pub fn push_params<'a>(&'a mut self, out: &mut NamedParams<'a, F, B>, prefix: &str) {
        push_linear(out, &format!("{prefix}.q_proj"), &mut self.q);
        push_linear(out, &format!("{prefix}.k_proj"), &mut self.k);
        push_linear(out, &format!("{prefix}.v_proj"), &mut self.v);
        push_linear(out, &format!("{prefix}.out_proj"), &mut self.o);
    }
}
