//! Mask metrics: CPU twins (and one small emulator run) with throughput beside a
//! memory-copy baseline measured in the same run.
//! Bytes counted: the mask bytes each op must read (u8 masks; f32 probabilities +
//! u8 targets for soft IoU); the copy counts read + write.
mod common;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use popen::kernels::mask::*;
use popen::kernels::philox::Philox;
use popen::kernels::Device;
use std::hint::black_box;

const H: usize = 480;
const W: usize = 640;

fn blobs(n: usize, seed: u64) -> Vec<u8> {
    let mut r = Philox::new(seed);
    let mut m = vec![0u8; n * H * W];
    for k in 0..n {
        let (cy, cx) = (
            (r.next_u32() as usize % H) as i64,
            (r.next_u32() as usize % W) as i64,
        );
        let rad = 20 + (r.next_u32() % 200) as i64;
        for y in 0..H {
            for x in 0..W {
                let (dy, dx) = (y as i64 - cy, x as i64 - cx);
                if dy * dy + dx * dx <= rad * rad {
                    m[k * H * W + y * W + x] = 255;
                }
            }
        }
    }
    m
}

fn bench(c: &mut Criterion) {
    common::memcpy_baseline(c, 32 << 20);
    let hw = H * W;
    // one pair (eval-masks): read 2·HW bytes
    let (p1, g1) = (blobs(1, 1), blobs(1, 2));
    let mut i1 = [0u64];
    let mut u1 = [0u64];
    let mut g = c.benchmark_group("cpu_pair_counts_1x1_480x640");
    g.throughput(Throughput::Bytes(2 * hw as u64));
    g.bench_function("bytes", |b| {
        b.iter(|| pair_counts_cpu(black_box(&p1), &g1, 1, 1, H, W, &mut i1, &mut u1).unwrap())
    });
    g.finish();
    // proposals × references (Eq. 1): the pair loop reads 2·HW bytes per pair
    let (p, q) = (16, 4);
    let (pm, gm) = (blobs(p, 3), blobs(q, 4));
    let mut inter = vec![0u64; p * q];
    let mut union = vec![0u64; p * q];
    let mut g = c.benchmark_group("cpu_pair_counts_16x4_480x640");
    g.throughput(Throughput::Bytes((2 * p * q * hw) as u64));
    g.bench_function("bytes", |b| {
        b.iter(|| pair_counts_cpu(black_box(&pm), &gm, p, q, H, W, &mut inter, &mut union).unwrap())
    });
    g.finish();
    // Boundary IoU of one pair: reads 2·HW bytes
    let mut g = c.benchmark_group("cpu_boundary_iou_480x640");
    g.throughput(Throughput::Bytes(2 * hw as u64));
    g.bench_function("packed", |b| {
        b.iter(|| boundary_iou_cpu(black_box(&p1), &g1, H, W, DEFAULT_DILATION_RATIO).unwrap())
    });
    g.finish();
    // soft IoU forward + backward on 8 masks: reads 5 B/pixel, bwd writes 4 B/pixel
    let nb = 8;
    let mut r = Philox::new(5);
    let prob: Vec<f32> = (0..nb * hw).map(|_| r.next_f32()).collect();
    let tgt = blobs(nb, 6);
    let mut iou = vec![0f32; nb];
    let mut sums = vec![0f32; 3 * nb];
    let mut dp = vec![0f32; nb * hw];
    let diou = vec![1f32; nb];
    let mut g = c.benchmark_group("cpu_soft_iou_8x480x640");
    g.throughput(Throughput::Bytes((5 * nb * hw) as u64));
    g.bench_function("fwd", |b| {
        b.iter(|| soft_iou_fwd_cpu(black_box(&prob), &tgt, nb, hw, &mut iou).unwrap())
    });
    soft_iou_sums_cpu(&prob, &tgt, nb, hw, &mut sums).unwrap();
    g.throughput(Throughput::Bytes((5 * nb * hw) as u64));
    g.bench_function("bwd", |b| {
        b.iter(|| soft_iou_bwd_cpu(black_box(&tgt), &sums, &diou, nb, hw, &mut dp).unwrap())
    });
    g.finish();
    // the GPU on the CPU shapes, when one is present (tools/gpu_check.sh)
    if let Ok(dev) = Device::cuda(0) {
        let (pd, gd) = (dev.upload(&pm).unwrap(), dev.upload(&gm).unwrap());
        let mut di = dev.zeros::<u64>(p * q).unwrap();
        let mut du = dev.zeros::<u64>(p * q).unwrap();
        let mut g = c.benchmark_group("cuda_pair_counts_16x4_480x640");
        g.throughput(Throughput::Bytes((2 * p * q * hw) as u64));
        g.bench_function("bytes", |b| {
            b.iter(|| {
                pair_counts(&dev, &pd, &gd, p, q, H, W, &mut di, &mut du).unwrap();
                dev.synchronize().unwrap()
            })
        });
        g.finish();
        let mut g = c.benchmark_group("cuda_boundary_pair_counts_16x4_480x640");
        g.throughput(Throughput::Bytes(((p + q) * hw) as u64));
        g.bench_function("erode", |b| {
            b.iter(|| {
                boundary_pair_counts(&dev, &pd, &gd, p, q, H, W, 0.02, &mut di, &mut du).unwrap();
                dev.synchronize().unwrap()
            })
        });
        g.finish();
        let (prd, tgd) = (dev.upload(&prob).unwrap(), dev.upload(&tgt).unwrap());
        let mut iod = dev.zeros::<f32>(nb).unwrap();
        let mut sd = dev.zeros::<f32>(3 * nb).unwrap();
        let mut g = c.benchmark_group("cuda_soft_iou_8x480x640");
        g.throughput(Throughput::Bytes((5 * nb * hw) as u64));
        g.bench_function("fwd", |b| {
            b.iter(|| {
                soft_iou_fwd(&dev, &prd, &tgd, nb, hw, &mut iod, &mut sd).unwrap();
                dev.synchronize().unwrap()
            })
        });
        g.finish();
    }

    // the emulator on a small shape: checks the launch path, not a speed claim
    let dev = Device::emulator();
    let (hs, ws) = (61, 67);
    let sm: Vec<u8> = p1[..hs * ws].to_vec();
    let (pd, gd) = (dev.upload(&sm).unwrap(), dev.upload(&sm).unwrap());
    let mut di = dev.zeros::<u64>(1).unwrap();
    let mut du = dev.zeros::<u64>(1).unwrap();
    let mut g = c.benchmark_group("emu_boundary_pair_counts_61x67");
    g.throughput(Throughput::Bytes(2 * (hs * ws) as u64));
    g.bench_function(BenchmarkId::from_parameter("1x1"), |b| {
        b.iter(|| {
            boundary_pair_counts(&dev, &pd, &gd, 1, 1, hs, ws, 0.02, &mut di, &mut du).unwrap();
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
