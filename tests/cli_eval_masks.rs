//! `popen eval-masks` end to end: the built binary on small PNGs in a temp folder,
//! the JSON report against hand-computed values, and each bad-input case.
use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh temp folder per test (no tempfile dependency): pid + test name.
fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popen-eval-masks-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("pred")).unwrap();
    std::fs::create_dir_all(d.join("gt")).unwrap();
    d
}

/// Write an 8-bit gray PNG, foreground = `val` where `f(y, x)`.
fn write_png(p: &Path, h: u32, w: u32, val: u8, f: impl Fn(u32, u32) -> bool) {
    let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([if f(y, x) { val } else { 0 }]));
    img.save(p).unwrap();
}

fn run(d: &Path, extra: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_popen"))
        .arg("eval-masks")
        .arg("--pred")
        .arg(d.join("pred"))
        .arg("--gt")
        .arg(d.join("gt"))
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn report_matches_hand_computed_metrics() {
    let d = tmpdir("ok");
    // a.png: 4×4 squares shifted by one column on 8×8 (d = 1): IoU 12/20, BIoU 1/3
    write_png(&d.join("pred/a.png"), 8, 8, 255, |y, x| {
        (2..6).contains(&y) && (3..7).contains(&x)
    });
    write_png(&d.join("gt/a.png"), 8, 8, 1, |y, x| {
        (2..6).contains(&y) && (2..6).contains(&x)
    });
    // b.png: both empty → 1.0, 0/0 counts
    write_png(&d.join("pred/b.png"), 5, 7, 255, |_, _| false);
    write_png(&d.join("gt/b.png"), 5, 7, 255, |_, _| false);
    // c.png: disjoint → 0, odd size
    write_png(&d.join("pred/c.png"), 9, 13, 255, |y, _| y < 3);
    write_png(&d.join("gt/c.png"), 9, 13, 255, |y, _| y > 5);
    // a non-PNG file is ignored
    std::fs::write(d.join("pred/notes.txt"), "x").unwrap();
    let out = d.join("report.json");
    let (ok, stdout, stderr) = run(&d, &["--out", out.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("a.png") && stdout.contains("gIoU"),
        "{stdout}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let case = |n: &str, k: &str| r["cases"][n][k].as_f64().unwrap();
    assert_eq!(case("a.png", "intersection"), 12.0);
    assert_eq!(case("a.png", "union"), 20.0);
    assert!((case("a.png", "iou") - 0.6).abs() < 1e-12);
    assert!((case("a.png", "boundary_iou") - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(case("b.png", "iou"), 1.0);
    assert_eq!(case("b.png", "boundary_iou"), 1.0);
    assert_eq!(case("c.png", "iou"), 0.0);
    assert_eq!(case("c.png", "union"), 2.0 * 3.0 * 13.0);
    let giou = r["giou"].as_f64().unwrap();
    assert!((giou - (0.6 + 1.0 + 0.0) / 3.0).abs() < 1e-12, "{giou}");
    let ciou = r["ciou"].as_f64().unwrap();
    assert!((ciou - 12.0 / (20.0 + 78.0)).abs() < 1e-12, "{ciou}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn file_on_one_side_only_is_named() {
    let d = tmpdir("missing");
    write_png(&d.join("pred/a.png"), 4, 4, 255, |_, _| true);
    write_png(&d.join("gt/a.png"), 4, 4, 255, |_, _| true);
    write_png(&d.join("gt/only_gt.png"), 4, 4, 255, |_, _| true);
    let (ok, _, stderr) = run(&d, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("only_gt.png") && stderr.contains("no predicted mask"),
        "{stderr}"
    );
    std::fs::rename(d.join("gt/only_gt.png"), d.join("pred/only_pred.png")).unwrap();
    let (ok, _, stderr) = run(&d, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("only_pred.png") && stderr.contains("no reference mask"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn size_mismatch_and_undecodable_file_are_named() {
    let d = tmpdir("bad");
    write_png(&d.join("pred/a.png"), 4, 6, 255, |_, _| true);
    write_png(&d.join("gt/a.png"), 6, 4, 255, |_, _| true);
    let (ok, _, stderr) = run(&d, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("a.png") && stderr.contains("6×4") && stderr.contains("4×6"),
        "{stderr}"
    );
    write_png(&d.join("gt/a.png"), 4, 6, 255, |_, _| true);
    std::fs::write(d.join("pred/broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    write_png(&d.join("gt/broken.png"), 4, 6, 255, |_, _| true);
    let (ok, _, stderr) = run(&d, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("broken.png") && stderr.contains("does not decode"),
        "{stderr}"
    );
    // and a bad ratio, and an empty pair of folders
    std::fs::remove_file(d.join("pred/broken.png")).unwrap();
    std::fs::remove_file(d.join("gt/broken.png")).unwrap();
    let (ok, _, stderr) = run(&d, &["--dilation-ratio=-1"]);
    assert!(!ok && stderr.contains("dilation-ratio"), "{stderr}");
    let e = tmpdir("empty");
    let (ok, _, stderr) = run(&e, &[]);
    assert!(!ok && stderr.contains("no PNG masks"), "{stderr}");
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_dir_all(&e);
}
