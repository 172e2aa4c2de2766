//! Whole-buffer ops: fill, copies, row adds, axpy, scale, Σx².
use super::{CpuFloat, MIN_ELEMS_PER_TASK};
use crate::backend::RowCopy;
use crate::error::{check_len, Error, Result};
use rayon::prelude::*;

pub(super) fn fill<F: CpuFloat>(x: &mut [F], v: F) {
    // parallel: zeroing every gradient before a step touches as many bytes as the model
    x.par_chunks_mut(MIN_ELEMS_PER_TASK)
        .for_each(|c| c.iter_mut().for_each(|e| *e = v));
}

pub(super) fn copy<F: CpuFloat>(dst: &mut [F], src: &[F]) -> Result<()> {
    check_len("copy", "src", src.len(), dst.len())?;
    dst.copy_from_slice(src);
    Ok(())
}

pub(super) fn copy_range<F: CpuFloat>(
    dst: &mut [F],
    dst_off: usize,
    src: &[F],
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
    dst[dst_off..dst_off + n].copy_from_slice(&src[src_off..src_off + n]);
    Ok(())
}

/// The runs of `c` from `src` added into `dst` (the dst runs do not overlap).
pub(super) fn add_rows<F: CpuFloat>(dst: &mut [F], src: &[F], c: RowCopy) -> Result<()> {
    c.check("add_rows", dst.len(), src.len())?;
    for r in 0..c.rows {
        let d = &mut dst[c.dst_off + r * c.dst_stride..][..c.width];
        let s = &src[c.src_off + r * c.src_stride..][..c.width];
        d.iter_mut().zip(s).for_each(|(d, s)| *d = *d + *s);
    }
    Ok(())
}

pub(super) fn axpy<F: CpuFloat>(dst: &mut [F], alpha: F, src: &[F]) -> Result<()> {
    check_len("axpy", "src", src.len(), dst.len())?;
    dst.par_iter_mut()
        .with_min_len(MIN_ELEMS_PER_TASK)
        .zip(src.par_iter())
        .for_each(|(d, s)| *d = *d + alpha * *s);
    Ok(())
}

pub(super) fn scale<F: CpuFloat>(x: &mut [F], alpha: F) {
    x.par_iter_mut()
        .with_min_len(MIN_ELEMS_PER_TASK)
        .for_each(|d| *d = *d * alpha);
}

pub(super) fn sum_sq<F: CpuFloat>(x: &[F]) -> F {
    x.iter().fold(F::zero(), |a, &v| a + v * v)
}
