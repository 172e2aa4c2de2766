//! The ensemble's cost against one answer (Sec. 3.3; the paper: 1.57×), on the CPU with
//! the default (world-sized) segmentation model at random initialisation and one world
//! image.  A random model never stops early, so every answer, sample and refinement
//! runs the full `max_new_tokens` (64): the ratio is the method's cost structure
//! (one prefix, K samples batched, one refinement, one teacher-forced segmentation
//! pass), not a trained model's answer lengths.  The context is widened so that three
//! full answers fit before the refinement.
//!
//! Groups: `seg_predict_single` (one greedy answer), `seg_predict_ensemble_k3`.
use criterion::{criterion_group, criterion_main, Criterion};
use popen::backend::Cpu;
use popen::data::world::{self, Split, WorldConfig};
use popen::method::ensemble::{sentence_ends, EnsembleCfg};
use popen::model::seg::{preprocess, SegModel, SegModelConfig, SegTokenizer};
use popen::nn::SamplingCfg;

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
            model
                .predict(&tok, &[(&px, q.as_str())], &SamplingCfg::greedy())
                .unwrap()
        })
    });
    g.bench_function("ensemble_k3", |b| {
        b.iter(|| {
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
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
