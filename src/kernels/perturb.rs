//! Noise perturbation (Sec. 3.2, Alg. 1): `Np` perturbed copies of a batch of images in
//! one launch.  Copy `k` of image `b` gets Gaussian noise of std `σ` added inside one
//! random rectangle; outside it the copy equals the image.  Kernel
//! `perturb_fwd_f32` in `kernels/perturb.cu`; CPU twin [`perturb_cpu`].
//!
//! NP copies, B images, C channels, H × W pixels, E = C·H·W elements per image.
//!
//! Randomness is Philox4x32-10 ([`super::philox`]) keyed by the 64-bit seed:
//! - rectangle of (copy, image): counter `(image, 0, copy, "RECT")`, the four words
//!   giving height, width, top and left;
//! - noise of elements `4g .. 4g+3` of image `b` in copy `k`: counter
//!   `(g, b, copy, "NOIS")`, Box–Muller on words (0,1) and (2,3).
//!
//! with `copy = first_copy + k`, so a caller that needs more copies (the regenerate
//! loop of Alg. 1) asks for `first_copy = Np, 2·Np, …` and never repeats a draw.  The
//! noise is not clamped: images are in the model's normalized space.
use super::philox::{box_muller, philox4x32_10};
use crate::error::{check_len, Error, Result};
use crate::kernels::{Device, DeviceBuf, KArg, LaunchCfg};
use rayon::prelude::*;

/// Counter word 3 of the rectangle draws ("RECT"), as in `perturb.cu`.
pub const DOMAIN_RECT: u32 = 0x5245_4354;
/// Counter word 3 of the noise draws ("NOIS"), as in `perturb.cu`.
pub const DOMAIN_NOISE: u32 = 0x4E4F_4953;
/// Threads per block of `perturb_fwd_f32` (each thread handles four elements).
const BLOCK: u32 = 256;
/// CUDA's limit on `gridDim.y`, which indexes (copy, image).
const MAX_GRID_Y: usize = 65_535;

/// What to draw: copies, noise level, rectangle size ranges (pixels, inclusive), seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PerturbCfg {
    /// Number of perturbed copies (`Np`; 30 in the paper).
    pub np: usize,
    /// Standard deviation of the Gaussian noise.
    pub sigma: f32,
    /// Rectangle height range `[min, max]`, 1 ≤ min ≤ max ≤ H.
    pub rect_h: (usize, usize),
    /// Rectangle width range `[min, max]`, 1 ≤ min ≤ max ≤ W.
    pub rect_w: (usize, usize),
    /// Generator key.
    pub seed: u64,
    /// Index of the first copy in the counter space (see module docs).
    pub first_copy: u32,
}

/// One noise rectangle: rows `y0 .. y0+h`, columns `x0 .. x0+w`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Rect {
    /// Top row, in pixels.
    pub y0: usize,
    /// Left column, in pixels.
    pub x0: usize,
    /// Height in pixels.
    pub h: usize,
    /// Width in pixels.
    pub w: usize,
}

impl Rect {
    fn from_i32(r: &[i32]) -> Rect {
        Rect {
            y0: r[0] as usize,
            x0: r[1] as usize,
            h: r[2] as usize,
            w: r[3] as usize,
        }
    }
    /// True when pixel (y, x) lies inside.
    pub fn contains(&self, y: usize, x: usize) -> bool {
        y >= self.y0 && y < self.y0 + self.h && x >= self.x0 && x < self.x0 + self.w
    }
}

fn key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// Check sizes and ranges; shared by the twin and the launch wrapper.
fn validate(cfg: &PerturbCfg, b: usize, c: usize, h: usize, w: usize) -> Result<()> {
    const OP: &str = "perturb";
    let (hmin, hmax) = cfg.rect_h;
    let (wmin, wmax) = cfg.rect_w;
    if h == 0 || w == 0 || c == 0 {
        return Err(Error::arg(OP, format!("empty image {c}×{h}×{w}")));
    }
    if !(1 <= hmin && hmin <= hmax && hmax <= h) {
        return Err(Error::arg(
            OP,
            format!("rect_h ({hmin}, {hmax}) must satisfy 1 ≤ min ≤ max ≤ H = {h}"),
        ));
    }
    if !(1 <= wmin && wmin <= wmax && wmax <= w) {
        return Err(Error::arg(
            OP,
            format!("rect_w ({wmin}, {wmax}) must satisfy 1 ≤ min ≤ max ≤ W = {w}"),
        ));
    }
    if !cfg.sigma.is_finite() || cfg.sigma < 0.0 {
        return Err(Error::arg(
            OP,
            format!("sigma must be finite and ≥ 0, got {}", cfg.sigma),
        ));
    }
    // The kernel indexes with i32 sizes and u32 group counters.
    c.checked_mul(h)
        .and_then(|x| x.checked_mul(w))
        .filter(|&e| e <= i32::MAX as usize)
        .ok_or_else(|| Error::arg(OP, format!("image {c}×{h}×{w} too large")))?;
    if b > i32::MAX as usize || (cfg.first_copy as u64 + cfg.np as u64) > u32::MAX as u64 {
        return Err(Error::arg(OP, "batch or copy index out of range"));
    }
    Ok(())
}

