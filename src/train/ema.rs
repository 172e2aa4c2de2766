//! An exponential moving average of the trainable weights (Polyak averaging; ours, off
//! by default: `[train] ema = 0`).
//!
//! After optimizer step `t` (1-based), with `d = [train] ema`:
//!
//! ```text
//! d_t = min(d, (1 + t) / (10 + t))
//! w̄  ← d_t · w̄ + (1 − d_t) · w          (w̄ = w before step 1)
//! ```
//!
//! The ramp `d_t` (TensorFlow's `ExponentialMovingAverage` with `num_updates`) keeps the
//! random initial weights from lingering in a short run: with `d = 0.999` the average
//! spans about the last `t/10` steps early on and the last 1000 from step 9000.
//!
//! Where the average goes (the run-directory contract, `train::checkpoint`): each
//! checkpoint folder keeps the raw weights in `model.safetensors` (a resumed run
//! continues from them) and the whole model with `w̄` in place of each trainable tensor
//! in `ema.safetensors`; the run directory's `model.safetensors`, which `popen predict`
//! and the next stage read, is that averaged model.  Frozen tensors are not averaged
//! (they do not move).  A resumed run continues the checkpointed average; a run
//! started without `ema` and resumed with it starts the average at the resumed weights.
//! `--val` scores the raw weights.
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::Tensor;

/// The averaged model inside a checkpoint folder.
pub const EMA_FILE: &str = "ema.safetensors";

/// The decay of step `t` (1-based) for the configured `decay`.
pub fn decay_at(decay: f32, t: u64) -> f32 {
    let ramp = (1.0 + t as f64) / (10.0 + t as f64);
    (decay as f64).min(ramp) as f32
}

/// The running average `w̄` of the trainable tensors (those with a gradient slot), in
/// parameter order.
pub struct Ema<Buf> {
    decay: f32,
    /// Positions in `params_mut()` of the averaged tensors.
    idx: Vec<usize>,
    avg: Vec<Buf>,
}

impl<Buf: Clone> Ema<Buf> {
    /// Starts the average at the current weights.
    pub fn new<B: Backend<f32, Buf = Buf>>(
        decay: f32,
        params: &[(String, &mut Tensor<f32, B>)],
    ) -> Self {
        let idx: Vec<usize> = params
            .iter()
            .enumerate()
            .filter(|(_, (_, t))| t.grad.is_some())
            .map(|(i, _)| i)
            .collect();
        let avg = idx.iter().map(|&i| params[i].1.data.clone()).collect();
        Ema { decay, idx, avg }
    }

    /// `w̄ ← d_t·w̄ + (1 − d_t)·w` after step `t`.
    pub fn update<B: Backend<f32, Buf = Buf>>(
        &mut self,
        be: &B,
        params: &[(String, &mut Tensor<f32, B>)],
        t: u64,
    ) -> Result<()> {
        let d = decay_at(self.decay, t);
        for (a, &i) in self.avg.iter_mut().zip(&self.idx) {
            let (name, w) = &params[i];
            if be.len(a) != be.len(&w.data) {
                return Err(Error::shape(
                    "Ema::update",
                    format!(
                        "`{name}` has {} values, its average {}",
                        be.len(&w.data),
                        be.len(a)
                    ),
                ));
            }
            be.scale(a, d);
            be.axpy(a, 1.0 - d, &w.data)?;
        }
        Ok(())
    }

    /// Exchanges each averaged tensor's values with its average: call, save, call
    /// again to restore.
    pub fn swap<B: Backend<f32, Buf = Buf>>(
        &mut self,
        params: &mut [(String, &mut Tensor<f32, B>)],
    ) {
        for (a, &i) in self.avg.iter_mut().zip(&self.idx) {
            std::mem::swap(a, &mut params[i].1.data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    #[test]
    fn the_decay_ramps_up_to_the_configured_value() {
        assert!((decay_at(0.999, 1) - 2.0 / 11.0).abs() < 1e-7);
        assert!((decay_at(0.999, 90) - 91.0 / 100.0).abs() < 1e-7);
        assert_eq!(decay_at(0.999, 100_000), 0.999);
        assert_eq!(decay_at(0.0, 5), 0.0);
    }

    #[test]
    fn only_trainable_tensors_average_and_swapping_twice_restores() {
        let mut a = Tensor::<f32, Cpu>::zeros(&Cpu, &[2]);
        let mut f = Tensor::<f32, Cpu>::zeros(&Cpu, &[1]);
        f.set_trainable(&Cpu, false);
        a.data = vec![1.0, 2.0];
        f.data = vec![5.0];
        let mut p = vec![("a".to_string(), &mut a), ("f".to_string(), &mut f)];
        let mut e = Ema::new(0.5, &p);
        p[0].1.data = vec![3.0, 6.0];
        p[1].1.data = vec![7.0];
        e.update(&Cpu, &p, 1_000).unwrap(); // d = 0.5
        assert_eq!(e.avg, vec![vec![2.0, 4.0]]);
        e.swap(&mut p);
        assert_eq!(
            (&p[0].1.data[..], &p[1].1.data[..]),
            (&[2.0, 4.0][..], &[7.0][..])
        );
        e.swap(&mut p);
        assert_eq!(p[0].1.data, vec![3.0, 6.0]);
        p[0].1.data = vec![3.0];
        assert!(e.update(&Cpu, &p, 1_001).is_err());
    }
}
