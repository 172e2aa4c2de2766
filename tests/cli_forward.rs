//! `popen forward` end to end: the built binary on a golden fixture.
mod common;
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
        let err = g.data.iter().zip(&w.data).fold(0f32, |m, (a, b)| {
            common::close::sticky_max(m, (a - b).abs())
        });
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

/// `popen forward --device DEVICE` on golden `name`; the command's output.
fn forward_on(name: &str, device: &str, out: &Path) -> std::process::Output {
    let dir = golden(name);
    Command::new(env!("CARGO_BIN_EXE_popen"))
        .args(["forward", "--device", device, "--model-dir"])
        .arg(&dir)
        .arg("--inputs")
        .arg(dir.join("inputs.safetensors"))
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn cli_forward_on_the_emulator_device_matches_every_golden() {
    // the whole model on the kernels (through the emulator) against transformers
    for name in ["llama", "bert", "clip_vision_model", "llava"] {
        let out = scratch(&format!("emu-{name}")).join("out.safetensors");
        let r = forward_on(name, "emu", &out);
        assert!(
            r.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let got = StFile::open(&out).unwrap();
        let want = StFile::open(golden(name).join("outputs.safetensors")).unwrap();
        let names = got.names();
        assert!(!names.is_empty(), "{name}: no outputs");
        for t in names {
            let (g, w) = (got.f32(&t).unwrap(), want.f32(&t).unwrap());
            assert_eq!(g.shape, w.shape, "{name} {t}");
            let scale = w.data.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = g.data.iter().zip(&w.data).fold(0f32, |m, (a, b)| {
                common::close::sticky_max(m, (a - b).abs())
            });
            assert!(
                err / scale <= 1e-4,
                "{name} {t}: relative error {}",
                err / scale
            );
        }
    }
}

#[test]
fn cli_forward_device_errors_are_messages_not_panics() {
    let out = scratch("devices").join("out.safetensors");
    // no usable GPU in this build or on this machine: a clear error, exit 1
    if popen::kernels::Device::cuda(0).is_err() {
        let r = forward_on("bert", "cuda", &out);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{err}");
        assert!(
            err.contains("--device cuda:0") && !err.contains("panicked"),
            "{err}"
        );
    }
    let r = forward_on("bert", "gpu", &out);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("cpu, emu, cuda or cuda:N"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
