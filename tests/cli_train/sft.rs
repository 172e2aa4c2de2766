//! Stage 1 (`popen train sft`), `predict` and `infer`: the run directory, the data
//! mixes, resume, bad input, a full disk, the emulated device.
use super::*;

#[test]
fn train_predict_eval_and_the_run_directory() {
    let d = tmp("flow");
    let (train_json, test_json, cfg) = setup(&d);
    let run = d.join("run");
    ok(&train(
        &train_json,
        &cfg,
        &run,
        &["--val", test_json.to_str().unwrap(), "--val-every", "3"],
        "2",
    ));
    for f in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "train_state.json",
        "metrics.jsonl",
        "loss.png",
    ] {
        assert!(run.join(f).is_file(), "{f} missing from the run directory");
    }
    let state = json_file(run.join("train_state.json"));
    assert_eq!(state["step"], 8);
    let lines = jsonl_file(run.join("metrics.jsonl"));
    assert_eq!(lines.len(), 8);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"], i as u64 + 1);
        for k in [
            "loss",
            "ce",
            "bce",
            "dice",
            "lr",
            "grad_norm",
            "tokens_per_s",
        ] {
            assert!(l[k].as_f64().is_some_and(f64::is_finite), "{k} in {l}");
        }
    }
    // `--val-every 3` over the config's checkpoints every 2 steps
    let val_steps: Vec<u64> = lines
        .iter()
        .filter(|l| l.get("val").is_some())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(val_steps, [3, 6], "validated at steps {val_steps:?}");
    // popen forward still reads the LLaVA part of the run directory's config
    let cfg_json = json_file(run.join("config.json"));
    assert_eq!(cfg_json["model_type"], "llava");
    // predict → eval
    let pred = d.join("pred.jsonl");
    ok(&predict(&run, &test_json, &pred, &["--batch", "3"], "2"));
    let n_questions: usize = serde_json::from_str::<Vec<serde_json::Value>>(
        &std::fs::read_to_string(&test_json).unwrap(),
    )
    .unwrap()
    .iter()
    .map(|r| r["questions"].as_array().unwrap().len())
    .sum();
    assert_eq!(
        std::fs::read_to_string(&pred).unwrap().lines().count(),
        n_questions
    );
    let report = d.join("report.json");
    ok(&popen(
        &[
            "eval",
            "--data",
            test_json.to_str().unwrap(),
            "--pred",
            pred.to_str().unwrap(),
            "--out",
            report.to_str().unwrap(),
        ],
        "2",
    ));
    let r = json_file(&report);
    assert_eq!(r["n_questions"], n_questions);
    assert_eq!(r["missing"], 0);
    // the batch size does not change the predictions
    let pred1 = d.join("pred1.jsonl");
    ok(&predict(&run, &test_json, &pred1, &["--batch", "1"], "1"));
    assert_eq!(
        std::fs::read(&pred).unwrap(),
        std::fs::read(&pred1).unwrap()
    );
    // infer: answer on stdout, overlay and masks on disk
    let img = d.join("world/images/test_000000.png");
    let out = d.join("infer");
    let text = ok(&popen(
        &[
            "infer",
            "--checkpoint",
            run.to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
            "--prompt",
            "Where is the cup?",
            "--out",
            out.to_str().unwrap(),
        ],
        "2",
    ));
    // one mask PNG per <seg> of the printed answer, and the overlay
    let n_seg = text.matches("<seg>").count();
    let n_png = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("mask_")
        })
        .count();
    assert_eq!(n_png, n_seg, "answer {text:?}");
    assert!(out.join("overlay.png").is_file());
    // probe-embeddings: one embedding per target of the questions read
    let probe = d.join("probe.json");
    let text = ok(&popen(
        &[
            "probe-embeddings",
            "--checkpoint",
            run.to_str().unwrap(),
            "--data",
            test_json.to_str().unwrap(),
            "--out",
            probe.to_str().unwrap(),
        ],
        "2",
    ));
    assert!(
        text.contains("nearest-neighbour category accuracy"),
        "{text}"
    );
    let p = json_file(&probe);
    let n_targets: usize = serde_json::from_str::<Vec<serde_json::Value>>(
        &std::fs::read_to_string(&test_json).unwrap(),
    )
    .unwrap()
    .iter()
    .flat_map(|r| r["answers"].as_array().unwrap().clone())
    .map(|a| a.as_array().unwrap().len())
    .sum();
    assert_eq!(p["items"], n_targets);
    let acc = p["nn_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{p}");
    let iou = p["teacher_forced_mean_iou"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&iou), "{p}");
    assert!(text.contains("teacher-forced masks"), "{text}");
    // one region feature per target at each decoder level; no patch head in this model
    let regions = p["region_features"].as_array().unwrap();
    assert_eq!(regions.len(), 2);
    for r in regions {
        assert_eq!(r["items"], n_targets, "{r}");
    }
    assert!(p["patch_head_accuracy"].is_null(), "{p}");
    score_answers(&d, &run, &test_json);
}

