//! Issue 12: paths read from data files stay inside their root, sizes claimed by a
//! file are checked before anything is allocated, and a write that fails part-way (a
//! full disk, a file-size limit) leaves the previous file intact with a clear error.
//!
//! The full-disk tests run `popen` in a child shell under `ulimit -f` (RLIMIT_FSIZE,
//! in 1024-byte blocks), with SIGXFSZ ignored (`trap '' XFSZ`, inherited through
//! `exec`) so that the write past the limit fails with EFBIG instead of killing the
//! process.  No root needed.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::cli::popen_limited;

fn popen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_popen"))
        .args(args)
        .output()
        .expect("run popen")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popen_hardening_{}_{name}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file under `dir` whose name marks a temporary of `crate::fsio`.
fn leftover_temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap().to_string_lossy().contains(".tmp-") {
                out.push(p);
            }
        }
    }
    out
}

fn generate(out: &Path, n: &str) -> Output {
    popen(&[
        "data",
        "generate",
        "--out",
        s(out),
        "--n",
        n,
        "--seed",
        "3",
        "--height",
        "48",
        "--width",
        "64",
        "--split",
        "val",
    ])
}

// ---------------------------------------------------------------- paths

/// `data show` on a data file whose first record's `file_name` is `name`; a valid
/// image sits at `root/../outside.png` to be read if the check let it through.
fn show_with_file_name(name: &str) -> (Output, PathBuf) {
    let d = tmp(&format!("show_{}", name.len()));
    let root = d.join("root");
    assert!(generate(&root, "2").status.success());
    std::fs::copy(root.join("images/val_000000.png"), d.join("outside.png")).unwrap();
    let json = root.join("val.json");
    let mut recs: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    recs[0]["file_name"] = name.replace("OUTSIDE", s(&d.join("outside.png"))).into();
    std::fs::write(&json, serde_json::to_string(&recs).unwrap()).unwrap();
    let out = d.join("shown");
    let o = popen(&[
        "data",
        "show",
        "--data",
        s(&json),
        "--out",
        s(&out),
        "--n",
        "2",
    ]);
    (o, out)
}

#[test]
fn data_show_refuses_file_names_that_leave_the_data_root() {
    for (name, why) in [
        ("../outside.png", "leaves the data root"),
        ("images/../../outside.png", "leaves the data root"),
        ("OUTSIDE", "is absolute"),
    ] {
        let (o, out) = show_with_file_name(name);
        assert!(
            !o.status.success(),
            "{name}: data show read outside its root"
        );
        let e = stderr(&o);
        assert!(e.contains("val.json") && e.contains("[0].file_name"), "{e}");
        assert!(e.contains(why), "{name}: {e}");
        assert!(!e.contains("panicked"), "{e}");
        assert!(!out.join("outside_overlay.png").exists(), "{name}");
    }
    // a `..` that stays inside the root is only text: it is resolved and followed
    let (o, out) = show_with_file_name("images/x/../val_000000.png");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("val_000000_overlay.png").exists());
}

#[test]
fn data_show_follows_symlinks_the_user_made() {
    let d = tmp("symlink");
    let real = d.join("real");
    assert!(generate(&real, "1").status.success());
    let root = d.join("linked");
    std::fs::create_dir_all(&root).unwrap();
    std::os::unix::fs::symlink(real.join("images"), root.join("images")).unwrap();
    std::fs::copy(real.join("val.json"), root.join("val.json")).unwrap();
    let out = d.join("shown");
    let o = popen(&[
        "data",
        "show",
        "--data",
        s(&root.join("val.json")),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("val_000000_overlay.png").exists());
}

#[test]
fn refcoco_refuses_an_image_file_name_that_leaves_its_root() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/readers/refcoco");
    let d = tmp("refcoco");
    std::fs::create_dir_all(d.join("refcoco")).unwrap();
    std::fs::copy(
        src.join("refcoco/refs(unc).p"),
        d.join("refcoco/refs(unc).p"),
    )
    .unwrap();
    let mut inst: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("refcoco/instances.json")).unwrap())
            .unwrap();
    let good = popen::data::sample::load_refcoco(&src, "refcoco", "unc", "train").unwrap();
    assert!(!good.is_empty());
    for im in inst["images"].as_array_mut().unwrap() {
        im["file_name"] = "../../../etc/passwd".into();
    }
    std::fs::write(d.join("refcoco/instances.json"), inst.to_string()).unwrap();
    let e = popen::data::sample::load_refcoco(&d, "refcoco", "unc", "train")
        .unwrap_err()
        .to_string();
    assert!(e.contains("instances.json"), "{e}");
    assert!(
        e.contains("file_name") && e.contains("leaves the data root"),
        "{e}"
    );
    assert!(e.contains("../../../etc/passwd"), "{e}");
}

