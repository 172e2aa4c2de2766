//! The ensemble's cost against one answer (Sec. 3.3; the paper: 1.57×), on the CPU.
//!
//! Groups `seg_predict/single` and `seg_predict/ensemble_k3`: the default (world-sized)
//! segmentation model at random initialisation and one world question.  A random model
//! never stops early, so every answer, sample and refinement runs the full
//! `max_new_tokens` (64) and no draft of `ỹ` holds: the ratio is the method's cost
//! structure at its worst (one prefix, K samples batched, one refinement, one
//! teacher-forced segmentation pass), not a trained model's answer lengths.  The
//! context is widened so that three full answers fit before the refinement.
//!
//! Groups `seg_predict_run/single` and `seg_predict_run/ensemble_k3`, only when
//! `POPEN_BENCH_RUN` names a run directory (a stage-3 run answers with its `p̂`) and
//! `POPEN_BENCH_DATA` a MUSE file: the run's model on the file's first 20 images' questions,
//! 16 questions per call as `popen predict` batches them, greedy against the ensemble
//! with K = 3 (the samples' own masks off, as `popen predict --ensemble 3` runs it).
//!
//! Each iteration runs on a thread of rayon's pool, as the `popen` binary runs its
//! commands ([`popen::backend::cpu::on_worker`]).
use criterion::{criterion_group, criterion_main, Criterion};
use popen::backend::cpu::on_worker;
use popen::backend::{Backend, Cpu};
use popen::data::sample::load_image;
use popen::data::world::{self, Split, WorldConfig};
use popen::method::ensemble::{load_prompt, sentence_ends, EnsembleCfg};
use popen::method::predict::{data_root, questions};
use popen::model::seg::{preprocess, Pixels, SegModel, SegModelConfig, SegTokenizer};
use popen::nn::SamplingCfg;
use std::path::Path;

fn bench(c: &mut Criterion) {
    let scene = world::generate(&WorldConfig::default(), 0, Split::Test, 0).unwrap();
    let mut cfg = SegModelConfig::default();
    cfg.lvlm.max_positions = 512;
    let texts: Vec<String> = scene
        .qas
        .iter()
        .flat_map(|q| [q.question.clone(), q.answer.clone()])
        .collect();
    let tok = SegTokenizer::train(&texts, cfg.lvlm.vocab_size, cfg.group_len()).unwrap();
    let model: SegModel = SegModel::new_tiny(Cpu, cfg, &tok, 0).unwrap();
    let img = image::RgbImage::from_raw(
        scene.image.width as u32,
        scene.image.height as u32,
        scene.image.data.clone(),
    )
    .unwrap();
    let px = preprocess(&img, model.cfg.image_size).unwrap();
    let q = scene.qas[0].question.clone();
    let ends = sentence_ends(&tok.tok);
    let mut g = c.benchmark_group("seg_predict");
    g.sample_size(10);
    g.bench_function("single", |b| {
        b.iter(|| {
            on_worker(|| {
                model
                    .predict(&tok, &[(&px, q.as_str())], &SamplingCfg::greedy())
                    .unwrap()
            })
        })
    });
    g.bench_function("ensemble_k3", |b| {
        b.iter(|| {
            on_worker(|| {
                model
                    .predict_ensemble(
                        &tok,
                        &[(&px, q.as_str())],
                        &EnsembleCfg::default(),
                        0,
                        None,
                        &ends,
                    )
                    .unwrap()
            })
        })
    });
    g.finish();
    if let (Ok(run), Ok(data)) = (
        std::env::var("POPEN_BENCH_RUN"),
        std::env::var("POPEN_BENCH_DATA"),
    ) {
        bench_run(c, Path::new(&run), Path::new(&data));
    }
}

/// A trained run on real questions (see the module doc).
fn bench_run(c: &mut Criterion, run: &Path, data: &Path) {
    let (model, tok): (SegModel, SegTokenizer) = SegModel::load(Cpu, run).unwrap();
    let hidden = model.llava.cfg.text.hidden_size;
    let prompt = load_prompt(run, hidden)
        .unwrap()
        .map(|p| model.llava.be.from_slice(&p));
    let root = data_root(data, &None);
    let items = questions(data, &root).unwrap();
    let mut files: Vec<&str> = items.iter().map(|x| x.0.as_str()).collect();
    files.dedup();
    files.truncate(20);
    let items: Vec<_> = items
        .iter()
        .filter(|x| files.contains(&x.0.as_str()))
        .collect();
    let px: Vec<Pixels> = items
        .iter()
        .map(|(_, s)| preprocess(&load_image(s).unwrap(), model.cfg.image_size).unwrap())
        .collect();
    let qs: Vec<(&Pixels, &str)> = px
        .iter()
        .zip(&items)
        .map(|(p, (_, s))| (p, s.question.as_str()))
        .collect();
    let ends = sentence_ends(&tok.tok);
    let ecfg = EnsembleCfg {
        sample_masks: false,
        ..Default::default()
    };
    let mut g = c.benchmark_group("seg_predict_run");
    g.sample_size(10);
    g.bench_function("single", |b| {
        b.iter(|| {
            on_worker(|| {
                for chunk in qs.chunks(16) {
                    model.predict(&tok, chunk, &SamplingCfg::greedy()).unwrap();
                }
            })
        })
    });
    g.bench_function("ensemble_k3", |b| {
        b.iter(|| {
            on_worker(|| {
                for chunk in qs.chunks(16) {
                    model
                        .predict_ensemble(&tok, chunk, &ecfg, 0, prompt.as_ref(), &ends)
                        .unwrap();
                }
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
