//! `WarmupDecayLR` (DeepSpeed's name, which LISA/PixelLM and the POPEN paper use).
//!
//! Choice: linear warmup from 0 to the peak over `warmup` steps, then linear decay to 0
//! at `total` steps — DeepSpeed's `WarmupDecayLR` with `warmup_type = "linear"`.  Step
//! numbers are 1-based, like the optimizer's, so the first step already has a nonzero
//! rate (`peak / warmup`) and the step numbered `total` has rate 0.
use crate::error::{Error, Result};

/// Paper default: 100 warmup steps.
pub const DEFAULT_WARMUP_STEPS: u64 = 100;

/// Linear warm-up from 0 to `peak`, then linear decay to 0 at step `total` (see the
/// module docs); build it with [`WarmupDecayLR::new`], which checks the ranges.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupDecayLR {
    /// Largest learning rate, reached at step `warmup`.
    pub peak: f32,
    /// Steps of the linear warm-up (≤ `total`; 0 starts the decay at once).
    pub warmup: u64,
    /// Step at which the rate reaches 0 (> 0).
    pub total: u64,
}

impl WarmupDecayLR {
    /// `warmup ≤ total`, `total > 0`, finite non-negative peak.
    pub fn new(peak: f32, warmup: u64, total: u64) -> Result<Self> {
        if total == 0 || warmup > total || !(peak.is_finite() && peak >= 0.0) {
            return Err(Error::arg(
                "WarmupDecayLR",
                format!(
                    "need 0 < total ({total}), warmup ({warmup}) ≤ total, finite peak ≥ 0 ({peak})"
                ),
            ));
        }
        Ok(WarmupDecayLR {
            peak,
            warmup,
            total,
        })
    }

    /// Learning rate at 1-based `step`: `peak·step/warmup` while `step < warmup`, then
    /// `peak·(total − step)/(total − warmup)`; 0 from `total` on.
    pub fn lr(&self, step: u64) -> f32 {
        if step >= self.total {
            return 0.0;
        }
        if step < self.warmup {
            return self.peak * step as f32 / self.warmup as f32;
        }
        let span = (self.total - self.warmup) as f32;
        self.peak * (self.total - step) as f32 / span
    }
}