// ---------------------------------------------------------------- sizes

#[test]
fn rle_decoding_checks_the_claimed_size_before_allocating() {
    // 10¹⁰ pixels claimed by three runs: an error, not a 10 GB allocation
    let r = popen::data::Rle {
        height: 100_000,
        width: 100_000,
        counts: vec![4_000_000_000, 4_000_000_000, 2_000_000_000],
    };
    let e = r.to_mask().unwrap_err().to_string();
    assert!(e.contains("100000x100000") && e.contains("over"), "{e}");
    // overflow of height × width is the same error, not a wrap-around
    let r = popen::data::Rle {
        height: usize::MAX,
        width: 3,
        counts: vec![1],
    };
    assert!(r.to_mask().is_err());
}

/// A PNG whose header says `w × h`, with a few bytes of pixel data behind it.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend(kind);
        out.extend(data);
        out.extend(crc32(&out[start..]).to_be_bytes());
    }
    fn crc32(b: &[u8]) -> u32 {
        let mut c = !0u32;
        for &x in b {
            c ^= x as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]); // 8-bit grey
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x63, 0x00]);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[test]
fn png_masks_claiming_huge_sizes_are_refused_from_the_header() {
    let e = popen::data::png::decode_mask_png(&png_header_only(100_000, 100_000), "m.png".as_ref())
        .unwrap_err()
        .to_string();
    assert!(e.contains("m.png") && e.contains("100000x100000"), "{e}");
    // within the limit, the same truncated file fails in the decoder instead
    let e = popen::data::png::decode_mask_png(&png_header_only(20, 10), "m.png".as_ref())
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not decode"), "{e}");
    // and through the command
    let d = tmp("png_huge");
    for sub in ["pred", "gt"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
        std::fs::write(d.join(sub).join("a.png"), png_header_only(1 << 20, 1 << 20)).unwrap();
    }
    let o = popen(&[
        "eval-masks",
        "--pred",
        s(&d.join("pred")),
        "--gt",
        s(&d.join("gt")),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("1048576x1048576"), "{}", stderr(&o));
}

#[test]
fn data_show_refuses_an_rle_of_another_size_than_its_image() {
    let d = tmp("show_rle");
    let root = d.join("root");
    assert!(generate(&root, "1").status.success());
    let json = root.join("val.json");
    let mut recs: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    // 10⁹ pixels claimed by a hostile RLE in a 48 x 64 image
    recs[0]["ann_list"][0]["segmentation"] =
        serde_json::json!({"size": [100000, 10000], "counts": [999999999, 1]});
    std::fs::write(&json, serde_json::to_string(&recs).unwrap()).unwrap();
    let o = popen(&["data", "show", "--data", s(&json), "--out", s(&d.join("o"))]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("RLE size is 100000x10000 but the image is 48x64"),
        "{}",
        stderr(&o)
    );
}

// ---------------------------------------------------------------- full disk

#[test]
fn data_generate_on_a_full_disk_keeps_the_previous_data_set() {
    let d = tmp("gen_full");
    assert!(generate(&d, "3").status.success());
    let old = std::fs::read(d.join("val.json")).unwrap();
    let biggest_png = std::fs::read_dir(d.join("images"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .max()
        .unwrap();
    // room for every image but not for the JSON (which only grows with --n 6)
    let kib = biggest_png.div_ceil(1024) + 1;
    assert!(
        kib * 1024 < old.len() as u64,
        "the limit must stop the JSON"
    );
    let o = popen_limited(
        kib,
        &[
            "data",
            "generate",
            "--out",
            s(&d),
            "--n",
            "6",
            "--seed",
            "3",
            "--height",
            "48",
            "--width",
            "64",
            "--split",
            "val",
        ],
    );
    assert!(
        !o.status.success(),
        "generate succeeded past the file-size limit"
    );
    let e = stderr(&o);
    assert!(
        e.starts_with("error:") && e.contains("val.json") && e.contains("too large"),
        "{e}"
    );
    // compared without printing: a damaged file is tens of kilobytes
    assert!(
        std::fs::read(d.join("val.json")).unwrap() == old,
        "val.json was damaged"
    );
    assert_eq!(leftover_temporaries(&d), Vec::<PathBuf>::new());

    // a limit that stops the first image: the same, with the image named
    let o = popen_limited(
        1,
        &[
            "data",
            "generate",
            "--out",
            s(&d),
            "--n",
            "6",
            "--seed",
            "4",
            "--height",
            "48",
            "--width",
            "64",
            "--split",
            "val",
        ],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(".png") && stderr(&o).contains("too large"),
        "{}",
        stderr(&o)
    );
    assert!(
        std::fs::read(d.join("val.json")).unwrap() == old,
        "val.json was damaged"
    );
    assert_eq!(leftover_temporaries(&d), Vec::<PathBuf>::new());
}

#[test]
fn eval_out_on_a_full_disk_keeps_the_previous_report() {
    let fx = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval");
    let d = tmp("eval_full");
    let out = d.join("report.json");
    let args = |out: &Path| -> Vec<String> {
        [
            "eval",
            "--data",
            s(&fx.join("data.json")),
            "--pred",
            s(&fx.join("pred.jsonl")),
            "--out",
            s(out),
        ]
        .map(String::from)
        .to_vec()
    };
    let a = args(&out);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = popen(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    let full = std::fs::read(&out).unwrap();
    assert!(full.len() > 1024, "the report must not fit in the limit");
    std::fs::write(&out, b"the previous report\n").unwrap();
    let o = popen_limited(1, &a);
    assert!(
        !o.status.success(),
        "eval succeeded past the file-size limit"
    );
    let e = stderr(&o);
    assert!(e.contains("report.json") && e.contains("too large"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"the previous report\n");
    assert_eq!(leftover_temporaries(&d), Vec::<PathBuf>::new());
}

#[test]
fn eval_masks_out_on_a_full_disk_keeps_the_previous_report() {
    let d = tmp("eval_masks_full");
    for sub in ["pred", "gt"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
        // enough cases that the report is over 1 KiB
        for k in 0..24u32 {
            let img = image::GrayImage::from_fn(13, 11, |x, y| {
                image::Luma([if (x + y + k) % 3 == 0 { 255 } else { 0 }])
            });
            img.save(d.join(sub).join(format!("case_{k:02}.png")))
                .unwrap();
        }
    }
    let out = d.join("masks.json");
    let (pred, gt) = (d.join("pred"), d.join("gt"));
    let a = [
        "eval-masks",
        "--pred",
        s(&pred),
        "--gt",
        s(&gt),
        "--out",
        s(&out),
    ];
    let o = popen(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::metadata(&out).unwrap().len() > 1024);
    std::fs::write(&out, b"old").unwrap();
    let o = popen_limited(1, &a);
    assert!(
        !o.status.success(),
        "eval-masks succeeded past the file-size limit"
    );
    let e = stderr(&o);
    assert!(e.contains("masks.json") && e.contains("too large"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    assert_eq!(leftover_temporaries(&d), Vec::<PathBuf>::new());
}

#[test]
fn forward_out_on_a_full_disk_keeps_the_previous_outputs() {
    let g = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/llama");
    let d = tmp("forward_full");
    let out = d.join("out.safetensors");
    let inputs = g.join("inputs.safetensors");
    let a = [
        "forward",
        "--model-dir",
        s(&g),
        "--inputs",
        s(&inputs),
        "--out",
        s(&out),
    ];
    let o = popen(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::metadata(&out).unwrap().len() > 1024);
    std::fs::write(&out, b"previous outputs").unwrap();
    let o = popen_limited(1, &a);
    assert!(
        !o.status.success(),
        "forward succeeded past the file-size limit"
    );
    let e = stderr(&o);
    assert!(
        e.contains("out.safetensors") && e.contains("too large"),
        "{e}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"previous outputs");
    assert_eq!(leftover_temporaries(&d), Vec::<PathBuf>::new());
}

#[test]
fn a_train_state_naming_a_folder_outside_its_step_is_refused() {
    use popen::train::checkpoint::read_train_state;
    let d = std::env::temp_dir().join(format!("popen_hardening_state_{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let state = |ck: &str| {
        format!(
            r#"{{"step":2,"checkpoint":"{ck}","format":1,"cursor":{{"epoch":0,"position":8}},
               "rng_state":7,"adamw_t":2,"elapsed_s":1.0,"config":{{}}}}"#
        )
    };
    std::fs::write(d.join("train_state.json"), state("checkpoints/step-000002")).unwrap();
    assert_eq!(read_train_state(&d).unwrap().unwrap().step, 2);
    for bad in ["../../elsewhere", "/tmp/x", "checkpoints/step-000001"] {
        std::fs::write(d.join("train_state.json"), state(bad)).unwrap();
        let e = read_train_state(&d).unwrap_err().to_string();
        assert!(
            e.contains("train_state.json") && e.contains("checkpoint") && e.contains(bad),
            "{bad}: {e}"
        );
    }
    std::fs::remove_dir_all(&d).ok();
}
