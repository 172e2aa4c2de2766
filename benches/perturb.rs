//! Noise perturbation on the CPU (and one small emulator run) with throughput beside a
//! memory-copy baseline measured in the same run.
//! Bytes counted: each copy reads the image and writes the copy (2·E·4 per copy).
mod common;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use popen::kernels::perturb::*;
use popen::kernels::philox::Philox;
use popen::kernels::Device;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    common::memcpy_baseline(c, 32 << 20);

    // Np = 30 copies (the paper's) of one 3 × 336 × 336 image (LLaVA-1.5's CLIP input);
    // rectangles of 1/8 to 1/2 of each side
    let (b, ch, h, w) = (1usize, 3usize, 336usize, 336usize);
    let cfg = PerturbCfg {
        np: 30,
        sigma: 0.5,
        rect_h: (h / 8, h / 2),
        rect_w: (w / 8, w / 2),
        seed: 7,
        first_copy: 0,
    };
    let e = ch * h * w;
    let mut rng = Philox::new(1);
    let img: Vec<f32> = (0..b * e).map(|_| rng.next_f32()).collect();
    let mut out = vec![0f32; cfg.np * b * e];
    let mut rects = vec![Rect::default(); cfg.np * b];
    let mut g = c.benchmark_group("cpu_perturb_30x3x336x336");
    g.throughput(Throughput::Bytes((2 * cfg.np * b * e * 4) as u64));
    g.bench_function("fwd", |bn| {
        bn.iter(|| perturb_cpu(black_box(&img), b, ch, h, w, &cfg, &mut out, &mut rects).unwrap())
    });
    // the noise-only cost: a full-image rectangle
    let full = PerturbCfg {
        rect_h: (h, h),
        rect_w: (w, w),
        ..cfg
    };
    g.bench_function("fwd_full_rect", |bn| {
        bn.iter(|| perturb_cpu(black_box(&img), b, ch, h, w, &full, &mut out, &mut rects).unwrap())
    });
    g.finish();

    // the GPU on the CPU shape, when one is present (tools/gpu_check.sh)
    if let Ok(dev) = Device::cuda(0) {
        let id = dev.upload(&img).unwrap();
        let mut od = dev.zeros::<f32>(cfg.np * b * e).unwrap();
        let mut rd = dev.zeros::<i32>(cfg.np * b * 4).unwrap();
        let mut g = c.benchmark_group("cuda_perturb_30x3x336x336");
        g.throughput(Throughput::Bytes((2 * cfg.np * b * e * 4) as u64));
        for (name, cf) in [("fwd", cfg), ("fwd_full_rect", full)] {
            g.bench_function(name, |bn| {
                bn.iter(|| {
                    perturb(&dev, &id, b, ch, h, w, &cf, &mut od, &mut rd).unwrap();
                    dev.synchronize().unwrap()
                })
            });
        }
        g.finish();
    }

    // the emulator on a small shape: checks the launch path, not a speed claim
    let dev = Device::emulator();
    let (hs, ws) = (33usize, 37usize);
    let small = PerturbCfg {
        np: 4,
        rect_h: (4, 16),
        rect_w: (4, 16),
        ..cfg
    };
    let id = dev.upload(&img[..ch * hs * ws]).unwrap();
    let mut od = dev.zeros::<f32>(small.np * ch * hs * ws).unwrap();
    let mut rd = dev.zeros::<i32>(small.np * 4).unwrap();
    let mut g = c.benchmark_group("emu_perturb_4x3x33x37");
    g.throughput(Throughput::Bytes((2 * small.np * ch * hs * ws * 4) as u64));
    g.bench_function("fwd", |bn| {
        bn.iter(|| {
            perturb(&dev, &id, 1, ch, hs, ws, &small, &mut od, &mut rd).unwrap();
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