/// The rectangle of (copy, image), as the kernel draws it.  `copy` is the absolute
/// copy index (`first_copy + k`).
pub fn rect_for(cfg: &PerturbCfg, h: usize, w: usize, copy: u32, image: u32) -> Rect {
    let x = philox4x32_10([image, 0, copy, DOMAIN_RECT], key(cfg.seed));
    let rh = cfg.rect_h.0 + (x[0] % (cfg.rect_h.1 - cfg.rect_h.0 + 1) as u32) as usize;
    let rw = cfg.rect_w.0 + (x[1] % (cfg.rect_w.1 - cfg.rect_w.0 + 1) as u32) as usize;
    Rect {
        y0: (x[2] % (h - rh + 1) as u32) as usize,
        x0: (x[3] % (w - rw + 1) as u32) as usize,
        h: rh,
        w: rw,
    }
}

/// Normals of groups `g0, g0+1, …` (four per group) of (image, copy), exactly as the
/// kernel draws them.  out (4·groups).
#[inline(always)]
fn fill_normals_portable(g0: u32, image: u32, copy: u32, key: [u32; 2], out: &mut [f32]) {
    for (i, o) in out.chunks_exact_mut(4).enumerate() {
        let q = philox4x32_10([g0.wrapping_add(i as u32), image, copy, DOMAIN_NOISE], key);
        let (z0, z1) = box_muller(q[0], q[1]);
        let (z2, z3) = box_muller(q[2], q[3]);
        o[0] = z0;
        o[1] = z1;
        o[2] = z2;
        o[3] = z3;
    }
}

crate::simd_fn!(
    fn fill_normals(g0: u32, image: u32, copy: u32, key: [u32; 2], out: &mut [f32]) => fill_normals_portable
);

/// CPU twin of `perturb_fwd_f32`.
///
/// img (B, C, H, W), out (NP, B, C, H, W) — overwritten, rects (NP, B) — overwritten.
#[allow(clippy::too_many_arguments)]
pub fn perturb_cpu(
    img: &[f32],
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    cfg: &PerturbCfg,
    out: &mut [f32],
    rects: &mut [Rect],
) -> Result<()> {
    const OP: &str = "perturb_cpu";
    validate(cfg, b, c, h, w)?;
    let e = c * h * w;
    check_len(OP, "img", img.len(), b * e)?;
    check_len(OP, "out", out.len(), cfg.np * b * e)?;
    check_len(OP, "rects", rects.len(), cfg.np * b)?;
    if e == 0 || b == 0 || cfg.np == 0 {
        return Ok(());
    }
    let k = key(cfg.seed);
    for (kb, r) in rects.iter_mut().enumerate() {
        *r = rect_for(cfg, h, w, cfg.first_copy + (kb / b) as u32, (kb % b) as u32);
    }
    out.par_chunks_mut(e).enumerate().for_each(|(kb, dst)| {
        let (copy, image) = (cfg.first_copy + (kb / b) as u32, kb % b);
        let src = &img[image * e..(image + 1) * e];
        dst.copy_from_slice(src);
        let r = rects[kb];
        // Only rows of the rectangle get noise: per row, the normals of the groups of
        // four elements it touches, drawn in one vectorizable loop, then added.
        let mut noise = Vec::with_capacity(4 * (r.w / 4 + 2));
        for ch in 0..c {
            for y in r.y0..r.y0 + r.h {
                let row = (ch * h + y) * w;
                let (lo, hi) = (row + r.x0, row + r.x0 + r.w);
                let (g_lo, g_hi) = (lo / 4, hi.div_ceil(4));
                noise.resize(4 * (g_hi - g_lo), 0.0);
                fill_normals(g_lo as u32, image as u32, copy, k, &mut noise);
                for (d, z) in dst[lo..hi].iter_mut().zip(&noise[lo - 4 * g_lo..]) {
                    *d += cfg.sigma * z;
                }
            }
        }
    });
    Ok(())
}

