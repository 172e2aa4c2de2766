//! The AdamW step, elementwise over one tensor.
use super::{f, CpuFloat, MIN_ELEMS_PER_TASK};
use crate::backend::AdamWStep;
use crate::error::{check_len, Error, Result};
use rayon::prelude::*;

pub(super) fn adamw_step<F: CpuFloat>(
    h: &AdamWStep,
    param: &mut [F],
    grad: &[F],
    m: &mut [F],
    v: &mut [F],
) -> Result<()> {
    let n = param.len();
    check_len("adamw_step", "grad", grad.len(), n)?;
    check_len("adamw_step", "m", m.len(), n)?;
    check_len("adamw_step", "v", v.len(), n)?;
    if h.step == 0 {
        return Err(Error::arg("adamw_step", "step numbers start at 1"));
    }
    let b1: F = f(h.beta1 as f64);
    let b2: F = f(h.beta2 as f64);
    let lr: F = f(h.lr as f64);
    let eps: F = f(h.eps as f64);
    let wd: F = f(h.weight_decay as f64);
    let c1 = F::one() - b1.powi(h.step as i32);
    let c2 = F::one() - b2.powi(h.step as i32);
    param
        .par_iter_mut()
        .with_min_len(MIN_ELEMS_PER_TASK)
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .zip(grad.par_iter())
        .for_each(|((p, (mi, vi)), &g)| {
            *mi = b1 * *mi + (F::one() - b1) * g;
            *vi = b2 * *vi + (F::one() - b2) * g * g;
            let mhat = *mi / c1;
            let vhat = *vi / c2;
            // decoupled decay (Loshchilov & Hutter): applied to the weight, not the gradient
            *p = *p - lr * (mhat / (vhat.sqrt() + eps) + wd * *p);
        });
    Ok(())
}
