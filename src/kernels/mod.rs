//! Hand-written CUDA kernels (`kernels/*.cu`), their CPU twins, and launch wrappers.
//!
//! Every kernel family has three pieces under one name: the `.cu` kernel, a launch
//! wrapper that takes a [`Device`], and a CPU twin in plain Rust.  The twin is both the
//! CPU backend and the reference the kernel is tested against.  Without a GPU the same
//! `.cu` source runs on the host through the CUDA emulator (see [`device`]), so
//! `cargo test` checks every kernel on every machine.
pub mod attention;
pub mod device;
pub mod fastmath;
pub mod logprob;
pub mod mask;
pub mod perturb;
pub mod philox;
pub mod probe;
pub mod profile;
pub mod rows;
pub mod simd;

pub use device::{
    Device, DeviceBuf, DeviceKind, Elem, KArg, LaunchCfg, EMU_BLOCKS_PER_SM, EMU_SMS,
};
pub use profile::KernelTime;

mod gen {
    include!(concat!(env!("OUT_DIR"), "/kernels_gen.rs"));
}
pub use gen::{EMU_SELFTEST_KERNELS, KERNELS, PTX, PTXAS_REPORT, PTX_ARCH};
