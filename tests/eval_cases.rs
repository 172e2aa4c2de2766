//! Hand-worked cases for every definition of `popen eval` (see `popen::metrics` docs).
use popen::data::muse::{RleJson, Segmentation};
use popen::data::{Mask, Rle};
use popen::metrics::chair::Vocab;
use popen::metrics::eval::{parse_data, parse_preds, score, EvalConfig, Predictions};
use popen::metrics::{evaluate, Report};
use serde_json::{json, Value};
use std::path::Path;

const H: usize = 7;
const W: usize = 9;

/// Rectangle rows y0..y1, columns x0..x1 of an H×W image.
fn rect(y0: usize, y1: usize, x0: usize, x1: usize) -> Mask {
    Mask::from_fn(H, W, |y, x| (y0..y1).contains(&y) && (x0..x1).contains(&x))
}

fn rle(m: &Mask) -> Value {
    serde_json::to_value(RleJson::from_rle(&Rle::from_mask(m))).unwrap()
}

fn ann(cat: &str, m: &Mask) -> Value {
    json!({"category_name": cat, "segmentation": rle(m)})
}

fn pred(file: &str, q: usize, text: &str, masks: &[&Mask]) -> String {
    let masks: Vec<Value> = masks.iter().map(|m| rle(m)).collect();
    json!({"file_name": file, "question": q, "text": text, "masks": masks}).to_string()
}

fn run_with(data: &Value, lines: &[String], vocab: &Vocab, cfg: &EvalConfig) -> Report {
    let d = parse_data(&data.to_string(), Path::new("DATA.json")).unwrap();
    let p = parse_preds(&lines.join("\n"), Path::new("PRED.jsonl"), &d).unwrap();
    evaluate(&d, &p, vocab, cfg, Path::new("DATA.json")).unwrap()
}

fn run(data: &Value, lines: &[String]) -> Report {
    run_with(data, lines, &Vocab::embedded(), &EvalConfig::default())
}

fn close(a: Option<f64>, b: f64) {
    let a = a.expect("metric is defined");
    assert!((a - b).abs() < 1e-12, "{a} vs {b}");
}

fn image(
    file: &str,
    questions: usize,
    answers: Vec<Vec<Value>>,
    ann_list: Option<Vec<Value>>,
) -> Value {
    let mut v = json!({
        "file_name": file, "height": H, "width": W,
        "questions": (0..questions).map(|q| format!("question {q}")).collect::<Vec<_>>(),
        "answers": answers,
    });
    if let Some(l) = ann_list {
        v["ann_list"] = Value::Array(l);
    }
    v
}

#[test]
fn muse_matching_unmatched_and_lisa_by_hand() {
    let a = rect(0, 2, 0, 2); // area 4
    let b = rect(4, 6, 4, 7); // area 6
    let p0 = b.clone(); // IoU 1 with b
    let p1 = rect(0, 2, 1, 3); // ∩a = 2, ∪a = 6
    let p2 = rect(5, 7, 0, 2); // area 4, touches nothing
    let data = json!([image(
        "i.jpg",
        1,
        vec![vec![ann("cup", &a), ann("fork", &b)]],
        None
    )]);
    let r = run(&data, &[pred("i.jpg", 0, "", &[&p0, &p1, &p2])]);
    let m = &r.overall;
    // (1 + 2/6) / max(3, 2)
    close(m.muse.giou, (1.0 + 2.0 / 6.0) / 3.0);
    // ΣI = 6 + 2; ΣU = 6 + 6 + area(p2) = 16
    close(m.muse.ciou, 8.0 / 16.0);
    assert_eq!(m.counts.matched, 2);
    // LISA: ∪P = 14 px, ∪G = 10 px, ∩ = 8 → 8 / 16
    close(m.lisa.giou, 0.5);
    close(m.lisa.ciou, 0.5);
    assert_eq!(m.n_questions, 1);
    assert_eq!(m.missing, 0);
}

#[test]
fn identical_masks_have_boundary_iou_one_and_no_loc_error() {
    let a = rect(1, 6, 2, 8);
    let data = json!([image("i.jpg", 1, vec![vec![ann("cup", &a)]], None)]);
    let r = run(&data, &[pred("i.jpg", 0, "", &[&a])]);
    close(r.overall.muse.boundary_iou, 1.0);
    close(r.overall.loc_error, 0.0);
    close(r.overall.muse.giou, 1.0);
}

