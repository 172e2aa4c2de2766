//! Linear, norms, embeddings, patch embedding and MLPs: forward, then its
//! backward right below.  Backward methods follow the gradient rule in [`crate::nn`].
//!
//! B batch, T tokens, C channels, N = B·T rows, NH heads, NKV kv heads, HS head size.
use super::Tensor;
use crate::backend::{Accum, Act, Backend, GateUp, MatmulSpec, RowCopy};
use crate::error::{Error, Result};
use num_traits::Float;

/// Rows of a (N, C) buffer, checked.
fn rows<F: Float, B: Backend<F>>(be: &B, op: &'static str, x: &B::Buf, c: usize) -> Result<usize> {
    let len = be.len(x);
    if c == 0 || len % c != 0 {
        return Err(Error::shape(
            op,
            format!("input of {len} elements is not a whole number of rows of {c}"),
        ));
    }
    Ok(len / c)
}

/// The `[cols, rows]` transpose of a row-major `[rows, cols]` matrix.
fn transposed<F: Float>(w: &[F], rows: usize, cols: usize) -> Vec<F> {
    let mut t = vec![F::zero(); w.len()];
    for (r, row) in w.chunks_exact(cols).enumerate().take(rows) {
        for (c, &v) in row.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    t
}

// ---------------------------------------------------------------------------------

/// `y = x Wᵀ + b`, W stored `[out, in]` as in PyTorch.
///
/// **Packed layers.** A frozen layer can be *packed* ([`Linear::pack`]): its values
/// move from `weight.data` (`[out, in]`, left empty) to a private `[in, out]` copy, so
/// that the forward's product reads the weight in the layout the CPU's gemm wants
/// (`x · Wᵀ` with W row-major makes gemm repack W on every call, which costs as much
/// as the product itself when `x` has a few dozen rows, as in decoding).  The values
/// live in one place at a time; [`Linear::unpack`] moves them back.  Whoever changes a
/// packed layer's weight must unpack it first; if `weight.data` is given values while
/// packed anyway, those values win and the packed copy is ignored.
#[derive(Clone, Debug)]
pub struct Linear<F: Float = f32, B: Backend<F> = crate::backend::Cpu> {
    /// W `[out, in]` (empty while the layer is packed).
    pub weight: Tensor<F, B>,
    /// b `[out]`, or None for a bias-free layer.
    pub bias: Option<Tensor<F, B>>,
    /// Wᵀ `[in, out]` while packed.
    packed: Option<B::Buf>,
}

impl<F: Float, B: Backend<F>> Linear<F, B> {
    /// Zero-initialised, trainable.
    pub fn new(be: &B, fan_in: usize, fan_out: usize, bias: bool) -> Self {
        Linear::from_parts(
            Tensor::zeros(be, &[fan_out, fan_in]),
            bias.then(|| Tensor::zeros(be, &[fan_out])),
        )
    }
    /// A layer of these tensors (W `[out, in]`, b `[out]`), unpacked.
    pub fn from_parts(weight: Tensor<F, B>, bias: Option<Tensor<F, B>>) -> Self {
        Linear {
            weight,
            bias,
            packed: None,
        }
    }
    /// Input width `in`: the weight's columns.
    pub fn fan_in(&self) -> usize {
        self.weight.shape[1]
    }
    /// Output width `out`: the weight's rows.
    pub fn fan_out(&self) -> usize {
        self.weight.shape[0]
    }

    /// Whether the layer holds a packed `[in, out]` copy ([`Linear::pack`]), which its
    /// products use while `weight.data` is empty.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// The packed copy, when it holds the values (`weight.data` empty).
    fn packed_weight(&self, be: &B) -> Option<&B::Buf> {
        self.packed
            .as_ref()
            .filter(|_| be.len(&self.weight.data) == 0 && self.weight.numel() > 0)
    }

    /// Moves a frozen layer's weight into the `[in, out]` layout its forward multiplies
    /// fastest on this backend ([`Backend::prefers_packed_weights`]; a no-op where the
    /// backend does not, or when already packed).  Returns whether it packed.  The
    /// products equal the unpacked ones up to rounding (on the CPU the same bits from 9
    /// rows up, where gemm computes both and only skips its repacking of W; fewer rows
    /// run other kernels, which sum in another order).  A trainable layer is refused:
    /// its optimizer updates `weight.data`.
    pub fn pack(&mut self, be: &B) -> Result<bool> {
        if !be.prefers_packed_weights() || self.packed_weight(be).is_some() {
            return Ok(false);
        }
        if self.weight.grad.is_some() {
            return Err(Error::arg(
                "Linear::pack",
                format!(
                    "the layer {:?} is trainable: only a frozen layer is packed",
                    self.weight.shape
                ),
            ));
        }
        let (i, o) = (self.fan_in(), self.fan_out());
        let w = be.to_vec(&self.weight.data);
        crate::error::check_len("Linear::pack", "weight", w.len(), o * i)?;
        self.packed = Some(be.from_slice(&transposed(&w, o, i)));
        self.weight.data = be.zeros(0);
        Ok(true)
    }

    /// Moves a packed layer's values back into `weight.data` (`[out, in]`); a no-op
    /// for an unpacked layer.
    pub fn unpack(&mut self, be: &B) {
        if let Some(wt) = self.packed.take() {
            if be.len(&self.weight.data) == 0 {
                let (i, o) = (self.fan_in(), self.fan_out());
                self.weight.data = be.from_slice(&transposed(&be.to_vec(&wt), i, o));
            }
        }
    }

    /// Frozen layers of one input as one product: W their weights stacked by rows
    /// (`[W₀; W₁; …]`, out the sum of theirs), their biases alike, packed when the
    /// backend prefers it ([`Linear::pack`]).  Each layer's values move there (its
    /// weight and bias left empty) until [`Linear::unstack`].  A trainable layer is
    /// refused (its optimizer updates its own weight), as are biases on some layers
    /// only and layers of other inputs; `op` names the caller in the error.
    pub fn stack<const N: usize>(
        be: &B,
        op: &'static str,
        mut parts: [&mut Linear<F, B>; N],
    ) -> Result<Linear<F, B>> {
        let trainable = |l: &Linear<F, B>| {
            l.weight.grad.is_some() || l.bias.as_ref().is_some_and(|b| b.grad.is_some())
        };
        if parts.iter().any(|l| trainable(l)) {
            return Err(Error::arg(op, "a trainable layer: only frozen ones fuse"));
        }
        let biased = parts.iter().filter(|l| l.bias.is_some()).count();
        if biased != 0 && biased != N {
            return Err(Error::arg(
                op,
                format!("biases on {biased} of {N} layers only"),
            ));
        }
        let c = parts.first().map_or(0, |l| l.fan_in());
        if let Some(l) = parts.iter().find(|l| l.fan_in() != c) {
            let ins = format!("inputs of {c} and {}", l.fan_in());
            return Err(Error::shape(op, ins));
        }
        let rows: usize = parts.iter().map(|l| l.fan_out()).sum();
        let mut w = be.uninit(rows * c);
        let mut bias = (biased > 0).then(|| be.uninit(rows));
        let mut at = 0;
        for l in parts.iter_mut() {
            let o = l.fan_out();
            l.unpack(be);
            be.copy_range(&mut w, at * c, &l.weight.data, 0, o * c)?;
            if let (Some(b), Some(lb)) = (&mut bias, &l.bias) {
                be.copy_range(b, at, &lb.data, 0, o)?;
            }
            at += o;
        }
        let frozen = |shape: Vec<usize>, data| Tensor {
            shape,
            data,
            grad: None,
        };
        let mut stacked = Linear::from_parts(
            frozen(vec![rows, c], w),
            bias.map(|b| frozen(vec![rows], b)),
        );
        stacked.pack(be)?;
        for l in parts {
            l.weight.data = be.zeros(0);
            if let Some(b) = &mut l.bias {
                b.data = be.zeros(0);
            }
        }
        Ok(stacked)
    }

    /// Moves a [`Linear::stack`]ed product's rows back into the layers it was made of
    /// (their weights `[out, in]`, unpacked).
    pub fn unstack<const N: usize>(mut self, be: &B, parts: [&mut Linear<F, B>; N]) -> Result<()> {
        self.unpack(be);
        let c = self.fan_in();
        let mut at = 0;
        for l in parts {
            let o = l.fan_out();
            let mut w = be.uninit(o * c);
            be.copy_range(&mut w, 0, &self.weight.data, at * c, o * c)?;
            l.weight.data = w;
            if let (Some(lb), Some(sb)) = (&mut l.bias, &self.bias) {
                let mut b = be.uninit(o);
                be.copy_range(&mut b, 0, &sb.data, at, o)?;
                lb.data = b;
            }
            at += o;
        }
        Ok(())
    }

    /// x (N, in) → y (N, out).
    pub fn forward(&self, be: &B, x: &B::Buf) -> Result<B::Buf> {
        let (i, o) = (self.fan_in(), self.fan_out());
        let n = rows(be, "Linear::forward", x, i)?;
        // packed: x · (Wᵀ stored [in, out]); else x · Wᵀ with W stored [out, in]
        let (w, tb) = match self.packed_weight(be) {
            Some(wt) => (wt, false),
            None => (&self.weight.data, true),
        };
        let mut y = be.matmul_new(
            MatmulSpec {
                m: n,
                k: i,
                n: o,
                ta: false,
                tb,
            },
            x,
            w,
        )?;
        if let Some(b) = &self.bias {
            be.add_bias(&mut y, &b.data, o)?;
        }
        Ok(y)
    }

    /// forward: y = x Wᵀ + b
    /// so:      dW += dyᵀ x,  db += Σ_n dy,  dx = dy W (only when `need_dx`).
    pub fn backward(
        &mut self,
        be: &B,
        x: &B::Buf,
        dy: &B::Buf,
        need_dx: bool,
    ) -> Result<Option<B::Buf>> {
        let (i, o) = (self.fan_in(), self.fan_out());
        let n = rows(be, "Linear::backward", x, i)?;
        crate::error::check_len("Linear::backward", "dy", be.len(dy), n * o)?;
        if let Some(dw) = &mut self.weight.grad {
            be.matmul(
                MatmulSpec {
                    m: o,
                    k: n,
                    n: i,
                    ta: true,
                    tb: false,
                },
                dy,
                x,
                dw,
                Accum::Add,
            )?;
        }
        if let Some(Tensor { grad: Some(db), .. }) = &mut self.bias {
            be.bias_bwd(dy, db, o)?;
        }
        if !need_dx {
            return Ok(None);
        }
        // W [out, in] as stored, or the packed Wᵀ [in, out] read transposed
        let (w, tb) = match self.packed_weight(be) {
            Some(wt) => (wt, true),
            None => (&self.weight.data, false),
        };
        let dx = be.matmul_new(
            MatmulSpec {
                m: n,
                k: o,
                n: i,
                ta: false,
                tb,
            },
            dy,
            w,
        )?;
        Ok(Some(dx))
    }
}

// ---------------------------------------------------------------------------------

/// RMSNorm (LLaMA): `x / √(mean(x²) + eps) · w`.
#[derive(Clone, Debug)]
pub struct RmsNorm<F: Float = f32, B: Backend<F> = crate::backend::Cpu> {
    /// Scale w (C).
    pub weight: Tensor<F, B>,
    /// Added to mean(x²) under the square root.
    pub eps: f32,
}

impl<F: Float, B: Backend<F>> RmsNorm<F, B> {
    /// Weight of ones, trainable.
    pub fn new(be: &B, c: usize, eps: f32) -> Self {
        let mut weight = Tensor::zeros(be, &[c]);
        weight.data = be.from_slice(&vec![F::one(); c]);
        RmsNorm { weight, eps }
    }
    /// x (N,C) → (out (N,C), rstd (N)).
    pub fn forward(&self, be: &B, x: &B::Buf) -> Result<(B::Buf, B::Buf)> {
        let c = self.weight.numel();
        let n = rows(be, "RmsNorm::forward", x, c)?;
        let (mut out, mut rstd) = (be.uninit(n * c), be.uninit(n));
        be.rmsnorm_fwd(x, Some(&self.weight.data), self.eps, c, &mut out, &mut rstd)?;
        Ok((out, rstd))
    }
    /// x, a (N,C) → (x + a, its norm (N,C), rstd (N)): a residual add and this norm in
    /// one op ([`Backend::add_rmsnorm_fwd`]).
    pub fn forward_added(
        &self,
        be: &B,
        x: &B::Buf,
        a: &B::Buf,
    ) -> Result<(B::Buf, B::Buf, B::Buf)> {
        let c = self.weight.numel();
        let n = rows(be, "RmsNorm::forward_added", x, c)?;
        let (mut sum, mut out, mut rstd) = (be.uninit(n * c), be.uninit(n * c), be.uninit(n));
        let w = Some(&self.weight.data);
        be.add_rmsnorm_fwd(x, a, w, self.eps, c, &mut sum, &mut out, &mut rstd)?;
        Ok((sum, out, rstd))
    }
    /// forward: out = x·rstd·w  so: dw += dout·x·rstd, dx = ∂/∂x (see the backend op).
    pub fn backward(&mut self, be: &B, x: &B::Buf, rstd: &B::Buf, dout: &B::Buf) -> Result<B::Buf> {
        let c = self.weight.numel();
        let mut dx = be.uninit(be.len(x));
        be.rmsnorm_bwd(
            dout,
            x,
            Some(&self.weight.data),
            rstd,
            c,
            &mut dx,
            self.weight.grad.as_mut(),
        )?;
        Ok(dx)
    }
}

/// LayerNorm (CLIP, BERT): `(x − mean)/√(var + eps) · w + b`.
#[derive(Clone, Debug)]
pub struct LayerNorm<F: Float = f32, B: Backend<F> = crate::backend::Cpu> {
    /// Scale w (C).
    pub weight: Tensor<F, B>,
    /// Shift b (C).
    pub bias: Tensor<F, B>,
    /// Added to the variance under the square root.
    pub eps: f32,
}

/// What a LayerNorm forward saves: mean and rstd (N).
#[derive(Clone, Debug)]
pub struct NormStats<Buf> {
    /// Mean of each row (N).
    pub mean: Buf,
    /// 1/√(var + eps) of each row (N).
    pub rstd: Buf,
}

/// What [`LayerNorm::forward_added`] returns: the sum x + a (the residual stream, which
/// the backward reads), its norm, and the stats.
pub type NormedSum<Buf> = (Buf, Buf, NormStats<Buf>);

impl<F: Float, B: Backend<F>> LayerNorm<F, B> {
    /// Weight of ones, bias of zeros, trainable.
    pub fn new(be: &B, c: usize, eps: f32) -> Self {
        let mut weight = Tensor::zeros(be, &[c]);
        weight.data = be.from_slice(&vec![F::one(); c]);
        LayerNorm {
            weight,
            bias: Tensor::zeros(be, &[c]),
            eps,
        }
    }
    /// x (N,C) → out (N,C) and the stats for the backward.
    pub fn forward(&self, be: &B, x: &B::Buf) -> Result<(B::Buf, NormStats<B::Buf>)> {
        let c = self.weight.numel();
        let n = rows(be, "LayerNorm::forward", x, c)?;
        let (mut out, mut mean, mut rstd) = (be.uninit(n * c), be.uninit(n), be.uninit(n));
        be.layernorm_fwd(
            x,
            &self.weight.data,
            &self.bias.data,
            self.eps,
            c,
            &mut out,
            &mut mean,
            &mut rstd,
        )?;
        Ok((out, NormStats { mean, rstd }))
    }
    /// x, a (N,C) → (x + a, its norm (N,C), the stats): a residual add and this norm in
    /// one op ([`Backend::add_layernorm_fwd`]).
    pub fn forward_added(&self, be: &B, x: &B::Buf, a: &B::Buf) -> Result<NormedSum<B::Buf>> {
        let c = self.weight.numel();
        let n = rows(be, "LayerNorm::forward_added", x, c)?;
        let (mut sum, mut out) = (be.uninit(n * c), be.uninit(n * c));
        let (mut mean, mut rstd) = (be.uninit(n), be.uninit(n));
        let (w, b) = (&self.weight.data, &self.bias.data);
        let (sm, o, mu, r) = (&mut sum, &mut out, &mut mean, &mut rstd);
        be.add_layernorm_fwd(x, a, w, b, self.eps, c, sm, o, mu, r)?;
        Ok((sum, out, NormStats { mean, rstd }))
    }
    /// forward: out = (x − μ)·r·w + b  so: dw += dout·x̂, db += dout, dx (backend op).
    pub fn backward(
        &mut self,
        be: &B,
        x: &B::Buf,
        st: &NormStats<B::Buf>,
        dout: &B::Buf,
    ) -> Result<B::Buf> {
        let c = self.weight.numel();
        let mut dx = be.uninit(be.len(x));
        be.layernorm_bwd(
            dout,
            x,
            &self.weight.data,
            &st.mean,
            &st.rstd,
            c,
            &mut dx,
            self.weight.grad.as_mut(),
            self.bias.grad.as_mut(),
        )?;
        Ok(dx)
    }
}

// ---------------------------------------------------------------------------------

/// Token (or position) embedding table `[V, C]`.
#[derive(Clone, Debug)]
pub struct Embedding<F: Float = f32, B: Backend<F> = crate::backend::Cpu> {
    /// Table (V, C): row `id` is that token's (or position's) vector.
    pub weight: Tensor<F, B>,
}

impl<F: Float, B: Backend<F>> Embedding<F, B> {
    /// A zero table of `v` rows of `c`, trainable.
    pub fn new(be: &B, v: usize, c: usize) -> Self {
        Embedding {
            weight: Tensor::zeros(be, &[v, c]),
        }
    }
    /// Width C of one embedding.
    pub fn dim(&self) -> usize {
        self.weight.shape[1]
    }
    /// ids (N) → (N, C).
    pub fn forward(&self, be: &B, ids: &[u32]) -> Result<B::Buf> {
        let c = self.dim();
        let mut out = be.uninit(ids.len() * c);
        be.embedding_fwd(ids, &self.weight.data, c, &mut out)?;
        Ok(out)
    }
    /// forward: `out[n] = W[ids[n]]`  so: `dW[ids[n]] += dout[n]` (skipped when frozen).
    pub fn backward(&mut self, be: &B, ids: &[u32], dout: &B::Buf) -> Result<()> {
        let c = self.dim();
        if let Some(g) = &mut self.weight.grad {
            be.embedding_bwd(ids, dout, c, g)?;
        }
        Ok(())
    }
}

/// Patch embedding: a conv with stride = kernel = P, written as patchify + matmul.
/// Weight `[OC, CH, P, P]` as PyTorch's Conv2d stores it, optional bias `[OC]`.
#[derive(Clone, Debug)]
pub struct PatchEmbed<F: Float = f32, B: Backend<F> = crate::backend::Cpu> {
    /// Kernel `[OC, CH, P, P]`.
    pub weight: Tensor<F, B>,
    /// Bias `[OC]`, or None.
    pub bias: Option<Tensor<F, B>>,
}

/// Image geometry of one patch-embedding call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageShape {
    /// Batch B.
    pub b: usize,
    /// Image height H in pixels (a multiple of P).
    pub h: usize,
    /// Image width W in pixels (a multiple of P).
    pub w: usize,
}

