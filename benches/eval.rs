//! `popen eval` throughput on a synthetic MUSE-like set: 500 images of 480×640, 4
//! questions each (2000 questions), 6 objects per image, 0–5 targets per question,
//! predictions = shifted/scaled targets plus spurious masks, all as compressed COCO RLE.
//!
//! Groups: `cpu_eval_full_480x640` (parse + validate + score, what `popen eval` does
//! after reading the files), `cpu_eval_decode_480x640` (parse + validate + decode every
//! mask to the foreground intervals the evaluator counts on, nothing else: the decoding
//! floor), `cpu_memcpy_480x640` (copying as many bytes as the masks have pixels: what
//! dense decoding would cost at memory speed).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use popen::data::muse::{RleJson, Segmentation};
use popen::data::Rle;
use popen::metrics::chair::Vocab;
use popen::metrics::eval::{evaluate, parse_data, parse_preds, EvalConfig};
use popen::metrics::raster::{rle_runs, Runs};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::path::Path;

const H: usize = 480;
const W: usize = 640;
const IMAGES: usize = 500;
const QUESTIONS: usize = 4;
const OBJECTS: usize = 6;
const SEED: u64 = 7;

/// SplitMix64: the bench needs no RNG crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn f(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Clone, Copy)]
struct Ellipse {
    cy: f64,
    cx: f64,
    ry: f64,
    rx: f64,
}

/// Column-major runs of an ellipse, built column by column (no dense mask).
fn ellipse_rle(e: Ellipse) -> Value {
    let mut counts = Vec::new();
    let mut last_end = 0usize; // end of the last foreground run (pixel index)
    for x in 0..W {
        let dx = (x as f64 + 0.5 - e.cx) / e.rx;
        if dx.abs() >= 1.0 {
            continue;
        }
        let half = e.ry * (1.0 - dx * dx).sqrt();
        let y0 = (e.cy - half - 0.5).ceil().clamp(0.0, H as f64) as usize;
        let y1 = (e.cy + half - 0.5).ceil().clamp(0.0, H as f64) as usize;
        if y1 <= y0 {
            continue;
        }
        let (s, t) = (x * H + y0, x * H + y1);
        if s == last_end && !counts.is_empty() {
            *counts.last_mut().unwrap() += (t - s) as u32; // continues the last run
        } else {
            counts.push((s - last_end) as u32);
            counts.push((t - s) as u32);
        }
        last_end = t;
    }
    counts.push((H * W - last_end) as u32);
    let r = Rle {
        height: H,
        width: W,
        counts,
    };
    serde_json::to_value(RleJson::from_rle(&r)).unwrap()
}

fn random_ellipse(r: &mut Rng) -> Ellipse {
    Ellipse {
        cy: r.f() * H as f64,
        cx: r.f() * W as f64,
        ry: 15.0 + r.f() * 120.0,
        rx: 15.0 + r.f() * 160.0,
    }
}

