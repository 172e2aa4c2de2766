//! Launch wrappers of `kernels/attention.cu` and `kernels/attention_tc.cu` (emulator or
//! GPU).
use super::{check_decode, AttnShape};
use crate::error::{check_len, Error, Result};
use crate::kernels::{Device, DeviceBuf, Elem, KArg, LaunchCfg};

/// Threads per block of every attention kernel (4 warps).
const GPU_THREADS: u32 = 128;
/// Keys per tile of every kernel, and queries per query tile of the dK / dV kernel.
const GPU_TILE: usize = 32;
/// Keys per decode block (one per thread).
const GPU_DEC_CHUNK: usize = 128;
/// Query rows per block of the backward preprocess (one warp each).
const GPU_PRE_ROWS: usize = 4;

/// Queries per block of the forward and of the dQ kernel (the dK / dV kernel walks
/// query tiles of [`GPU_TILE`]).
const GPU_FWD_QUERIES: usize = 64;
/// Row stride of the P / dS tiles (keys per tile + 4; rows read as float4).
const GPU_PS: usize = GPU_TILE + 4;

/// Row strides of the kernels' tiles: q side a multiple of 4 (float4 reads), k side the
/// next multiple of 4 that is ≡ 4 mod 32 (8 lanes read 8 rows without bank conflicts);
/// P / dS tiles [`GPU_PS`].
fn tile_strides(hs: usize) -> (usize, usize) {
    let qs = hs.div_ceil(4) * 4;
    (qs, (qs - 4).div_ceil(32) * 32 + 4)
}

/// Row strides (floats) of a kernel family's shared tiles: the q-side tiles (q, dout),
/// the k tile and the forward's v tile (the backward's v tile takes the k stride); and
/// whether the forward keeps P, and the dQ kernel dS, in shared memory.  The SIMT
/// kernels read q-side rows as float4 broadcasts (q = the padded width) and stage P and
/// dS; the tensor-core kernels read tiles as mma fragments at a stride ≡ 4 mod 32 (the
/// forward's v, read as B only, at ≡ 8 mod 32) and keep P and dS in registers; the
/// backward's tiles read both ways are swizzled at a stride 4 floats under `k` (`tc_sw`
/// in kernels/attention_tc.cu), in the same space.
struct Strides {
    q: usize,
    k: usize,
    v: usize,
    /// P (forward) and dS (dQ) go through shared memory.
    staged: bool,
}

fn strides(hs: usize, tc: bool) -> Strides {
    let (qs, ks) = tile_strides(hs);
    if tc {
        Strides {
            q: ks,
            k: ks,
            v: ks + 4,
            staged: false,
        }
    } else {
        Strides {
            q: qs,
            k: ks,
            v: qs,
            staged: true,
        }
    }
}

/// Dynamic shared memory of `attention_fwd_*`: q tile (64 rows), k and v tiles (32
/// rows), P (64 rows, SIMT only), key row.
fn fwd_shmem(st: &Strides) -> u32 {
    let q = GPU_FWD_QUERIES;
    let p = if st.staged { q * GPU_PS } else { 0 };
    (4 * (q * st.q + GPU_TILE * st.k + GPU_TILE * st.v + p + GPU_TILE)) as u32
}

/// Dynamic shared memory of `attention_bwd_dq_*`: q and dout tiles (64 rows), k and v
/// tiles (32 rows), dS (64 rows, SIMT only), key row, lse and D (64 each).
fn bwd_dq_shmem(st: &Strides) -> u32 {
    let q = GPU_FWD_QUERIES;
    let ds = if st.staged { q * GPU_PS } else { 0 };
    (4 * (2 * q * st.q + 2 * GPU_TILE * st.k + ds + GPU_TILE + 2 * q)) as u32
}

/// Dynamic shared memory of `attention_bwd_dkv_*`: q, dout, k, v tiles (32 rows each),
/// Pᵀ and dSᵀ (32 rows each), key row, lse and D.
fn bwd_dkv_shmem(st: &Strides) -> u32 {
    let t = GPU_TILE;
    (4 * (2 * t * st.q + 2 * t * st.k + 2 * t * GPU_PS + 3 * t)) as u32
}

fn opt_arg<T: Elem>(b: Option<&DeviceBuf<T>>) -> KArg {
    b.map_or(KArg::Ptr(0), |x| x.arg())
}

