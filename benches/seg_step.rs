//! One stage-1 training step of the tiny segmentation model on the CPU, at the shapes of
//! `tools/configs/stage1_world.toml`: a fixed micro-batch of 16 world questions (96×128
//! images, the world's mix of answers and masks), forward, backward, gradient clipping
//! and the AdamW update, as `popen train sft` runs it.  The same batch every iteration,
//! so the time does not move with the data the way `metrics.jsonl`'s `elapsed_s` does.
//!
//! Groups: `seg_train_step/pixellm` (CE + 2·BCE + 2·Dice, the work of
//! `tools/bench_seg_torch.py`, the PyTorch comparison) and `seg_train_step/world_config`
//! (the config's two category losses on as well).  The batch's sizes are printed
//! once (positions, masks) so the PyTorch script's shapes can be checked against them
//! (`tools/bench_seg_torch.py --text 42 --masks 25` for this batch).
use criterion::{criterion_group, criterion_main, Criterion};
use popen::backend::cpu::on_worker;
use popen::backend::Cpu;
use popen::data::world::{write_dataset, Split, WorldConfig};
use popen::method::sft::{training_samples, with_classes, SftConfig, SftPaths};
use popen::model::seg::data::{corpus, example};
use popen::model::seg::{Example, SegModel, SegTokenizer};
use popen::train::{clip_grad_norm, parse_toml, AdamW};
use std::path::Path;

const CONFIG: &str = include_str!("../tools/configs/stage1_world.toml");
const BATCH: usize = 16;

fn setup(dir: &Path, with_heads: bool) -> (SegModel, Vec<Example>, SftConfig) {
    let mut cfg: SftConfig = parse_toml(Path::new("stage1_world.toml"), CONFIG).unwrap();
    if !with_heads {
        cfg.loss.patch_class = 0.0;
        cfg.loss.seg_class = 0.0;
    }
    let paths = SftPaths {
        data: dir.join("train.json"),
        images: None,
        out: dir.join("run"),
        val: None,
        base: None,
    };
    let samples = training_samples(&paths.data, &None).unwrap();
    let cfg = with_classes(&cfg, &samples, &paths).unwrap();
    let tok = SegTokenizer::train(
        &corpus(&samples),
        cfg.model.lvlm.vocab_size,
        cfg.model.group_len(),
    )
    .unwrap();
    let batch: Vec<Example> = samples[..BATCH]
        .iter()
        .map(|s| example(&cfg.model, &tok, s).unwrap())
        .collect();
    let mut m = SegModel::new_tiny(Cpu, cfg.model.clone(), &tok, 0).unwrap();
    m.set_trainable(cfg.trainable);
    (m, batch, cfg)
}

fn bench(c: &mut Criterion) {
    // as the `popen` binary does (`POPEN_BENCH_GLIBC_DEFAULTS=1` leaves glibc's defaults,
    // to measure what keeping freed memory buys)
    if std::env::var_os("POPEN_BENCH_GLIBC_DEFAULTS").is_none() {
        popen::backend::cpu::keep_freed_memory();
    }
    let dir = std::env::temp_dir().join(format!("popen_bench_seg_step_{}", std::process::id()));
    let wc = WorldConfig {
        height: 96,
        width: 128,
        questions: 3,
    };
    write_dataset(&dir, &wc, 0, Split::Train, 8, &|| {}).unwrap();
    let mut g = c.benchmark_group("seg_train_step");
    g.sample_size(10);
    for (name, heads) in [("pixellm", false), ("world_config", true)] {
        let (mut m, batch, cfg) = setup(&dir, heads);
        let mut opt = AdamW::new(cfg.train.adamw());
        let masks: usize = batch.iter().map(|e| e.masks.len()).sum();
        let positions: usize = batch.iter().map(|e| m.expand_ids(&e.enc).len()).sum();
        eprintln!("{name}: {BATCH} questions, {positions} positions, {masks} masks");
        let mut step = || {
            for (_, p) in m.params_mut() {
                p.zero_grad(&Cpu);
            }
            let loss = m.step(&batch, cfg.loss, 1.0, true).unwrap();
            let mut params = m.params_mut();
            clip_grad_norm(&Cpu, &mut params, cfg.train.clip_grad_norm).unwrap();
            opt.step(&Cpu, &mut params, 1e-4).unwrap();
            loss.total
        };
        g.bench_function(name, |b| {
            // on a thread of rayon's pool, as the `popen` binary runs
            // (`POPEN_BENCH_OFF_POOL=1`: from the bench's own thread, to measure what
            // that buys)
            if std::env::var_os("POPEN_BENCH_OFF_POOL").is_some() {
                b.iter(&mut step)
            } else {
                b.iter(|| on_worker(&mut step))
            }
        });
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
