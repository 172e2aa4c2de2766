//! The pixel decoder's image ops (im2col, depth-to-space, bilinear resize, per-row
//! scale, the mask losses): launches of `kernels/image.cu`.  CPU twins:
//! `src/backend/image.rs`, whose size checks these share.
//!
//! Feature maps are channels-last (B,H,W,C); sizes as in `kernels/image.cu`.  The layout
//! ops run on 2-D blocks: x over one pixel's channels (float4s when the run is a
//! multiple of 4 floats), y over pixels; the grid names (pixel run, row, image).
use super::{i32_arg, i64_arg, linear, norm::per_row, BLOCK};
use crate::backend::image::{check_d2s, check_masks, check_resize, DICE_EPS, DICE_SCALE};
use crate::backend::{Conv2dGeom, MaskLosses};
use crate::error::{check_len, Error, Result};
use crate::kernels::{Device, DeviceBuf, KArg, LaunchCfg};

/// (B, H, W, C) of a layout op's input side.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

/// The most blocks along grid.y and grid.z; the kernels loop over more rows or images.
const GRID_YZ: usize = 65_535;
/// Room the kernels' int loop counters need past a size: a grid.y / grid.z step or a
/// block row's float4 step.
const STEP_ROOM: usize = 1 << 17;

/// `n` as a kernel int that a loop may step past by up to [`STEP_ROOM`] without wrapping.
fn int_arg(op: &'static str, what: &str, n: usize) -> Result<KArg> {
    if n > i32::MAX as usize - STEP_ROOM {
        return Err(Error::shape(
            op,
            format!("{what} = {n} does not fit a 32-bit int"),
        ));
    }
    i32_arg(op, what, n)
}

/// The launch of a layout kernel: `run` floats per pixel (float4 units when a multiple
/// of 4), `pixels` pixels per row along grid.x (blockDim.y of them per block), `rows`
/// rows along grid.y and `images` along grid.z (both capped at [`GRID_YZ`]).
fn pixel_launch(
    op: &'static str,
    run: usize,
    pixels: usize,
    rows: usize,
    images: usize,
) -> Result<LaunchCfg> {
    let units = if run.is_multiple_of(4) { run / 4 } else { run };
    let bx = units.clamp(1, BLOCK as usize);
    let by = (BLOCK as usize / bx).min(pixels).max(1);
    let gx = u32::try_from(pixels.div_ceil(by))
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| Error::shape(op, format!("{pixels} pixels do not fit one grid")))?;
    let cap = |n: usize| n.clamp(1, GRID_YZ) as u32;
    Ok(LaunchCfg::new(
        [gx, cap(rows), cap(images)],
        [bx as u32, by as u32, 1],
        0,
    ))
}

/// The geometry as the kernels' ints: B, H, W, C, K, pad, Ho, Wo (and the runs the
/// kernels index by int: a column row K·K·C, and H + 2·pad + K).
fn conv_args(op: &'static str, g: &Conv2dGeom, ho: usize, wo: usize) -> Result<Vec<KArg>> {
    int_arg(op, "K·K·C", g.col_width())?;
    int_arg(op, "H + 2·pad + K", g.h.max(g.w) + 2 * g.pad + g.k)?;
    [
        ("B", g.b),
        ("H", g.h),
        ("W", g.w),
        ("C", g.c),
        ("K", g.k),
        ("pad", g.pad),
        ("Ho", ho),
        ("Wo", wo),
    ]
    .into_iter()
    .map(|(what, n)| int_arg(op, what, n))
    .collect()
}

/// x (B,H,W,C) → out (B,Ho,Wo,K·K·C), zero padding.
pub(super) fn im2col(
    dev: &Device,
    x: &DeviceBuf<f32>,
    g: &Conv2dGeom,
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "im2col";
    let (ho, wo) = g.out_hw()?;
    check_len(OP, "x", x.len(), g.b * g.h * g.w * g.c)?;
    check_len(OP, "out", out.len(), g.b * ho * wo * g.col_width())?;
    if out.is_empty() {
        return Ok(());
    }
    let mut args = vec![out.arg_mut(), x.arg()];
    args.extend(conv_args(OP, g, ho, wo)?);
    // one output pixel per thread row: K·K runs of C floats
    dev.launch("im2col_f32", pixel_launch(OP, g.c, wo, ho, g.b)?, &args)
}

