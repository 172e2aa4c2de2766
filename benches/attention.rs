//! CPU twin of biased attention: forward and backward throughput, with a memory-copy
//! baseline measured in the same run.  The emulator is not timed (it runs fibers).
//!
//! Throughput is set in flops (criterion prints them as "elem/s": read Gelem/s as
//! GFLOP/s): forward `4·B·NH·pairs·HS`, backward 2.5× that, where `pairs` counts the
//! (query, key) pairs the causal rule lets through.  The same formula is used by
//! `tools/bench_attention_torch.py`, so the two rates compare directly.
//!
//! With `--features cuda` and a GPU, `cuda_attention_*` groups time the kernels too.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench --bench attention
//! RAYON_NUM_THREADS=1 ATTN_CPU_TIME=1 cargo bench --bench attention   # CPU time per call
//! /work/main/.venv/bin/python tools/bench_attention_torch.py --threads 2
//! ```
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use popen::kernels::attention::{
    attention_bwd, attention_bwd_cpu, attention_fwd, attention_fwd_cpu, AttnLayout, AttnShape,
};
use popen::kernels::Device;
use std::hint::black_box;
use std::time::Duration;

/// The benchmarked shapes: (name, shape, with padding mask).
fn shapes() -> Vec<(&'static str, AttnShape, bool)> {
    let base = AttnShape {
        b: 4,
        nh: 8,
        nkv: 8,
        tq: 256,
        tk: 256,
        kv_stride: 256,
        hs: 64,
        causal: false,
        scale: 0.125,
        layout: AttnLayout::HEADS,
    };
    vec![
        ("b4_h8_t256_d64_bias_mask", base, true),
        (
            "b4_h8_t256_d64_causal_bias",
            AttnShape {
                causal: true,
                ..base
            },
            false,
        ),
        (
            "b2_h8kv2_t512_d128_causal_bias",
            AttnShape {
                b: 2,
                nkv: 2,
                tq: 512,
                tk: 512,
                kv_stride: 512,
                hs: 128,
                scale: 1.0 / (128f32).sqrt(),
                causal: true,
                ..base
            },
            false,
        ),
    ]
}

/// Deterministic pseudo-random values in [-1, 1).
fn fill(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    bias: Vec<f32>,
    mask: Option<Vec<u8>>,
}

fn inputs(s: &AttnShape, masked: bool) -> Inputs {
    let nq = s.b * s.nh * s.tq * s.hs;
    let nk = s.b * s.nkv * s.tk * s.hs;
    Inputs {
        q: fill(nq, 1),
        k: fill(nk, 2),
        v: fill(nk, 3),
        bias: fill(s.b * s.tk, 4),
        // the last eighth of each sequence is padding
        mask: masked.then(|| {
            (0..s.b * s.tk)
                .map(|i| u8::from(i % s.tk < s.tk - s.tk / 8))
                .collect()
        }),
    }
}

