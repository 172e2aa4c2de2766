//! Throughput of the embedded world: samples/s of generation (scene draw, placement,
//! rendering, masks, questions) and of PNG encoding, with a memory-copy baseline of
//! the same image bytes in the same run.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use popen::data::world::{generate, Split, WorldConfig};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    for (h, w) in [(96usize, 128usize), (224, 224)] {
        let cfg = WorldConfig {
            height: h,
            width: w,
            questions: 3,
        };
        let mut g = c.benchmark_group(format!("cpu_world_generate_{h}x{w}"));
        g.throughput(Throughput::Elements(1));
        let mut i = 0usize;
        g.bench_function("sample", |b| {
            b.iter(|| {
                i += 1;
                black_box(generate(&cfg, 0, Split::Train, i).unwrap())
            })
        });
        let s = generate(&cfg, 0, Split::Train, 0).unwrap();
        g.bench_function("png_encode", |b| b.iter(|| black_box(s.png().unwrap())));
        g.finish();

        let mut g = c.benchmark_group(format!("cpu_memcpy_{h}x{w}x3"));
        g.throughput(Throughput::Bytes((h * w * 3) as u64));
        let src = s.image.data.clone();
        let mut dst = vec![0u8; src.len()];
        g.bench_function("copy", |b| b.iter(|| dst.copy_from_slice(black_box(&src))));
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
