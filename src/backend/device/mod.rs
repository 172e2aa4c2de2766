//! The device backend: [`Backend<f32>`] over [`crate::kernels::Device`], so the same
//! model code runs on the CUDA emulator (CI, no GPU) and on a GPU through cudarc.
//!
//! Every op of the contract is a kernel launch on buffers that stay on the device; the
//! CPU backend is each kernel's twin, and `tests/backend_device/` checks every op
//! against it.  Matrix products go through [`gemm`] (the CPU `gemm` crate on the
//! emulator, one cuBLAS SGEMM on a GPU).  Host↔device copies happen only where the
//! contract hands over host data (token ids, targets, key masks; a key mask or target
//! list equal to the last one is not uploaded again) and in the memory ops
//! `from_slice`/`to_vec`/`sum_sq`; [`crate::kernels::Device::copies`] counts them.
//! Attention with one query and no key mask (a decoding step over the KV cache) runs
//! the split-K decode kernel.
//!
//! The trait's memory ops (`zeros`, `fill`, `to_vec`, ...) cannot return an error; a
//! device failure there (out of memory, a lost GPU) panics with the device's message.
//!
//! Sizes: N rows, C channels, V vocabulary.
use super::{
    Accum, Act, AdamWSlot, AdamWStep, AttnShape, Backend, Cols, Conv2dGeom, GateUp, KvAppend,
    MaskLosses, MatmulSpec, RowCopy,
};
use crate::error::{check_len, Error, Result};
use crate::kernels::{Device, DeviceBuf, KArg, LaunchCfg};
use std::sync::Arc;

mod choice;
mod elementwise;
mod gemm;
mod image;
mod layout;
mod many;
mod model_ops;
mod norm;

pub use choice::{DeviceChoice, OnBackend};
pub use gemm::{gemm, gemm_batched};

/// Threads per block of the elementwise kernels.
const BLOCK: u32 = 256;
/// Most blocks of a grid-stride elementwise launch: enough to fill a GPU, few enough
/// that the emulator does not spin up a block per 256 elements of a large tensor.
const MAX_BLOCKS: usize = 1024;

/// The device backend; cheap to clone (the device is shared).
#[derive(Clone, Debug)]
pub struct DeviceBackend {
    dev: Arc<Device>,
    inputs: Arc<model_ops::HostInputs>,
    tensor_core_attention: bool,
}

impl DeviceBackend {
    /// A backend that launches every op on `dev` (the emulator or a GPU).
    pub fn new(dev: Device) -> Self {
        DeviceBackend {
            dev: Arc::new(dev),
            inputs: Arc::new(model_ops::HostInputs::new()),
            tensor_core_attention: false,
        }
    }
    /// The same backend with attention's forward and backward on the tensor-core
    /// kernels ([`crate::kernels::attention::attention_fwd_tc`], `attention_bwd_tc`)
    /// wherever they take the head size, when `on`.  Off by default until a GPU has
    /// timed them; the single-query decode kernel is used either way.
    pub fn with_tensor_core_attention(mut self, on: bool) -> Self {
        self.tensor_core_attention = on;
        self
    }
    /// Whether attention runs on the tensor-core kernels for head size `hs`.
    pub fn tensor_core_attention(&self, hs: usize) -> bool {
        self.tensor_core_attention && crate::kernels::attention::tensor_core_head_size(hs)
    }
    /// The device this backend launches on.
    pub fn device(&self) -> &Device {
        &self.dev
    }
}

/// A grid-stride launch over `n` elements.
fn linear(n: usize) -> LaunchCfg {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchCfg::new([blocks, 1, 1], [BLOCK, 1, 1], 0)
}

fn i64_arg(n: usize) -> KArg {
    KArg::I64(n as i64)
}

/// `c` as a kernel's `int`, or an error naming the op.
fn i32_arg(op: &'static str, what: &str, n: usize) -> Result<KArg> {
    i32::try_from(n)
        .map(KArg::I32)
        .map_err(|_| Error::shape(op, format!("{what} = {n} does not fit a 32-bit int")))
}

fn rows_of(op: &'static str, len: usize, c: usize) -> Result<usize> {
    if c == 0 || !len.is_multiple_of(c) {
        return Err(Error::shape(
            op,
            format!("buffer of {len} elements is not a whole number of rows of {c}"),
        ));
    }
    Ok(len / c)
}

