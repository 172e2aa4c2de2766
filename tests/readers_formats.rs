//! The data-set readers on small fixtures in each format.  Fixtures and the expected
//! samples (masks computed by pycocotools, ReasonSeg masks by OpenCV the LISA way) are
//! written by `tools/make_reader_fixtures.py`.
use std::path::{Path, PathBuf};

use popen::data::mask::IGNORE;
use popen::data::sample::{
    check_images, load_grandf, load_image, load_muse, load_reasonseg, load_reasonseg_flagged,
    load_refcoco, Sample, Target,
};
use popen::data::{Mask, Rle};
use popen::Error;
use serde::Deserialize;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/readers")
}

#[derive(Deserialize)]
struct ExpTarget {
    category: String,
    #[serde(default)]
    counts: Option<String>,
    /// raw row-major values (ReasonSeg's reference holds 255 = ignore)
    #[serde(default)]
    values: Option<Vec<u8>>,
}

#[derive(Deserialize)]
struct Expected {
    image_id: String,
    image_path: String,
    height: usize,
    width: usize,
    question: String,
    question_index: usize,
    answer: Option<String>,
    targets: Vec<ExpTarget>,
    objects: Vec<ExpTarget>,
    #[serde(default)]
    is_sentence: Option<bool>,
}

fn read_expected<T: serde::de::DeserializeOwned>(p: &Path) -> T {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn exp_mask(t: &ExpTarget, h: usize, w: usize) -> Mask {
    match (&t.counts, &t.values) {
        (Some(c), _) => Rle::from_compressed(h, w, c).unwrap().to_mask().unwrap(),
        (None, Some(v)) => Mask::from_vec(h, w, v.clone()).unwrap(),
        _ => panic!("expected target has no mask"),
    }
}

fn check_targets(what: &str, got: &[Target], want: &[ExpTarget], h: usize, w: usize) {
    assert_eq!(got.len(), want.len(), "{what}: count");
    for (k, (g, e)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.category, e.category, "{what}[{k}] category");
        assert_eq!(g.mask, exp_mask(e, h, w), "{what}[{k}] ({}) mask", e.category);
    }
}

fn check_samples(got: &[Sample], want: &[Expected], root: &Path) {
    assert_eq!(got.len(), want.len(), "number of samples");
    for (i, (g, e)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.image_id, e.image_id, "sample {i}");
        assert_eq!(g.image_path, root.join(&e.image_path), "sample {i}");
        assert_eq!((g.height, g.width), (e.height, e.width), "sample {i}");
        assert_eq!(g.question, e.question, "sample {i}");
        assert_eq!(g.question_index, e.question_index, "sample {i}");
        assert_eq!(g.answer, e.answer, "sample {i}");
        check_targets(&format!("sample {i} targets"), &g.targets, &e.targets, e.height, e.width);
        check_targets(&format!("sample {i} objects"), &g.objects, &e.objects, e.height, e.width);
    }
}

#[test]
fn muse_reads_polygons_rles_placeholders_and_coco_urls() {
    let root = fixtures().join("muse");
    let got = load_muse(&root.join("muse.json"), &root).unwrap();
    let want: Vec<Expected> = read_expected(&root.join("expected.json"));
    check_samples(&got, &want, &root);
    // `{seg}` became `<seg>`, one per target
    for s in &got {
        if let Some(a) = &s.answer {
            assert!(!a.contains("{seg}"));
            assert_eq!(a.matches("<seg>").count(), s.targets.len());
        }
    }
    // the images decode, at the annotated size
    for s in &got[..3] {
        let img = load_image(s).unwrap();
        assert_eq!(img.dimensions(), (20, 16));
    }
}

fn muse_err(name: &str) -> String {
    let root = fixtures().join("muse");
    let path = root.join("bad").join(name);
    let e = load_muse(&path, &root).expect_err(name);
    let msg = e.to_string();
    assert!(msg.contains(name), "{name}: error does not name the file: {msg}");
    msg
}

