//! The device's one matrix product.
use crate::backend::{Accum, MatmulSpec};
use crate::error::{check_len, Error, Result};
use crate::kernels::{Device, DeviceBuf};

/// `out (M,N) (=|+=) op(a) · op(b)` on `dev`; see [`MatmulSpec`].
///
/// On the emulator the buffers are host memory and the product is the CPU backend's
/// (the `gemm` crate); on a GPU it is meant to be cuBLAS, which is not wired yet: an
/// error, never a silent fallback through the host.
pub fn gemm(
    dev: &Device,
    s: MatmulSpec,
    a: &DeviceBuf<f32>,
    b: &DeviceBuf<f32>,
    out: &mut DeviceBuf<f32>,
    acc: Accum,
) -> Result<()> {
    let _ = dev;
    let MatmulSpec { m, k, n, .. } = s;
    check_len("matmul", "a", a.len(), m * k)?;
    check_len("matmul", "b", b.len(), k * n)?;
    check_len("matmul", "out", out.len(), m * n)?;
    match (a.host(), b.host(), out.host_mut()) {
        (Some(a), Some(b), Some(out)) => crate::backend::cpu::matmul::matmul(s, a, b, out, acc),
        _ => Err(Error::Unsupported(
            "matmul on a GPU needs cuBLAS, which the device backend does not call yet (issue 11)"
                .into(),
        )),
    }
}
