//! Golden tests: our loader + forward against `transformers` (tools/make_golden.py).
//!
//! Error measure: for each output, max|ours − reference| / max(1e-6, max|reference|),
//! i.e. the largest absolute error relative to the output's scale.  The reference was
//! computed in f64 on the stored weights, so this is our f32 rounding (plus any bug).
use popen::model::forward::{run_dir, Inputs};
use popen::model::StFile;
use std::path::{Path, PathBuf};
mod common;
use common::close::rel_err;

/// The bound the issue sets for f32.
const MAX_REL_ERR: f32 = 1e-4;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(name)
}

/// Runs the fixture `name`; returns the worst relative error over its outputs.
fn check(name: &str, want: &[&str]) -> f32 {
    let dir = golden(name);
    let inputs = Inputs::read(dir.join("inputs.safetensors")).unwrap();
    let outs = run_dir(&dir, &inputs).unwrap();
    let reference = StFile::open(dir.join("outputs.safetensors")).unwrap();
    let got: Vec<&str> = outs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(got, want, "{name}: output names");
    let mut worst = 0f32;
    for (n, t) in &outs {
        let r = reference.f32(n).unwrap();
        assert_eq!(t.shape, r.shape, "{name}/{n}: shape");
        let e = rel_err(&t.data, &r.data);
        println!("{name}/{n}: max relative error {e:.3e}");
        assert!(
            e <= MAX_REL_ERR,
            "{name}/{n}: relative error {e:.3e} > {MAX_REL_ERR:e}"
        );
        worst = worst.max(e);
    }
    worst
}

#[test]
fn golden_llama() {
    check("llama", &["logits", "last_hidden_state"]);
}

#[test]
fn golden_llama_bf16_weights_and_top_level_rope_theta() {
    check("llama_bf16", &["logits", "last_hidden_state"]);
}

#[test]
fn golden_clip_vision() {
    check(
        "clip_vision_model",
        &[
            "last_hidden_state",
            "pooler_output",
            "penultimate_hidden_state",
        ],
    );
}

#[test]
fn golden_bert_with_padding() {
    check("bert", &["last_hidden_state", "pooler_output"]);
}

#[test]
fn golden_llava() {
    check("llava", &["logits"]);
}

/// The goldens can fail: swapping two LayerNorms of one BERT block (same shapes, so the
/// loader accepts it) must push the error far past the bound.
#[test]
fn golden_catches_a_wrong_mapping() {
    use popen::model::io::{write_safetensors, OutValue};
    let src = golden("bert");
    let d = std::env::temp_dir().join(format!("popen-golden-swap-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
    let f = StFile::open(src.join("model.safetensors")).unwrap();
    let swap = |n: &str| -> String {
        let (a, b) = (
            "encoder.layer.0.attention.output.LayerNorm.weight",
            "encoder.layer.0.output.LayerNorm.weight",
        );
        if n == a {
            b.into()
        } else if n == b {
            a.into()
        } else {
            n.into()
        }
    };
    let hosts: Vec<(String, popen::model::HostTensor)> = f
        .names()
        .into_iter()
        .map(|n| (swap(&n), f.f32(&n).unwrap()))
        .collect();
    let out: Vec<(String, OutValue<'_>)> = hosts
        .iter()
        .map(|(n, t)| (n.clone(), OutValue::Float(t, popen::model::StDtype::F32)))
        .collect();
    write_safetensors(d.join("model.safetensors"), &out).unwrap();
    let inputs = Inputs::read(src.join("inputs.safetensors")).unwrap();
    let got = run_dir(&d, &inputs).unwrap();
    let want = StFile::open(src.join("outputs.safetensors")).unwrap();
    let e = rel_err(&got[0].1.data, &want.f32("last_hidden_state").unwrap().data);
    println!("bert with two LayerNorms swapped: relative error {e:.3e}");
    assert!(
        e > 100.0 * MAX_REL_ERR,
        "a swapped mapping went unnoticed ({e:.3e})"
    );
}
