//! Forward+backward tokens/s of a ~25M-parameter LLaMA on the CPU backend, the number
//! to hold against PyTorch: `tools/bench_llama_torch.py` runs transformers'
//! LlamaForCausalLM on the same config, batch, sequence length and thread count.
//!
//! `cargo bench --bench llama` (threads: POPEN_BENCH_THREADS, default 2);
//! `POPEN_BENCH_RAW=7 cargo bench --bench llama` prints median/min like the PyTorch script.
//! Compare with `OMP_WAIT_POLICY=PASSIVE python tools/bench_llama_torch.py --threads 2`
//! run right before or after (on a shared machine, alternate the two a few times), and
//! with `POPEN_BENCH_THREADS=1` against `--threads 1`, where contention matters least.
//! One step = zero grads, forward, log-prob of a target per position, backward of the
//! mean negative log-prob (the cross-entropy loss PyTorch's side uses).
//!
//! `cargo bench --bench llama -- linear_packed`: a frozen Linear's product, plain
//! against packed (`Linear::pack`), at decoding's row counts.
use criterion::{criterion_group, Criterion, Throughput};
use popen::backend::{Backend, Cpu};
use popen::nn::{randn, Linear, Llama, LlamaConfig, Rng};
use std::hint::black_box;

/// Keep in sync with CFG in tools/bench_llama_torch.py.
fn bench_cfg() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 8000,
        hidden_size: 512,
        intermediate_size: 1376,
        num_hidden_layers: 6,
        num_attention_heads: 8,
        num_key_value_heads: Some(4),
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
    }
}
const BATCH: usize = 4;
const SEQ: usize = 128;
const DEFAULT_THREADS: usize = 2;

fn threads() -> usize {
    std::env::var("POPEN_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_THREADS)
}

/// One training step's compute; returns the loss so nothing is optimised away.
fn step(m: &mut Llama, ids: &[u32], targets: &[i32]) -> f32 {
    let be = Cpu;
    let v = m.cfg.vocab_size;
    let n = ids.len();
    m.zero_grad();
    let (logits, acts) = m.forward(ids, BATCH, None, None).unwrap();
    let (mut lp, mut lse) = (vec![0.0f32; n], vec![0.0f32; n]);
    be.logprob_fwd(&logits, targets, v, &mut lp, &mut lse)
        .unwrap();
    // loss = −mean logp  so: dlogp = −1/N
    let dlogp = vec![-1.0 / n as f32; n];
    let mut dlogits = vec![0.0f32; n * v];
    be.logprob_bwd(&logits, targets, v, &lse, &dlogp, &mut dlogits)
        .unwrap();
    m.backward(&acts, &dlogits).unwrap();
    -lp.iter().sum::<f32>() / n as f32
}

fn bench(c: &mut Criterion) {
    let nt = threads();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(nt)
        .build()
        .unwrap();
    let cfg = bench_cfg();
    let params = cfg.num_params();
    let mut m: Llama = Llama::new(Cpu, cfg, 0).unwrap();
    let mut rng = Rng::new(1);
    let v = m.cfg.vocab_size as u64;
    let ids: Vec<u32> = (0..BATCH * SEQ)
        .map(|_| (rng.next_u64() % v) as u32)
        .collect();
    let targets: Vec<i32> = (0..BATCH * SEQ)
        .map(|_| (rng.next_u64() % v) as i32)
        .collect();
    let tokens = (BATCH * SEQ) as u64;
    // napkin math: a training step costs ≈ 6 FLOP per parameter per token (+ attention)
    let flops = 6.0 * params as f64 * tokens as f64;
    eprintln!(
        "llama bench: {params} parameters, B={BATCH} T={SEQ}, {nt} threads, ≈{:.1} GFLOP/step",
        flops / 1e9
    );

    let mut g = c.benchmark_group(format!("cpu_llama_fwd_bwd_25m_b{BATCH}_t{SEQ}_{nt}thr"));
    g.sample_size(10);
    g.throughput(Throughput::Elements(tokens));
    g.bench_function("step", |b| {
        b.iter(|| pool.install(|| black_box(step(&mut m, &ids, &targets))))
    });
    g.finish();

    // stage 3 shape: every weight frozen, the gradient only reaches the input
    // embeddings (the learnable prompt): no weight-gradient GEMMs, so ≈ 2/3 of the cost
    m.set_trainable(false);
    let mut g = c.benchmark_group(format!(
        "cpu_llama_fwd_bwd_frozen_25m_b{BATCH}_t{SEQ}_{nt}thr"
    ));
    g.sample_size(10);
    g.throughput(Throughput::Elements(tokens));
    g.bench_function("step", |b| {
        b.iter(|| pool.install(|| black_box(step(&mut m, &ids, &targets))))
    });
    g.finish();

    // memory-copy baseline in the same run: one pass over the parameters' bytes
    let src = vec![1.0f32; params];
    let mut dst = vec![0.0f32; params];
    let mut g = c.benchmark_group(format!("cpu_memcpy_{}mb", (params * 4) >> 20));
    g.sample_size(10);
    g.throughput(Throughput::Bytes((params * 4) as u64));
    g.bench_function("copy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(dst[0])
        })
    });
    g.finish();
}

