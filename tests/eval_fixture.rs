//! `popen eval` against the report that `tools/eval_fixture.py` computed independently
//! (pycocotools RLE, scipy's linear_sum_assignment, scipy.ndimage erosion) on a random
//! case with odd image sizes.
use popen::metrics::eval::{evaluate_files, EvalConfig};
use serde_json::Value;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/eval")
        .join(name)
}

/// Same keys; numbers equal (integers exactly, floats to 1e-9); nulls where expected.
fn compare(path: &str, got: &Value, want: &Value) {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            for (k, wv) in w {
                let gv = g
                    .get(k)
                    .unwrap_or_else(|| panic!("{path}.{k} missing from the report"));
                compare(&format!("{path}.{k}"), gv, wv);
            }
        }
        (Value::Number(g), Value::Number(w)) if w.is_u64() => {
            assert_eq!(g.as_u64(), w.as_u64(), "{path}");
        }
        (Value::Number(g), Value::Number(w)) => {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!((g - w).abs() <= 1e-9, "{path}: {g} vs expected {w}");
        }
        _ => assert_eq!(got, want, "{path}"),
    }
}

#[test]
fn report_matches_the_independent_python_fixture() {
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    let cfg = EvalConfig {
        dilation_ratio: want["dilation_ratio"].as_f64().unwrap(),
        few_max: want["few_max"].as_u64().unwrap() as usize,
    };
    let report = evaluate_files(
        &fixture("data.json"),
        &fixture("pred.jsonl"),
        Some(&fixture("vocab.txt")),
        &cfg,
    )
    .unwrap();
    let got: Value = serde_json::from_str(&report.to_json()).unwrap();
    compare("report", &got, &want);
    // the fixture exercises what it is meant to
    assert!(want["missing"].as_u64().unwrap() > 0);
    assert!(want["counts"]["loc_errors"].as_u64().unwrap() > 0);
    assert!(want["by_targets"]["many"]["n_questions"].as_u64().unwrap() > 0);
    assert!(want["counts"]["no_target_questions"].as_u64().unwrap() > 0);
}