/// (DATA.json text, PRED.jsonl text, questions, masks decoded by the evaluator)
fn generate() -> (String, String, usize, usize) {
    let mut r = Rng(SEED);
    let cats = [
        "cup", "fork", "knife", "laptop", "book", "chair", "plant", "clock",
    ];
    let mut data = Vec::new();
    let mut lines = Vec::new();
    let mut masks = 0usize;
    for i in 0..IMAGES {
        let objs: Vec<Ellipse> = (0..OBJECTS).map(|_| random_ellipse(&mut r)).collect();
        let anns: Vec<Value> = objs
            .iter()
            .map(|&e| json!({"category_name": cats[r.below(cats.len())], "segmentation": ellipse_rle(e)}))
            .collect();
        masks += OBJECTS;
        let mut answers = Vec::new();
        let file = format!("{i:05}.jpg");
        for q in 0..QUESTIONS {
            let k = r.below(6);
            let targets: Vec<usize> = (0..k)
                .map(|_| r.below(OBJECTS))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            answers.push(targets.iter().map(|&t| anns[t].clone()).collect::<Vec<_>>());
            masks += targets.len();
            let mut preds = Vec::new();
            for &t in &targets {
                if r.f() < 0.15 {
                    continue; // missed target
                }
                let e = objs[t];
                preds.push(ellipse_rle(Ellipse {
                    cy: e.cy + (r.f() - 0.5) * 30.0,
                    cx: e.cx + (r.f() - 0.5) * 30.0,
                    ry: e.ry * (0.8 + 0.4 * r.f()),
                    rx: e.rx * (0.8 + 0.4 * r.f()),
                }));
            }
            if r.f() < 0.3 {
                preds.push(ellipse_rle(random_ellipse(&mut r))); // spurious
            }
            masks += preds.len();
            let text = format!(
                "There is a {} next to two {}s.",
                cats[r.below(cats.len())],
                cats[r.below(cats.len())]
            );
            lines.push(
                json!({"file_name": file, "question": q, "text": text, "masks": preds}).to_string(),
            );
        }
        data.push(json!({
            "file_name": file, "height": H, "width": W,
            "questions": (0..QUESTIONS).map(|q| format!("question {q}")).collect::<Vec<_>>(),
            "answers": answers, "ann_list": anns,
        }));
    }
    (
        Value::Array(data).to_string(),
        lines.join("\n"),
        IMAGES * QUESTIONS,
        masks,
    )
}

fn bench(c: &mut Criterion) {
    let (data_text, pred_text, nq, nmasks) = generate();
    let cfg = EvalConfig::default();
    let vocab = Vocab::embedded();
    let src = Path::new("bench");
    eprintln!(
        "eval bench: {nq} questions, {nmasks} masks of {H}x{W} ({:.1} GB dense), DATA {:.1} MB, PRED {:.1} MB",
        (nmasks * H * W) as f64 / 1e9,
        data_text.len() as f64 / 1e6,
        pred_text.len() as f64 / 1e6
    );

    let mut g = c.benchmark_group("cpu_eval_full_480x640");
    g.sample_size(10)
        .throughput(Throughput::Elements(nq as u64));
    g.bench_function(BenchmarkId::from_parameter(nq), |b| {
        b.iter(|| {
            let d = parse_data(&data_text, src).unwrap();
            let p = parse_preds(&pred_text, src, &d).unwrap();
            evaluate(&d, &p, &vocab, &cfg, src).unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("cpu_eval_decode_480x640");
    g.sample_size(10)
        .throughput(Throughput::Elements(nq as u64));
    g.bench_function(BenchmarkId::from_parameter(nq), |b| {
        b.iter(|| {
            let d = parse_data(&data_text, src).unwrap();
            let p = parse_preds(&pred_text, src, &d).unwrap();
            // decode what the evaluator decodes (to foreground intervals), per image
            d.par_iter()
                .zip(p.par_iter())
                .map(|(img, preds)| {
                    let anns = img
                        .answers
                        .iter()
                        .flatten()
                        .chain(img.ann_list.iter().flatten());
                    let mut fg = 0u64;
                    for a in anns {
                        if let Segmentation::Rle(r) = &a.segmentation {
                            fg += Runs::from_counts(&rle_runs(r, H, W).unwrap()).area;
                        }
                    }
                    for m in preds.iter().flatten().flat_map(|p| p.masks.iter()) {
                        fg += Runs::from_counts(m).area;
                    }
                    fg
                })
                .sum::<u64>()
        })
    });
    g.finish();

    // memory baseline: write + read the same number of mask bytes (in 64 MiB chunks)
    let chunk = 64 << 20;
    let src_buf = vec![1u8; chunk];
    let mut dst = vec![0u8; chunk];
    let total = nmasks * H * W;
    let mut g = c.benchmark_group("cpu_memcpy_480x640");
    g.sample_size(10)
        .throughput(Throughput::Bytes(total as u64));
    g.bench_function(BenchmarkId::from_parameter(nmasks), |b| {
        b.iter(|| {
            let mut left = total;
            while left > 0 {
                let n = left.min(chunk);
                dst[..n].copy_from_slice(&src_buf[..n]);
                left -= n;
            }
            std::hint::black_box(&dst);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
