//! The device backend: [`Backend<f32>`] over [`crate::kernels::Device`], so the same
//! model code runs on the CUDA emulator (CI, no GPU) and on a GPU through cudarc.
//!
//! Every op is a kernel launch on buffers that stay on the device; the CPU backend is
//! each kernel's twin, and `tests/backend_device.rs` checks every op against it.  Matrix
//! products go through [`gemm`] (the CPU `gemm` crate on the emulator; cuBLAS on a GPU is
//! not wired yet and is an error).  Host↔device copies happen only where the contract
//! hands over host data (token ids, targets, key masks) and in the memory ops
//! `from_slice`/`to_vec`; [`crate::kernels::Device::copies`] counts them.
//!
//! Not done yet (each an `Err(Unsupported)` naming the op): LayerNorm, heads
//! split/merge with RoPE, concat along time, embedding gather/scatter, patchify.
//!
//! The trait's memory ops (`zeros`, `fill`, `to_vec`, ...) cannot return an error; a
//! device failure there (out of memory, a lost GPU) panics with the device's message.
//!
//! Sizes: N rows, C channels, V vocabulary.
use super::{Accum, Act, AdamWStep, AttnShape, Backend, MatmulSpec};
use crate::error::{check_len, Error, Result};
use crate::kernels::{Device, DeviceBuf, KArg, LaunchCfg};
use std::sync::Arc;

mod elementwise;
mod gemm;
mod model_ops;
mod norm;

pub use gemm::gemm;

/// Threads per block of the elementwise kernels.
const BLOCK: u32 = 256;
/// Most blocks of a grid-stride elementwise launch: enough to fill a GPU, few enough
/// that the emulator does not spin up a block per 256 elements of a large tensor.
const MAX_BLOCKS: usize = 1024;

/// The device backend; cheap to clone (the device is shared).
#[derive(Clone, Debug)]
pub struct DeviceBackend {
    dev: Arc<Device>,
}

impl DeviceBackend {
    pub fn new(dev: Device) -> Self {
        DeviceBackend { dev: Arc::new(dev) }
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

fn not_yet(op: &'static str) -> Error {
    Error::Unsupported(format!(
        "{op} is not implemented on the device backend yet (issue 11)"
    ))
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
    fn axpy(&self, dst: &mut DeviceBuf<f32>, alpha: f32, src: &DeviceBuf<f32>) -> Result<()> {
        elementwise::axpy(&self.dev, dst, alpha, src)
    }
    fn scale(&self, x: &mut DeviceBuf<f32>, alpha: f32) {
        ok(elementwise::scale(&self.dev, x, alpha))
    }
    fn sum_sq(&self, x: &DeviceBuf<f32>) -> f32 {
        ok(elementwise::sum_sq(&self.dev, x))
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
    fn add_bias(&self, out: &mut DeviceBuf<f32>, bias: &DeviceBuf<f32>, c: usize) -> Result<()> {
        elementwise::add_bias(&self.dev, out, bias, c)
    }
    fn bias_bwd(&self, dout: &DeviceBuf<f32>, dbias: &mut DeviceBuf<f32>, c: usize) -> Result<()> {
        elementwise::col_sum(&self.dev, "bias_bwd", dout, dbias, c)
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
        norm::rmsnorm_bwd(&self.dev, dout, x, w, rstd, c, dx, dw)
    }
    fn layernorm_fwd(
        &self,
        _x: &DeviceBuf<f32>,
        _w: &DeviceBuf<f32>,
        _b: &DeviceBuf<f32>,
        _eps: f32,
        _c: usize,
        _out: &mut DeviceBuf<f32>,
        _mean: &mut DeviceBuf<f32>,
        _rstd: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        Err(not_yet("layernorm_fwd"))
    }
    fn layernorm_bwd(
        &self,
        _dout: &DeviceBuf<f32>,
        _x: &DeviceBuf<f32>,
        _w: &DeviceBuf<f32>,
        _mean: &DeviceBuf<f32>,
        _rstd: &DeviceBuf<f32>,
        _c: usize,
        _dx: &mut DeviceBuf<f32>,
        _dw: Option<&mut DeviceBuf<f32>>,
        _db: Option<&mut DeviceBuf<f32>>,
    ) -> Result<()> {
        Err(not_yet("layernorm_bwd"))
    }

    fn heads_split(
        &self,
        _x: &DeviceBuf<f32>,
        _b: usize,
        _t: usize,
        _nh: usize,
        _hs: usize,
        _pos0: usize,
        _theta: Option<f32>,
        _out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        Err(not_yet("heads_split"))
    }
    fn heads_split_bwd(
        &self,
        _dout: &DeviceBuf<f32>,
        _b: usize,
        _t: usize,
        _nh: usize,
        _hs: usize,
        _pos0: usize,
        _theta: Option<f32>,
        _dx: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        Err(not_yet("heads_split_bwd"))
    }
    fn heads_merge(
        &self,
        _x: &DeviceBuf<f32>,
        _b: usize,
        _t: usize,
        _nh: usize,
        _hs: usize,
        _out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        Err(not_yet("heads_merge"))
    }
    fn concat_time(
        &self,
        _cache: &DeviceBuf<f32>,
        _new: &DeviceBuf<f32>,
        _b: usize,
        _h: usize,
        _t1: usize,
        _t2: usize,
        _hs: usize,
    ) -> Result<DeviceBuf<f32>> {
        Err(not_yet("concat_time"))
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
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        elementwise::swiglu_fwd(&self.dev, gate, up, out)
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
        _ids: &[u32],
        _table: &DeviceBuf<f32>,
        _c: usize,
        _out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        Err(not_yet("embedding_fwd"))
    }
    fn embedding_bwd(
        &self,
        _ids: &[u32],
        _dout: &DeviceBuf<f32>,
        _c: usize,
        _dtable: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        Err(not_yet("embedding_bwd"))
    }
    fn patchify(
        &self,
        _pixels: &DeviceBuf<f32>,
        _b: usize,
        _ch: usize,
        _h: usize,
        _w: usize,
        _p: usize,
        _out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        Err(not_yet("patchify"))
    }
    fn patchify_bwd(
        &self,
        _dout: &DeviceBuf<f32>,
        _b: usize,
        _ch: usize,
        _h: usize,
        _w: usize,
        _p: usize,
        _dpixels: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        Err(not_yet("patchify_bwd"))
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
        model_ops::attention_fwd(&self.dev, s, q, k, v, bias, key_mask, out, lse)
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
        model_ops::attention_bwd(&self.dev, s, q, k, v, bias, key_mask, out, lse, dout, grads)
    }

    fn logprob_fwd(
        &self,
        logits: &DeviceBuf<f32>,
        targets: &[i32],
        v: usize,
        logp: &mut DeviceBuf<f32>,
        lse: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        model_ops::logprob_fwd(&self.dev, logits, targets, v, logp, lse)
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
        model_ops::logprob_bwd(&self.dev, logits, targets, v, lse, dlogp, dlogits)
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
}
