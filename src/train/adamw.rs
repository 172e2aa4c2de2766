//! AdamW (Loshchilov & Hutter): Adam with decoupled weight decay,
//! `p ← p − lr·(m̂/(√v̂ + ε) + wd·p)`, the same update as `torch.optim.AdamW`.
//! Frozen tensors (no gradient slot) are skipped and stay bit-identical.
use crate::backend::{AdamWSlot, AdamWStep, Backend};
use crate::error::{Error, Result};
use crate::nn::Tensor;
use num_traits::Float;

/// Hyper-parameters; defaults are the paper's (Supp Table 7).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Peak learning rate (Table 7: 3e-4).  [`AdamW::step`] does not read it: it takes
    /// the rate of each step from its `lr` argument (the schedule).
    pub lr: f32,
    /// Decay of the first-moment average `m` (Table 7: 0.9).
    pub beta1: f32,
    /// Decay of the second-moment average `v` (Table 7: 0.95).
    pub beta2: f32,
    /// ε added to `√v̂` in the denominator (1e-8, `torch.optim.AdamW`'s default).
    pub eps: f32,
    /// Decoupled weight decay `wd` (Table 7: 0).
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW's moments `(m, v)` by parameter position (`None`: not stepped yet, or frozen).
pub type Moments<Buf> = Vec<Option<(Buf, Buf)>>;

/// Optimizer state: one (m, v) pair per parameter, by position in the list the caller
/// passes to [`AdamW::step`] (keep the order fixed, e.g. `Llama::params_mut`).
#[derive(Clone, Debug)]
pub struct AdamW<F: Float, B: Backend<F>> {
    /// Hyper-parameters of every step (the step's rate comes from [`AdamW::step`]'s `lr`).
    pub cfg: AdamWConfig,
    /// Number of steps taken so far.
    pub t: u64,
    state: Moments<B::Buf>,
}

impl<F: Float, B: Backend<F>> AdamW<F, B> {
    /// An optimizer with no moments yet and `t = 0`; moments are created at a
    /// parameter's first step.
    pub fn new(cfg: AdamWConfig) -> Self {
        AdamW {
            cfg,
            t: 0,
            state: Vec::new(),
        }
    }

    /// The moments `(m, v)` by parameter position; `None` where a parameter has not
    /// been stepped (frozen, or before the first step).  For checkpoints.
    pub fn moments(&self) -> &[Option<(B::Buf, B::Buf)>] {
        &self.state
    }

    /// Restores moments saved from [`AdamW::moments`] and the step count `t` (the bias
    /// corrections depend on it), so that a resumed run continues bit-exactly.
    pub fn restore(&mut self, moments: Moments<B::Buf>, t: u64) {
        self.state = moments;
        self.t = t;
    }

    /// One step over `params` at learning rate `lr` (from the schedule).  Tensors with
    /// no gradient slot are left untouched.  Gradients are not zeroed.
    pub fn step(
        &mut self,
        be: &B,
        params: &mut [(String, &mut Tensor<F, B>)],
        lr: f32,
    ) -> Result<()> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(Error::arg(
                "AdamW::step",
                format!("learning rate {lr} must be finite and ≥ 0"),
            ));
        }
        if self.state.len() < params.len() {
            self.state.resize(params.len(), None);
        }
        self.t += 1;
        let h = AdamWStep {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
            step: self.t,
        };
        // every tensor in one call: one launch on a device
        let mut slots = Vec::with_capacity(params.len());
        for ((name, p), st) in params.iter_mut().zip(&mut self.state) {
            let n = p.numel();
            let Tensor { data, grad, .. } = &mut **p;
            let Some(g) = grad.as_ref() else { continue };
            let (m, v) = st.get_or_insert_with(|| (be.zeros(n), be.zeros(n)));
            if be.len(m) != n {
                return Err(Error::shape(
                    "AdamW::step",
                    format!("`{name}` changed size between steps"),
                ));
            }
            slots.push(AdamWSlot {
                param: data,
                grad: g,
                m,
                v,
            });
        }
        be.adamw_step_many(&h, &mut slots)
    }
}

/// Scale all gradients so that their joint L2 norm is at most `max_norm` (DeepSpeed's
/// `gradient_clipping`, which LISA-style trainers set to 1.0).  Returns the norm
/// before clipping; frozen tensors are ignored.  A non-finite norm is an error, so a
/// diverging run stops instead of writing NaN into every weight.
pub fn clip_grad_norm<F: Float, B: Backend<F>>(
    be: &B,
    params: &mut [(String, &mut Tensor<F, B>)],
    max_norm: f32,
) -> Result<f32> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::arg(
            "clip_grad_norm",
            format!("max_norm {max_norm} must be finite and > 0"),
        ));
    }
    let grads: Vec<&B::Buf> = params.iter().filter_map(|(_, p)| p.grad.as_ref()).collect();
    // one host round trip for all the parts on a device; added in tensor order
    let sq: f64 = be
        .sum_sq_many(&grads)
        .iter()
        .map(|s| s.to_f64().unwrap_or(f64::NAN))
        .sum();
    let norm = sq.sqrt();
    if !norm.is_finite() {
        return Err(Error::NonFinite {
            what: "gradient norm".into(),
        });
    }
    if norm > max_norm as f64 {
        let s = F::from(max_norm as f64 / norm).expect("scale representable");
        let mut grads: Vec<&mut B::Buf> = params
            .iter_mut()
            .filter_map(|(_, p)| p.grad.as_mut())
            .collect();
        be.scale_many(&mut grads, s);
    }
    Ok(norm as f32)
}
