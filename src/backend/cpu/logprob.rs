//! Log-probabilities of the targets: the log-prob kernel's CPU twin, called with the
//! N rows as one sequence.
use super::{rows_of, CpuFloat};
use crate::error::{check_len, Result};
use crate::kernels::logprob::{logprob_bwd_cpu, logprob_fwd_cpu};

pub(super) fn logprob_fwd<F: CpuFloat>(
    logits: &[F],
    targets: &[i32],
    v: usize,
    logp: &mut [F],
    lse: &mut [F],
) -> Result<()> {
    let n = rows_of("logprob_fwd", logits.len(), v)?;
    check_len("logprob_fwd", "targets", targets.len(), n)?;
    check_len("logprob_fwd", "logp", logp.len(), n)?;
    check_len("logprob_fwd", "lse", lse.len(), n)?;
    let (lp, ls) = logprob_fwd_cpu(logits, targets, v)?;
    logp.copy_from_slice(&lp);
    lse.copy_from_slice(&ls);
    Ok(())
}

pub(super) fn logprob_bwd<F: CpuFloat>(
    logits: &[F],
    targets: &[i32],
    v: usize,
    lse: &[F],
    dlogp: &[F],
    dlogits: &mut [F],
) -> Result<()> {
    // forward: logp[n] = x[n, y_n] − lse(x[n])
    // so:      dx[n, j] = dlogp[n]·(1[j = y_n] − softmax(x[n])[j]),
    // the twin's Eq. 3 backward for one sequence of N rows with weights w = dlogp and
    // d_out = scale = 1
    let n = rows_of("logprob_bwd", logits.len(), v)?;
    check_len("logprob_bwd", "dlogp", dlogp.len(), n)?;
    let one = [F::one()];
    logprob_bwd_cpu(logits, lse, targets, dlogp, &one, &one, n, v, dlogits)
}
