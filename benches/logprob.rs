//! DPO log-prob reductions on the CPU (and one small emulator run) with throughput
//! beside a memory-copy baseline measured in the same run.
//! Bytes counted: fwd reads the logits (R·V·4); bwd reads logits and writes dlogits
//! (2·R·V·4); the copy counts read + write.
mod common;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use popen::kernels::logprob::*;
use popen::kernels::philox::Philox;
use popen::kernels::Device;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    common::memcpy_baseline(c, 32 << 20);

    // B = 4 sequences of T = 64 over a LLaMA vocabulary of 32000
    let (b, t, v) = (4usize, 64usize, 32000usize);
    let r = b * t;
    let mut rng = Philox::new(1);
    let logits: Vec<f32> = (0..r * v).map(|_| rng.next_f32() * 20.0 - 10.0).collect();
    let targets: Vec<i32> = (0..r).map(|_| (rng.next_u32() % v as u32) as i32).collect();
    let w: Vec<f32> = (0..r).map(|i| if i % t < 8 { 0.0 } else { 1.0 }).collect();
    let mut g = c.benchmark_group("cpu_logprob_4x64x32000");
    g.throughput(Throughput::Bytes((r * v * 4) as u64));
    g.bench_function("fwd", |bn| {
        bn.iter(|| {
            let (lp, _) = logprob_fwd_cpu(black_box(&logits), &targets, v).unwrap();
            seq_weighted_sum_cpu(&lp, &w, &targets, v, b, t, true).unwrap()
        })
    });
    let (lp, lse) = logprob_fwd_cpu(&logits, &targets, v).unwrap();
    let (_, scale) = seq_weighted_sum_cpu(&lp, &w, &targets, v, b, t, true).unwrap();
    let d_out = vec![1f32; b];
    let mut dl = vec![0f32; r * v];
    g.throughput(Throughput::Bytes((2 * r * v * 4) as u64));
    g.bench_function("bwd", |bn| {
        bn.iter(|| {
            logprob_bwd_cpu(
                black_box(&logits),
                &lse,
                &targets,
                &w,
                &d_out,
                &scale,
                t,
                v,
                &mut dl,
            )
            .unwrap()
        })
    });
    g.finish();

    // the GPU on the CPU shape, when one is present (tools/gpu_check.sh)
    if let Ok(dev) = Device::cuda(0) {
        let ld = dev.upload(&logits).unwrap();
        let td = dev.upload(&targets).unwrap();
        let wd = dev.upload(&w).unwrap();
        let dd = dev.upload(&d_out).unwrap();
        let mut lpd = dev.zeros::<f32>(r).unwrap();
        let mut lsed = dev.zeros::<f32>(r).unwrap();
        let mut od = dev.zeros::<f32>(b).unwrap();
        let mut sd = dev.zeros::<f32>(b).unwrap();
        let mut dld = dev.zeros::<f32>(r * v).unwrap();
        let mut g = c.benchmark_group("cuda_logprob_4x64x32000");
        g.throughput(Throughput::Bytes((r * v * 4) as u64));
        g.bench_function("fwd", |bn| {
            bn.iter(|| {
                logprob_fwd(&dev, &ld, &td, v, &mut lpd, &mut lsed).unwrap();
                seq_weighted_sum(&dev, &lpd, &wd, &td, v, b, t, true, &mut od, &mut sd).unwrap();
                dev.synchronize().unwrap()
            })
        });
        g.throughput(Throughput::Bytes((2 * r * v * 4) as u64));
        g.bench_function("bwd", |bn| {
            bn.iter(|| {
                logprob_bwd(&dev, &ld, &lsed, &td, &wd, &dd, &sd, t, v, &mut dld).unwrap();
                dev.synchronize().unwrap()
            })
        });
        g.finish();
    }

    // the emulator on a small shape: checks the launch path, not a speed claim
    let dev = Device::emulator();
    let (rs, vs) = (8usize, 1031usize);
    let ld = dev.upload(&logits[..rs * vs]).unwrap();
    let td = dev.upload(&vec![3i32; rs]).unwrap();
    let mut lpd = dev.zeros::<f32>(rs).unwrap();
    let mut lsed = dev.zeros::<f32>(rs).unwrap();
    let mut g = c.benchmark_group("emu_logprob_8x1031");
    g.throughput(Throughput::Bytes((rs * vs * 4) as u64));
    g.bench_function("fwd", |bn| {
        bn.iter(|| {
            logprob_fwd(&dev, &ld, &td, vs, &mut lpd, &mut lsed).unwrap();
            dev.synchronize().unwrap()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::quick();
    targets = bench
}
criterion_main!(benches);