/// Launch `perturb_fwd_f32`: the same result as [`perturb_cpu`] within float rounding.
///
/// img (B, C, H, W), out (NP, B, C, H, W), rects (NP, B, 4) as `[y0, x0, h, w]`.
#[allow(clippy::too_many_arguments)]
pub fn perturb(
    dev: &Device,
    img: &DeviceBuf<f32>,
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    cfg: &PerturbCfg,
    out: &mut DeviceBuf<f32>,
    rects: &mut DeviceBuf<i32>,
) -> Result<()> {
    const OP: &str = "perturb";
    validate(cfg, b, c, h, w)?;
    let e = c * h * w;
    check_len(OP, "img", img.len(), b * e)?;
    check_len(OP, "out", out.len(), cfg.np * b * e)?;
    check_len(OP, "rects", rects.len(), cfg.np * b * 4)?;
    let nkb = cfg.np * b;
    if nkb == 0 {
        return Ok(());
    }
    if nkb > MAX_GRID_Y {
        return Err(Error::arg(
            OP,
            format!("NP × B = {nkb} exceeds {MAX_GRID_Y}; split the batch"),
        ));
    }
    let groups = e.div_ceil(4);
    let [k0, k1] = key(cfg.seed);
    let cfgl = LaunchCfg::new(
        [groups.div_ceil(BLOCK as usize) as u32, nkb as u32, 1],
        [BLOCK, 1, 1],
        0,
    );
    dev.launch(
        "perturb_fwd_f32",
        cfgl,
        &[
            out.arg_mut(),
            rects.arg_mut(),
            img.arg(),
            KArg::I32(b as i32),
            KArg::I32(c as i32),
            KArg::I32(h as i32),
            KArg::I32(w as i32),
            KArg::F32(cfg.sigma),
            KArg::I32(cfg.rect_h.0 as i32),
            KArg::I32(cfg.rect_h.1 as i32),
            KArg::I32(cfg.rect_w.0 as i32),
            KArg::I32(cfg.rect_w.1 as i32),
            KArg::U32(k0),
            KArg::U32(k1),
            KArg::U32(cfg.first_copy),
        ],
    )
}

/// Download rectangles written by [`perturb`] as [`Rect`]s.
pub fn rects_from_device(dev: &Device, rects: &DeviceBuf<i32>) -> Result<Vec<Rect>> {
    Ok(dev.download(rects)?.chunks(4).map(Rect::from_i32).collect())
}

/// Launch `philox_fill_u32`: `out[4i + j] = philox4x32_10((i, c1, c2, c3), key)[j]`.
/// out (4n).
pub fn philox_fill(
    dev: &Device,
    out: &mut DeviceBuf<u32>,
    ctr_hi: [u32; 3],
    key: [u32; 2],
) -> Result<()> {
    philox_launch(
        dev,
        "philox_fill",
        "philox_fill_u32",
        out.len(),
        out.arg_mut(),
        ctr_hi,
        key,
    )
}

/// Launch `philox_normal_f32`: Box–Muller normals of the stream of [`philox_fill`].
pub fn philox_normal(
    dev: &Device,
    out: &mut DeviceBuf<f32>,
    ctr_hi: [u32; 3],
    key: [u32; 2],
) -> Result<()> {
    philox_launch(
        dev,
        "philox_normal",
        "philox_normal_f32",
        out.len(),
        out.arg_mut(),
        ctr_hi,
        key,
    )
}

/// The launch both Philox stream kernels share: one thread per 4 outputs of `out`
/// (`len` elements, a multiple of 4), counter `(i, ctr_hi)` under `key`.
fn philox_launch(
    dev: &Device,
    op: &'static str,
    kernel: &str,
    len: usize,
    out: KArg,
    ctr_hi: [u32; 3],
    key: [u32; 2],
) -> Result<()> {
    if !len.is_multiple_of(4) || len / 4 > i32::MAX as usize {
        return Err(Error::shape(
            op,
            format!("out has {len} elements, need a multiple of 4"),
        ));
    }
    let n = len / 4;
    if n == 0 {
        return Ok(());
    }
    dev.launch(
        kernel,
        LaunchCfg::linear(n, BLOCK),
        &[
            out,
            KArg::I32(n as i32),
            KArg::U32(ctr_hi[0]),
            KArg::U32(ctr_hi[1]),
            KArg::U32(ctr_hi[2]),
            KArg::U32(key[0]),
            KArg::U32(key[1]),
        ],
    )
}