fn bench(c: &mut Criterion) {
    for (name, s, masked) in shapes() {
        let x = inputs(&s, masked);
        let mut out = vec![0.0f32; x.q.len()];
        let mut lse = vec![0.0f32; s.b * s.nh * s.tq];

        let mut g = c.benchmark_group(format!("cpu_attention_fwd_{name}"));
        g.throughput(Throughput::Elements(s.fwd_flops() as u64));
        g.measurement_time(Duration::from_secs(3));
        g.bench_function(BenchmarkId::from_parameter("twin"), |bch| {
            bch.iter(|| {
                attention_fwd_cpu(
                    &s,
                    &x.q,
                    &x.k,
                    &x.v,
                    Some(&x.bias),
                    x.mask.as_deref(),
                    &mut out,
                    &mut lse,
                )
                .unwrap();
                black_box(&out);
            })
        });
        g.finish();

        let dout = fill(x.q.len(), 5);
        let (mut dq, mut dk, mut dv) = (
            vec![0.0f32; x.q.len()],
            vec![0.0f32; x.k.len()],
            vec![0.0f32; x.v.len()],
        );
        let mut db = vec![0.0f32; s.b * s.tk];
        let mut g = c.benchmark_group(format!("cpu_attention_bwd_{name}"));
        g.throughput(Throughput::Elements(s.bwd_flops() as u64));
        g.measurement_time(Duration::from_secs(3));
        g.bench_function(BenchmarkId::from_parameter("twin"), |bch| {
            bch.iter(|| {
                attention_bwd_cpu(
                    &s,
                    &x.q,
                    &x.k,
                    &x.v,
                    Some(&x.bias),
                    x.mask.as_deref(),
                    &out,
                    &lse,
                    &dout,
                    &mut dq,
                    &mut dk,
                    &mut dv,
                    Some(&mut db),
                )
                .unwrap();
                black_box(&dq);
            })
        });
        g.finish();

        // Baseline: copying the forward's inputs and output once (the least memory
        // traffic any implementation has), same run, same machine.
        let bytes = 4 * (x.q.len() * 2 + x.k.len() * 2);
        let src = fill(bytes / 4, 6);
        let mut dst = vec![0.0f32; bytes / 4];
        let mut g = c.benchmark_group(format!("cpu_memcpy_{name}"));
        g.throughput(Throughput::Bytes(bytes as u64));
        g.measurement_time(Duration::from_secs(2));
        g.bench_function(BenchmarkId::from_parameter("copy"), |bch| {
            bch.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&dst);
            })
        });
        g.finish();
    }
}

/// The CUDA kernels, when this build has the `cuda` feature and a GPU is present
/// (`cuda_attention_{fwd,bwd}_*`, synchronized inside the timed closure, with a
/// device-to-device copy of the same bytes as baseline).  Skipped otherwise.
fn bench_cuda(c: &mut Criterion) {
    let Ok(dev) = Device::cuda(0) else {
        eprintln!("no usable GPU: cuda_attention_* benches skipped");
        return;
    };
    for (name, s, masked) in shapes() {
        let x = inputs(&s, masked);
        let up = |v: &[f32]| dev.upload(v).unwrap();
        let (q, k, v, bias) = (up(&x.q), up(&x.k), up(&x.v), up(&x.bias));
        let mask = x.mask.as_ref().map(|m| dev.upload(m).unwrap());
        let mut out = dev.zeros::<f32>(x.q.len()).unwrap();
        let mut lse = dev.zeros::<f32>(s.b * s.nh * s.tq).unwrap();
        let mut g = c.benchmark_group(format!("cuda_attention_fwd_{name}"));
        g.throughput(Throughput::Elements(s.fwd_flops() as u64));
        g.bench_function(BenchmarkId::from_parameter("kernel"), |bch| {
            bch.iter(|| {
                attention_fwd(
                    &dev,
                    &s,
                    &q,
                    &k,
                    &v,
                    Some(&bias),
                    mask.as_ref(),
                    &mut out,
                    &mut lse,
                )
                .unwrap();
                dev.synchronize().unwrap();
            })
        });
        g.finish();
        let dout = up(&fill(x.q.len(), 5));
        let mut dq = dev.zeros::<f32>(x.q.len()).unwrap();
        let mut dk = dev.zeros::<f32>(x.k.len()).unwrap();
        let mut dv = dev.zeros::<f32>(x.v.len()).unwrap();
        let mut db = dev.zeros::<f32>(s.b * s.tk).unwrap();
        let mut g = c.benchmark_group(format!("cuda_attention_bwd_{name}"));
        g.throughput(Throughput::Elements(s.bwd_flops() as u64));
        g.bench_function(BenchmarkId::from_parameter("kernel"), |bch| {
            bch.iter(|| {
                attention_bwd(
                    &dev,
                    &s,
                    &q,
                    &k,
                    &v,
                    Some(&bias),
                    mask.as_ref(),
                    &out,
                    &lse,
                    &dout,
                    &mut dq,
                    &mut dk,
                    &mut dv,
                    Some(&mut db),
                )
                .unwrap();
                dev.synchronize().unwrap();
            })
        });
        g.finish();
        // Baseline: the forward's bytes (q, k, v in, out) moved once on the device,
        // timed as a device-side copy through the same launch path.
        let n = x.q.len() * 2 + x.k.len() * 2;
        let src = dev.zeros::<f32>(n).unwrap();
        let mut dst = dev.zeros::<f32>(n).unwrap();
        let mut g = c.benchmark_group(format!("cuda_memcpy_{name}"));
        g.throughput(Throughput::Bytes(4 * n as u64));
        g.bench_function(BenchmarkId::from_parameter("copy"), |bch| {
            bch.iter(|| {
                dev.launch(
                    "scale_f32",
                    popen::kernels::LaunchCfg::linear(n, 256),
                    &[
                        dst.arg_mut(),
                        src.arg(),
                        popen::kernels::KArg::F32(1.0),
                        popen::kernels::KArg::I32(n as i32),
                    ],
                )
                .unwrap();
                dev.synchronize().unwrap();
            })
        });
        g.finish();
    }
}

