//! Whole-buffer ops, activations, SwiGLU, bias and AdamW: launches of
//! `kernels/elementwise.cu`.  CPU twins: `src/backend/cpu/{elementwise,act,matmul,optim}.rs`.
use super::{i32_arg, i64_arg, linear, rows_of, DeviceBackend, BLOCK};
use crate::backend::{check_terms, Act, AdamWStep, GateUp, RowCopy};
use crate::error::{check_len, Error, Result};
use crate::kernels::{Device, DeviceBuf, KArg, LaunchCfg};

/// The activation codes of `kernels/elementwise.cu` (`ACT_*`).
fn act_code(act: Act) -> i32 {
    match act {
        Act::QuickGelu => 0,
        Act::GeluErf => 1,
        Act::GeluTanh => 2,
        Act::Silu => 3,
        Act::Relu => 4,
        Act::Sigmoid => 5,
    }
}

pub(super) fn fill(dev: &Device, x: &mut DeviceBuf<f32>, v: f32) -> Result<()> {
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    dev.launch(
        "fill_f32",
        linear(n),
        &[x.arg_mut(), KArg::F32(v), i64_arg(n)],
    )
}

/// dst[dst_off..+n] = src[src_off..+n]
pub(super) fn copy_range(
    dev: &Device,
    dst: &mut DeviceBuf<f32>,
    dst_off: usize,
    src: &DeviceBuf<f32>,
    src_off: usize,
    n: usize,
) -> Result<()> {
    if dst_off + n > dst.len() || src_off + n > src.len() {
        return Err(Error::shape(
            "copy_range",
            format!(
                "range of {n} at dst {dst_off} (len {}) / src {src_off} (len {})",
                dst.len(),
                src.len()
            ),
        ));
    }
    if n == 0 {
        return Ok(());
    }
    dev.launch(
        "copy_f32",
        linear(n),
        &[dst.arg_mut_at(dst_off), src.arg_at(src_off), i64_arg(n)],
    )
}

/// The runs of `c` from `src` copied into `dst` (`copy_rows_f32`), or added into it
/// when `add` (`add_rows_f32`), one launch.
pub(super) fn rows(
    dev: &Device,
    add: bool,
    dst: &mut DeviceBuf<f32>,
    src: &DeviceBuf<f32>,
    c: RowCopy,
) -> Result<()> {
    let (op, kernel) = if add {
        ("add_rows", "add_rows_f32")
    } else {
        ("copy_rows", "copy_rows_f32")
    };
    c.check(op, dst.len(), src.len())?;
    let n = c.rows * c.width;
    if n == 0 {
        return Ok(());
    }
    dev.launch(
        kernel,
        linear(n),
        &[
            dst.arg_mut_at(c.dst_off),
            src.arg_at(c.src_off),
            i64_arg(c.width),
            i64_arg(c.dst_stride),
            i64_arg(c.src_stride),
            i64_arg(n),
        ],
    )
}

pub(super) fn axpy(
    dev: &Device,
    dst: &mut DeviceBuf<f32>,
    alpha: f32,
    src: &DeviceBuf<f32>,
) -> Result<()> {
    check_len("axpy", "src", src.len(), dst.len())?;
    let n = dst.len();
    if n == 0 {
        return Ok(());
    }
    dev.launch(
        "axpy_f32",
        linear(n),
        &[dst.arg_mut(), src.arg(), KArg::F32(alpha), i64_arg(n)],
    )
}

/// The most terms one `add_terms_f32` launch adds.
const TERMS_PER_LAUNCH: usize = 4;

/// `dst = Σ terms`, or `dst += Σ terms` when `into`, added left to right (the bits of
/// [`crate::backend::Backend::add_into`]'s axpys): one launch per four operands, `dst`
/// the first operand of every launch after the first.
pub(super) fn add_terms(
    dev: &Device,
    op: &'static str,
    dst: &mut DeviceBuf<f32>,
    into: bool,
    terms: &[&DeviceBuf<f32>],
) -> Result<()> {
    let n = dst.len();
    check_terms(op, n, terms.iter().map(|t| t.len()))?;
    if n == 0 {
        return Ok(());
    }
    let (mut next, mut partial) = (0, into);
    while next < terms.len() {
        let y = dst.arg_mut();
        let mut ops = Vec::with_capacity(TERMS_PER_LAUNCH);
        if partial {
            ops.push(dst.arg());
        }
        while ops.len() < TERMS_PER_LAUNCH && next < terms.len() {
            ops.push(terms[next].arg());
            next += 1;
        }
        let nt = KArg::I32(ops.len() as i32);
        ops.resize(TERMS_PER_LAUNCH, KArg::Ptr(0));
        let mut args = vec![y];
        args.extend(ops);
        args.extend([nt, i64_arg(n)]);
        dev.launch("add_terms_f32", linear(n), &args)?;
        partial = true;
    }
    Ok(())
}