/// `popen score-answers`: one line per question in file order with the file's own
/// answer, a finite negative log-likelihood over at least the codebook tokens and the
/// end of sequence, the same at any batch size; data without answer texts is an error.
fn score_answers(d: &Path, run: &Path, data: &Path) {
    let score = |out: &Path, data: &Path, batch: &str| {
        popen(
            &[
                "score-answers",
                "--checkpoint",
                run.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--batch",
                batch,
            ],
            "2",
        )
    };
    let read = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (s3, s1) = (d.join("scores3.jsonl"), d.join("scores1.jsonl"));
    ok(&score(&s3, data, "3"));
    ok(&score(&s1, data, "1"));
    let records: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(data).unwrap()).unwrap();
    let expected: Vec<(String, String)> = records
        .iter()
        .flat_map(|r| {
            let q = r["questions"].as_array().unwrap().iter();
            let a = r["text_answers"].as_array().unwrap().iter();
            q.zip(a).map(|(q, a)| {
                let a = a.as_str().unwrap().replace("{seg}", "<seg>");
                (q.as_str().unwrap().to_string(), a)
            })
        })
        .collect();
    let (l3, l1) = (read(&s3), read(&s1));
    assert_eq!(l3.len(), expected.len());
    assert_eq!(l1.len(), expected.len());
    // the tiny config's codebook: 2 tokens per scale × 2 scales per <seg>
    for ((a, b), (q, ans)) in l3.iter().zip(&l1).zip(&expected) {
        assert_eq!(a["question"], q.as_str());
        assert_eq!(a["answer"], ans.as_str());
        let lp = a["logp"].as_f64().unwrap();
        assert!(lp.is_finite() && lp < 0.0, "{a}");
        let min_tokens = 1 + 4 * ans.matches("<seg>").count() as u64;
        assert!(a["tokens"].as_u64().unwrap() >= min_tokens, "{a}");
        assert_eq!(a["tokens"], b["tokens"]);
        let lp1 = b["logp"].as_f64().unwrap();
        assert!(
            (lp - lp1).abs() <= 1e-3 * lp.abs().max(1.0),
            "{lp} vs {lp1}"
        );
    }
    let mut bare = records.clone();
    for r in &mut bare {
        r.as_object_mut().unwrap().remove("text_answers");
    }
    let bare_json = data.with_file_name("no_text.json");
    std::fs::write(&bare_json, serde_json::to_string(&bare).unwrap()).unwrap();
    let e = err(&score(&d.join("bare.jsonl"), &bare_json, "2"));
    assert!(e.contains("text answer"), "{e}");
    assert!(!d.join("bare.jsonl").exists());
}