#[test]
fn boundary_iou_by_hand() {
    // 7×9: d = max(1, round(0.02·√130)) = 1, so the boundary is the mask minus its
    // 3×3 erosion.  gt = 5×5 block (rows 1..6, cols 2..7): boundary = its ring, 25 − 9
    // = 16 px.  pred = the 5×4 block without gt's last column: ring of 20 − 6 = 14 px.
    // Shared: gt's ring without its last column (rows 1 and 5 over cols 2..6, col 2
    // over rows 2..5) = 4 + 4 + 3 = 11 px, all on pred's ring; pred's last column (col
    // 5, rows 2..5) is gt interior.  ∩ = 11, ∪ = 16 + 14 − 11 = 19.
    let gt = rect(1, 6, 2, 7);
    let p = rect(1, 6, 2, 6);
    let data = json!([image("i.jpg", 1, vec![vec![ann("cup", &gt)]], None)]);
    let r = run(&data, &[pred("i.jpg", 0, "", &[&p])]);
    close(r.overall.muse.boundary_iou, 11.0 / 19.0);
}

#[test]
fn ties_go_to_the_lowest_ground_truth() {
    // p overlaps g0 and g1 with the same IoU (2 / 6 each); g0 is listed first.
    let g0 = rect(0, 2, 0, 2);
    let g1 = rect(0, 2, 4, 6);
    let p = rect(0, 2, 1, 5); // ∩g0 = 2, ∩g1 = 2, |p| = 8 → ∪ = 10 each
    let data = json!([image(
        "i.jpg",
        1,
        vec![vec![ann("cup", &g0), ann("cup", &g1)]],
        None
    )]);
    let d = parse_data(&data.to_string(), Path::new("D")).unwrap();
    let lines = [pred("i.jpg", 0, "", &[&p])];
    let pr = parse_preds(&lines.join("\n"), Path::new("P"), &d).unwrap();
    let s = score(
        &d,
        &pr,
        &Vocab::embedded(),
        &EvalConfig::default(),
        Path::new("D"),
    )
    .unwrap();
    assert_eq!(s[0][0].matches, vec![Some(0)]);
    // swapping the order of the ground truths swaps the choice
    let data = json!([image(
        "i.jpg",
        1,
        vec![vec![ann("cup", &g1), ann("cup", &g0)]],
        None
    )]);
    let d = parse_data(&data.to_string(), Path::new("D")).unwrap();
    let pr = parse_preds(&lines.join("\n"), Path::new("P"), &d).unwrap();
    let s = score(
        &d,
        &pr,
        &Vocab::embedded(),
        &EvalConfig::default(),
        Path::new("D"),
    )
    .unwrap();
    assert_eq!(s[0][0].matches, vec![Some(0)]);
    let r = run(&data, &lines);
    close(r.overall.muse.giou, (2.0 / 10.0) / 2.0);
    // ΣI = 2, ΣU = 10 + |other gt| 4
    close(r.overall.muse.ciou, 2.0 / 14.0);
}

#[test]
fn empty_sets_no_target_accuracy_and_missing_lines() {
    let a = rect(2, 4, 2, 4);
    // q0: no gt, no prediction (IoU 1, counts 1); q1: no gt, one prediction (0 / 1);
    // q2: one gt, no line at all (missing: 0 / 1); q3: one gt, empty mask list (0 / 1)
    let data = json!([image(
        "i.jpg",
        4,
        vec![vec![], vec![], vec![ann("cup", &a)], vec![ann("cup", &a)]],
        None
    )]);
    let lines = [
        pred("i.jpg", 0, "nothing here", &[]),
        pred("i.jpg", 1, "", &[&a]),
        String::new(), // blank lines are skipped
        pred("i.jpg", 3, "", &[]),
    ];
    let r = run(&data, &lines);
    let m = &r.overall;
    assert_eq!(m.n_questions, 4);
    assert_eq!(m.missing, 1);
    close(m.muse.giou, 1.0 / 4.0);
    // ΣI = 0; ΣU = 4 (q1's prediction) + 4 (q2's gt) + 4 (q3's gt)
    close(m.muse.ciou, 0.0);
    assert!(m.muse.boundary_iou.is_none(), "nothing matched");
    assert!(m.loc_error.is_none());
    close(m.no_target_acc, 0.5);
    // LISA: q0 empty vs empty = 1, the rest 0
    close(m.lisa.giou, 0.25);
    close(m.lisa.ciou, 0.0);
    close(m.chair_s, 0.0);
    assert!(m.chair_i.is_none(), "no mentions");
}

