//! The pixel decoder's image ops (`im2col`, `depth_to_space`, bilinear resize,
//! `mul_rows`, the mask losses) on the device backend.  They have no kernels yet: each
//! stages its inputs to the host, runs the CPU body (`backend/image.rs`, the twin the
//! kernels will be tested against) and uploads the result.  Correct on every device, and
//! the copies show in `Device::copies()`; writing these as kernels is the open part of
//! the device backend.
use crate::backend::{image, Conv2dGeom};
use crate::error::{check_len, Result};
use crate::kernels::{Device, DeviceBuf};

/// Downloads `x`.
fn host(dev: &Device, x: &DeviceBuf<f32>) -> Result<Vec<f32>> {
    dev.download(x)
}

/// Runs `f` on a host copy of `out` (filled by `f`), then uploads it over `out`.
fn into(
    dev: &Device,
    out: &mut DeviceBuf<f32>,
    f: impl FnOnce(&mut Vec<f32>) -> Result<()>,
) -> Result<()> {
    let mut h = vec![0f32; out.len()];
    f(&mut h)?;
    let up = dev.upload(&h)?;
    check_len("device image op", "result", up.len(), out.len())?;
    *out = up;
    Ok(())
}

pub(super) fn im2col(
    dev: &Device,
    x: &DeviceBuf<f32>,
    g: &Conv2dGeom,
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    let x = host(dev, x)?;
    into(dev, out, |o| image::im2col(&x, g, o))
}

pub(super) fn im2col_bwd(
    dev: &Device,
    dout: &DeviceBuf<f32>,
    g: &Conv2dGeom,
    dx: &mut DeviceBuf<f32>,
) -> Result<()> {
    let d = host(dev, dout)?;
    into(dev, dx, |o| image::im2col_bwd(&d, g, o))
}

/// (B, H, W, C) sizes and the factor or output size of a layout op.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

pub(super) fn depth_to_space(
    dev: &Device,
    x: &DeviceBuf<f32>,
    d: Dims,
    r: usize,
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    let x = host(dev, x)?;
    into(dev, out, |o| {
        image::depth_to_space(&x, d.b, d.h, d.w, d.c, r, o)
    })
}

pub(super) fn depth_to_space_bwd(
    dev: &Device,
    dout: &DeviceBuf<f32>,
    d: Dims,
    r: usize,
    dx: &mut DeviceBuf<f32>,
) -> Result<()> {
    let g = host(dev, dout)?;
    into(dev, dx, |o| {
        image::depth_to_space_bwd(&g, d.b, d.h, d.w, d.c, r, o)
    })
}

pub(super) fn resize_bilinear(
    dev: &Device,
    x: &DeviceBuf<f32>,
    d: Dims,
    ho: usize,
    wo: usize,
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    let x = host(dev, x)?;
    into(dev, out, |o| {
        image::resize_bilinear(&x, d.b, d.h, d.w, d.c, ho, wo, o)
    })
}

pub(super) fn resize_bilinear_bwd(
    dev: &Device,
    dout: &DeviceBuf<f32>,
    d: Dims,
    ho: usize,
    wo: usize,
    dx: &mut DeviceBuf<f32>,
) -> Result<()> {
    let g = host(dev, dout)?;
    into(dev, dx, |o| {
        image::resize_bilinear_bwd(&g, d.b, d.h, d.w, d.c, ho, wo, o)
    })
}

pub(super) fn mul_rows(
    dev: &Device,
    x: &DeviceBuf<f32>,
    g: &DeviceBuf<f32>,
    c: usize,
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    let (x, g) = (host(dev, x)?, host(dev, g)?);
    into(dev, out, |o| image::mul_rows(&x, &g, c, o))
}

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
    let (x, g, d) = (host(dev, x)?, host(dev, g)?, host(dev, dout)?);
    let mut hg = vec![0f32; dg.len()];
    into(dev, dx, |o| image::mul_rows_bwd(&x, &g, &d, c, o, &mut hg))?;
    into(dev, dg, |o| {
        o.copy_from_slice(&hg);
        Ok(())
    })
}

pub(super) fn mask_loss_fwd(
    dev: &Device,
    logits: &DeviceBuf<f32>,
    target: &DeviceBuf<f32>,
    m: usize,
    p: usize,
) -> Result<Vec<(f32, f32)>> {
    image::mask_loss_fwd(&host(dev, logits)?, &host(dev, target)?, m, p)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn mask_loss_bwd(
    dev: &Device,
    logits: &DeviceBuf<f32>,
    target: &DeviceBuf<f32>,
    m: usize,
    p: usize,
    w_bce: f32,
    w_dice: f32,
    dlogits: &mut DeviceBuf<f32>,
) -> Result<()> {
    let (l, t) = (host(dev, logits)?, host(dev, target)?);
    into(dev, dlogits, |o| {
        image::mask_loss_bwd(&l, &t, m, p, w_bce, w_dice, o)
    })
}
