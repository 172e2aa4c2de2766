//! One MUSE file, one set of rules: the placeholder spellings, and `popen eval` and the
//! data reader agreeing on which files are bad.
use std::path::{Path, PathBuf};

use popen::data::muse::{MuseImage, MUSE_SEG};
use popen::data::sample::{load_muse, muse_to_samples, SEG};
use popen::data::world::{generate, Split, WorldConfig};
use serde_json::{json, Value};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popen_muse_rules_{name}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A 4×5 record with one question whose answer segments `n` copies of a 2×2 square.
fn record(file: &str, text: &str, n: usize) -> Value {
    // column-major runs of a 4×5 image with rows 0..2 of columns 0..2 set
    let seg = json!({"size": [4, 5], "counts": [0, 2, 2, 2, 14]});
    let anns: Vec<Value> = (0..n)
        .map(|_| json!({"category_name": "cup", "segmentation": seg}))
        .collect();
    json!({
        "file_name": file, "height": 4, "width": 5,
        "questions": ["where is the cup?"],
        "answers": [anns],
        "text_answers": [text],
    })
}

#[test]
fn the_world_writes_muse_placeholders_and_reads_them_back() {
    let s = generate(&WorldConfig::default(), 3, Split::Train, 0).unwrap();
    let rec = s.to_muse("images/train_000000.png");
    let texts = rec.text_answers.as_ref().unwrap();
    let mut segs = 0;
    for ((t, anns), qa) in texts.iter().zip(&rec.answers).zip(&s.qas) {
        assert_eq!(t.matches(MUSE_SEG).count(), anns.len(), "{t}");
        assert!(!t.contains(SEG), "{t}");
        segs += anns.len();
        // the reader gives back the world's own answer, `<seg>` and all
        let back =
            muse_to_samples(std::slice::from_ref(&rec), Path::new("/data"), "world").unwrap();
        assert!(back
            .iter()
            .any(|b| b.answer.as_deref() == Some(qa.answer.as_str())));
    }
    assert!(segs > 0, "the sample has no target to check");
}

