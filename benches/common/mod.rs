//! Pieces shared by the kernel benches (`mod common;` in each).
use criterion::{Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

/// The memory-copy baseline every bench measures in the same run: `cpu_memcpy_{MB}MB`,
/// throughput counted as read + write.
pub fn memcpy_baseline(c: &mut Criterion, bytes: usize) {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut g = c.benchmark_group(format!("cpu_memcpy_{}MB", bytes >> 20));
    g.throughput(Throughput::Bytes(2 * bytes as u64));
    g.bench_function("copy", |b| b.iter(|| dst.copy_from_slice(black_box(&src))));
    g.finish();
}

/// Short criterion runs: 10 samples, 0.5 s warm-up, 2 s measurement (the machine is
/// shared; these benches look for gross changes, not 1 % ones).
pub fn quick() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}