impl<F: Float, B: Backend<F>> PatchEmbed<F, B> {
    /// Zero-initialised, trainable: `ch` input channels, `oc` outputs, patch side `p`.
    pub fn new(be: &B, ch: usize, oc: usize, p: usize, bias: bool) -> Self {
        PatchEmbed {
            weight: Tensor::zeros(be, &[oc, ch, p, p]),
            bias: bias.then(|| Tensor::zeros(be, &[oc])),
        }
    }
    fn dims(&self) -> (usize, usize, usize) {
        (
            self.weight.shape[0],
            self.weight.shape[1],
            self.weight.shape[2],
        )
    }
    /// The same weights viewed as a Linear (OC, CH·P·P) (no copy of the layout needed:
    /// a row-major conv kernel is already that matrix).
    fn as_linear(&self) -> Linear<F, B> {
        let (oc, ch, p) = self.dims();
        Linear::from_parts(
            Tensor {
                shape: vec![oc, ch * p * p],
                data: self.weight.data.clone(),
                grad: None,
            },
            self.bias.as_ref().map(|b| Tensor {
                shape: b.shape.clone(),
                data: b.data.clone(),
                grad: None,
            }),
        )
    }
    /// pixels (B,CH,H,W) → (patches (B·NP, CH·P·P) saved for the backward, out (B, NP, OC)),
    /// NP = (H/P)(W/P) in row-major patch order.
    pub fn forward(&self, be: &B, pixels: &B::Buf, img: ImageShape) -> Result<(B::Buf, B::Buf)> {
        let (_, ch, p) = self.dims();
        let mut patches = be.uninit(img.b * ch * img.h * img.w);
        be.patchify(pixels, img.b, ch, img.h, img.w, p, &mut patches)?;
        let out = self.as_linear().forward(be, &patches)?;
        Ok((patches, out))
    }
    /// forward: out = patchify(pixels) Wᵀ + b
    /// so:      dW += doutᵀ patches, db += Σ dout, dpixels = unpatchify(dout W) if asked.
    pub fn backward(
        &mut self,
        be: &B,
        patches: &B::Buf,
        dout: &B::Buf,
        img: ImageShape,
        need_dpixels: bool,
    ) -> Result<Option<B::Buf>> {
        let (_, ch, p) = self.dims();
        let mut lin = self.as_linear();
        lin.weight.grad = self.weight.grad.take();
        if let (Some(lb), Some(b)) = (&mut lin.bias, &mut self.bias) {
            lb.grad = b.grad.take();
        }
        let res = lin.backward(be, patches, dout, need_dpixels);
        self.weight.grad = lin.weight.grad.take();
        if let (Some(lb), Some(b)) = (&mut lin.bias, &mut self.bias) {
            b.grad = lb.grad.take();
        }
        match res? {
            Some(dpatches) => {
                let mut dpix = be.uninit(be.len(&dpatches));
                be.patchify_bwd(&dpatches, img.b, ch, img.h, img.w, p, &mut dpix)?;
                Ok(Some(dpix))
            }
            None => Ok(None),
        }
    }
}

