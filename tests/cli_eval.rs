//! `popen eval` as a command: report table and JSON, byte-identical reruns, and clear
//! errors (never a panic) on bad input.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/eval")
        .join(name)
}

fn popen(args: &[&Path]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_popen"));
    c.arg("eval");
    for a in args {
        c.arg(a);
    }
    c.output().expect("popen runs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popen_cli_eval_{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn eval_prints_a_table_and_writes_identical_reports() {
    let (a, b) = (tmp("a.json"), tmp("b.json"));
    for out in [&a, &b] {
        let o = popen(&[
            Path::new("--data"),
            &fixture("data.json"),
            Path::new("--pred"),
            &fixture("pred.jsonl"),
            Path::new("--vocab"),
            &fixture("vocab.txt"),
            Path::new("--dilation-ratio"),
            Path::new("0.05"),
            Path::new("--out"),
            out,
        ]);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            stdout.contains("MUSE gIoU") && stdout.contains("many"),
            "{stdout}"
        );
    }
    let (ra, rb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(ra, rb, "two runs gave different reports");
    let v: serde_json::Value = serde_json::from_slice(&ra).unwrap();
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("expected.json")).unwrap()).unwrap();
    assert_eq!(v["n_questions"], want["n_questions"]);
    assert_eq!(v["counts"], want["counts"]);
    assert!(v["muse"]["giou"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let good = std::fs::read_to_string(fixture("pred.jsonl")).unwrap();
    let first = good.lines().next().unwrap();
    let cases = [
        (format!("{first}\n{{\"file_name\": 3\n"), "pred.jsonl:2: malformed prediction"),
        (
            r#"{"file_name": "nope.jpg", "question": 0, "text": "", "masks": []}"#.to_string(),
            "pred.jsonl:1: unknown image \"nope.jpg\"",
        ),
        (
            r#"{"file_name": "img_00.jpg", "question": 0, "text": "", "masks": [{"size": [5, 5], "counts": [25]}]}"#
                .to_string(),
            "pred.jsonl:1: masks[0]: mask size [5, 5] differs from the image size [23, 37]",
        ),
        (
            r#"{"file_name": "img_00.jpg", "question": 0, "text": "", "masks": [{"size": [23, 37], "counts": "~~"}]}"#
                .to_string(),
            "pred.jsonl:1: masks[0]: RLE does not decode",
        ),
    ];
    for (k, (text, want)) in cases.iter().enumerate() {
        let p = tmp(&format!("bad{k}/pred.jsonl"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        let o = popen(&[
            Path::new("--data"),
            &fixture("data.json"),
            Path::new("--pred"),
            &p,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "case {k} succeeded");
        assert!(!err.contains("panicked"), "case {k} panicked: {err}");
        assert!(err.contains(want), "case {k}: {err}");
    }
    // a missing file names the path
    let o = popen(&[
        Path::new("--data"),
        Path::new("/nonexistent/d.json"),
        Path::new("--pred"),
        &fixture("pred.jsonl"),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("/nonexistent/d.json"),
        "{err}"
    );
}

#[test]
fn a_closed_stdout_ends_quietly_not_in_a_panic() {
    // `popen eval ... | head -0`: the reader is gone before the table is printed
    let mut child = Command::new(env!("CARGO_BIN_EXE_popen"))
        .arg("eval")
        .arg("--data")
        .arg(fixture("data.json"))
        .arg("--pred")
        .arg(fixture("pred.jsonl"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
}
