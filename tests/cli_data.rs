//! `popen data generate|show` end to end, and its errors on bad input.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn popen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_popen"))
        .args(args)
        .output()
        .expect("run popen")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popen_cli_data_{}_{name}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    d
}

fn generate(out: &Path, seed: &str) -> Output {
    popen(&[
        "data",
        "generate",
        "--out",
        out.to_str().unwrap(),
        "--n",
        "6",
        "--seed",
        seed,
        "--height",
        "48",
        "--width",
        "64",
        "--split",
        "val",
    ])
}

#[test]
fn generate_then_show() {
    let (a, b) = (tmp("a"), tmp("b"));
    let o = generate(&a, "5");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(generate(&b, "5").status.success());
    let ja = std::fs::read(a.join("val.json")).unwrap();
    assert_eq!(
        ja,
        std::fs::read(b.join("val.json")).unwrap(),
        "same seed, same JSON"
    );
    let png = "images/val_000003.png";
    assert_eq!(
        std::fs::read(a.join(png)).unwrap(),
        std::fs::read(b.join(png)).unwrap()
    );
    let recs: Vec<popen::data::muse::MuseImage> = serde_json::from_slice(&ja).unwrap();
    assert_eq!(recs.len(), 6);
    assert!(recs
        .iter()
        .all(|r| r.ann_list.is_some() && r.height == 48 && r.width == 64));

    let show = a.join("show");
    let o = popen(&[
        "data",
        "show",
        "--data",
        a.join("val.json").to_str().unwrap(),
        "--out",
        show.to_str().unwrap(),
        "--n",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let im = image::open(show.join("val_000000_overlay.png")).unwrap();
    assert_eq!((im.height(), im.width()), (48 * 3, 2 * 64 * 3 + 4));
    assert!(!show.join("val_000002_overlay.png").exists());

    // With --masks every object of the record comes out as a 0/255 PNG that
    // decodes to the record's RLE mask.
    let o = popen(&[
        "data",
        "show",
        "--data",
        a.join("val.json").to_str().unwrap(),
        "--out",
        show.to_str().unwrap(),
        "--n",
        "1",
        "--masks",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (k, ann) in recs[0].ann_list.as_ref().unwrap().iter().enumerate() {
        let p = show.join(format!("val_000000_obj{k}_{}.png", ann.category_name));
        let im = image::open(&p).unwrap().to_luma8();
        let want = match &ann.segmentation {
            popen::data::muse::Segmentation::Rle(r) => r.to_rle().unwrap().to_mask().unwrap(),
            _ => panic!("RLE expected"),
        };
        let got: Vec<u8> = im.as_raw().iter().map(|&v| u8::from(v != 0)).collect();
        assert_eq!(got, want.data, "{}", p.display());
    }
    std::fs::remove_dir_all(&a).ok();
    std::fs::remove_dir_all(&b).ok();
}

fn fails_with(args: &[&str], needle: &str) {
    let o = popen(args);
    assert!(!o.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(needle),
        "{args:?}: stderr does not mention `{needle}`:\n{err}"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let d = tmp("bad");
    let ds = d.to_str().unwrap();
    fails_with(
        &["data", "generate", "--out", ds, "--n", "0"],
        "--n must be at least 1",
    );
    fails_with(
        &[
            "data", "generate", "--out", ds, "--n", "3", "--height", "16",
        ],
        "height 16 is out of range",
    );
    fails_with(
        &[
            "data", "generate", "--out", ds, "--n", "3", "--split", "dev",
        ],
        "unknown split `dev`",
    );
    // A directory below a regular file cannot be created.
    std::fs::create_dir_all(&d).unwrap();
    let file = d.join("a_file");
    std::fs::write(&file, b"x").unwrap();
    let under = file.join("out");
    fails_with(
        &[
            "data",
            "generate",
            "--out",
            under.to_str().unwrap(),
            "--n",
            "2",
        ],
        "cannot create output directory",
    );
    fails_with(
        &[
            "data",
            "show",
            "--data",
            d.join("missing.json").to_str().unwrap(),
            "--out",
            ds,
        ],
        "missing.json",
    );
    std::fs::write(d.join("bad.json"), b"{\"not\": \"a list\"}").unwrap();
    fails_with(
        &[
            "data",
            "show",
            "--data",
            d.join("bad.json").to_str().unwrap(),
            "--out",
            ds,
        ],
        "not a list of MUSE records",
    );
    std::fs::remove_dir_all(&d).ok();
}
