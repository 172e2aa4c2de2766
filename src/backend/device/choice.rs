//! Which backend a command runs a model on: `--device cpu|emu|cuda[:N]`.
use crate::backend::{Backend, Cpu, DeviceBackend};
use crate::error::{Error, Result};
use crate::kernels::{Device, KernelTime};
use std::fmt;
use std::str::FromStr;

/// A `--device` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU backend (the reference).
    Cpu,
    /// The device backend on the CUDA emulator (slow; for checking the kernels).
    Emu,
    /// The device backend on GPU `N` (`cuda` = `cuda:0`).
    Cuda(usize),
}

/// Work written once, generic over the backend, that [`DeviceChoice::run`] runs on the
/// backend a `--device` names (Rust has no generic closures, so a job is a type).
pub trait OnBackend {
    /// What the job returns.
    type Out;
    /// Runs the job on `be`.
    fn run<B: Backend<f32>>(self, be: B) -> Result<Self::Out>;
}

impl DeviceChoice {
    /// Opens this device and runs `job` on it: the CPU backend, the device backend on
    /// the emulator, or the device backend on GPU `N` (an error, never a panic, when
    /// this build or machine has no such GPU).
    pub fn run<J: OnBackend>(self, job: J) -> Result<J::Out> {
        match self {
            DeviceChoice::Cpu => job.run(Cpu),
            _ => job.run(self.device_backend()?),
        }
    }

    /// [`run`](Self::run) with every kernel launch and matrix product of the job timed
    /// ([`Device::set_profiling`]): the job's result and the per-kernel table, largest
    /// total first.  An error before any work on `cpu`, which launches no kernels.
    pub fn run_profiled<J: OnBackend>(self, job: J) -> Result<(J::Out, Vec<KernelTime>)> {
        if self == DeviceChoice::Cpu {
            return Err(Error::arg(
                "--profile",
                "the CPU backend launches no kernels: profile with --device emu or cuda[:N]",
            ));
        }
        let be = self.device_backend()?;
        be.device().set_profiling(true);
        let out = job.run(be.clone())?;
        let rows = be.device().take_profile()?;
        be.device().set_profiling(false);
        Ok((out, rows))
    }

    /// The device backend on the emulator or on GPU `N`; an error on `cpu`.
    fn device_backend(self) -> Result<DeviceBackend> {
        match self {
            DeviceChoice::Cpu => Err(Error::arg("--device", "cpu is not a kernel device")),
            DeviceChoice::Emu => Ok(DeviceBackend::new(Device::emulator())),
            DeviceChoice::Cuda(n) => {
                let dev = Device::cuda(n).map_err(|e| {
                    let why = match e {
                        Error::Device(m) => m,
                        other => other.to_string(),
                    };
                    Error::Device(format!("--device cuda:{n}: {why}"))
                })?;
                Ok(DeviceBackend::new(dev))
            }
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::arg(
                "--device",
                format!("`{s}` is not a device: use cpu, emu, cuda or cuda:N"),
            )
        };
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "emu" => Ok(DeviceChoice::Emu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(bad),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Emu => f.write_str("emu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DeviceChoice;

    #[test]
    fn device_choices_parse_and_print() {
        for (s, d) in [
            ("cpu", DeviceChoice::Cpu),
            ("emu", DeviceChoice::Emu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap(), d);
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(e.to_string().contains("cpu, emu, cuda or cuda:N"), "{e}");
        }
    }
}