// ---------------------------------------------------------------------------------

/// Two-layer MLP with a pointwise activation (CLIP: quick-GELU, BERT: GELU-erf,
/// LLaVA projector: GELU).
#[derive(Clone, Debug)]
pub struct Mlp<F: Float = f32, B: Backend<F> = crate::backend::Cpu> {
    /// C → hidden.
    pub fc1: Linear<F, B>,
    /// hidden → C.
    pub fc2: Linear<F, B>,
    /// Activation between `fc1` and `fc2`.
    pub act: Act,
}

/// Saved activations of an [`Mlp`] forward.
#[derive(Clone, Debug)]
pub struct MlpActs<Buf> {
    /// Input x (N,C).
    pub x: Buf,
    /// `fc1(x)` (N,hidden), before the activation.
    pub h: Buf,
    /// `act(h)` (N,hidden), the input of `fc2`.
    pub a: Buf,
}

impl<F: Float, B: Backend<F>> Mlp<F, B> {
    /// Zero-initialised, trainable: C → `hidden` → C, with biases when `bias`.
    pub fn new(be: &B, c: usize, hidden: usize, act: Act, bias: bool) -> Self {
        Mlp {
            fc1: Linear::new(be, c, hidden, bias),
            fc2: Linear::new(be, hidden, c, bias),
            act,
        }
    }
    /// x (N,C) → (N,C).  The activations keep x (a caller that reads it after hands
    /// over a clone).
    pub fn forward(&self, be: &B, x: B::Buf) -> Result<(B::Buf, MlpActs<B::Buf>)> {
        let h = self.fc1.forward(be, &x)?;
        let mut a = be.uninit(be.len(&h));
        be.act_fwd(self.act, &h, &mut a)?;
        let y = self.fc2.forward(be, &a)?;
        Ok((y, MlpActs { x, h, a }))
    }
    /// forward: y = fc2(act(fc1(x)))  so: backward through each in reverse.
    pub fn backward(&mut self, be: &B, acts: &MlpActs<B::Buf>, dy: &B::Buf) -> Result<B::Buf> {
        let da = self
            .fc2
            .backward(be, &acts.a, dy, true)?
            .expect("dx requested");
        let mut dh = be.uninit(be.len(&da));
        be.act_bwd(self.act, &acts.h, &da, &mut dh)?;
        Ok(self
            .fc1
            .backward(be, &acts.x, &dh, true)?
            .expect("dx requested"))
    }
}