#[test]
fn the_reader_accepts_both_spellings_and_counts_each() {
    let d = scratch("spellings");
    let cases = [
        ("a cup {seg} and a cup {seg}", 2, true),
        ("a cup <seg> and a cup <seg>", 2, true),
        ("a cup {seg} and a cup <seg>", 2, true),
        ("a cup {seg}", 2, false),
        ("a cup <seg> <seg> <seg>", 2, false),
    ];
    for (k, (text, n, ok)) in cases.into_iter().enumerate() {
        let p = d.join(format!("{k}.json"));
        std::fs::write(&p, json!([record("i.png", text, n)]).to_string()).unwrap();
        match load_muse(&p, &d) {
            Ok(s) => {
                assert!(ok, "{text:?} was accepted");
                assert_eq!(
                    s[0].answer.as_deref(),
                    Some("a cup <seg> and a cup <seg>"),
                    "{text:?}"
                );
            }
            Err(e) => {
                assert!(!ok, "{text:?}: {e}");
                assert!(e.to_string().contains("text_answers[0]"), "{e}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&d);
    // the schema type round-trips the MUSE spelling untouched
    let r: MuseImage = serde_json::from_value(record("i.png", "x {seg}", 1)).unwrap();
    assert_eq!(r.text_answers.unwrap()[0], "x {seg}");
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/readers/muse")
}

/// What `popen eval` says about `data` with no predictions, and what the reader says.
fn verdicts(
    data: &Path,
    root: &Path,
    empty_pred: &Path,
) -> (Result<(), String>, Result<(), String>) {
    let eval = popen::metrics::evaluate_files(
        data,
        empty_pred,
        None,
        &popen::metrics::EvalConfig::default(),
    )
    .map(|_| ())
    .map_err(|e| e.to_string());
    let reader = load_muse(data, root).map(|_| ()).map_err(|e| e.to_string());
    (eval, reader)
}

#[test]
fn eval_and_the_reader_give_the_same_verdict_on_every_file() {
    let d = scratch("verdicts");
    let pred = d.join("empty.jsonl");
    std::fs::write(&pred, "").unwrap();
    // rule breakers written here, beside the reader's own bad fixtures
    let ok = record("i.png", "a cup {seg}", 1);
    // `ok` changed by `f`, as a one-record file
    let with = |f: &dyn Fn(&mut Value)| {
        let mut r = ok.clone();
        f(&mut r);
        json!([r])
    };
    let made: Vec<(&str, Value)> = vec![
        ("good.json", json!([ok.clone(), record("j.png", "x", 0)])),
        ("wrapped.json", json!({"images": [ok.clone()]})),
        ("same_image.json", json!([ok.clone(), ok.clone()])),
        ("huge.json", with(&|r| r["height"] = json!(100_000))),
        ("empty_size.json", with(&|r| r["width"] = json!(0))),
        ("answers.json", with(&|r| r["answers"] = json!([[], []]))),
        (
            "texts.json",
            with(&|r| r["text_answers"] = json!(["a", "b"])),
        ),
        (
            "placeholders.json",
            with(&|r| r["text_answers"] = json!(["a"])),
        ),
        (
            "rle_size.json",
            with(&|r| r["answers"][0][0]["segmentation"]["size"] = json!([5, 4])),
        ),
        (
            "absolute.json",
            with(&|r| r["file_name"] = json!("/etc/passwd")),
        ),
        ("escape.json", with(&|r| r["file_name"] = json!("../x.png"))),
        ("no_name.json", with(&|r| r["file_name"] = json!(""))),
    ];
    let mut files: Vec<(PathBuf, PathBuf)> = Vec::new();
    for (name, v) in &made {
        let p = d.join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        files.push((p, d.clone()));
    }
    files.push((fixtures().join("muse.json"), fixtures()));
    let mut bad: Vec<PathBuf> = std::fs::read_dir(fixtures().join("bad"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    bad.sort();
    assert!(bad.len() >= 8, "{bad:?}");
    files.extend(bad.into_iter().map(|p| (p, fixtures())));
    let (mut accepted, mut rejected) = (0, 0);
    for (path, root) in &files {
        let (eval, reader) = verdicts(path, root, &pred);
        let name = path.file_name().unwrap().to_string_lossy();
        assert_eq!(
            eval.is_ok(),
            reader.is_ok(),
            "{name}: eval {eval:?}, reader {reader:?}"
        );
        match (&eval, &reader) {
            (Ok(()), _) => accepted += 1,
            (Err(e), Err(r)) => {
                rejected += 1;
                assert!(e.contains(&*path.to_string_lossy()), "{name}: {e}");
                // one rule set: the same message, except where only the pixels are wrong
                // (the reader decodes every mask up front, eval while scoring)
                if name != "rle_runs.json" {
                    assert_eq!(e, r, "{name}");
                }
            }
            _ => unreachable!(),
        }
    }
    // good.json, wrapped.json, muse.json and images.json (whose images are only
    // opened by `load_image`)
    assert_eq!(accepted, 4, "accepted {accepted}, rejected {rejected}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_file_claiming_more_mask_bytes_than_the_budget_is_refused_before_decoding() {
    use popen::data::sample::{load_muse_within, MAX_DECODED_MASK_BYTES};
    let d = scratch("budget");
    // a few hundred bytes claiming 20 empty masks of 16384 × 16384 (5 GiB decoded)
    let side = 16384u64;
    let seg = json!({"size": [side, side], "counts": [side * side]});
    let n = 20;
    let rec = json!({
        "file_name": "big.png", "height": side, "width": side,
        "questions": (0..n).map(|q| format!("q{q}")).collect::<Vec<_>>(),
        "answers": (0..n).map(|_| vec![json!({"category_name": "cup", "segmentation": seg})]).collect::<Vec<_>>(),
        "ann_list": [],
    });
    let p = d.join("big.json");
    std::fs::write(&p, serde_json::to_string(&json!([rec])).unwrap()).unwrap();
    assert!(std::fs::metadata(&p).unwrap().len() < 2000);
    assert!(20 * side * side > MAX_DECODED_MASK_BYTES);
    let e = load_muse(&p, &d).unwrap_err().to_string();
    assert!(
        e.contains("big.json") && e.contains("over the limit"),
        "{e}"
    );
    // the claim counts each question's objects too: 2 targets + 2 questions × 3 objects
    // of 4×5 = 8 masks · 20 bytes = 160 bytes
    let mut r = record(
        "a.png",
        &format!("the cup {MUSE_SEG} and the cup {MUSE_SEG}"),
        2,
    );
    r["questions"] = json!(["q0", "q1"]);
    r["answers"] = json!([r["answers"][0].clone(), []]);
    r["text_answers"] = json!([r["text_answers"][0].clone(), "nothing"]);
    r["ann_list"] = r["answers"][0].clone();
    let one = r["answers"][0][0].clone();
    r["ann_list"].as_array_mut().unwrap().push(one);
    let p = d.join("small.json");
    std::fs::write(&p, serde_json::to_string(&json!([r])).unwrap()).unwrap();
    let imgs: Vec<MuseImage> = serde_json::from_value(json!([r])).unwrap();
    assert_eq!(
        popen::data::sample::decoded_mask_bytes(&imgs),
        (2 + 2 * 3) * 20
    );
    assert_eq!(load_muse_within(&p, &d, 160).unwrap().len(), 2);
    let e = load_muse_within(&p, &d, 159).unwrap_err().to_string();
    assert!(e.contains("160 bytes, over the limit of 159"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}
