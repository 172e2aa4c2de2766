//! Attention and log-probs on the device: the attention and log-prob kernels' launch
//! wrappers, with the host data the contract hands over (key mask, targets) uploaded.
use crate::backend::AttnShape;
use crate::error::{check_len, Result};
use crate::kernels::logprob::check_targets;
use crate::kernels::{attention, logprob, Device, DeviceBuf};

/// The gradients one attention backward writes.
pub(super) struct AttnGrads<'a> {
    pub dq: &'a mut DeviceBuf<f32>,
    pub dk: &'a mut DeviceBuf<f32>,
    pub dv: &'a mut DeviceBuf<f32>,
    pub dbias: Option<&'a mut DeviceBuf<f32>>,
}

fn upload_mask(dev: &Device, key_mask: Option<&[u8]>) -> Result<Option<DeviceBuf<u8>>> {
    key_mask.map(|m| dev.upload(m)).transpose()
}

/// q (B,NH,Tq,HS), k and v (B,NKV,Tk,HS), bias (B,Tk) or None, key_mask (B,Tk) or None
/// → out (B,NH,Tq,HS), lse (B,NH,Tq)
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_fwd(
    dev: &Device,
    s: &AttnShape,
    q: &DeviceBuf<f32>,
    k: &DeviceBuf<f32>,
    v: &DeviceBuf<f32>,
    bias: Option<&DeviceBuf<f32>>,
    key_mask: Option<&[u8]>,
    out: &mut DeviceBuf<f32>,
    lse: &mut DeviceBuf<f32>,
) -> Result<()> {
    let mask = upload_mask(dev, key_mask)?;
    attention::attention_fwd(dev, s, q, k, v, bias, mask.as_ref(), out, lse)
}

/// dq, dk, dv overwritten; dbias (B,Tk) overwritten when given.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_bwd(
    dev: &Device,
    s: &AttnShape,
    q: &DeviceBuf<f32>,
    k: &DeviceBuf<f32>,
    v: &DeviceBuf<f32>,
    bias: Option<&DeviceBuf<f32>>,
    key_mask: Option<&[u8]>,
    out: &DeviceBuf<f32>,
    lse: &DeviceBuf<f32>,
    dout: &DeviceBuf<f32>,
    g: AttnGrads<'_>,
) -> Result<()> {
    let mask = upload_mask(dev, key_mask)?;
    attention::attention_bwd(
        dev,
        s,
        q,
        k,
        v,
        bias,
        mask.as_ref(),
        out,
        lse,
        dout,
        g.dq,
        g.dk,
        g.dv,
        g.dbias,
    )
}

/// logits (N,V), targets (N) → logp (N), lse (N); the host-side target rule of
/// [`check_targets`] first (the kernel cannot report a bad target).
pub(super) fn logprob_fwd(
    dev: &Device,
    logits: &DeviceBuf<f32>,
    targets: &[i32],
    v: usize,
    logp: &mut DeviceBuf<f32>,
    lse: &mut DeviceBuf<f32>,
) -> Result<()> {
    let n = super::rows_of("logprob_fwd", logits.len(), v)?;
    check_len("logprob_fwd", "targets", targets.len(), n)?;
    check_targets("logprob_fwd", targets, v)?;
    let t = dev.upload(targets)?;
    logprob::logprob_fwd(dev, logits, &t, v, logp, lse)
}

/// forward: logp[n] = x[n, y_n] − lse(x[n])
/// so:      dlogits[n, j] = dlogp[n]·(1[j = y_n] − softmax(x[n])[j]) (overwritten): the
/// Eq. 3 backward kernel for one sequence of N rows with w = dlogp, d_out = scale = 1.
pub(super) fn logprob_bwd(
    dev: &Device,
    logits: &DeviceBuf<f32>,
    targets: &[i32],
    v: usize,
    lse: &DeviceBuf<f32>,
    dlogp: &DeviceBuf<f32>,
    dlogits: &mut DeviceBuf<f32>,
) -> Result<()> {
    let n = super::rows_of("logprob_bwd", logits.len(), v)?;
    check_len("logprob_bwd", "targets", targets.len(), n)?;
    check_len("logprob_bwd", "dlogp", dlogp.len(), n)?;
    check_targets("logprob_bwd", targets, v)?;
    let t = dev.upload(targets)?;
    let one = dev.upload(&[1.0f32])?;
    logprob::logprob_bwd(dev, logits, lse, &t, dlogp, &one, &one, n, v, dlogits)
}