#[test]
fn all_empty_gives_ciou_one() {
    let data = json!([image("i.jpg", 2, vec![vec![], vec![]], None)]);
    let r = run(&data, &[]);
    close(r.overall.muse.ciou, 1.0);
    close(r.overall.lisa.ciou, 1.0);
    close(r.overall.muse.giou, 1.0);
    assert_eq!(r.overall.missing, 2);
    close(r.overall.no_target_acc, 1.0);
}

#[test]
fn chair_plurals_multiword_and_ann_list_objects() {
    let vocab = Vocab::parse(
        "cup, mug\nwine glass\nglass\nknife\nbox\nstrawberry\nteddy bear, bear\n",
        "v.txt",
    )
    .unwrap();
    let a = rect(0, 2, 0, 2);
    let b = rect(3, 5, 3, 5);
    // objects in the image: cup (via "Mug" category), glass, strawberry
    let list = vec![ann("Mug", &a), ann("glass", &b), ann("strawberry", &b)];
    let data = json!([image(
        "i.jpg",
        3,
        vec![vec![ann("Mug", &a)], vec![ann("glass", &b)], vec![]],
        Some(list)
    )]);
    let lines = [
        // mentions: mugs (cup, present), wine glasses (wine glass, absent), strawberries
        // (present) → 1 hallucination of 3
        pred(
            "i.jpg",
            0,
            "Two mugs, wine glasses and strawberries.",
            &[&a],
        ),
        // glass (present), boxes (absent), teddy bears (absent) → 2 of 3
        pred("i.jpg", 1, "A glass; boxes and teddy bears.", &[&b]),
        // knives is not "knifes": no mention
        pred("i.jpg", 2, "Knives.", &[]),
    ];
    let r = run_with(&data, &lines, &vocab, &EvalConfig::default());
    let m = &r.overall;
    assert_eq!(m.counts.mentions, 6);
    assert_eq!(m.counts.hallucinated_mentions, 3);
    close(m.chair_i, 3.0 / 6.0);
    close(m.chair_s, 2.0 / 3.0);
}

#[test]
fn chair_objects_fall_back_to_answer_annotations() {
    let vocab = Vocab::parse("cup\nfork\n", "v.txt").unwrap();
    let a = rect(0, 2, 0, 2);
    // no ann_list: the image's objects are every answer annotation's category, across
    // questions, so "fork" (an answer of q1) is present for q0 too
    let data = json!([image(
        "i.jpg",
        2,
        vec![vec![ann("cup", &a)], vec![ann("fork", &a)]],
        None
    )]);
    let lines = [pred("i.jpg", 0, "a cup and a fork", &[&a])];
    let r = run_with(&data, &lines, &vocab, &EvalConfig::default());
    close(r.overall.chair_i, 0.0);
}

#[test]
fn localization_error_by_hand() {
    let gt = rect(0, 4, 0, 4); // 16 px
    let other = rect(0, 4, 4, 8); // 16 px, beside gt
                                  // p: 2 columns of gt + 4 columns of other: ∩gt = 8, ∪gt = 16 + 24 − 8 = 32 (0.25 < 0.75)
                                  // ∩other = 16, ∪other = 24 → 0.67 > 0.25: a localization error
    let p = rect(0, 4, 2, 8);
    let list = vec![ann("cup", &gt), ann("fork", &other)];
    let data = json!([image(
        "i.jpg",
        1,
        vec![vec![ann("cup", &gt)]],
        Some(list.clone())
    )]);
    let r = run(&data, &[pred("i.jpg", 0, "", &[&p])]);
    close(r.overall.loc_error, 1.0);
    assert_eq!(r.overall.counts.loc_errors, 1);
    // the same prediction without the other object in ann_list: IoU with gt itself does
    // not count ("other" excludes the matched ground truth's mask)
    let data = json!([image(
        "i.jpg",
        1,
        vec![vec![ann("cup", &gt)]],
        Some(vec![list[0].clone()])
    )]);
    let r = run(&data, &[pred("i.jpg", 0, "", &[&p])]);
    close(r.overall.loc_error, 0.0);
    // a good prediction (IoU ≥ 0.75) is never a localization error: 12 / 16
    let good = rect(0, 4, 0, 3);
    let data = json!([image("i.jpg", 1, vec![vec![ann("cup", &gt)]], Some(list))]);
    let r = run(&data, &[pred("i.jpg", 0, "", &[&good])]);
    close(r.overall.loc_error, 0.0);
}