/// LLaMA's gated MLP: `down(silu(gate(x)) · up(x))`, no biases.
#[derive(Clone, Debug)]
pub struct SwiGluMlp<F: Float = f32, B: Backend<F> = crate::backend::Cpu> {
    /// C → I, through silu.
    pub gate: Linear<F, B>,
    /// C → I, multiplied by the gate.
    pub up: Linear<F, B>,
    /// I → C.
    pub down: Linear<F, B>,
    /// gate and up as one product while fused ([`SwiGluMlp::fuse`]): W `[gate; up]`
    /// (2·I rows), their weights empty meanwhile.
    pub(crate) fused: Option<Linear<F, B>>,
}

/// Saved activations of a [`SwiGluMlp`] forward.
#[derive(Clone, Debug)]
pub struct SwiGluActs<Buf> {
    /// Input x (N,C).
    pub x: Buf,
    /// `gate(x)` (N,I); after a fused forward ([`SwiGluMlp::fuse`]) both halves,
    /// `[gate(x) | up(x)]` (N,2I).
    pub g: Buf,
    /// `up(x)` (N,I); None after a fused forward (`g` holds it).
    pub u: Option<Buf>,
    /// `silu(g)·u` (N,I), the input of `down`.
    pub a: Buf,
}

impl<F: Float, B: Backend<F>> SwiGluMlp<F, B> {
    /// Zero-initialised, trainable, with C channels and I = `inter`.
    pub fn new(be: &B, c: usize, inter: usize) -> Self {
        SwiGluMlp {
            gate: Linear::new(be, c, inter, false),
            up: Linear::new(be, c, inter, false),
            down: Linear::new(be, inter, c, false),
            fused: None,
        }
    }