/// A 1-D grid of `n` blocks of [`GPU_THREADS`], or an error when it does not fit.
fn grid(op: &'static str, n: usize, shmem: u32) -> Result<LaunchCfg> {
    let g = u32::try_from(n)
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| Error::shape(op, format!("{n} blocks do not fit one grid")))?;
    Ok(LaunchCfg::new([g, 1, 1], [GPU_THREADS, 1, 1], shmem))
}

fn i32_arg(x: usize) -> KArg {
    // validate() bounds every size by i32::MAX.
    KArg::I32(x as i32)
}

/// The shape arguments the attention kernels take after their buffers: the forward
/// reads keys at `kv_stride` rows per block (`Ks`), the backward packed ones; the
/// layout's bits last.
fn shape_args(s: &AttnShape, with_stride: bool) -> Vec<KArg> {
    let mut a = vec![
        i32_arg(s.b),
        i32_arg(s.nh),
        i32_arg(s.nkv),
        i32_arg(s.tq),
        i32_arg(s.tk),
    ];
    if with_stride {
        a.push(i32_arg(s.kv_stride));
    }
    a.extend([
        i32_arg(s.hs),
        KArg::I32(i32::from(s.causal)),
        KArg::F32(s.scale),
        KArg::I32(s.layout.bits()),
    ]);
    a
}

/// Forward on a device (`attention_fwd_f32`): same contract as [`super::attention_fwd_cpu`].
///
/// q (B,NH,Tq,HS), k and v (B,NKV,kv_stride,HS) of which each block's first Tk rows are
/// read, bias (B,Tk) or None, key_mask (B,Tk) or None; writes out (B,NH,Tq,HS) and lse
/// (B,NH,Tq).
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd(
    dev: &Device,
    s: &AttnShape,
    q: &DeviceBuf<f32>,
    k: &DeviceBuf<f32>,
    v: &DeviceBuf<f32>,
    bias: Option<&DeviceBuf<f32>>,
    key_mask: Option<&DeviceBuf<u8>>,
    out: &mut DeviceBuf<f32>,
    lse: &mut DeviceBuf<f32>,
) -> Result<()> {
    fwd_launch(
        dev,
        "attention_fwd",
        ("attention_fwd_f32", false),
        s,
        [q.len(), k.len(), v.len(), out.len()],
        [q.arg(), k.arg(), v.arg()],
        bias,
        key_mask,
        out.arg_mut(),
        lse,
    )
}

/// The device forwards' common signature ([`attention_fwd`], [`attention_fwd_tc`]), so
/// that a caller can pick one per head size.
pub type AttnFwdFn = fn(
    &Device,
    &AttnShape,
    &DeviceBuf<f32>,
    &DeviceBuf<f32>,
    &DeviceBuf<f32>,
    Option<&DeviceBuf<f32>>,
    Option<&DeviceBuf<u8>>,
    &mut DeviceBuf<f32>,
    &mut DeviceBuf<f32>,
) -> Result<()>;

/// The device backwards' common signature ([`attention_bwd`], [`attention_bwd_tc`]).
pub type AttnBwdFn = fn(
    &Device,
    &AttnShape,
    &DeviceBuf<f32>,
    &DeviceBuf<f32>,
    &DeviceBuf<f32>,
    Option<&DeviceBuf<f32>>,
    Option<&DeviceBuf<u8>>,
    &DeviceBuf<f32>,
    &DeviceBuf<f32>,
    &DeviceBuf<f32>,
    &mut DeviceBuf<f32>,
    &mut DeviceBuf<f32>,
    &mut DeviceBuf<f32>,
    Option<&mut DeviceBuf<f32>>,
) -> Result<()>;

/// Whether [`attention_fwd_tc`] takes head size `hs`: its padded width (a multiple of 4)
/// must be a multiple of 8, the tensor cores' k step (8, 16, …, 128; 40 and 72 too).
pub fn tensor_core_head_size(hs: usize) -> bool {
    (1..=128).contains(&hs) && hs.div_ceil(4).is_multiple_of(2)
}

fn check_tensor_core_head_size(op: &'static str, hs: usize) -> Result<()> {
    if tensor_core_head_size(hs) {
        return Ok(());
    }
    Err(Error::arg(
        op,
        format!(
            "head size {hs} pads to {}, not a multiple of the tensor cores' 8",
            hs.div_ceil(4) * 4
        ),
    ))
}