#[test]
fn by_targets_splits_on_few_max() {
    let a = rect(0, 2, 0, 2);
    let b = rect(3, 5, 3, 5);
    let data = json!([image(
        "i.jpg",
        2,
        vec![vec![ann("cup", &a)], vec![ann("cup", &a), ann("fork", &b)]],
        None
    )]);
    let lines = [pred("i.jpg", 0, "", &[&a]), pred("i.jpg", 1, "", &[&a])];
    let cfg = EvalConfig {
        few_max: 1,
        ..Default::default()
    };
    let r = run_with(&data, &lines, &Vocab::embedded(), &cfg);
    assert_eq!(r.by_targets.few.n_questions, 1);
    assert_eq!(r.by_targets.many.n_questions, 1);
    close(r.by_targets.few.muse.giou, 1.0);
    close(r.by_targets.many.muse.giou, 0.5);
    close(r.overall.muse.giou, 2.0 / 3.0);
    // default few_max = 3: both are "few", "many" is empty and its metrics are null
    let r = run(&data, &lines);
    assert_eq!(r.by_targets.few.n_questions, 2);
    assert_eq!(r.by_targets.many.n_questions, 0);
    assert!(r.by_targets.many.muse.giou.is_none());
    let j: Value = serde_json::from_str(&r.to_json()).unwrap();
    assert!(j["by_targets"]["many"]["muse"]["giou"].is_null());
    for key in [
        "muse",
        "lisa",
        "chair_s",
        "chair_i",
        "n_questions",
        "missing",
        "loc_error",
        "no_target_acc",
        "by_targets",
    ] {
        assert!(j.get(key).is_some(), "report lacks {key}");
    }
}

#[test]
fn polygons_in_data_follow_the_coco_rule() {
    // pycocotools.mask.frPyObjects on a 7×9 image (printed by hand with the venv):
    // [2,1, 6,1, 6,4, 2,4]         → rows 1..4, columns 2..6
    // [2.5,1.5, 6.5,1.5, 6.5,4.5, 2.5,4.5] → rows 2..5, columns 3..7 (a pixel-centre
    // rule would give rows 1..4, columns 2..6 here)
    for (poly, want) in [
        (
            vec![2.0, 1.0, 6.0, 1.0, 6.0, 4.0, 2.0, 4.0],
            rect(1, 4, 2, 6),
        ),
        (
            vec![2.5, 1.5, 6.5, 1.5, 6.5, 4.5, 2.5, 4.5],
            rect(2, 5, 3, 7),
        ),
    ] {
        let seg = json!({"category_name": "cup", "segmentation": [poly]});
        let data = json!([image("i.jpg", 1, vec![vec![seg]], None)]);
        let r = run(&data, &[pred("i.jpg", 0, "", &[&want])]);
        close(r.overall.muse.giou, 1.0);
    }
    // two rings are united
    let seg = json!({"category_name": "cup", "segmentation": [
        [0.0, 0.0, 2.0, 0.0, 2.0, 2.0, 0.0, 2.0], [2.0, 1.0, 6.0, 1.0, 6.0, 4.0, 2.0, 4.0]]});
    let data = json!([image("i.jpg", 1, vec![vec![seg]], None)]);
    let want = rect(0, 2, 0, 2).union(&rect(1, 4, 2, 6)).unwrap();
    let r = run(&data, &[pred("i.jpg", 0, "", &[&want])]);
    close(r.overall.muse.giou, 1.0);
    let _ = Segmentation::Polygons(vec![]); // the schema type the data uses
}

#[test]
fn same_inputs_same_bytes_at_any_thread_count() {
    let a = rect(0, 3, 0, 5);
    let b = rect(2, 7, 3, 9);
    let imgs: Vec<Value> = (0..9)
        .map(|i| {
            image(
                &format!("{i}.jpg"),
                2,
                vec![vec![ann("cup", &a), ann("fork", &b)], vec![]],
                None,
            )
        })
        .collect();
    let data = Value::Array(imgs);
    let lines: Vec<String> = (0..9)
        .map(|i| {
            pred(
                &format!("{i}.jpg"),
                0,
                "a cup and a knife",
                &[&b, &rect(0, 2, 0, i % 5 + 1)],
            )
        })
        .collect();
    let once = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| run(&data, &lines).to_json())
    };
    let r1 = once(1);
    assert_eq!(r1, once(3));
    assert_eq!(r1, once(2));
}