    /// Makes the frozen gate and up one product of W `[gate; up]` ([`Linear::stack`]):
    /// a forward then makes one matrix product where it made two, and SwiGLU reads the
    /// two halves of each row where they lie ([`GateUp::fused`]).  Their own weights
    /// are left empty until [`SwiGluMlp::unfuse`]; the outputs equal the unfused ones
    /// up to rounding.  A trainable gate or up is refused.  Returns whether it fused
    /// (false when already fused).
    pub fn fuse(&mut self, be: &B) -> Result<bool> {
        if self.fused.is_some() {
            return Ok(false);
        }
        let parts = [&mut self.gate, &mut self.up];
        self.fused = Some(Linear::stack(be, "SwiGluMlp::fuse", parts)?);
        Ok(true)
    }

    /// Moves a fused layer's values back into gate and up ([`SwiGluMlp::fuse`]); a
    /// no-op for an unfused one.
    pub fn unfuse(&mut self, be: &B) -> Result<()> {
        match self.fused.take() {
            Some(f) => f.unstack(be, [&mut self.gate, &mut self.up]),
            None => Ok(()),
        }
    }

    /// Whether gate and up are one product ([`SwiGluMlp::fuse`]).
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    /// x (N,C) → (N,C); g, u, a are (N,I) (when fused, g is (N,2I) and u None).  The
    /// activations keep x (a caller that reads it after hands over a clone).
    pub fn forward(&self, be: &B, x: B::Buf) -> Result<(B::Buf, SwiGluActs<B::Buf>)> {
        let i = self.down.fan_in();
        let (g, u) = match &self.fused {
            Some(f) => (f.forward(be, &x)?, None),
            None => (self.gate.forward(be, &x)?, Some(self.up.forward(be, &x)?)),
        };
        let n = rows(be, "SwiGluMlp::forward", &x, self.down.fan_out())?;
        let mut a = be.uninit(n * i);
        match &u {
            Some(u) => be.swiglu_fwd(&g, u, GateUp::apart(i), &mut a)?,
            None => be.swiglu_fwd(&g, &g, GateUp::fused(i), &mut a)?,
        }
        let y = self.down.forward(be, &a)?;
        Ok((y, SwiGluActs { x, g, u, a }))
    }

