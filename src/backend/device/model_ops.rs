//! Attention and log-probs on the device: the attention and log-prob kernels' launch
//! wrappers, with the host data the contract hands over (key mask, targets) uploaded
//! once per distinct value ([`HostInputs`]).
use super::DeviceBackend;
use crate::backend::AttnShape;
use crate::error::{check_len, Result};
use crate::kernels::logprob::check_targets;
use crate::kernels::{attention, logprob, Device, DeviceBuf, Elem};
use std::sync::Mutex;

/// The last host slices of one kind that were uploaded (at most `cap`), with their
/// device copies.  One training step hands every layer the same key mask, forward and
/// backward, and the log-prob forward and backward the same targets: each is uploaded
/// once, not once per call.  The copies are only read by kernels, so reusing one is
/// safe.
pub(super) struct Memo<T: Elem> {
    /// most recently used first
    last: Mutex<Vec<(Vec<T>, DeviceBuf<T>)>>,
    cap: usize,
}

impl<T: Elem + PartialEq> Memo<T> {
    fn new(cap: usize) -> Self {
        Memo {
            last: Mutex::new(Vec::with_capacity(cap)),
            cap,
        }
    }

    /// `f` on the device copy of `host`, uploaded unless it is one of the last `cap`.
    pub(super) fn with<R>(
        &self,
        dev: &Device,
        host: &[T],
        f: impl FnOnce(&DeviceBuf<T>) -> Result<R>,
    ) -> Result<R> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.iter().position(|(h, _)| h.as_slice() == host) {
            Some(i) => {
                let hit = last.remove(i);
                last.insert(0, hit);
            }
            None => {
                let buf = dev.upload(host)?;
                last.truncate(self.cap.saturating_sub(1));
                last.insert(0, (host.to_vec(), buf));
            }
        }
        f(&last[0].1)
    }
}

/// The host inputs of the contract, memoized per kind (see [`Memo`]).
pub(super) struct HostInputs {
    masks: Memo<u8>,
    targets: Memo<i32>,
    ones: Memo<f32>,
    /// the buffer tables of the one-launch ops over many buffers (`super::many`): a
    /// step's gradients, and its parameters with their moments
    pub(super) tables: Memo<u64>,
    /// completion counters of the one-launch chunked reductions (`col_sum_chunks_f32`),
    /// zero between launches: the kernel sets back each counter it counts in
    counters: Mutex<Option<DeviceBuf<u32>>>,
}

impl HostInputs {
    pub(super) fn new() -> Self {
        HostInputs {
            masks: Memo::new(1),
            targets: Memo::new(1),
            ones: Memo::new(1),
            tables: Memo::new(4),
            counters: Mutex::new(None),
        }
    }

    /// `f` with at least `n` zeroed counters on the device, allocated (zeroed) at the
    /// first call that needs more.  One stream runs every launch, so one set serves all.
    pub(super) fn counters<R>(
        &self,
        dev: &Device,
        n: usize,
        f: impl FnOnce(&mut DeviceBuf<u32>) -> Result<R>,
    ) -> Result<R> {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        if c.as_ref().is_none_or(|b| b.len() < n) {
            *c = Some(dev.zeros::<u32>(n.next_power_of_two())?);
        }
        f(c.as_mut().expect("allocated above"))
    }

    /// `f` with the key mask on the device (None stays None).
    fn mask<R>(
        &self,
        dev: &Device,
        key_mask: Option<&[u8]>,
        f: impl FnOnce(Option<&DeviceBuf<u8>>) -> Result<R>,
    ) -> Result<R> {
        match key_mask {
            Some(m) => self.masks.with(dev, m, |b| f(Some(b))),
            None => f(None),
        }
    }
}

impl std::fmt::Debug for HostInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostInputs")
    }
}

/// The gradients one attention backward writes.
pub(super) struct AttnGrads<'a> {
    pub dq: &'a mut DeviceBuf<f32>,
    pub dk: &'a mut DeviceBuf<f32>,
    pub dv: &'a mut DeviceBuf<f32>,
    pub dbias: Option<&'a mut DeviceBuf<f32>>,
}

