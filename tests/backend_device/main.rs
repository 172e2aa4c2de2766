//! The device backend on the CUDA emulator against the CPU backend (the reference):
//! every op of the contract at odd sizes, forward and backward, relative error ≤ 1e-5 of
//! the output's scale; bad sizes are errors; buffers stay on the device (host↔device
//! copies counted); a tiny LLaMA's training step equals the CPU's.
//!
//! Here: the helpers the modules share; `elementwise` adds, copies, reductions and the
//! optimizer, `layers` the layers' ops, `image` the pixel decoder's, `llama` a tiny
//! LLaMA decoding and training.
use popen::backend::{
    Accum, Act, AdamWStep, AttnLayout, AttnShape, Backend, Cols, Cpu, DeviceBackend, GateUp,
    KvAppend, MatmulSpec, RowCopy, TimeCopy,
};
use popen::kernels::philox::Philox;
use popen::kernels::Device;

/// Relative tolerance against the largest reference value.
const TOL: f32 = 1e-5;

/// The device backend on every test device: the emulator, and GPU 0 when present (see
/// `Device::test_devices`; `POPEN_TEST_CUDA=1` requires it).
fn backends() -> Vec<DeviceBackend> {
    Device::test_devices()
        .into_iter()
        .map(DeviceBackend::new)
        .collect()
}

fn rnd(r: &mut Philox, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| r.uniform(-scale, scale) as f32).collect()
}

/// `got` equals `want` within TOL of want's scale.
#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= TOL * scale,
            "{what}[{i}]: device {g} vs cpu {w} (scale {scale})"
        );
    }
}

/// The same host data on both backends.
fn both(d: &DeviceBackend, x: &[f32]) -> (Vec<f32>, popen::kernels::DeviceBuf<f32>) {
    (x.to_vec(), d.from_slice(x))
}

mod elementwise;
mod fused;
mod image;
mod layers;
mod llama;
