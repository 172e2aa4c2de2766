//! Per-kernel timing of a [`Device`]'s work: where a training step's time goes.
//!
//! Off by default.  [`Device::set_profiling`] turns it on; from then on every kernel
//! launch, every matrix product (cuBLAS on a GPU, the host's on the emulator) and every
//! zero-filled allocation ([`Device::zeros`], a memset on a GPU) is bracketed by two
//! timing events on the GPU's stream (on the emulator, which runs each launch to
//! completion, by the host clock), and [`Device::take_profile`] waits for the work, adds
//! the times up by name and clears them.  Products are named by their shape (`sgemm
//! 2048x4096x11008 NT`: M×K×N, then whether `a` and `b` are transposed), so one table
//! separates the model's matrices.  The calls of a profile count what costs the host a
//! driver call on a GPU, which bounds a small model's speed there.  One such call is not
//! recorded: a buffer's `clone` (an allocation and a device-to-device copy on a GPU),
//! which does not go through the [`Device`].
//!
//! ```
//! use popen::kernels::{Device, KArg, LaunchCfg};
//! let dev = Device::emulator();
//! let x = dev.upload(&[1.0f32; 5]).unwrap();
//! let mut y = dev.zeros::<f32>(5).unwrap();
//! dev.set_profiling(true);
//! for _ in 0..3 {
//!     dev.launch("scale_f32", LaunchCfg::linear(5, 128),
//!                &[y.arg_mut(), x.arg(), KArg::F32(2.0), KArg::I64(5)]).unwrap();
//! }
//! let rows = dev.take_profile().unwrap();
//! assert_eq!(rows.len(), 1);
//! assert_eq!((rows[0].name.as_str(), rows[0].calls), ("scale_f32", 3));
//! assert!(rows[0].ms > 0.0);
//! // taken means cleared; off means nothing is recorded
//! dev.set_profiling(false);
//! dev.launch("scale_f32", LaunchCfg::linear(5, 128),
//!            &[y.arg_mut(), x.arg(), KArg::F32(2.0), KArg::I64(5)]).unwrap();
//! assert!(dev.take_profile().unwrap().is_empty());
//! ```
//!
//! The events cost the GPU almost nothing but each costs the host a driver call, so a
//! profiled step is not a timed step: time with profiling off, then profile one more.
use super::Device;
use crate::error::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// One row of a profile: a kernel (or a product's shape), its launches and their total
/// time.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// Kernel name, or `sgemm MxKxN` with the transposes.
    pub name: String,
    /// Launches recorded.
    pub calls: usize,
    /// Their total time in milliseconds.
    pub ms: f64,
}

/// A product's row name: `sgemm MxKxN`, whether `a`, `b` are transposed (`N`/`T`), and
/// ` xB` for a batch of B products (`Backend::matmul_batched`); the same for cuBLAS on a
/// GPU and the emulator's host product.
pub(crate) fn sgemm_name([m, k, n]: [usize; 3], ta: bool, tb: bool, batch: usize) -> String {
    let t = |x: bool| if x { 'T' } else { 'N' };
    let times = if batch == 1 {
        String::new()
    } else {
        format!(" x{batch}")
    };
    format!("sgemm {m}x{k}x{n} {}{}{times}", t(ta), t(tb))
}

/// One end of a launch: the host clock on the emulator, an event on a GPU's stream.
pub(crate) enum Start {
    Host(Instant),
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaEvent),
}

/// Milliseconds from `a` to `b` (a GPU's events are read, waiting for them, here).
fn elapsed_ms(a: &Start, b: &Start) -> Result<f64> {
    match (a, b) {
        (Start::Host(a), Start::Host(b)) => Ok((*b - *a).as_secs_f64() * 1e3),
        #[cfg(feature = "cuda")]
        (Start::Cuda(a), Start::Cuda(b)) => a
            .elapsed_ms(b)
            .map(f64::from)
            .map_err(|e| crate::error::Error::Device(format!("profile: {e}"))),
        #[cfg(feature = "cuda")]
        _ => Err(crate::error::Error::Device(
            "profile: a launch marked by two clocks".into(),
        )),
    }
}

/// The recorder a [`Device`] carries: each launch's name and its two ends.
#[derive(Default)]
pub(crate) struct Profiler {
    on: AtomicBool,
    marks: Mutex<Vec<(String, Start, Start)>>,
}

impl Profiler {
    pub(crate) fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    pub(crate) fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    pub(crate) fn finish(&self, name: String, start: Start, end: Start) {
        self.lock().push((name, start, end));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Start, Start)>> {
        // a panic while pushing leaves a valid Vec: keep using it
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sums by name, largest total first; clears the marks.
    pub(crate) fn take(&self) -> Result<Vec<KernelTime>> {
        let marks = std::mem::take(&mut *self.lock());
        let mut rows: Vec<KernelTime> = Vec::new();
        for (name, start, end) in marks {
            let ms = elapsed_ms(&start, &end)?;
            match rows.iter_mut().find(|r| r.name == name) {
                Some(r) => {
                    r.calls += 1;
                    r.ms += ms;
                }
                None => rows.push(KernelTime { name, calls: 1, ms }),
            }
        }
        rows.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
        Ok(rows)
    }
}

impl Device {
    /// Record the time of every launch and product from now on (`true`) or stop (`false`);
    /// see [the module docs](self).
    pub fn set_profiling(&self, on: bool) {
        self.profiler().set(on);
    }

    /// The launches recorded since profiling was turned on or last taken, summed by
    /// name, largest total first; clears them.  Waits for the device's work.
    pub fn take_profile(&self) -> Result<Vec<KernelTime>> {
        self.synchronize()?;
        self.profiler().take()
    }
}