/// dout (B,Ho,Wo,K·K·C) → dx (B,H,W,C), overwritten.
pub(super) fn im2col_bwd(
    dev: &Device,
    dout: &DeviceBuf<f32>,
    g: &Conv2dGeom,
    dx: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "im2col_bwd";
    let (ho, wo) = g.out_hw()?;
    check_len(OP, "dout", dout.len(), g.b * ho * wo * g.col_width())?;
    check_len(OP, "dx", dx.len(), g.b * g.h * g.w * g.c)?;
    if dx.is_empty() {
        return Ok(());
    }
    let mut args = vec![dx.arg_mut(), dout.arg()];
    args.extend(conv_args(OP, g, ho, wo)?);
    // one input pixel per thread row, summing its K² taps
    dev.launch(
        "im2col_bwd_f32",
        pixel_launch(OP, g.c, g.w, g.h, g.b)?,
        &args,
    )
}

/// `kernel` (the forward or its inverse permutation) from `src` into `dst`, both of
/// B·H·W·r·r·C elements.
fn launch_d2s(
    dev: &Device,
    op: &'static str,
    kernel: &str,
    (d, r): (Dims, usize),
    src: &DeviceBuf<f32>,
    dst: &mut DeviceBuf<f32>,
) -> Result<()> {
    check_d2s(op, r)?;
    let n = d.b * d.h * d.w * r * r * d.c;
    check_len(op, "input", src.len(), n)?;
    check_len(op, "output", dst.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    // the kernels index a run of r·C floats and the r·H output rows by int
    int_arg(op, "r·C", r * d.c)?;
    int_arg(op, "r·H", r * d.h)?;
    // one run of r·C floats (an input pixel's channels (dy, ·, ·)) per thread row
    let cfg = pixel_launch(op, r * d.c, d.w, r * d.h, d.b)?;
    dev.launch(
        kernel,
        cfg,
        &[
            dst.arg_mut(),
            src.arg(),
            int_arg(op, "B", d.b)?,
            int_arg(op, "H", d.h)?,
            int_arg(op, "W", d.w)?,
            int_arg(op, "C", d.c)?,
            int_arg(op, "r", r)?,
        ],
    )
}

/// x (B,H,W,r·r·C) → out (B,r·H,r·W,C); input channels ordered (dy, dx, c).
pub(super) fn depth_to_space(
    dev: &Device,
    x: &DeviceBuf<f32>,
    d: Dims,
    r: usize,
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    launch_d2s(dev, "depth_to_space", "depth_to_space_f32", (d, r), x, out)
}

/// dout (B,r·H,r·W,C) → dx (B,H,W,r·r·C), overwritten.
pub(super) fn depth_to_space_bwd(
    dev: &Device,
    dout: &DeviceBuf<f32>,
    d: Dims,
    r: usize,
    dx: &mut DeviceBuf<f32>,
) -> Result<()> {
    launch_d2s(
        dev,
        "depth_to_space_bwd",
        "depth_to_space_bwd_f32",
        (d, r),
        dout,
        dx,
    )
}

/// B, H, W, C, Ho, Wo as the kernels' ints (and the rows W·C, Wo·C they index by int).
fn resize_args(op: &'static str, d: Dims, ho: usize, wo: usize) -> Result<Vec<KArg>> {
    int_arg(op, "W·C", d.w * d.c)?;
    int_arg(op, "Wo·C", wo * d.c)?;
    [d.b, d.h, d.w, d.c, ho, wo]
        .into_iter()
        .zip(["B", "H", "W", "C", "Ho", "Wo"])
        .map(|(n, what)| int_arg(op, what, n))
        .collect()
}

/// Output rows per block of `resize_bilinear_f32` (`RESIZE_ROWS` there).
const RESIZE_ROWS: usize = 16;
/// x (B,H,W,C) → out (B,Ho,Wo,C), `align_corners=False`.
pub(super) fn resize_bilinear(
    dev: &Device,
    x: &DeviceBuf<f32>,
    d: Dims,
    ho: usize,
    wo: usize,
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "resize_bilinear";
    check_resize(OP, x.len(), out.len(), d.b, d.h, d.w, d.c, ho, wo)?;
    if out.is_empty() {
        return Ok(());
    }
    let mut args = vec![out.arg_mut(), x.arg()];
    args.extend(resize_args(OP, d, ho, wo)?);
    // an output column per thread row, down a band of RESIZE_ROWS rows
    let cfg = pixel_launch(OP, d.c, wo, ho.div_ceil(RESIZE_ROWS), d.b)?;
    dev.launch("resize_bilinear_f32", cfg, &args)
}

/// dout (B,Ho,Wo,C) → dx (B,H,W,C), overwritten: the tap tables into scratch, then two
/// passes that sum along y (reading dout row by row) and then x.
pub(super) fn resize_bilinear_bwd(
    dev: &Device,
    dout: &DeviceBuf<f32>,
    d: Dims,
    ho: usize,
    wo: usize,
    dx: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "resize_bilinear_bwd";
    check_resize(OP, dx.len(), dout.len(), d.b, d.h, d.w, d.c, ho, wo)?;
    if dx.is_empty() {
        return Ok(());
    }
    let dims = resize_args(OP, d, ho, wo)?;
    // Tap (4 floats) per output coordinate, Reach (2) per input coordinate
    let mut tab = dev.uninit::<f32>(4 * (ho + wo) + 2 * (d.h + d.w))?;
    dev.launch(
        "resize_taps_f32",
        linear(ho + wo + d.h + d.w),
        &[tab.arg_mut(), dims[1], dims[4], dims[2], dims[5]],
    )?;
    // along y into t (B,H,Wo,C), then along x into dx: a column per thread row
    let mut t = dev.uninit::<f32>(d.b * d.h * wo * d.c)?;
    let mut args = vec![t.arg_mut(), dout.arg(), tab.arg()];
    args.extend(dims.iter().copied());
    dev.launch(
        "resize_bilinear_bwd_y_f32",
        pixel_launch(OP, d.c, wo, d.h, d.b)?,
        &args,
    )?;
    let mut args = vec![dx.arg_mut(), t.arg(), tab.arg()];
    args.extend(dims);
    dev.launch(
        "resize_bilinear_bwd_x_f32",
        pixel_launch(OP, d.c, d.w, d.h, d.b)?,
        &args,
    )
}

/// out (N,C) = x (N,C) · g (N).
pub(super) fn mul_rows(
    dev: &Device,
    x: &DeviceBuf<f32>,
    g: &DeviceBuf<f32>,
    c: usize,
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    launch_mul_rows(dev, "mul_rows", x, g, c, out)
}

fn launch_mul_rows(
    dev: &Device,
    op: &'static str,
    x: &DeviceBuf<f32>,
    g: &DeviceBuf<f32>,
    c: usize,
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    let n = g.len();
    check_len(op, "x", x.len(), n * c)?;
    check_len(op, "out", out.len(), n * c)?;
    if n * c == 0 {
        return Ok(());
    }
    // a row per thread row
    dev.launch(
        "mul_rows_f32",
        pixel_launch(op, c, n, 1, 1)?,
        &[
            out.arg_mut(),
            x.arg(),
            g.arg(),
            i64_arg(n),
            int_arg(op, "C", c)?,
        ],
    )
}

/// dx (N,C) = dout·g, dg (N) = Σ_i dout·x; both overwritten.
#[allow(clippy::too_many_arguments)]
pub(super) fn mul_rows_bwd(
    dev: &Device,
    x: &DeviceBuf<f32>,
    g: &DeviceBuf<f32>,
    dout: &DeviceBuf<f32>,
    c: usize,
    dx: &mut DeviceBuf<f32>,
    dg: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "mul_rows_bwd";
    let n = g.len();
    check_len(OP, "x", x.len(), n * c)?;
    check_len(OP, "dg", dg.len(), n)?;
    // forward: out = x·g (row-broadcast), so dx = dout·g: the forward op on dout
    launch_mul_rows(dev, OP, dout, g, c, dx)?;
    if n == 0 {
        return Ok(());
    }
    if c == 0 {
        return super::elementwise::fill(dev, dg, 0.0);
    }
    let (cfg, n_arg, c_arg) = per_row(OP, n, c)?;
    dev.launch(
        "mul_rows_bwd_dg_f32",
        cfg,
        &[dg.arg_mut(), x.arg(), dout.arg(), n_arg, c_arg],
    )
}

/// Pixels per block of `mask_loss_part_f32` (a multiple of 4): 64 masks of 1024² give
/// 8192 blocks, a 64² mask one.
const MASK_LOSS_CHUNK: usize = 8 * 4 * BLOCK as usize;

/// The per-mask loss sums (M, 4) and (BCE, Dice) pairs (M, 2), on the device: the chunk
/// partials of `mask_loss_part_f32`, added in order by `mask_loss_finish_f32`.
fn mask_loss_sums(
    dev: &Device,
    op: &'static str,
    logits: &DeviceBuf<f32>,
    target: &DeviceBuf<f32>,
    m: usize,
    p: usize,
) -> Result<(DeviceBuf<f32>, DeviceBuf<f32>)> {
    let chunks = p.div_ceil(MASK_LOSS_CHUNK).max(1);
    let my = u32::try_from(m)
        .ok()
        .filter(|&g| g <= 65_535)
        .ok_or_else(|| Error::shape(op, format!("{m} masks do not fit one grid")))?;
    let mut part = dev.uninit::<f32>(4 * m * chunks)?;
    let mut sums = dev.uninit::<f32>(4 * m)?;
    let mut out = dev.uninit::<f32>(2 * m)?;
    dev.launch(
        "mask_loss_part_f32",
        LaunchCfg::new([chunks as u32, my, 1], [BLOCK, 1, 1], 0),
        &[
            part.arg_mut(),
            logits.arg(),
            target.arg(),
            i32_arg(op, "P", p)?,
            KArg::I32(MASK_LOSS_CHUNK as i32),
            KArg::F32(DICE_SCALE as f32),
        ],
    )?;
    dev.launch(
        "mask_loss_finish_f32",
        LaunchCfg::new([my, 1, 1], [32, 1, 1], 0),
        &[
            out.arg_mut(),
            sums.arg_mut(),
            part.arg(),
            KArg::I32(chunks as i32),
            i32_arg(op, "P", p)?,
            KArg::F32(DICE_EPS as f32),
        ],
    )?;
    Ok((sums, out))
}

/// Per mask of logits (M,P) against target (M,P): (BCE averaged over the pixels, Dice
/// loss), computed on the device; the 2·M values are the one download.
pub(super) fn mask_loss_fwd(
    dev: &Device,
    logits: &DeviceBuf<f32>,
    target: &DeviceBuf<f32>,
    m: usize,
    p: usize,
) -> Result<MaskLosses<f32, DeviceBuf<f32>>> {
    const OP: &str = "mask_loss_fwd";
    check_masks(OP, logits.len(), target.len(), m, p)?;
    if m == 0 {
        return Ok(MaskLosses {
            losses: Vec::new(),
            sums: dev.zeros(0)?,
        });
    }
    let (sums, out) = mask_loss_sums(dev, OP, logits, target, m, p)?;
    let losses = dev
        .download(&out)?
        .chunks_exact(2)
        .map(|v| (v[0], v[1]))
        .collect();
    Ok(MaskLosses { losses, sums })
}

/// dlogits (M,P) = d(Σ_masks w_bce·bce + w_dice·dice)/dlogits, overwritten; `sums` (M, 4)
/// = the forward's, so one pass reads logits and target once and writes dlogits.
#[allow(clippy::too_many_arguments)]
pub(super) fn mask_loss_bwd(
    dev: &Device,
    logits: &DeviceBuf<f32>,
    target: &DeviceBuf<f32>,
    sums: &DeviceBuf<f32>,
    m: usize,
    p: usize,
    w_bce: f32,
    w_dice: f32,
    dlogits: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "mask_loss_bwd";
    check_masks(OP, logits.len(), target.len(), m, p)?;
    check_len(OP, "sums", sums.len(), 4 * m)?;
    check_len(OP, "dlogits", dlogits.len(), m * p)?;
    if m == 0 {
        return Ok(());
    }
    // four pixels per thread
    let gx = u32::try_from(p.div_ceil(4 * BLOCK as usize))
        .map_err(|_| Error::shape(OP, format!("P = {p} does not fit one grid")))?;
    dev.launch(
        "mask_loss_bwd_f32",
        LaunchCfg::new([gx, m as u32, 1], [BLOCK, 1, 1], 0),
        &[
            dlogits.arg_mut(),
            logits.arg(),
            target.arg(),
            sums.arg(),
            i32_arg(OP, "P", p)?,
            KArg::F32(w_bce),
            KArg::F32(w_dice),
            KArg::F32(DICE_SCALE as f32),
            KArg::F32(DICE_EPS as f32),
        ],
    )
}