    /// forward: y = down(silu(g)·u), g = gate(x), u = up(x)
    /// so:      dx = gateᵀ-path(dg) + upᵀ-path(du)
    /// (fused: [g | u] = fused(x), so dx = fusedᵀ-path([dg | du]))
    pub fn backward(&mut self, be: &B, acts: &SwiGluActs<B::Buf>, dy: &B::Buf) -> Result<B::Buf> {
        if acts.u.is_none() != self.fused.is_some() {
            return Err(Error::arg(
                "SwiGluMlp::backward",
                "activations of a forward with gate and up fused otherwise: fuse or unfuse \
                 the layer as it was",
            ));
        }
        let da = self
            .down
            .backward(be, &acts.a, dy, true)?
            .expect("dx requested");
        let (mut dg, mut du) = (be.uninit(be.len(&da)), be.uninit(be.len(&da)));
        if let Some(f) = &mut self.fused {
            // the halves apart for the backward, and their gradients side by side again
            let i = self.down.fan_in();
            let n = be.len(&da) / i.max(1);
            let half = |off: usize| RowCopy {
                rows: n,
                width: i,
                dst_off: 0,
                dst_stride: i,
                src_off: off,
                src_stride: 2 * i,
            };
            let (mut g, mut u) = (be.uninit(n * i), be.uninit(n * i));
            be.copy_rows(&mut g, &acts.g, half(0))?;
            be.copy_rows(&mut u, &acts.g, half(i))?;
            be.swiglu_bwd(&g, &u, &da, &mut dg, &mut du)?;
            let mut dgu = be.uninit(2 * n * i);
            be.copy_rows(&mut dgu, &dg, half(0).swapped())?;
            be.copy_rows(&mut dgu, &du, half(i).swapped())?;
            return Ok(f.backward(be, &acts.x, &dgu, true)?.expect("dx requested"));
        }
        let u = acts.u.as_ref().expect("an unfused forward keeps up(x)");
        be.swiglu_bwd(&acts.g, u, &da, &mut dg, &mut du)?;
        let mut dx = self
            .gate
            .backward(be, &acts.x, &dg, true)?
            .expect("dx requested");
        let dxu = self
            .up
            .backward(be, &acts.x, &du, true)?
            .expect("dx requested");
        be.add_into(&mut dx, &[&dxu])?;
        Ok(dx)
    }
}
