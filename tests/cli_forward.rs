//! `popen forward` end to end: the built binary on a golden fixture.
use popen::model::StFile;
use std::path::{Path, PathBuf};
use std::process::Command;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popen-cli-forward-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn cli_forward_matches_bert_golden() {
    let dir = golden("bert");
    let out = scratch("bert").join("out.safetensors");
    let r = Command::new(env!("CARGO_BIN_EXE_popen"))
        .arg("forward")
        .arg("--model-dir")
        .arg(&dir)
        .arg("--inputs")
        .arg(dir.join("inputs.safetensors"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        stdout.contains("last_hidden_state") && stdout.contains("[2, 9, 24]"),
        "{stdout}"
    );
    let got = StFile::open(&out).unwrap();
    let want = StFile::open(dir.join("outputs.safetensors")).unwrap();
    for name in ["last_hidden_state", "pooler_output"] {
        let (g, w) = (got.f32(name).unwrap(), want.f32(name).unwrap());
        assert_eq!(got.info(name).unwrap().0, popen::model::StDtype::F32);
        assert_eq!(g.shape, w.shape);
        let scale = w.data.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = g
            .data
            .iter()
            .zip(&w.data)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err / scale <= 1e-4,
            "{name}: relative error {}",
            err / scale
        );
    }
}

#[test]
fn cli_forward_reports_bad_model_type() {
    let d = scratch("badtype");
    let src = golden("bert");
    let cfg = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace("\"model_type\": \"bert\"", "\"model_type\": \"gpt2\"");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    std::fs::copy(src.join("model.safetensors"), d.join("model.safetensors")).unwrap();
    let r = Command::new(env!("CARGO_BIN_EXE_popen"))
        .args(["forward", "--model-dir"])
        .arg(&d)
        .arg("--inputs")
        .arg(src.join("inputs.safetensors"))
        .arg("--out")
        .arg(d.join("out.safetensors"))
        .output()
        .unwrap();
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("model_type") && err.contains("gpt2") && err.contains("config.json"),
        "{err}"
    );
    assert!(!d.join("out.safetensors").exists());
}
