//! `popen train sft`, `predict`, `infer` end to end on a tiny model and a tiny world:
//! the run-directory contract, PRED.jsonl that `popen eval` reads, SIGKILL-and-resume
//! ending byte-identical, the same weights at 1 and 2 threads, bad input as errors.
//!
//! Here: the helpers both stages' tests share; `sft` stage 1 with `predict` and
//! `infer`, `pref` stage 2.
use std::path::{Path, PathBuf};
use std::process::Output;

#[path = "../common/mod.rs"]
mod common;
use common::cli::{err, json_file, jsonl_file, kill_and_resume, ok, popen, popen_limited, Kills};

fn tmp(name: &str) -> PathBuf {
    common::cli::tmp("cli_train", name)
}

/// A tiny world (6 train images, 2 test images) and a tiny model's config.
fn setup(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let w = dir.join("world");
    let ws = w.to_str().unwrap();
    for (split, n) in [("train", "6"), ("test", "2")] {
        ok(&popen(
            &[
                "data", "generate", "--out", ws, "--n", n, "--seed", "3", "--split", split,
            ],
            "2",
        ));
    }
    let cfg = dir.join("tiny.toml");
    std::fs::write(
        &cfg,
        r#"
[model]
image_size = 32
seg_dim = 8
decoder_heads = 2
decoder_mlp = 16
max_new_tokens = 24
[model.lvlm]
vision_hidden = 16
vision_layers = 2
vision_heads = 2
vision_intermediate = 32
patch_size = 8
text_hidden = 16
text_layers = 2
text_heads = 2
text_kv_heads = 1
text_intermediate = 32
max_positions = 128
vocab_size = 200
[train]
lr = 1e-3
micro_batch = 4
grad_accum_steps = 1
warmup_steps = 2
total_steps = 8
checkpoint_every = 2
log_every = 1
"#,
    )
    .unwrap();
    (w.join("train.json"), w.join("test.json"), cfg)
}

fn train(data: &Path, cfg: &Path, out: &Path, extra: &[&str], threads: &str) -> Output {
    let mut args = vec![
        "train",
        "sft",
        "--data",
        data.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    popen(&args, threads)
}

fn predict(run: &Path, data: &Path, out: &Path, extra: &[&str], threads: &str) -> Output {
    let mut args = vec![
        "predict",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    popen(&args, threads)
}

/// The losses `metrics.jsonl` logged, by step.
fn logged_losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()?)))
        .collect()
}

/// Every tensor of a safetensors file, by name, as raw bytes.
fn tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect()
}

mod pref;
mod sft;