#[test]
fn muse_bad_input_is_an_error_naming_file_and_field() {
    let m = muse_err("syntax.json");
    assert!(m.contains(":3") && m.contains("line 3"), "{m}");
    let m = muse_err("type.json");
    assert!(m.contains("[0].height"), "{m}");
    let m = muse_err("rle_size.json");
    assert!(m.contains("[0].answers[0][0].segmentation.size") && m.contains("17x20"), "{m}");
    let m = muse_err("rle_runs.json");
    assert!(m.contains("segmentation.counts"), "{m}");
    let m = muse_err("escape.json");
    assert!(m.contains("file_name") && m.contains(".."), "{m}");
    let m = muse_err("absolute.json");
    assert!(m.contains("absolute"), "{m}");
    let m = muse_err("placeholders.json");
    assert!(m.contains("text_answers[0]"), "{m}");
    let m = muse_err("counts.json");
    assert!(m.contains("[0].answers") && m.contains("1 answer lists for 3 questions"), "{m}");
}

#[test]
fn bad_images_are_errors_naming_the_file() {
    let root = fixtures().join("muse").join("bad");
    let samples = load_muse(&root.join("images.json"), &root).unwrap();
    assert_eq!(samples.len(), 3);
    for (s, why) in samples.iter().zip(["does not decode", "15x20", "cannot open"]) {
        let e = load_image(s).expect_err(why);
        assert!(matches!(e, Error::Image { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(why), "{msg}");
        assert!(msg.contains(s.image_path.to_str().unwrap()), "{msg}");
    }
    let bad = check_images(&samples);
    assert_eq!(bad.len(), 3);
}

#[test]
fn reasonseg_fills_largest_first_with_ignore_and_reads_cp1252() {
    let root = fixtures().join("reasonseg");
    let got = load_reasonseg_flagged(&root.join("val")).unwrap();
    let want: Vec<Expected> = read_expected(&root.join("expected.json"));
    let samples: Vec<Sample> = got.iter().map(|(s, _)| s.clone()).collect();
    check_samples(&samples, &want, &root);
    for ((_, flag), e) in got.iter().zip(&want) {
        assert_eq!(Some(*flag), e.is_sentence);
    }
    // the ignore region survives inside the target (it is smaller, so drawn later),
    // and the tiny target inside the ignore region is drawn last of all
    let m = &samples[0].targets[0].mask;
    assert!(m.data.contains(&IGNORE));
    assert_eq!(m.get(7, 8), 1);
    // cp1252 right quote decoded
    assert_eq!(samples[2].question, "the thing you\u{2019}d sit on");
    assert_eq!(load_reasonseg(&root.join("val")).unwrap().len(), 3);
}

#[derive(Deserialize)]
struct CvCase {
    h: usize,
    w: usize,
    points: Vec<[f64; 2]>,
    counts: String,
}

#[test]
fn reasonseg_polygon_fill_matches_opencv() {
    let cases: Vec<CvCase> = read_expected(&fixtures().join("reasonseg/cv_polygons.json"));
    let mut differ = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let mut m = Mask::new(c.h, c.w);
        popen::data::polygon::fill_polygon_cv(&mut m, &c.points, 1).unwrap();
        let want = Rle::from_compressed(c.h, c.w, &c.counts).unwrap().to_mask().unwrap();
        let d = m.data.iter().zip(&want.data).filter(|(a, b)| a != b).count();
        if d > 0 {
            differ.push((i, d));
        }
    }
    assert!(differ.is_empty(), "cases differing from cv2 (case, pixels): {differ:?}");
}

#[test]
fn refcoco_reads_pickles_of_every_protocol() {
    let root = fixtures().join("refcoco");
    let want: std::collections::HashMap<String, Vec<Expected>> =
        read_expected(&root.join("expected.json"));
    for (ds, by) in [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")] {
        for split in ["train", "testA"] {
            let got = load_refcoco(&root, ds, by, split).unwrap();
            check_samples(&got, &want[split], &root);
        }
    }
    let e = load_refcoco(&root, "refcoco", "unc", "testC").unwrap_err().to_string();
    assert!(e.contains("testC") && e.contains("testA"), "{e}");
    let e = load_refcoco(&root, "refcoco", "google", "train").unwrap_err().to_string();
    assert!(e.contains("refs(google).p"), "{e}");
}

#[test]
fn grandf_places_seg_after_each_phrase_in_caption_order() {
    let root = fixtures().join("grandf");
    let got = load_grandf(&root.join("grandf.json"), &root.join("images")).unwrap();
    let want: Vec<Expected> = read_expected(&root.join("expected.json"));
    check_samples(&got, &want, &root);
}