/// Forward on tensor cores (`attention_fwd_tc_f32`: 3×TF32 products, on the emulator
/// too), same contract as [`attention_fwd`]; an error for a head size that
/// [`tensor_core_head_size`] refuses.  Not yet the default: it has passed the emulator's
/// tests and has not been timed on a GPU.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_tc(
    dev: &Device,
    s: &AttnShape,
    q: &DeviceBuf<f32>,
    k: &DeviceBuf<f32>,
    v: &DeviceBuf<f32>,
    bias: Option<&DeviceBuf<f32>>,
    key_mask: Option<&DeviceBuf<u8>>,
    out: &mut DeviceBuf<f32>,
    lse: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "attention_fwd_tc";
    check_tensor_core_head_size(OP, s.hs)?;
    fwd_launch(
        dev,
        OP,
        ("attention_fwd_tc_f32", true),
        s,
        [q.len(), k.len(), v.len(), out.len()],
        [q.arg(), k.arg(), v.arg()],
        bias,
        key_mask,
        out.arg_mut(),
        lse,
    )
}

/// Forward with bf16 q, k, v and out (`attention_fwd_bf16`; the buffers hold bf16 bit
/// patterns, e.g. `half::bf16::to_bits`); bias, lse and all arithmetic are f32.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_bf16(
    dev: &Device,
    s: &AttnShape,
    q: &DeviceBuf<u16>,
    k: &DeviceBuf<u16>,
    v: &DeviceBuf<u16>,
    bias: Option<&DeviceBuf<f32>>,
    key_mask: Option<&DeviceBuf<u8>>,
    out: &mut DeviceBuf<u16>,
    lse: &mut DeviceBuf<f32>,
) -> Result<()> {
    fwd_launch(
        dev,
        "attention_fwd_bf16",
        ("attention_fwd_bf16", false),
        s,
        [q.len(), k.len(), v.len(), out.len()],
        [q.arg(), k.arg(), v.arg()],
        bias,
        key_mask,
        out.arg_mut(),
        lse,
    )
}

#[allow(clippy::too_many_arguments)]
fn fwd_launch(
    dev: &Device,
    op: &'static str,
    (kernel, tc): (&str, bool),
    s: &AttnShape,
    lens: [usize; 4],
    qkv: [KArg; 3],
    bias: Option<&DeviceBuf<f32>>,
    key_mask: Option<&DeviceBuf<u8>>,
    out: KArg,
    lse: &mut DeviceBuf<f32>,
) -> Result<()> {
    let [ql, kl, vl, ol] = lens;
    s.check_fwd(
        op,
        ql,
        kl,
        vl,
        bias.map(|x| x.len()),
        key_mask.map(|x| x.len()),
        ol,
        lse.len(),
    )?;
    if lse.is_empty() {
        return Ok(()); // no query row
    }
    let shmem = fwd_shmem(&strides(s.hs, tc));
    let cfg = grid(op, s.tq.div_ceil(GPU_FWD_QUERIES) * s.nh * s.b, shmem)?;
    let mut args = vec![
        out,
        lse.arg_mut(),
        qkv[0],
        qkv[1],
        qkv[2],
        opt_arg(bias),
        opt_arg(key_mask),
    ];
    args.extend(shape_args(s, true));
    dev.launch(kernel, cfg, &args)
}

/// Backward on a device: `attention_bwd_preprocess_f32` (D = rowsum(dout ∘ out)), then
/// `attention_bwd_dq_f32` (dQ from 64-query blocks) and `attention_bwd_dkv_f32` (dK, dV
/// and per-kv-head dγ from 32-key blocks; both recompute P and dP, no atomics:
/// deterministic), then `attention_bwd_dbias_f32` (sum
/// of dγ over kv heads) when `dbias` is given.  Same contract as [`super::attention_bwd_cpu`]:
/// every gradient is overwritten.  Allocates D (B,NH,Tq) and, with dbias, a
/// (B,NKV,Tk) partial.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    dev: &Device,
    s: &AttnShape,
    q: &DeviceBuf<f32>,
    k: &DeviceBuf<f32>,
    v: &DeviceBuf<f32>,
    bias: Option<&DeviceBuf<f32>>,
    key_mask: Option<&DeviceBuf<u8>>,
    out: &DeviceBuf<f32>,
    lse: &DeviceBuf<f32>,
    dout: &DeviceBuf<f32>,
    dq: &mut DeviceBuf<f32>,
    dk: &mut DeviceBuf<f32>,
    dv: &mut DeviceBuf<f32>,
    dbias: Option<&mut DeviceBuf<f32>>,
) -> Result<()> {
    bwd_launch(
        dev, s, q, k, v, bias, key_mask, out, lse, dout, dq, dk, dv, dbias, false,
    )
}

