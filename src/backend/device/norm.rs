//! RMSNorm and LayerNorm: launches of `kernels/norm.cu`.  CPU twin: `src/backend/cpu/norm.rs`.
use super::{
    elementwise::{col_sum, col_sums},
    i32_arg, i64_arg, rows_of, DeviceBackend, BLOCK,
};
use crate::error::{check_len, Error, Result};
use crate::kernels::{Device, DeviceBuf, KArg, LaunchCfg};

/// Rows of at most this many floats go one to a warp, [`BLOCK`] / 32 rows to a block;
/// longer rows one to a block of [`BLOCK`] threads (`kernels/common.cuh`: `row_index`,
/// `row_sum`).  At the bound a lane walks 32 floats of its row; LLaMA-7B's 4096-wide
/// norms take the block.  A 64-channel LayerNorm2d row on a whole block left 3/4 of its
/// threads idle and waited at two barriers per sum.  The bound is a choice, not yet timed
/// on a GPU.
const WARP_ROW_MAX: usize = 1024;

/// The launch of a row kernel over `n` rows of `c` floats, and its last two arguments,
/// `n` (`long long`) and `C` (`int`).
pub(super) fn per_row(op: &'static str, n: usize, c: usize) -> Result<(LaunchCfg, KArg, KArg)> {
    let (bx, by) = if c <= WARP_ROW_MAX {
        (32, BLOCK / 32)
    } else {
        (BLOCK, 1)
    };
    let g = u32::try_from(n.div_ceil(by as usize))
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| Error::shape(op, format!("{n} rows do not fit one grid")))?;
    let cfg = LaunchCfg::new([g, 1, 1], [bx, by, 1], 0);
    Ok((cfg, i64_arg(n), i32_arg(op, "C", c)?))
}

fn opt(b: Option<&DeviceBuf<f32>>) -> KArg {
    b.map_or(KArg::Ptr(0), |x| x.arg())
}

/// x (N,C), w (C) or None → out (N,C), rstd (N)
#[allow(clippy::too_many_arguments)]
pub(super) fn rmsnorm_fwd(
    dev: &Device,
    x: &DeviceBuf<f32>,
    w: Option<&DeviceBuf<f32>>,
    eps: f32,
    c: usize,
    out: &mut DeviceBuf<f32>,
    rstd: &mut DeviceBuf<f32>,
) -> Result<()> {
    let n = rows_of("rmsnorm_fwd", x.len(), c)?;
    check_len("rmsnorm_fwd", "out", out.len(), n * c)?;
    check_len("rmsnorm_fwd", "rstd", rstd.len(), n)?;
    if let Some(w) = w {
        check_len("rmsnorm_fwd", "weight", w.len(), c)?;
    }
    if n == 0 {
        return Ok(());
    }
    let (cfg, n_arg, c_arg) = per_row("rmsnorm_fwd", n, c)?;
    dev.launch(
        "rmsnorm_fwd_f32",
        cfg,
        &[
            out.arg_mut(),
            rstd.arg_mut(),
            x.arg(),
            opt(w),
            KArg::F32(eps),
            n_arg,
            c_arg,
        ],
    )
}

/// sum = x + a (N,C), then out (N,C), rstd (N) as [`rmsnorm_fwd`] gives them for sum.
#[allow(clippy::too_many_arguments)]
pub(super) fn add_rmsnorm_fwd(
    dev: &Device,
    x: &DeviceBuf<f32>,
    a: &DeviceBuf<f32>,
    w: Option<&DeviceBuf<f32>>,
    eps: f32,
    c: usize,
    sum: &mut DeviceBuf<f32>,
    out: &mut DeviceBuf<f32>,
    rstd: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "add_rmsnorm_fwd";
    let n = rows_of(OP, x.len(), c)?;
    check_len(OP, "a", a.len(), n * c)?;
    check_len(OP, "sum", sum.len(), n * c)?;
    check_len(OP, "out", out.len(), n * c)?;
    check_len(OP, "rstd", rstd.len(), n)?;
    if let Some(w) = w {
        check_len(OP, "weight", w.len(), c)?;
    }
    if n == 0 {
        return Ok(());
    }
    let (cfg, n_arg, c_arg) = per_row(OP, n, c)?;
    dev.launch(
        "add_rmsnorm_fwd_f32",
        cfg,
        &[
            sum.arg_mut(),
            out.arg_mut(),
            rstd.arg_mut(),
            x.arg(),
            a.arg(),
            opt(w),
            KArg::F32(eps),
            n_arg,
            c_arg,
        ],
    )
}