/// A frozen Linear's forward, plain (`[out, in]`) against packed (`[in, out]`,
/// `Linear::pack`), at the world model's LLM shapes and decoding's row counts (one row
/// per answer being generated; a batch of 16 questions, or 16 × K samples):
/// `cargo bench --bench llama -- linear_packed`.
fn bench_linear(c: &mut Criterion) {
    let be = Cpu;
    let mut rng = Rng::new(2);
    let mut g = c.benchmark_group("cpu_linear_packed");
    g.sample_size(20);
    g.warm_up_time(std::time::Duration::from_millis(300));
    g.measurement_time(std::time::Duration::from_millis(800));
    for (fan_in, fan_out) in [(192, 192), (192, 512), (512, 192), (192, 804)] {
        let mut plain = Linear::new(&be, fan_in, fan_out, false);
        plain.weight.data = randn(&mut rng, fan_in * fan_out, 0.1);
        plain.weight.grad = None;
        let mut packed = plain.clone();
        packed.pack(&be).unwrap();
        for rows in [1, 2, 8, 16, 48] {
            let x: Vec<f32> = randn(&mut rng, rows * fan_in, 1.0);
            for (name, l) in [("plain", &plain), ("packed", &packed)] {
                g.bench_function(format!("{fan_in}x{fan_out}_rows{rows}/{name}"), |b| {
                    // timed on a thread of rayon's pool, as the `popen` binary runs its
                    // commands (`on_worker`): from the main thread each product large
                    // enough to split would pay two cross-thread wake-ups
                    b.iter_custom(|iters| {
                        popen::backend::cpu::on_worker(|| {
                            let t = std::time::Instant::now();
                            for _ in 0..iters {
                                black_box(l.forward(&be, &x).unwrap());
                            }
                            t.elapsed()
                        })
                    })
                });
            }
        }
    }
    g.finish();
}

/// `POPEN_BENCH_RAW=N`: skip criterion, time N steps after 2 warm-up steps and print one
/// JSON line with the median and minimum, the same statistics as the PyTorch script
/// (on a shared machine the minimum is the least disturbed step).
fn raw(iters: usize) {
    let nt = threads();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(nt)
        .build()
        .unwrap();
    let cfg = bench_cfg();
    let params = cfg.num_params();
    let mut m: Llama = Llama::new(Cpu, cfg, 0).unwrap();
    let mut rng = Rng::new(1);
    let v = m.cfg.vocab_size as u64;
    let ids: Vec<u32> = (0..BATCH * SEQ)
        .map(|_| (rng.next_u64() % v) as u32)
        .collect();
    let targets: Vec<i32> = (0..BATCH * SEQ)
        .map(|_| (rng.next_u64() % v) as i32)
        .collect();
    let frozen = std::env::var("POPEN_BENCH_FROZEN").is_ok_and(|s| s == "1");
    if frozen {
        m.set_trainable(false);
    }
    let mut times = vec![];
    let mut cpu0 = 0.0;
    for i in 0..iters + 2 {
        if i == 2 {
            cpu0 = process_cpu_s();
        }
        let t0 = std::time::Instant::now();
        pool.install(|| black_box(step(&mut m, &ids, &targets)));
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let cpu_per_step = (process_cpu_s() - cpu0) / iters as f64;
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    println!(
        "{{\"impl\": \"popen cpu{}\", \"threads\": {nt}, \"params\": {params}, \"batch\": {BATCH}, \"seq\": {SEQ}, \"median_s\": {med:.4}, \"min_s\": {:.4}, \"tokens_per_s\": {:.1}, \"cpu_s_per_step\": {cpu_per_step:.3}}}",
        if frozen { " (frozen)" } else { "" },
        times[0],
        (BATCH * SEQ) as f64 / med
    );
}

/// User + system CPU seconds of this process (Linux `/proc/self/stat`, 100 Hz ticks;
/// NaN elsewhere).  On a shared machine CPU time per step is steadier than wall time.
fn process_cpu_s() -> f64 {
    const TICKS_PER_S: f64 = 100.0;
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // fields after the parenthesised command name; utime and stime are the 14th and 15th
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        f.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (tick(11) + tick(12)) / TICKS_PER_S
}

criterion_group!(benches, bench, bench_linear);

fn main() {
    if let Some(n) = std::env::var("POPEN_BENCH_RAW")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        raw(n);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