/// Backward on tensor cores (`attention_bwd_dq_tc_f32` and `attention_bwd_dkv_tc_f32`:
/// 3×TF32 products, on the emulator too; the preprocess and dγ's sum over kv heads as
/// [`attention_bwd`]), same contract; an error for a head size that
/// [`tensor_core_head_size`] refuses.  Not yet the default: it has passed the emulator's
/// tests and has not been timed on a GPU.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_tc(
    dev: &Device,
    s: &AttnShape,
    q: &DeviceBuf<f32>,
    k: &DeviceBuf<f32>,
    v: &DeviceBuf<f32>,
    bias: Option<&DeviceBuf<f32>>,
    key_mask: Option<&DeviceBuf<u8>>,
    out: &DeviceBuf<f32>,
    lse: &DeviceBuf<f32>,
    dout: &DeviceBuf<f32>,
    dq: &mut DeviceBuf<f32>,
    dk: &mut DeviceBuf<f32>,
    dv: &mut DeviceBuf<f32>,
    dbias: Option<&mut DeviceBuf<f32>>,
) -> Result<()> {
    check_tensor_core_head_size("attention_bwd_tc", s.hs)?;
    bwd_launch(
        dev, s, q, k, v, bias, key_mask, out, lse, dout, dq, dk, dv, dbias, true,
    )
}

/// [`attention_bwd`]'s launches, dQ and dK / dV by the tensor-core kernels when `tc`.
#[allow(clippy::too_many_arguments)]
fn bwd_launch(
    dev: &Device,
    s: &AttnShape,
    q: &DeviceBuf<f32>,
    k: &DeviceBuf<f32>,
    v: &DeviceBuf<f32>,
    bias: Option<&DeviceBuf<f32>>,
    key_mask: Option<&DeviceBuf<u8>>,
    out: &DeviceBuf<f32>,
    lse: &DeviceBuf<f32>,
    dout: &DeviceBuf<f32>,
    dq: &mut DeviceBuf<f32>,
    dk: &mut DeviceBuf<f32>,
    dv: &mut DeviceBuf<f32>,
    dbias: Option<&mut DeviceBuf<f32>>,
    tc: bool,
) -> Result<()> {
    const OP: &str = "attention_bwd";
    s.check_fwd(
        OP,
        q.len(),
        k.len(),
        v.len(),
        bias.map(|x| x.len()),
        key_mask.map(|x| x.len()),
        out.len(),
        lse.len(),
    )?;
    s.check_grads(
        OP,
        [q.len(), k.len(), v.len()],
        [dout.len(), dq.len(), dk.len(), dv.len()],
        dbias.as_ref().map(|d| d.len()),
    )?;
    let rows = s.b * s.nh * s.tq;
    if rows == 0 {
        // No query row: zero kv-side gradients (dq is empty).
        let zero = |dev: &Device, x: &mut DeviceBuf<f32>| dev.write(x, &vec![0.0; x.len()]);
        zero(dev, dk)?;
        zero(dev, dv)?;
        if let Some(db) = dbias {
            zero(dev, db)?;
        }
        return Ok(());
    }
    let mut d = dev.uninit::<f32>(rows)?;
    let pre = grid(OP, rows.div_ceil(GPU_PRE_ROWS), 0)?;
    dev.launch(
        "attention_bwd_preprocess_f32",
        pre,
        &[
            d.arg_mut(),
            out.arg(),
            dout.arg(),
            i32_arg(s.b),
            i32_arg(s.nh),
            i32_arg(s.tq),
            i32_arg(s.hs),
            KArg::I32(s.layout.bits()),
        ],
    )?;
    let mut part = match dbias {
        Some(_) if s.b * s.tk > 0 => Some(dev.uninit::<f32>(s.b * s.nkv * s.tk)?),
        _ => None,
    };
    let shape = shape_args(s, false);
    let common = [
        q.arg(),
        k.arg(),
        v.arg(),
        opt_arg(bias),
        opt_arg(key_mask),
        lse.arg(),
        d.arg(),
        dout.arg(),
    ];
    let nqb = s.tq.div_ceil(GPU_FWD_QUERIES) * s.nh * s.b;
    let mut args = vec![dq.arg_mut()];
    args.extend(common.iter().copied());
    args.extend(shape.iter().copied());
    let st = strides(s.hs, tc);
    let dq_kernel = if tc {
        "attention_bwd_dq_tc_f32"
    } else {
        "attention_bwd_dq_f32"
    };
    dev.launch(dq_kernel, grid(OP, nqb, bwd_dq_shmem(&st))?, &args)?;
    let nkvb = s.tk.div_ceil(GPU_TILE) * s.nkv * s.b;
    if nkvb > 0 {
        let mut args = vec![
            dk.arg_mut(),
            dv.arg_mut(),
            part.as_mut().map_or(KArg::Ptr(0), |p| p.arg_mut()),
        ];
        args.extend(common.iter().copied());
        args.extend(shape.iter().copied());
        let dkv_kernel = if tc {
            "attention_bwd_dkv_tc_f32"
        } else {
            "attention_bwd_dkv_f32"
        };
        dev.launch(dkv_kernel, grid(OP, nkvb, bwd_dkv_shmem(&st))?, &args)?;
    }
    if let (Some(db), Some(p)) = (dbias, part.as_ref()) {
        dev.launch(
            "attention_bwd_dbias_f32",
            LaunchCfg::linear(s.b * s.tk, GPU_THREADS),
            &[
                db.arg_mut(),
                p.arg(),
                i32_arg(s.b),
                i32_arg(s.nkv),
                i32_arg(s.tk),
            ],
        )?;
    }
    Ok(())
}

