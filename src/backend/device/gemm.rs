//! The device's one matrix product.
use crate::backend::{Accum, MatmulSpec};
use crate::error::{check_len, Result};
use crate::kernels::{Device, DeviceBuf};

/// `out (M,N) (=|+=) op(a) · op(b)` on `dev`; see [`MatmulSpec`].
///
/// On the emulator the buffers are host memory and the product is the CPU backend's
/// (the `gemm` crate); on a GPU it is one cuBLAS SGEMM (`Device::cublas_sgemm`), never a
/// fallback through the host.
pub fn gemm(
    dev: &Device,
    s: MatmulSpec,
    a: &DeviceBuf<f32>,
    b: &DeviceBuf<f32>,
    out: &mut DeviceBuf<f32>,
    acc: Accum,
) -> Result<()> {
    gemm_batched(dev, s, 1, a, b, out, acc)
}

/// `out[i] (M,N) (=|+=) op(a[i]) · op(b[i])` for `batch` products stored one after
/// another (`Backend::matmul_batched`): on the emulator the CPU backend's product per
/// batch, on a GPU one cuBLAS call (strided batched when `batch` > 1).
pub fn gemm_batched(
    dev: &Device,
    s: MatmulSpec,
    batch: usize,
    a: &DeviceBuf<f32>,
    b: &DeviceBuf<f32>,
    out: &mut DeviceBuf<f32>,
    acc: Accum,
) -> Result<()> {
    let MatmulSpec { m, k, n, ta, tb } = s;
    let (la, lb, lo) = (m * k, k * n, m * n);
    check_len("matmul", "a", a.len(), batch * la)?;
    check_len("matmul", "b", b.len(), batch * lb)?;
    check_len("matmul", "out", out.len(), batch * lo)?;
    if let (Some(ah), Some(bh)) = (a.host(), b.host()) {
        if let Some(oh) = out.host_mut() {
            // named as a GPU's profile names the cuBLAS call
            return dev.profiled(
                || crate::kernels::profile::sgemm_name([m, k, n], ta, tb, batch),
                || crate::backend::cpu::matmul::matmul_batched(s, batch, ah, bh, oh, acc),
            );
        }
    }
    if m == 0 || n == 0 || batch == 0 {
        return Ok(());
    }
    dev.cublas_sgemm([m, k, n], ta, tb, batch, a, b, out, acc == Accum::Add)
}