pub(super) fn scale(dev: &Device, x: &mut DeviceBuf<f32>, alpha: f32) -> Result<()> {
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    // scale_f32 reads x[i] before writing y[i]: in place is safe
    let (y, xa) = (x.arg_mut(), x.arg());
    dev.launch(
        "scale_f32",
        linear(n),
        &[y, xa, KArg::F32(alpha), i64_arg(n)],
    )
}

pub(super) fn act_fwd(
    dev: &Device,
    act: Act,
    x: &DeviceBuf<f32>,
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    check_len("act_fwd", "out", out.len(), x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    dev.launch(
        "act_fwd_f32",
        linear(x.len()),
        &[
            out.arg_mut(),
            x.arg(),
            KArg::I32(act_code(act)),
            i64_arg(x.len()),
        ],
    )
}

/// forward: out = act(x)  so: dx = act'(x)·dout (overwritten)
pub(super) fn act_bwd(
    dev: &Device,
    act: Act,
    x: &DeviceBuf<f32>,
    dout: &DeviceBuf<f32>,
    dx: &mut DeviceBuf<f32>,
) -> Result<()> {
    check_len("act_bwd", "dout", dout.len(), x.len())?;
    check_len("act_bwd", "dx", dx.len(), x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    dev.launch(
        "act_bwd_f32",
        linear(x.len()),
        &[
            dx.arg_mut(),
            x.arg(),
            dout.arg(),
            KArg::I32(act_code(act)),
            i64_arg(x.len()),
        ],
    )
}

pub(super) fn swiglu_fwd(
    dev: &Device,
    (gate, up): (&DeviceBuf<f32>, &DeviceBuf<f32>),
    at: GateUp,
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "swiglu_fwd";
    at.rows(OP, gate.len(), up.len(), out.len())?;
    let n = out.len();
    if n == 0 {
        return Ok(());
    }
    dev.launch(
        "swiglu_fwd_f32",
        linear(n),
        &[
            out.arg_mut(),
            gate.arg_at(at.gate.off),
            up.arg_at(at.up.off),
            i64_arg(n),
            i32_arg(OP, "W", at.w)?,
            i64_arg(at.gate.ld),
            i64_arg(at.up.ld),
        ],
    )
}

/// forward: out = silu(g)·u  so: du = silu(g)·dout, dg = silu'(g)·u·dout (overwritten)
pub(super) fn swiglu_bwd(
    dev: &Device,
    gate: &DeviceBuf<f32>,
    up: &DeviceBuf<f32>,
    dout: &DeviceBuf<f32>,
    dgate: &mut DeviceBuf<f32>,
    dup: &mut DeviceBuf<f32>,
) -> Result<()> {
    let n = gate.len();
    check_len("swiglu_bwd", "up", up.len(), n)?;
    check_len("swiglu_bwd", "dout", dout.len(), n)?;
    check_len("swiglu_bwd", "dgate", dgate.len(), n)?;
    check_len("swiglu_bwd", "dup", dup.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    dev.launch(
        "swiglu_bwd_f32",
        linear(n),
        &[
            dgate.arg_mut(),
            dup.arg_mut(),
            gate.arg(),
            up.arg(),
            dout.arg(),
            i64_arg(n),
        ],
    )
}

/// out (N,C) += bias (C)
pub(super) fn add_bias(
    dev: &Device,
    out: &mut DeviceBuf<f32>,
    bias: &DeviceBuf<f32>,
    c: usize,
) -> Result<()> {
    check_len("add_bias", "bias", bias.len(), c)?;
    let n = rows_of("add_bias", out.len(), c)?;
    if n == 0 {
        return Ok(());
    }
    dev.launch(
        "add_bias_f32",
        linear(n * c),
        &[
            out.arg_mut(),
            bias.arg(),
            i64_arg(n),
            i32_arg("add_bias", "C", c)?,
        ],
    )
}

/// acc (C) += Σ_rows x (N,C): bias and norm-weight gradients.
pub(super) fn col_sum(
    be: &DeviceBackend,
    op: &'static str,
    x: &DeviceBuf<f32>,
    acc: &mut DeviceBuf<f32>,
    c: usize,
) -> Result<()> {
    col_sums(be, op, &mut [(x, acc)], c)
}

/// [`col_sum`] of one or two (x, acc) pairs of one shape, in the launches of one: the
/// second pair runs on the grid's z (LayerNorm's weight and bias gradients).
pub(super) fn col_sums(
    be: &DeviceBackend,
    op: &'static str,
    pairs: &mut [(&DeviceBuf<f32>, &mut DeviceBuf<f32>)],
    c: usize,
) -> Result<()> {
    let dev = be.device();
    let Some((x, _)) = pairs.first() else {
        return Ok(());
    };
    if pairs.len() > 2 {
        return Err(Error::arg(op, "col_sums takes one or two pairs"));
    }
    let n = rows_of(op, x.len(), c)?;
    for (i, (x, acc)) in pairs.iter().enumerate() {
        check_len(op, "gradient (C)", acc.len(), c)?;
        check_len(op, &format!("rows of sum {i}"), x.len(), n * c)?;
    }
    let z = pairs.len() as u32;
    let blocks = u32::try_from(c.div_ceil(BLOCK as usize))
        .map_err(|_| Error::shape(op, format!("C = {c} too large")))?;
    // the second pair's pointers: the first's again when there is none (grid.z = 1
    // never reads them)
    let accs: Vec<KArg> = pairs.iter_mut().map(|(_, a)| a.arg_mut()).collect();
    let (acc0, acc1) = (accs[0], *accs.last().unwrap_or(&accs[0]));
    let (x0, x1) = (pairs[0].0.arg(), pairs[pairs.len() - 1].0.arg());
    // Few column blocks and many rows: chunks of rows (their sums in order), then the
    // chunks in order, so that a GPU has COL_SUM_BLOCKS blocks at work; one launch, in
    // which a column tile's last block to finish adds its chunks.
    let chunks = COL_SUM_BLOCKS
        .div_ceil(blocks as usize)
        .min(n / COL_SUM_MIN_ROWS);
    if chunks < 2 {
        return dev.launch(
            "col_sum_f32",
            LaunchCfg::new([blocks, 1, z], [BLOCK, 1, 1], 0),
            &[acc0, acc1, x0, x1, i64_arg(n), i32_arg(op, "C", c)?],
        );
    }
    let rows = n.div_ceil(chunks);
    let chunks = n.div_ceil(rows);
    let mut part = dev.uninit::<f32>(z as usize * chunks * c)?;
    be.inputs.counters(dev, (blocks * z) as usize, |done| {
        dev.launch(
            "col_sum_chunks_f32",
            LaunchCfg::new([blocks, chunks as u32, z], [BLOCK, 1, 1], 0),
            &[
                acc0,
                acc1,
                part.arg_mut(),
                done.arg_mut(),
                x0,
                x1,
                i64_arg(n),
                i32_arg(op, "C", c)?,
                i32_arg(op, "rows per chunk", rows)?,
            ],
        )
    })
}

/// Blocks `col_sum` aims for, and the fewest rows worth a chunk of their own.
const COL_SUM_BLOCKS: usize = 512;
const COL_SUM_MIN_ROWS: usize = 16;

pub(super) fn adamw(
    dev: &Device,
    h: &AdamWStep,
    param: &mut DeviceBuf<f32>,
    grad: &DeviceBuf<f32>,
    m: &mut DeviceBuf<f32>,
    v: &mut DeviceBuf<f32>,
) -> Result<()> {
    let n = param.len();
    check_len("adamw_step", "grad", grad.len(), n)?;
    check_len("adamw_step", "m", m.len(), n)?;
    check_len("adamw_step", "v", v.len(), n)?;
    if h.step == 0 {
        return Err(Error::arg("adamw_step", "step numbers start at 1"));
    }
    if n == 0 {
        return Ok(());
    }
    let mut args = vec![param.arg_mut(), m.arg_mut(), v.arg_mut(), grad.arg()];
    args.extend(adamw_args(h));
    args.push(i64_arg(n));
    dev.launch("adamw_f32", linear(n), &args)
}

/// The step's scalars as the AdamW kernels take them: lr, β1, β2, ε, weight decay and the
/// bias corrections `1 − β1^t`, `1 − β2^t`, computed as the CPU backend does (f32 `powi`).
pub(super) fn adamw_args(h: &AdamWStep) -> [KArg; 7] {
    let c1 = 1.0 - h.beta1.powi(h.step as i32);
    let c2 = 1.0 - h.beta2.powi(h.step as i32);
    [h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, c1, c2].map(KArg::F32)
}