/// Single-query decode over a KV cache on a device (`attention_decode_f32` split over
/// 128-key chunks, then `attention_decode_reduce_f32`; one launch when `len` <= 128):
/// same contract as [`super::attention_decode_cpu`].  Allocates a
/// (B,NH,ceil(len/128),HS+2) partial when there is more than one chunk.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    dev: &Device,
    s_b: usize,
    nh: usize,
    nkv: usize,
    tmax: usize,
    len: usize,
    hs: usize,
    scale: f32,
    q: &DeviceBuf<f32>,
    k_cache: &DeviceBuf<f32>,
    v_cache: &DeviceBuf<f32>,
    bias: Option<&DeviceBuf<f32>>,
    out: &mut DeviceBuf<f32>,
    lse: Option<&mut DeviceBuf<f32>>,
) -> Result<()> {
    const OP: &str = "attention_decode";
    check_decode(
        OP,
        [s_b, nh, nkv, tmax, len, hs],
        scale,
        [q.len(), k_cache.len(), v_cache.len(), out.len()],
        bias.map(|g| g.len()),
    )?;
    if let Some(l) = &lse {
        check_len(OP, "lse (B,NH)", l.len(), s_b * nh)?;
    }
    if out.is_empty() {
        return Ok(());
    }
    let nsplit = len.div_ceil(GPU_DEC_CHUNK);
    let dims = [
        i32_arg(s_b),
        i32_arg(nh),
        i32_arg(nkv),
        i32_arg(tmax),
        i32_arg(len),
        i32_arg(hs),
        KArg::F32(scale),
        i32_arg(nsplit),
    ];
    let lse = lse.map_or(KArg::Ptr(0), |l| l.arg_mut());
    let qkvb = [q.arg(), k_cache.arg(), v_cache.arg(), opt_arg(bias)];
    if nsplit == 1 {
        // one chunk: the block writes out and lse itself, no reduce
        let mut args = vec![KArg::Ptr(0), out.arg_mut(), lse];
        args.extend(qkvb);
        args.extend(dims);
        return dev.launch("attention_decode_f32", grid(OP, nh * s_b, 0)?, &args);
    }
    // With len = 0 the reduce sees no split and writes zeros.
    let mut part = dev.uninit::<f32>((s_b * nh * nsplit * (hs + 2)).max(1))?;
    if nsplit > 0 {
        let mut args = vec![part.arg_mut(), KArg::Ptr(0), KArg::Ptr(0)];
        args.extend(qkvb);
        args.extend(dims);
        dev.launch(
            "attention_decode_f32",
            grid(OP, nsplit * nh * s_b, 0)?,
            &args,
        )?;
    }
    dev.launch(
        "attention_decode_reduce_f32",
        grid(OP, nh * s_b, 0)?,
        &[
            out.arg_mut(),
            lse,
            part.arg(),
            i32_arg(s_b),
            i32_arg(nh),
            i32_arg(hs),
            i32_arg(nsplit),
        ],
    )
}