/// Process CPU time (user + system) from `/proc/self/stat`, in seconds; None off Linux.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesized command name; utime and stime are fields 14, 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux configuration we run on.
    const USER_HZ: f64 = 100.0;
    Some(ticks / USER_HZ)
}

/// `ATTN_CPU_TIME=1 cargo bench --bench attention`: instead of criterion, run each CPU
/// shape a fixed number of times and print CPU time per call beside wall time.  On a
/// machine shared with other jobs the CPU time is the steadier number (the same column
/// is printed by `tools/bench_attention_torch.py`).
fn cpu_time_report() {
    const REPS: usize = 40;
    for (name, s, masked) in shapes() {
        let x = inputs(&s, masked);
        let mut out = vec![0.0f32; x.q.len()];
        let mut lse = vec![0.0f32; s.b * s.nh * s.tq];
        let fwd = |out: &mut Vec<f32>, lse: &mut Vec<f32>| {
            attention_fwd_cpu(
                &s,
                &x.q,
                &x.k,
                &x.v,
                Some(&x.bias),
                x.mask.as_deref(),
                out,
                lse,
            )
            .unwrap()
        };
        fwd(&mut out, &mut lse);
        let dout = fill(x.q.len(), 5);
        let (mut dq, mut dk, mut dv) = (
            vec![0.0f32; x.q.len()],
            vec![0.0f32; x.k.len()],
            vec![0.0f32; x.v.len()],
        );
        let mut db = vec![0.0f32; s.b * s.tk];
        let mut bwd = || {
            attention_bwd_cpu(
                &s,
                &x.q,
                &x.k,
                &x.v,
                Some(&x.bias),
                x.mask.as_deref(),
                &out,
                &lse,
                &dout,
                &mut dq,
                &mut dk,
                &mut dv,
                Some(&mut db),
            )
            .unwrap()
        };
        bwd();
        let (mut o2, mut l2) = (out.clone(), lse.clone());
        let time = |f: &mut dyn FnMut()| {
            let (c0, w0) = (process_cpu_seconds(), std::time::Instant::now());
            for _ in 0..REPS {
                f();
            }
            let wall = w0.elapsed().as_secs_f64() / REPS as f64;
            let cpu = match (c0, process_cpu_seconds()) {
                (Some(a), Some(b)) => (b - a) / REPS as f64,
                _ => f64::NAN,
            };
            (cpu, wall)
        };
        let (cf, wf) = time(&mut || fwd(&mut o2, &mut l2));
        let (cb, wb) = time(&mut bwd);
        println!(
            "{name}: fwd cpu {:.3} ms wall {:.3} ms ({:.1} GFLOP/s by cpu time), \
             bwd cpu {:.3} ms wall {:.3} ms ({:.1} GFLOP/s by cpu time), {} rayon threads",
            cf * 1e3,
            wf * 1e3,
            s.fwd_flops() / cf / 1e9,
            cb * 1e3,
            wb * 1e3,
            s.bwd_flops() / cb / 1e9,
            rayon::current_num_threads()
        );
    }
}

criterion_group!(benches, bench, bench_cuda);

fn main() {
    if std::env::var_os("ATTN_CPU_TIME").is_some() {
        cpu_time_report();
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
