//! Stage 2 (`popen train pref`): collection, training, resume, the re-read mix, image
//! preference pairs.
use super::*;

/// `popen train pref --from SFT --data DATA --config CFG --out OUT`.
fn pref_args(sft: &Path, data: &Path, cfg: &Path, out: &Path) -> Vec<String> {
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let mut v: Vec<String> = ["train", "pref", "--from"].map(String::from).into();
    v.extend([p(sft), "--data".into(), p(data), "--config".into(), p(cfg)]);
    v.extend(["--out".into(), p(out)]);
    v
}

#[test]
fn stage2_collects_trains_resumes_and_predicts() {
    let d = tmp("pref");
    let (train_json, test_json, cfg) = setup(&d);
    let sft = d.join("sft");
    ok(&train(&train_json, &cfg, &sft, &[], "2"));
    let pcfg = d.join("pref.toml");
    std::fs::write(
        &pcfg,
        "[train]\nlr = 1e-3\nmicro_batch = 4\nwarmup_steps = 1\ntotal_steps = 10\n\
         checkpoint_every = 2\nlog_every = 1\n[ps]\nnp = 4\nregenerations = 1\nbatch = 4\n",
    )
    .unwrap();
    let args = |out: &Path| pref_args(&sft, &train_json, &pcfg, out);
    let a = d.join("a");
    let argv = args(&a);
    let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
    ok(&popen(&argv, "2"));
    for f in [
        "pt.jsonl",
        "ps.jsonl",
        "collect.json",
        "config.json",
        "tokenizer.json",
        "model.safetensors",
    ] {
        assert!(a.join(f).is_file(), "{f} missing from the stage-2 run");
    }
    // the counts add up, and every pair is in pt.jsonl with its changed positions
    let c = json_file(a.join("collect.json"));
    let n = |k: &str| c[k].as_u64().unwrap();
    assert_eq!(
        n("sampled") + n("resampled") + n("injected") + n("skipped"),
        n("questions")
    );
    let pairs = jsonl_file(a.join("pt.jsonl"));
    assert_eq!(
        pairs.len() as u64,
        n("sampled") + n("resampled") + n("injected")
    );
    assert!(!pairs.is_empty());
    for p in &pairs {
        assert_ne!(p["y"], p["yc"], "{p}");
        assert!(
            !p["ly"].as_array().unwrap().is_empty() || !p["lyc"].as_array().unwrap().is_empty()
        );
    }
    // Ps: one record per question with a target, Alg. 1's counts add up
    let ps = &c["ps"];
    let np = |k: &str| ps[k].as_u64().unwrap();
    let recs = jsonl_file(a.join("ps.jsonl"));
    assert!(!recs.is_empty());
    assert_eq!(recs.len() as u64, np("questions") - np("no_target"));
    assert_eq!(np("s_selected") + np("s_skipped"), recs.len() as u64);
    let draws: u64 = recs.iter().map(|r| r["draws"].as_u64().unwrap()).sum();
    assert_eq!(np("copies"), 4 * draws);
    assert_eq!(np("regenerations"), draws - recs.len() as u64);
    for r in &recs {
        assert!((1..=2).contains(&r["draws"].as_u64().unwrap()), "{r}");
        let rules: Vec<&str> = r["triples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["rule"].as_str().unwrap())
            .collect();
        for want in ["biou", "random_s", "random_biou"] {
            assert!(rules.contains(&want), "{r}");
        }
    }
    // every logged step reports Ls and the curriculum's half (steps 1-5 first, 6-10 second)
    for line in std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        let (step, phase) = (m["step"].as_u64().unwrap(), m["phase"].as_f64().unwrap());
        assert_eq!(phase, if step <= 5 { 1.0 } else { 2.0 }, "{m}");
        assert!(m["ls"].as_f64().unwrap().is_finite(), "{m}");
    }
    // step 1: the policy is the reference, so Lt = ln 2 (the cache equals a recompute)
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(a.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let lt = first["lt"].as_f64().unwrap();
    assert!((lt - std::f64::consts::LN_2).abs() < 1e-6, "{first}");
    // the tower and the decoder are bit-identical to stage 1's; the LLM moved
    let (w1, w2) = (
        tensors(&sft.join("model.safetensors")),
        tensors(&a.join("model.safetensors")),
    );
    assert_eq!(w1.len(), w2.len());
    let mut moved = 0;
    for (name, t) in &w1 {
        if name.contains("vision_tower") || name.starts_with("mask_decoder") {
            assert!(t == &w2[name], "{name} changed in stage 2");
        } else if t != &w2[name] {
            moved += 1;
        }
    }
    assert!(moved > 0, "nothing trained");
    // killed and resumed: the same bits as the uninterrupted run
    let b = d.join("b");
    let wa = std::fs::read(a.join("model.safetensors")).unwrap();
    let kills = kill_and_resume(
        &args(&b),
        &b,
        Kills {
            seed: 3,
            attempts: 30,
            kill_until: 20,
            base_ms: 50,
            spread_ms: 600,
        },
    );
    assert!(kills >= 1, "no kill landed on a running stage 2");
    assert!(
        wa == std::fs::read(b.join("model.safetensors")).unwrap(),
        "resumed stage 2 differs after {kills} kills"
    );
    // the stage-2 run directory is a model predict reads
    let pred = d.join("pred.jsonl");
    ok(&predict(&a, &test_json, &pred, &[], "2"));
    assert!(std::fs::read_to_string(&pred).unwrap().lines().count() > 0);
    // a damaged pt.jsonl on --resume names the file and its line
    let mut text = std::fs::read_to_string(a.join("pt.jsonl")).unwrap();
    text.push_str("{not json\n");
    std::fs::write(a.join("pt.jsonl"), text).unwrap();
    let mut argv = args(&a);
    argv.push("--resume".into());
    let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
    let e = err(&popen(&argv, "2"));
    assert!(e.contains(&format!("pt.jsonl:{}", pairs.len() + 1)), "{e}");
    // bad flags are errors
    let mut argv = args(&d.join("c"));
    argv.extend(["--norm".to_string(), "bogus".to_string()]);
    let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
    assert!(err(&popen(&argv, "2")).contains("--norm bogus"));
    let mut argv = args(&d.join("c"));
    argv.extend(["--ps-collection".to_string(), "bogus".to_string()]);
    let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
    assert!(err(&popen(&argv, "2")).contains("expected random, s, biou, curriculum or hybrid"));
    // --no-ls: no Ps collected, no Ls logged
    let nols = d.join("nols");
    let mut argv = args(&nols);
    argv.extend([
        "--no-ls".to_string(),
        "--steps".to_string(),
        "2".to_string(),
    ]);
    let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
    ok(&popen(&argv, "2"));
    assert!(!nols.join("ps.jsonl").exists());
    let m = std::fs::read_to_string(nols.join("metrics.jsonl")).unwrap();
    assert!(!m.contains("\"ls\""), "{m}");
}

#[test]
fn stage2_reread_mix_reads_the_policys_samples_and_refuses_a_bad_fraction() {
    let d = tmp("pref_reread");
    let (train_json, _, cfg) = setup(&d);
    let sft = d.join("sft");
    ok(&train(&train_json, &cfg, &sft, &[], "2"));
    let run = |out: &Path, collect: &str| -> Output {
        let pcfg = d.join("pref.toml");
        std::fs::write(
            &pcfg,
            format!(
                "[train]\nlr = 1e-3\nmicro_batch = 4\nwarmup_steps = 1\ntotal_steps = 2\n\
                 log_every = 1\n[collect]\n{collect}\n"
            ),
        )
        .unwrap();
        let mut argv = pref_args(&sft, &train_json, &pcfg, out);
        argv.push("--no-ls".into());
        let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
        popen(&argv, "2")
    };
    let a = d.join("a");
    ok(&run(&a, "reread = 1.0\nreread_k = 2"));
    // every question with a pair is re-read (fraction 1), with at most K = 2 answers
    let pairs = jsonl_file(a.join("pt.jsonl"));
    let rr = jsonl_file(a.join("reread.jsonl"));
    let with_pair: std::collections::BTreeSet<u64> = pairs
        .iter()
        .map(|p| p["sample"].as_u64().unwrap())
        .collect();
    let read: std::collections::BTreeSet<u64> =
        rr.iter().map(|r| r["index"].as_u64().unwrap()).collect();
    assert_eq!(read, with_pair);
    let answers: usize = rr.iter().map(|r| r["read"].as_array().unwrap().len()).sum();
    assert!(answers > 0 && rr.iter().all(|r| r["read"].as_array().unwrap().len() <= 2));
    let c = json_file(a.join("collect.json"));
    assert_eq!(
        c["reread"]["questions"].as_u64().unwrap() as usize,
        rr.len()
    );
    assert_eq!(c["reread"]["answers"].as_u64().unwrap() as usize, answers);
    // the re-read rows train: a logged part, finite and positive
    let m = jsonl_file(a.join("metrics.jsonl"));
    assert!(
        m.iter()
            .any(|l| l["reread"].as_f64().is_some_and(|v| v > 0.0)),
        "{m:?}"
    );
    // the same seed draws the same samples
    let b = d.join("b");
    ok(&run(&b, "reread = 1.0\nreread_k = 2"));
    assert_eq!(
        std::fs::read(a.join("reread.jsonl")).unwrap(),
        std::fs::read(b.join("reread.jsonl")).unwrap()
    );
    // off: no file, no part
    let off = d.join("off");
    ok(&run(&off, "reread = 0.0"));
    assert!(!off.join("reread.jsonl").exists());
    assert!(!std::fs::read_to_string(off.join("metrics.jsonl"))
        .unwrap()
        .contains("\"reread\""));
    // a fraction out of range is an error naming the key, before anything is written
    let bad = d.join("bad");
    let e = err(&run(&bad, "reread = 1.5"));
    assert!(e.contains("[collect] reread"), "{e}");
    assert!(!bad.join("pt.jsonl").exists());
}

#[test]
fn stage2_image_pref_collects_contrasts_trains_and_refuses_a_bad_pick() {
    let d = tmp("pref_image");
    let (train_json, _, cfg) = setup(&d);
    let sft = d.join("sft");
    ok(&train(&train_json, &cfg, &sft, &[], "2"));
    let pcfg = d.join("pref.toml");
    std::fs::write(
        &pcfg,
        "[train]\nlr = 1e-3\nmicro_batch = 4\nwarmup_steps = 1\ntotal_steps = 2\nlog_every = 1\n",
    )
    .unwrap();
    let run = |out: &Path, extra: &[&str]| -> Output {
        let mut argv = pref_args(&sft, &train_json, &pcfg, out);
        argv.push("--no-ls".into());
        argv.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
        popen(&argv, "2")
    };
    let a = d.join("a");
    ok(&run(
        &a,
        &["--image-pref", "1", "--image-pref-contrast", "similar"],
    ));
    let c = json_file(a.join("config.json"));
    assert_eq!(c["popen_run"]["loss"]["image_pref"], 1.0, "{c}");
    assert_eq!(
        c["popen_run"]["loss"]["image_pref_contrast"], "similar",
        "{c}"
    );
    // pairs whose chosen answer names an object carry a contrast: another question,
    // with the reference's log-prob of yc on its image
    let pairs = jsonl_file(a.join("pt.jsonl"));
    let with: Vec<&serde_json::Value> =
        pairs.iter().filter(|p| p["contrast"].is_object()).collect();
    assert!(!with.is_empty(), "no contrast in {pairs:?}");
    for p in &with {
        assert_ne!(p["contrast"]["sample"], p["sample"], "{p}");
        let r = p["contrast"]["ref_yc"].as_f64().unwrap();
        assert!(r.is_finite() && r < 0.0, "{p}");
    }
    // step 1: the policy is the reference, so the term is ln 2 (the contrast rows'
    // cached reference equals the training pass's)
    let m = jsonl_file(a.join("metrics.jsonl"));
    let first = m[0]["image_pref"].as_f64().unwrap();
    assert!((first - std::f64::consts::LN_2).abs() < 1e-6, "{:?}", m[0]);
    // erased: the contrast is the pair's own image, painted over where yc's objects
    // are, so the reference's value differs from ref_yc; still ln 2 at step 1 (the
    // training pass paints the same image)
    let e = d.join("erased");
    ok(&run(
        &e,
        &["--image-pref", "1", "--image-pref-contrast", "erased"],
    ));
    let pairs = jsonl_file(e.join("pt.jsonl"));
    let with: Vec<&serde_json::Value> =
        pairs.iter().filter(|p| p["contrast"].is_object()).collect();
    assert!(!with.is_empty(), "no contrast in {pairs:?}");
    for p in &with {
        assert_eq!(p["contrast"]["sample"], p["sample"], "{p}");
        assert_eq!(p["contrast"]["erased"], true, "{p}");
        let r = p["contrast"]["ref_yc"].as_f64().unwrap();
        assert!(r.is_finite() && r != p["ref_yc"].as_f64().unwrap(), "{p}");
    }
    let m = jsonl_file(e.join("metrics.jsonl"));
    let first = m[0]["image_pref"].as_f64().unwrap();
    assert!((first - std::f64::consts::LN_2).abs() < 1e-6, "{:?}", m[0]);
    // off: no contrast collected, no part
    let off = d.join("off");
    ok(&run(&off, &[]));
    assert!(jsonl_file(off.join("pt.jsonl"))
        .iter()
        .all(|p| p.get("contrast").is_none()));
    assert!(jsonl_file(off.join("metrics.jsonl"))
        .iter()
        .all(|l| l.get("image_pref").is_none()));
    // a pick it does not know, or a negative weight, is an error naming the flag
    for (extra, name) in [
        (
            &["--image-pref-contrast", "closest"][..],
            "--image-pref-contrast",
        ),
        (&["--image-pref=-1"][..], "--image-pref"),
    ] {
        let out = run(&d.join("bad"), extra);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name), "{err}");
    }
    // and so is a negative weight in the config, before anything is collected
    let neg = d.join("neg.toml");
    std::fs::write(
        &neg,
        std::fs::read_to_string(&pcfg).unwrap() + "[loss]\nimage_pref = -0.5\n",
    )
    .unwrap();
    let bad = d.join("bad_toml");
    let argv = pref_args(&sft, &train_json, &neg, &bad);
    let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
    let e = err(&popen(&argv, "2"));
    assert!(e.contains("image_pref"), "{e}");
    assert!(!bad.join("pt.jsonl").exists());
}