#[track_caller]
fn ok<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("device backend: {e}"))
}

impl Backend<f32> for DeviceBackend {
    type Buf = DeviceBuf<f32>;

    fn name(&self) -> &'static str {
        match self.dev.kind() {
            crate::kernels::DeviceKind::Emulator => "emu",
            crate::kernels::DeviceKind::Cuda => "cuda",
        }
    }

    fn zeros(&self, n: usize) -> DeviceBuf<f32> {
        ok(self.dev.zeros(n))
    }
    fn uninit(&self, n: usize) -> DeviceBuf<f32> {
        ok(self.dev.uninit(n))
    }
    fn from_slice(&self, x: &[f32]) -> DeviceBuf<f32> {
        ok(self.dev.upload(x))
    }
    fn to_vec(&self, x: &DeviceBuf<f32>) -> Vec<f32> {
        ok(self.dev.download(x))
    }
    fn len(&self, x: &DeviceBuf<f32>) -> usize {
        x.len()
    }
    fn fill(&self, x: &mut DeviceBuf<f32>, v: f32) {
        ok(elementwise::fill(&self.dev, x, v))
    }
    fn copy(&self, dst: &mut DeviceBuf<f32>, src: &DeviceBuf<f32>) -> Result<()> {
        check_len("copy", "src", src.len(), dst.len())?;
        elementwise::copy_range(&self.dev, dst, 0, src, 0, src.len())
    }
    fn copy_range(
        &self,
        dst: &mut DeviceBuf<f32>,
        dst_off: usize,
        src: &DeviceBuf<f32>,
        src_off: usize,
        n: usize,
    ) -> Result<()> {
        elementwise::copy_range(&self.dev, dst, dst_off, src, src_off, n)
    }
    fn copy_rows(&self, dst: &mut DeviceBuf<f32>, src: &DeviceBuf<f32>, c: RowCopy) -> Result<()> {
        elementwise::rows(&self.dev, false, dst, src, c)
    }
    fn add_rows(&self, dst: &mut DeviceBuf<f32>, src: &DeviceBuf<f32>, c: RowCopy) -> Result<()> {
        elementwise::rows(&self.dev, true, dst, src, c)
    }
    fn axpy(&self, dst: &mut DeviceBuf<f32>, alpha: f32, src: &DeviceBuf<f32>) -> Result<()> {
        elementwise::axpy(&self.dev, dst, alpha, src)
    }
    fn add_new(&self, terms: &[&DeviceBuf<f32>]) -> Result<DeviceBuf<f32>> {
        let first = terms
            .first()
            .ok_or_else(|| Error::shape("add_new", "no terms to add"))?;
        let mut out = self.dev.uninit(first.len())?;
        elementwise::add_terms(&self.dev, "add_new", &mut out, false, terms)?;
        Ok(out)
    }
    fn add_into(&self, dst: &mut DeviceBuf<f32>, terms: &[&DeviceBuf<f32>]) -> Result<()> {
        elementwise::add_terms(&self.dev, "add_into", dst, true, terms)
    }
    fn scale(&self, x: &mut DeviceBuf<f32>, alpha: f32) {
        ok(elementwise::scale(&self.dev, x, alpha))
    }
    fn fill_many(&self, xs: &mut [&mut DeviceBuf<f32>], v: f32) {
        ok(many::each_in_place(self, "fill_many_f32", xs, v))
    }
    fn scale_many(&self, xs: &mut [&mut DeviceBuf<f32>], alpha: f32) {
        ok(many::each_in_place(self, "scale_many_f32", xs, alpha))
    }
    fn sum_sq(&self, x: &DeviceBuf<f32>) -> f32 {
        ok(many::sum_sq_many(self, &[x]))[0]
    }
    fn sum_sq_many(&self, xs: &[&DeviceBuf<f32>]) -> Vec<f32> {
        ok(many::sum_sq_many(self, xs))
    }

    fn matmul(
        &self,
        s: MatmulSpec,
        a: &DeviceBuf<f32>,
        b: &DeviceBuf<f32>,
        out: &mut DeviceBuf<f32>,
        acc: Accum,
    ) -> Result<()> {
        gemm(&self.dev, s, a, b, out, acc)
    }
    fn matmul_batched(
        &self,
        s: MatmulSpec,
        batch: usize,
        a: &DeviceBuf<f32>,
        b: &DeviceBuf<f32>,
        out: &mut DeviceBuf<f32>,
        acc: Accum,
    ) -> Result<()> {
        gemm_batched(&self.dev, s, batch, a, b, out, acc)
    }
    fn add_bias(&self, out: &mut DeviceBuf<f32>, bias: &DeviceBuf<f32>, c: usize) -> Result<()> {
        elementwise::add_bias(&self.dev, out, bias, c)
    }
    fn bias_bwd(&self, dout: &DeviceBuf<f32>, dbias: &mut DeviceBuf<f32>, c: usize) -> Result<()> {
        elementwise::col_sum(self, "bias_bwd", dout, dbias, c)
    }

    fn add_rmsnorm_fwd(
        &self,
        x: &DeviceBuf<f32>,
        a: &DeviceBuf<f32>,
        w: Option<&DeviceBuf<f32>>,
        eps: f32,
        c: usize,
        sum: &mut DeviceBuf<f32>,
        out: &mut DeviceBuf<f32>,
        rstd: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        norm::add_rmsnorm_fwd(&self.dev, x, a, w, eps, c, sum, out, rstd)
    }
    fn rmsnorm_fwd(
        &self,
        x: &DeviceBuf<f32>,
        w: Option<&DeviceBuf<f32>>,
        eps: f32,
        c: usize,
        out: &mut DeviceBuf<f32>,
        rstd: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        norm::rmsnorm_fwd(&self.dev, x, w, eps, c, out, rstd)
    }
    fn rmsnorm_bwd(
        &self,
        dout: &DeviceBuf<f32>,
        x: &DeviceBuf<f32>,
        w: Option<&DeviceBuf<f32>>,
        rstd: &DeviceBuf<f32>,
        c: usize,
        dx: &mut DeviceBuf<f32>,
        dw: Option<&mut DeviceBuf<f32>>,
    ) -> Result<()> {
        norm::rmsnorm_bwd(self, dout, x, w, rstd, c, dx, dw)
    }
    fn layernorm_fwd(
        &self,
        x: &DeviceBuf<f32>,
        w: &DeviceBuf<f32>,
        b: &DeviceBuf<f32>,
        eps: f32,
        c: usize,
        out: &mut DeviceBuf<f32>,
        mean: &mut DeviceBuf<f32>,
        rstd: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        norm::layernorm_fwd(&self.dev, x, None, w, b, eps, c, out, mean, rstd)
    }
    fn add_layernorm_fwd(
        &self,
        x: &DeviceBuf<f32>,
        a: &DeviceBuf<f32>,
        w: &DeviceBuf<f32>,
        b: &DeviceBuf<f32>,
        eps: f32,
        c: usize,
        sum: &mut DeviceBuf<f32>,
        out: &mut DeviceBuf<f32>,
        mean: &mut DeviceBuf<f32>,
        rstd: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        let added = Some((a, sum));
        norm::layernorm_fwd(&self.dev, x, added, w, b, eps, c, out, mean, rstd)
    }
    fn layernorm_bwd(
        &self,
        dout: &DeviceBuf<f32>,
        x: &DeviceBuf<f32>,
        w: &DeviceBuf<f32>,
        mean: &DeviceBuf<f32>,
        rstd: &DeviceBuf<f32>,
        c: usize,
        dx: &mut DeviceBuf<f32>,
        dw: Option<&mut DeviceBuf<f32>>,
        db: Option<&mut DeviceBuf<f32>>,
    ) -> Result<()> {
        let saved = norm::LnSaved { w, mean, rstd };
        norm::layernorm_bwd(self, dout, x, saved, c, dx, dw, db)
    }

    fn heads_split(
        &self,
        x: &DeviceBuf<f32>,
        x_at: Cols,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        pos0: usize,
        theta: Option<f32>,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        let h = layout::Heads::new(b, t, nh, hs, pos0, theta);
        layout::heads_split(&self.dev, &h, (x, x_at), out)
    }
    fn append_kv(
        &self,
        k: &DeviceBuf<f32>,
        v: &DeviceBuf<f32>,
        a: &KvAppend,
        kc: &mut DeviceBuf<f32>,
        vc: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        let h = layout::Heads::new(a.b, a.t, a.nkv, a.hs, a.pos0, a.theta);
        let place = layout::Place {
            ht: a.cap,
            at: a.at,
        };
        layout::append_kv(&self.dev, &h, place, (k, a.k_cols, kc), (v, a.v_cols, vc))
    }
    fn heads_split_bwd(
        &self,
        dout: &DeviceBuf<f32>,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        pos0: usize,
        theta: Option<f32>,
        dx: &mut DeviceBuf<f32>,
        dx_at: Cols,
    ) -> Result<()> {
        let h = layout::Heads::new(b, t, nh, hs, pos0, theta);
        layout::heads_split_bwd(&self.dev, &h, dout, (dx, dx_at))
    }
    fn heads_merge(
        &self,
        x: &DeviceBuf<f32>,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        let h = layout::Heads::new(b, t, nh, hs, 0, None);
        layout::heads_merge(&self.dev, &h, x, out)
    }

    fn act_fwd(&self, act: Act, x: &DeviceBuf<f32>, out: &mut DeviceBuf<f32>) -> Result<()> {
        elementwise::act_fwd(&self.dev, act, x, out)
    }
    fn act_bwd(
        &self,
        act: Act,
        x: &DeviceBuf<f32>,
        dout: &DeviceBuf<f32>,
        dx: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        elementwise::act_bwd(&self.dev, act, x, dout, dx)
    }
    fn swiglu_fwd(
        &self,
        gate: &DeviceBuf<f32>,
        up: &DeviceBuf<f32>,
        at: GateUp,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        elementwise::swiglu_fwd(&self.dev, (gate, up), at, out)
    }
    fn swiglu_bwd(
        &self,
        gate: &DeviceBuf<f32>,
        up: &DeviceBuf<f32>,
        dout: &DeviceBuf<f32>,
        dgate: &mut DeviceBuf<f32>,
        dup: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        elementwise::swiglu_bwd(&self.dev, gate, up, dout, dgate, dup)
    }

    fn embedding_fwd(
        &self,
        ids: &[u32],
        table: &DeviceBuf<f32>,
        c: usize,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        layout::embedding_fwd(&self.dev, ids, table, c, out)
    }
    fn embedding_bwd(
        &self,
        ids: &[u32],
        dout: &DeviceBuf<f32>,
        c: usize,
        dtable: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        layout::embedding_bwd(&self.dev, ids, dout, c, dtable)
    }
    fn patchify(
        &self,
        pixels: &DeviceBuf<f32>,
        b: usize,
        ch: usize,
        h: usize,
        w: usize,
        p: usize,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        layout::patchify(
            &self.dev,
            "patchify",
            "patchify_fwd_f32",
            pixels,
            [b, ch, h, w, p],
            out,
        )
    }
    fn patchify_bwd(
        &self,
        dout: &DeviceBuf<f32>,
        b: usize,
        ch: usize,
        h: usize,
        w: usize,
        p: usize,
        dpixels: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        layout::patchify(
            &self.dev,
            "patchify_bwd",
            "patchify_bwd_f32",
            dout,
            [b, ch, h, w, p],
            dpixels,
        )
    }

    fn attention_fwd(
        &self,
        s: &AttnShape,
        q: &DeviceBuf<f32>,
        k: &DeviceBuf<f32>,
        v: &DeviceBuf<f32>,
        bias: Option<&DeviceBuf<f32>>,
        key_mask: Option<&[u8]>,
        out: &mut DeviceBuf<f32>,
        lse: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        model_ops::attention_fwd(self, s, q, k, v, bias, key_mask, out, lse)
    }
    fn attention_bwd(
        &self,
        s: &AttnShape,
        q: &DeviceBuf<f32>,
        k: &DeviceBuf<f32>,
        v: &DeviceBuf<f32>,
        bias: Option<&DeviceBuf<f32>>,
        key_mask: Option<&[u8]>,
        out: &DeviceBuf<f32>,
        lse: &DeviceBuf<f32>,
        dout: &DeviceBuf<f32>,
        dq: &mut DeviceBuf<f32>,
        dk: &mut DeviceBuf<f32>,
        dv: &mut DeviceBuf<f32>,
        dbias: Option<&mut DeviceBuf<f32>>,
    ) -> Result<()> {
        let grads = model_ops::AttnGrads { dq, dk, dv, dbias };
        model_ops::attention_bwd(self, s, q, k, v, bias, key_mask, out, lse, dout, grads)
    }

    fn logprob_fwd(
        &self,
        logits: &DeviceBuf<f32>,
        targets: &[i32],
        v: usize,
        logp: &mut DeviceBuf<f32>,
        lse: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        model_ops::logprob_fwd(self, logits, targets, v, logp, lse)
    }
    fn logprob_bwd(
        &self,
        logits: &DeviceBuf<f32>,
        targets: &[i32],
        v: usize,
        lse: &DeviceBuf<f32>,
        dlogp: &DeviceBuf<f32>,
        dlogits: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        model_ops::logprob_bwd(self, logits, targets, v, lse, dlogp, dlogits)
    }

    fn adamw_step(
        &self,
        h: &AdamWStep,
        param: &mut DeviceBuf<f32>,
        grad: &DeviceBuf<f32>,
        m: &mut DeviceBuf<f32>,
        v: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        elementwise::adamw(&self.dev, h, param, grad, m, v)
    }
    fn adamw_step_many(
        &self,
        h: &AdamWStep,
        slots: &mut [AdamWSlot<DeviceBuf<f32>>],
    ) -> Result<()> {
        many::adamw_many(self, h, slots)
    }

    // The pixel decoder's ops: `kernels/image.cu`.
    fn im2col(&self, x: &DeviceBuf<f32>, g: &Conv2dGeom, out: &mut DeviceBuf<f32>) -> Result<()> {
        image::im2col(&self.dev, x, g, out)
    }
    fn im2col_bwd(
        &self,
        dout: &DeviceBuf<f32>,
        g: &Conv2dGeom,
        dx: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        image::im2col_bwd(&self.dev, dout, g, dx)
    }
    #[rustfmt::skip]
    fn depth_to_space(&self, x: &DeviceBuf<f32>, b: usize, h: usize, w: usize, c: usize, r: usize, out: &mut DeviceBuf<f32>) -> Result<()> {
        image::depth_to_space(&self.dev, x, image::Dims { b, h, w, c }, r, out)
    }
    #[rustfmt::skip]
    fn depth_to_space_bwd(&self, dout: &DeviceBuf<f32>, b: usize, h: usize, w: usize, c: usize, r: usize, dx: &mut DeviceBuf<f32>) -> Result<()> {
        image::depth_to_space_bwd(&self.dev, dout, image::Dims { b, h, w, c }, r, dx)
    }
    #[rustfmt::skip]
    fn resize_bilinear(&self, x: &DeviceBuf<f32>, b: usize, h: usize, w: usize, c: usize, ho: usize, wo: usize, out: &mut DeviceBuf<f32>) -> Result<()> {
        image::resize_bilinear(&self.dev, x, image::Dims { b, h, w, c }, ho, wo, out)
    }
    #[rustfmt::skip]
    fn resize_bilinear_bwd(&self, dout: &DeviceBuf<f32>, b: usize, h: usize, w: usize, c: usize, ho: usize, wo: usize, dx: &mut DeviceBuf<f32>) -> Result<()> {
        image::resize_bilinear_bwd(&self.dev, dout, image::Dims { b, h, w, c }, ho, wo, dx)
    }
    fn mul_rows(
        &self,
        x: &DeviceBuf<f32>,
        g: &DeviceBuf<f32>,
        c: usize,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        image::mul_rows(&self.dev, x, g, c, out)
    }
    #[rustfmt::skip]
    fn mul_rows_bwd(&self, x: &DeviceBuf<f32>, g: &DeviceBuf<f32>, dout: &DeviceBuf<f32>, c: usize, dx: &mut DeviceBuf<f32>, dg: &mut DeviceBuf<f32>) -> Result<()> {
        image::mul_rows_bwd(&self.dev, x, g, dout, c, dx, dg)
    }
    fn mask_loss_fwd(
        &self,
        logits: &DeviceBuf<f32>,
        target: &DeviceBuf<f32>,
        m: usize,
        p: usize,
    ) -> Result<MaskLosses<f32, DeviceBuf<f32>>> {
        image::mask_loss_fwd(&self.dev, logits, target, m, p)
    }
    #[rustfmt::skip]
    fn mask_loss_bwd(&self, logits: &DeviceBuf<f32>, target: &DeviceBuf<f32>, sums: &DeviceBuf<f32>, m: usize, p: usize, w_bce: f32, w_dice: f32, dlogits: &mut DeviceBuf<f32>) -> Result<()> {
        image::mask_loss_bwd(&self.dev, logits, target, sums, m, p, w_bce, w_dice, dlogits)
    }
}