/// `[data] presence_questions`: the run trains on the added questions (the tokenizer,
/// trained on the data's text, learns their words), records the setting, and refuses
/// data whose objects the world does not know, naming the key and the file.
#[test]
fn the_presence_mix_trains_is_recorded_and_refuses_foreign_categories() {
    let d = tmp("presence");
    let (train_json, _, cfg) = setup(&d);
    let mix = d.join("mix.toml");
    let text = std::fs::read_to_string(&cfg).unwrap() + "[data]\npresence_questions = 2\n";
    std::fs::write(&mix, text).unwrap();
    let (run, plain) = (d.join("run"), d.join("plain"));
    ok(&train(&train_json, &mix, &run, &["--steps", "2"], "2"));
    ok(&train(&train_json, &cfg, &plain, &["--steps", "2"], "2"));
    let c = json_file(run.join("config.json"));
    assert_eq!(c["popen_run"]["data"]["presence_questions"], 2, "{c}");
    // the counting phrasings ("Count the … in the picture") are in the mix's vocabulary
    // whatever the world drew; more text, more distinct merges
    let vocab = |r: &Path| json_file(r.join("tokenizer.json"))["model"]["vocab"].clone();
    assert_ne!(vocab(&run), vocab(&plain));
    let mut recs: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&train_json).unwrap()).unwrap();
    recs[0]["ann_list"][0]["category_name"] = "zebra".into();
    let foreign = train_json.with_file_name("foreign.json");
    std::fs::write(&foreign, serde_json::to_string(&recs).unwrap()).unwrap();
    let e = err(&train(
        &foreign,
        &mix,
        &d.join("bad"),
        &["--steps", "2"],
        "2",
    ));
    assert!(e.contains("data.presence_questions"), "{e}");
    assert!(e.contains("zebra") && e.contains("foreign.json"), "{e}");
    assert!(!d.join("bad/model.safetensors").exists());
    // `presence_absent` is recorded, and a draw it does not know is an error naming it
    let cooccur = d.join("cooccur.toml");
    let text = std::fs::read_to_string(&mix).unwrap() + "presence_absent = \"cooccur\"\n";
    std::fs::write(&cooccur, text).unwrap();
    let run_c = d.join("run_c");
    ok(&train(
        &train_json,
        &cooccur,
        &run_c,
        &["--steps", "1"],
        "2",
    ));
    let c = json_file(run_c.join("config.json"));
    assert_eq!(c["popen_run"]["data"]["presence_absent"], "cooccur", "{c}");
    let bad = d.join("bad_draw.toml");
    let text = std::fs::read_to_string(&mix).unwrap() + "presence_absent = \"tempting\"\n";
    std::fs::write(&bad, text).unwrap();
    let e = err(&train(
        &train_json,
        &bad,
        &d.join("bad2"),
        &["--steps", "1"],
        "2",
    ));
    assert!(e.contains("tempting"), "{e}");
}

/// A `[data]` mix that adds examples (`good`, TOML lines): the run records each of
/// `recorded` under `popen_run.data` and trains on another stream, resuming a plain run
/// with the mix is refused, and `bad` is refused before anything is written with an
/// error containing each of `bad_says`.
fn check_mix(
    tag: &str,
    good: &str,
    recorded: &[(&str, serde_json::Value)],
    bad: &str,
    bad_says: &[&str],
) {
    let d = tmp(tag);
    let (train_json, _, cfg) = setup(&d);
    let base = std::fs::read_to_string(&cfg).unwrap();
    let mix = d.join("mix.toml");
    std::fs::write(&mix, base.clone() + "[data]\n" + good).unwrap();
    let (run, plain) = (d.join("run"), d.join("plain"));
    ok(&train(&train_json, &mix, &run, &["--steps", "2"], "2"));
    ok(&train(&train_json, &cfg, &plain, &["--steps", "2"], "2"));
    let c = json_file(run.join("config.json"));
    for (key, want) in recorded {
        assert_eq!(&c["popen_run"]["data"][key], want, "{key}: {c}");
    }
    let first_loss = |r: &Path| {
        jsonl_file(r.join("metrics.jsonl"))[0]["loss"]
            .as_f64()
            .unwrap()
    };
    assert_ne!(first_loss(&run), first_loss(&plain));
    // the mix adds examples: resuming the plain run with it would change its stream
    let state = std::fs::read(plain.join("train_state.json")).unwrap();
    let e = err(&train(
        &train_json,
        &mix,
        &plain,
        &["--resume", "--steps", "3"],
        "2",
    ));
    assert!(e.contains("examples") && e.contains("[data]"), "{e}");
    assert_eq!(
        std::fs::read(plain.join("train_state.json")).unwrap(),
        state
    );
    let bad_toml = d.join("bad.toml");
    std::fs::write(&bad_toml, base + "[data]\n" + bad).unwrap();
    let e = err(&train(
        &train_json,
        &bad_toml,
        &d.join("bad"),
        &["--steps", "2"],
        "2",
    ));
    assert!(bad_says.iter().all(|w| e.contains(w)), "{e}");
    assert!(!d.join("bad").exists());
}