/// q (B,NH,Tq,HS), k and v (B,NKV,kv_stride,HS) (the first Tk rows of each block are
/// read), bias (B,Tk) or None, key_mask (B,Tk) or None → out (B,NH,Tq,HS), lse (B,NH,Tq)
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_fwd(
    be: &DeviceBackend,
    s: &AttnShape,
    q: &DeviceBuf<f32>,
    k: &DeviceBuf<f32>,
    v: &DeviceBuf<f32>,
    bias: Option<&DeviceBuf<f32>>,
    key_mask: Option<&[u8]>,
    out: &mut DeviceBuf<f32>,
    lse: &mut DeviceBuf<f32>,
) -> Result<()> {
    let (dev, inputs) = (be.device(), &*be.inputs);
    if s.tq == 1 && key_mask.is_none() && !s.layout.k && !s.layout.v {
        // one query per head over every key (a decoding step with a KV cache): the
        // split-K decode kernel, whose parallelism is over key chunks, not queries.  One
        // query's q and out are the same token-major or not; its keys must be heads.
        return attention::attention_decode(
            dev,
            s.b,
            s.nh,
            s.nkv,
            s.kv_stride,
            s.tk,
            s.hs,
            s.scale,
            q,
            k,
            v,
            bias,
            out,
            Some(lse),
        );
    }
    let fwd: attention::AttnFwdFn = if be.tensor_core_attention(s.hs) {
        attention::attention_fwd_tc
    } else {
        attention::attention_fwd
    };
    inputs.mask(dev, key_mask, |mask| {
        fwd(dev, s, q, k, v, bias, mask, out, lse)
    })
}

/// dq, dk, dv overwritten; dbias (B,Tk) overwritten when given.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_bwd(
    be: &DeviceBackend,
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
    let (dev, inputs) = (be.device(), &*be.inputs);
    let bwd: attention::AttnBwdFn = if be.tensor_core_attention(s.hs) {
        attention::attention_bwd_tc
    } else {
        attention::attention_bwd
    };
    inputs.mask(dev, key_mask, |mask| {
        bwd(
            dev, s, q, k, v, bias, mask, out, lse, dout, g.dq, g.dk, g.dv, g.dbias,
        )
    })
}

/// logits (N,V), targets (N) → logp (N), lse (N); the host-side target rule of
/// [`check_targets`] first (the kernel cannot report a bad target).
pub(super) fn logprob_fwd(
    be: &DeviceBackend,
    logits: &DeviceBuf<f32>,
    targets: &[i32],
    v: usize,
    logp: &mut DeviceBuf<f32>,
    lse: &mut DeviceBuf<f32>,
) -> Result<()> {
    let (dev, inputs) = (be.device(), &*be.inputs);
    let n = super::rows_of("logprob_fwd", logits.len(), v)?;
    check_len("logprob_fwd", "targets", targets.len(), n)?;
    check_targets("logprob_fwd", targets, v)?;
    inputs.targets.with(dev, targets, |t| {
        logprob::logprob_fwd(dev, logits, t, v, logp, lse)
    })
}

/// forward: logp[n] = x[n, y_n] − lse(x[n])
/// so:      dlogits[n, j] = dlogp[n]·(1[j = y_n] − softmax(x[n])[j]) (overwritten): the
/// Eq. 3 backward kernel for one sequence of N rows with w = dlogp, d_out = scale = 1.
pub(super) fn logprob_bwd(
    be: &DeviceBackend,
    logits: &DeviceBuf<f32>,
    targets: &[i32],
    v: usize,
    lse: &DeviceBuf<f32>,
    dlogp: &DeviceBuf<f32>,
    dlogits: &mut DeviceBuf<f32>,
) -> Result<()> {
    let (dev, inputs) = (be.device(), &*be.inputs);
    let n = super::rows_of("logprob_bwd", logits.len(), v)?;
    check_len("logprob_bwd", "targets", targets.len(), n)?;
    check_len("logprob_bwd", "dlogp", dlogp.len(), n)?;
    check_targets("logprob_bwd", targets, v)?;
    inputs.targets.with(dev, targets, |t| {
        inputs.ones.with(dev, &[1.0], |one| {
            logprob::logprob_bwd(dev, logits, lse, t, dlogp, one, one, n, v, dlogits)
        })
    })
}