fn err_of(data: &Value, lines: &[&str]) -> String {
    let d = parse_data(&data.to_string(), Path::new("DATA.json")).unwrap();
    let e = parse_preds(&lines.join("\n"), Path::new("PRED.jsonl"), &d).unwrap_err();
    e.to_string()
}

#[test]
fn bad_prediction_lines_are_errors_naming_the_line() {
    let a = rect(0, 2, 0, 2);
    let data = json!([image("i.jpg", 1, vec![vec![ann("cup", &a)]], None)]);
    let good = pred("i.jpg", 0, "", &[&a]);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![good.clone(), "{not json".into()],
            "PRED.jsonl:2: malformed",
        ),
        (
            vec![pred("x.jpg", 0, "", &[])],
            "PRED.jsonl:1: unknown image \"x.jpg\"",
        ),
        (
            vec![String::new(), pred("i.jpg", 1, "", &[])],
            "PRED.jsonl:2: question 1",
        ),
        (
            vec![json!({"file_name": "i.jpg", "question": 0, "text": "",
                "masks": [{"size": [W, H], "counts": "abc"}]})
            .to_string()],
            "PRED.jsonl:1: masks[0]: mask size [9, 7] differs",
        ),
        (
            vec![json!({"file_name": "i.jpg", "question": 0, "text": "",
                "masks": [rle(&a), {"size": [H, W], "counts": [3, 4]}]})
            .to_string()],
            "PRED.jsonl:1: masks[1]: RLE does not decode",
        ),
        (
            vec![json!({"file_name": "i.jpg", "question": 0, "text": "",
                "masks": [{"size": [H, W], "counts": "  "}]})
            .to_string()],
            "PRED.jsonl:1: masks[0]: RLE does not decode",
        ),
        (
            vec![good.clone(), good.clone()],
            "PRED.jsonl:2: second prediction for question 0",
        ),
        (
            vec![r#"{"file_name": "i.jpg", "question": 0, "text": ""}"#.into()],
            "PRED.jsonl:1: malformed prediction: missing field `masks`",
        ),
        (
            vec![r#"{"file_name": "i.jpg", "question": -1, "text": "", "masks": []}"#.into()],
            "PRED.jsonl:1: malformed",
        ),
    ];
    for (lines, want) in cases {
        let l: Vec<&str> = lines.iter().map(String::as_str).collect();
        let e = err_of(&data, &l);
        assert!(e.contains(want), "got {e:?}, want {want:?}");
    }
}

#[test]
fn bad_data_is_an_error_naming_the_record_and_field() {
    let a = rect(0, 2, 0, 2);
    let p = |t: &str| {
        parse_data(t, Path::new("DATA.json"))
            .unwrap_err()
            .to_string()
    };
    assert!(p("[{").contains("DATA.json:1"));
    let mut d = image("i.jpg", 1, vec![vec![]], None);
    d["height"] = json!(100_000);
    d["width"] = json!(100_000);
    assert!(p(&json!([d]).to_string()).contains("is over 268435456 pixels"));
    d = image("i.jpg", 0, vec![], None);
    d["width"] = json!(0);
    assert!(p(&json!([d]).to_string()).contains("is empty"));
    d = image("i.jpg", 2, vec![vec![]], None);
    assert!(p(&json!([d]).to_string()).contains("1 answer lists for 2 questions"));
    d = image("i.jpg", 1, vec![vec![]], None);
    let e = p(&json!([d.clone(), d]).to_string());
    assert!(
        e.contains("[1].file_name") && e.contains("also record [0]"),
        "{e}"
    );
    // a ground-truth mask of the wrong size is found by the readers' rules, and again
    // while scoring data that did not come through `parse_data`
    let small = Mask::from_fn(3, 3, |_, _| true);
    let data = json!([
        image("ok.jpg", 1, vec![vec![]], None),
        image(
            "i.jpg",
            1,
            vec![vec![ann("cup", &a), ann("cup", &small)]],
            None
        )
    ]);
    let e = p(&data.to_string());
    assert!(
        e.contains("DATA.json: field `[1].answers[0][1].segmentation.size`: RLE size is 3x3"),
        "{e}"
    );
    let d: Vec<popen::data::muse::MuseImage> = serde_json::from_value(data).unwrap();
    let pr: Predictions = vec![vec![None], vec![None]];
    let e = evaluate(
        &d,
        &pr,
        &Vocab::embedded(),
        &EvalConfig::default(),
        Path::new("DATA.json"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(
            "DATA.json: field `[1] (i.jpg) answers[0][1].segmentation`: mask size [3, 3] differs"
        ),
        "{e}"
    );
}