/// `[data] reread`: the re-read questions are added to the data.
#[test]
fn the_reread_mix_trains_is_recorded_and_refuses_a_bad_fraction() {
    check_mix(
        "reread",
        "reread = 1.0\nreread_k = 2\n",
        &[("reread", 1.0.into()), ("reread_k", 2.into())],
        "reread = 1.5\n",
        &["[data] reread", "1.5"],
    );
}

/// `[data] erased`: the counterfactual questions are added to the data.
#[test]
fn the_counterfactual_mix_trains_is_recorded_and_refuses_a_bad_fraction() {
    check_mix(
        "erased",
        "erased = 1.0\n",
        &[("erased", 1.0.into())],
        "erased = -0.5\n",
        &["[data] erased", "-0.5"],
    );
}

#[test]
fn the_shift_augmentation_trains_is_recorded_and_changes_what_a_step_sees() {
    let d = tmp("shift");
    let (train_json, _, cfg) = setup(&d);
    let shifted = d.join("shift.toml");
    let base = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&shifted, base + "[data]\nshift = 6\n").unwrap();
    let (run, plain) = (d.join("run"), d.join("plain"));
    ok(&train(&train_json, &shifted, &run, &["--steps", "2"], "2"));
    ok(&train(&train_json, &cfg, &plain, &["--steps", "2"], "2"));
    let c = json_file(run.join("config.json"));
    assert_eq!(c["popen_run"]["data"]["shift"], 6, "{c}");
    // the same examples in the same order, the images and masks moved
    let (a, b) = (logged_losses(&run), logged_losses(&plain));
    assert_eq!(a.len(), b.len());
    assert_ne!(a[0].1, b[0].1, "the shift changed nothing: {a:?}");
}