/// dx (N,C) overwritten; dw (C) += Σ_rows dout·x·rstd (None = frozen).
#[allow(clippy::too_many_arguments)]
pub(super) fn rmsnorm_bwd(
    be: &DeviceBackend,
    dout: &DeviceBuf<f32>,
    x: &DeviceBuf<f32>,
    w: Option<&DeviceBuf<f32>>,
    rstd: &DeviceBuf<f32>,
    c: usize,
    dx: &mut DeviceBuf<f32>,
    dw: Option<&mut DeviceBuf<f32>>,
) -> Result<()> {
    let dev = be.device();
    let n = rows_of("rmsnorm_bwd", x.len(), c)?;
    check_len("rmsnorm_bwd", "dout", dout.len(), n * c)?;
    check_len("rmsnorm_bwd", "dx", dx.len(), n * c)?;
    check_len("rmsnorm_bwd", "rstd", rstd.len(), n)?;
    if let Some(w) = w {
        check_len("rmsnorm_bwd", "weight", w.len(), c)?;
    }
    if let Some(dw) = &dw {
        check_len("rmsnorm_bwd", "dweight", dw.len(), c)?;
    }
    if n == 0 {
        return Ok(());
    }
    // the per-row dw terms, summed over rows in a fixed order by col_sum
    let mut terms = match dw {
        Some(_) => Some(dev.uninit::<f32>(n * c)?),
        None => None,
    };
    let terms_arg = terms.as_mut().map_or(KArg::Ptr(0), |t| t.arg_mut());
    let (cfg, n_arg, c_arg) = per_row("rmsnorm_bwd", n, c)?;
    dev.launch(
        "rmsnorm_bwd_f32",
        cfg,
        &[
            dx.arg_mut(),
            terms_arg,
            dout.arg(),
            x.arg(),
            opt(w),
            rstd.arg(),
            n_arg,
            c_arg,
        ],
    )?;
    if let (Some(dw), Some(t)) = (dw, &terms) {
        col_sum(be, "rmsnorm_bwd", t, dw, c)?;
    }
    Ok(())
}

/// x (N,C), w, b (C) → out (N,C), mean, rstd (N).  With `added` = (a, sum), the norm of
/// x + a, the sum written to `sum` (N,C): a residual add and the norm after it in one
/// launch.
#[allow(clippy::too_many_arguments)]
pub(super) fn layernorm_fwd(
    dev: &Device,
    x: &DeviceBuf<f32>,
    added: Option<(&DeviceBuf<f32>, &mut DeviceBuf<f32>)>,
    w: &DeviceBuf<f32>,
    b: &DeviceBuf<f32>,
    eps: f32,
    c: usize,
    out: &mut DeviceBuf<f32>,
    mean: &mut DeviceBuf<f32>,
    rstd: &mut DeviceBuf<f32>,
) -> Result<()> {
    let op = if added.is_some() {
        "add_layernorm_fwd"
    } else {
        "layernorm_fwd"
    };
    let n = rows_of(op, x.len(), c)?;
    if let Some((a, sum)) = &added {
        check_len(op, "a", a.len(), n * c)?;
        check_len(op, "sum", sum.len(), n * c)?;
    }
    check_len(op, "out", out.len(), n * c)?;
    check_len(op, "mean", mean.len(), n)?;
    check_len(op, "rstd", rstd.len(), n)?;
    check_len(op, "weight", w.len(), c)?;
    check_len(op, "bias", b.len(), c)?;
    if n == 0 {
        return Ok(());
    }
    let (cfg, n_arg, c_arg) = per_row(op, n, c)?;
    let stats = [out.arg_mut(), mean.arg_mut(), rstd.arg_mut(), x.arg()];
    let tail = [w.arg(), b.arg(), KArg::F32(eps), n_arg, c_arg];
    match added {
        None => dev.launch("layernorm_fwd_f32", cfg, &[&stats[..], &tail].concat()),
        Some((a, sum)) => dev.launch(
            "add_layernorm_fwd_f32",
            cfg,
            &[&[sum.arg_mut()], &stats[..], &[a.arg()], &tail].concat(),
        ),
    }
}

/// The statistics a LayerNorm backward reads: w (C), mean and rstd (N).
pub(super) struct LnSaved<'a> {
    pub w: &'a DeviceBuf<f32>,
    pub mean: &'a DeviceBuf<f32>,
    pub rstd: &'a DeviceBuf<f32>,
}

/// dx (N,C) overwritten; dw, db (C) += (None = frozen).
#[allow(clippy::too_many_arguments)]
pub(super) fn layernorm_bwd(
    be: &DeviceBackend,
    dout: &DeviceBuf<f32>,
    x: &DeviceBuf<f32>,
    s: LnSaved<'_>,
    c: usize,
    dx: &mut DeviceBuf<f32>,
    dw: Option<&mut DeviceBuf<f32>>,
    db: Option<&mut DeviceBuf<f32>>,
) -> Result<()> {
    const OP: &str = "layernorm_bwd";
    let dev = be.device();
    let n = rows_of(OP, x.len(), c)?;
    check_len(OP, "dout", dout.len(), n * c)?;
    check_len(OP, "dx", dx.len(), n * c)?;
    check_len(OP, "weight", s.w.len(), c)?;
    check_len(OP, "mean", s.mean.len(), n)?;
    check_len(OP, "rstd", s.rstd.len(), n)?;
    if let Some(dw) = &dw {
        check_len(OP, "dweight", dw.len(), c)?;
    }
    if let Some(db) = &db {
        check_len(OP, "dbias", db.len(), c)?;
    }
    if n == 0 {
        return Ok(());
    }
    let mut terms = match dw {
        Some(_) => Some(dev.uninit::<f32>(n * c)?),
        None => None,
    };
    let terms_arg = terms.as_mut().map_or(KArg::Ptr(0), |t| t.arg_mut());
    let (cfg, n_arg, c_arg) = per_row(OP, n, c)?;
    dev.launch(
        "layernorm_bwd_f32",
        cfg,
        &[
            dx.arg_mut(),
            terms_arg,
            dout.arg(),
            x.arg(),
            s.w.arg(),
            s.mean.arg(),
            s.rstd.arg(),
            n_arg,
            c_arg,
        ],
    )?;
    // dw and db in the same launches
    let mut sums = Vec::with_capacity(2);
    if let (Some(dw), Some(t)) = (dw, &terms) {
        sums.push((t, dw));
    }
    if let Some(db) = db {
        sums.push((dout, db));
    }
    col_sums(be, OP, &mut sums, c)
}