#[test]
fn killed_and_resumed_ends_byte_identical_and_threads_agree() {
    let d = tmp("kill");
    let (train_json, _, tiny) = setup(&d);
    // with the translation augmentation: each visit's shift must come back on resume
    let cfg = d.join("shift.toml");
    let base = std::fs::read_to_string(&tiny).unwrap();
    std::fs::write(&cfg, base + "[data]\nshift = 3\n").unwrap();
    let (a, b, c) = (d.join("a"), d.join("b"), d.join("c"));
    // long enough that kills land mid-run (at 48 steps a resumed run could finish
    // inside the sleep before the next kill under a loaded machine, leaving one kill)
    let steps = ["--steps", "96"];
    ok(&train(&train_json, &cfg, &a, &steps, "2"));
    // the same seed at one thread: the same bits
    ok(&train(&train_json, &cfg, &c, &steps, "1"));
    let wa = std::fs::read(a.join("model.safetensors")).unwrap();
    assert!(
        wa == std::fs::read(c.join("model.safetensors")).unwrap(),
        "1 and 2 threads differ"
    );
    // killed at several moments, resumed until it finishes
    let args: Vec<String> = [
        "train",
        "sft",
        "--data",
        train_json.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        b.to_str().unwrap(),
        "--steps",
        "96",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let kills = kill_and_resume(
        &args,
        &b,
        Kills {
            seed: 9,
            attempts: 40,
            kill_until: 30,
            base_ms: 30,
            spread_ms: 700,
        },
    );
    assert!(kills >= 2, "only {kills} kills landed on a running trainer");
    assert!(
        wa == std::fs::read(b.join("model.safetensors")).unwrap(),
        "resumed run differs after {kills} kills"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let d = tmp("bad");
    let (train_json, test_json, cfg) = setup(&d);
    // an unknown config key names itself
    let bad = d.join("bad.toml");
    std::fs::write(&bad, "[model]\nimage_sise = 64\n").unwrap();
    let e = err(&train(&train_json, &bad, &d.join("r1"), &[], "2"));
    assert!(e.contains("image_sise"), "{e}");
    // a device this build cannot serve
    let e = err(&train(
        &train_json,
        &cfg,
        &d.join("r2"),
        &["--device", "cuda:0"],
        "2",
    ));
    assert!(e.contains("--device cuda:0"), "{e}");
    // a validation schedule without validation data
    let e = err(&train(
        &train_json,
        &cfg,
        &d.join("r4"),
        &["--val-every", "2"],
        "2",
    ));
    assert!(e.contains("--val-every needs --val"), "{e}");
    assert!(!d.join("r4").exists(), "a refused run wrote its directory");
    // a missing image names the file
    std::fs::remove_file(d.join("world/images/train_000002.png")).unwrap();
    let e = err(&train(&train_json, &cfg, &d.join("r3"), &[], "2"));
    assert!(e.contains("train_000002.png"), "{e}");
    // a run directory that is not a model's
    let e = err(&predict(
        &d.join("world"),
        &test_json,
        &d.join("p.jsonl"),
        &[],
        "2",
    ));
    assert!(e.contains("config.json"), "{e}");
    assert!(
        !d.join("p.jsonl").exists(),
        "a failed predict wrote its output"
    );
}

/// The category losses on: the classes come from the data's objects (sorted, in the
/// run's config), the heads are saved with the model, their losses are logged, and the
/// run predicts.
#[test]
fn the_category_losses_train_log_and_reload() {
    let d = tmp("patch");
    let (train_json, test_json, cfg) = setup(&d);
    let pcfg = d.join("patch.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &pcfg,
        format!("{text}\n[loss]\npatch_class = 1.0\nseg_class = 0.5\n"),
    )
    .unwrap();
    let run = d.join("run");
    ok(&train(&train_json, &pcfg, &run, &["--steps", "3"], "2"));
    let cfg_json = json_file(run.join("config.json"));
    let classes: Vec<String> =
        serde_json::from_value(cfg_json["popen"]["classes"].clone()).unwrap();
    let data = json_file(&train_json);
    let mut want: Vec<String> = data
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["ann_list"].as_array().unwrap().iter())
        .map(|a| a["category_name"].as_str().unwrap().to_string())
        .collect();
    want.sort();
    want.dedup();
    assert_eq!(classes, want);
    let weights = tensors(&run.join("model.safetensors"));
    for head in ["patch_head", "seg_class_head"] {
        assert!(
            weights.contains_key(&format!("{head}.weight")),
            "{head} not saved"
        );
    }
    let lines = jsonl_file(run.join("metrics.jsonl"));
    assert_eq!(lines.len(), 3);
    for l in &lines {
        // a cross-entropy, and a fresh head is far from sure
        for k in ["patch_class", "seg_class"] {
            let p = l[k].as_f64().unwrap_or(f64::NAN);
            assert!(p.is_finite() && p > 0.0, "{k} in {l}");
        }
    }
    ok(&predict(&run, &test_json, &d.join("pred.jsonl"), &[], "2"));
    // probe-embeddings reads the patch head: accuracies over the labelled patches
    let probe = d.join("probe.json");
    ok(&popen(
        &[
            "probe-embeddings",
            "--checkpoint",
            run.to_str().unwrap(),
            "--data",
            test_json.to_str().unwrap(),
            "--out",
            probe.to_str().unwrap(),
        ],
        "2",
    ));
    let p = json_file(&probe);
    let h = &p["patch_head_accuracy"];
    // 32 px images in patches of 8: at most 16 labelled patches per question read
    let questions = p["items"].as_u64().unwrap(); // ≥ the questions with targets
    let patches = h["patches"].as_u64().unwrap();
    assert!(patches > 0 && patches <= 16 * questions, "{p}");
    assert!(h["object_patches"].as_u64().unwrap() <= patches, "{p}");
    for k in ["objects", "all"] {
        assert!((0.0..=1.0).contains(&h[k].as_f64().unwrap()), "{k}: {p}");
    }
    // without the loss there is no head and no logged part
    let plain = d.join("plain");
    ok(&train(&train_json, &cfg, &plain, &["--steps", "1"], "2"));
    assert!(!tensors(&plain.join("model.safetensors")).contains_key("patch_head.weight"));
    let first = std::fs::read_to_string(plain.join("metrics.jsonl")).unwrap();
    assert!(!first.contains("_class"), "{first}");
}

#[test]
fn a_full_disk_keeps_the_last_checkpoint_and_the_old_predictions() {
    let d = tmp("disk");
    let (train_json, test_json, cfg) = setup(&d);
    let run = d.join("run");
    ok(&train(&train_json, &cfg, &run, &[], "2"));
    let weights = std::fs::read(run.join("model.safetensors")).unwrap();
    let state = std::fs::read(run.join("train_state.json")).unwrap();
    // more steps, with checkpoints that cannot be written (the weights file alone is
    // larger than the limit): the run fails naming a file, the last checkpoint stands
    let kib = (weights.len() as u64 / 1024) / 2;
    let o = popen_limited(
        kib,
        &[
            "train",
            "sft",
            "--data",
            train_json.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--resume",
            "--steps",
            "12",
        ],
    );
    let e = err(&o);
    assert!(
        e.contains("safetensors") || e.contains("File too large"),
        "{e}"
    );
    assert_eq!(std::fs::read(run.join("train_state.json")).unwrap(), state);
    assert_eq!(
        std::fs::read(run.join("model.safetensors")).unwrap(),
        weights
    );
    // and it resumes from there without the limit
    ok(&train(
        &train_json,
        &cfg,
        &run,
        &["--resume", "--steps", "12"],
        "2",
    ));
    // predictions: an old PRED.jsonl survives a write that cannot finish
    let pred = d.join("pred.jsonl");
    std::fs::write(&pred, "old\n").unwrap();
    let o = popen_limited(
        0,
        &[
            "predict",
            "--checkpoint",
            run.to_str().unwrap(),
            "--data",
            test_json.to_str().unwrap(),
            "--out",
            pred.to_str().unwrap(),
        ],
    );
    let e = err(&o);
    assert!(e.contains("pred.jsonl"), "{e}");
    assert_eq!(std::fs::read_to_string(&pred).unwrap(), "old\n");
}

#[test]
fn three_steps_on_the_emulated_device_log_the_cpus_losses() {
    let d = tmp("emu");
    let (train_json, test_json, cfg) = setup(&d);
    let (cpu, emu) = (d.join("cpu"), d.join("emu"));
    ok(&train(&train_json, &cfg, &cpu, &["--steps", "3"], "2"));
    let prof = d.join("profile.jsonl");
    ok(&train(
        &train_json,
        &cfg,
        &emu,
        &[
            "--steps",
            "3",
            "--device",
            "emu",
            "--profile",
            prof.to_str().unwrap(),
        ],
        "2",
    ));
    // --profile: the run's kernels by total time, each launched at least once
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&prof)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = rows.iter().map(|r| r["kernel"].as_str().unwrap()).collect();
    for k in [
        "attention_fwd_f32",
        "attention_bwd_dq_f32",
        "adamw_many_f32",
    ] {
        assert!(names.contains(&k), "{k} not in the profile: {names:?}");
    }
    let ms: Vec<f64> = rows.iter().map(|r| r["ms"].as_f64().unwrap()).collect();
    assert!(
        ms.windows(2).all(|w| w[0] >= w[1]),
        "not largest first: {ms:?}"
    );
    assert!(rows.iter().all(|r| r["calls"].as_u64().unwrap() >= 1));
    // the CPU backend launches no kernels: an error before any work
    let e = err(&train(
        &train_json,
        &cfg,
        &d.join("cpu_prof"),
        &["--steps", "1", "--profile", "-"],
        "2",
    ));
    assert!(e.contains("--device emu or cuda"), "{e}");
    assert!(!d.join("cpu_prof").join("metrics.jsonl").exists());
    let (lc, le) = (logged_losses(&cpu), logged_losses(&emu));
    assert_eq!(lc.len(), 3, "{lc:?}");
    assert_eq!(lc.len(), le.len());
    for ((sc, a), (se, b)) in lc.iter().zip(&le) {
        assert_eq!(sc, se);
        assert!(
            (a - b).abs() <= 1e-4 * a.abs(),
            "step {sc}: cpu {a} vs emu {b}"
        );
    }
    // the emulator's run directory is an ordinary one: predict reads it on either device
    for dev in ["cpu", "emu"] {
        let pred = d.join(format!("pred_{dev}.jsonl"));
        ok(&predict(&emu, &test_json, &pred, &["--device", dev], "2"));
    }
    // every question answered on both (the texts may differ where two tokens' logits
    // tie to within the twins' rounding, so they are not compared)
    let lines = |dev: &str| {
        std::fs::read_to_string(d.join(format!("pred_{dev}.jsonl")))
            .unwrap()
            .lines()
            .count()
    };
    assert!(lines("cpu") > 0);
    assert_eq!(lines("cpu"), lines("emu"));
}
