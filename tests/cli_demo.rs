//! `popen demo --quick` end to end: every row of `results.json` is `popen eval` of the
//! prediction file it names; overlays and loss curves are drawn; a rerun resumes to the
//! same results; a directory made with other settings is refused; `predict --ensemble`
//! answers every question of a file.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::cli::{kill_and_resume, ok, Kills, BIN};

fn popen(args: &[&str]) -> Output {
    common::cli::popen(args, "2")
}

fn tmp(name: &str) -> PathBuf {
    common::cli::tmp("cli_demo", name)
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn quick_demo_rows_are_popen_eval_of_their_predictions() {
    let d = tmp("quick");
    let out = d.join("demo");
    let o = out.to_str().unwrap();
    let table = ok(&popen(&["demo", "--quick", "--out", o]));
    assert!(table.contains("| method | gIoU |"), "{table}");
    let res = json(&out.join("results.json"));
    let rows = res["rows"].as_array().unwrap();
    let methods: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["sft", "popen_no_ensemble", "popen"]);
    let test = out.join("world/test.json");
    for r in rows {
        let m = r["method"].as_str().unwrap();
        let pred = out.join(format!("pred_{m}.jsonl"));
        let rep = d.join(format!("{m}.json"));
        ok(&popen(&[
            "eval",
            "--data",
            test.to_str().unwrap(),
            "--pred",
            pred.to_str().unwrap(),
            "--out",
            rep.to_str().unwrap(),
        ]));
        let e = json(&rep);
        assert_eq!(r["giou"], e["muse"]["giou"], "{m}");
        assert_eq!(r["ciou"], e["muse"]["ciou"], "{m}");
        assert_eq!(r["boundary_iou"], e["muse"]["boundary_iou"], "{m}");
        for k in ["chair_s", "chair_i", "loc_error", "no_target_acc"] {
            assert_eq!(r[k], e[k], "{m}: {k}");
        }
        // one line per question of the test split
        assert_eq!(
            std::fs::read_to_string(&pred).unwrap().lines().count() as u64,
            e["n_questions"].as_u64().unwrap()
        );
    }
    for k in [
        "world",
        "sft",
        "pref",
        "ensemble",
        "predict_sft",
        "predict_popen",
    ] {
        assert!(res["timings"][k].as_f64().unwrap() >= 0.0, "timing {k}");
    }
    assert_eq!(
        res["stage3"], true,
        "the popen row answers with stage 3's prompt"
    );
    assert!(res["lti"].is_boolean());
    let overlays: Vec<_> = std::fs::read_dir(out.join("overlays")).unwrap().collect();
    assert_eq!(overlays.len(), 2);
    for stage in ["sft", "pref", "ensemble"] {
        assert!(
            out.join(stage).join("loss.png").exists(),
            "{stage}/loss.png"
        );
    }

    // rerun: every stage resumes as finished, and the results are the same
    ok(&popen(&["demo", "--quick", "--out", o]));
    let again = json(&out.join("results.json"));
    assert_eq!(again["rows"], res["rows"]);
    assert_eq!(again["pearson_text"], res["pearson_text"]);

    // other settings in the same directory: refused, nothing overwritten
    let before = std::fs::read(out.join("results.json")).unwrap();
    let e = popen(&["demo", "--quick", "--seed", "1", "--out", o]);
    assert!(!e.status.success());
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("other settings"),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );
    assert_eq!(std::fs::read(out.join("results.json")).unwrap(), before);
    // a stage 1 of another length is another setting too
    let e = popen(&["demo", "--quick", "--sft-steps", "13", "--out", o]);
    assert!(!e.status.success());
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        err.contains("other settings") && err.contains("13"),
        "{err}"
    );
    assert_eq!(std::fs::read(out.join("results.json")).unwrap(), before);
    // and no stage 1 at all is not a demo
    let e = popen(&["demo", "--quick", "--sft-steps", "0", "--out", o]);
    assert!(!e.status.success());
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("--sft-steps"),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );

    // predict --ensemble on the demo's stage-3 run is the demo's popen row
    let pe = d.join("ens.jsonl");
    let predict = |extra: &[&str]| -> Vec<String> {
        let ckpt = out.join("ensemble");
        let base = ["predict", "--checkpoint", ckpt.to_str().unwrap()];
        let data = ["--data", test.to_str().unwrap()];
        base.iter()
            .chain(&data)
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v = predict(&["--out", pe.to_str().unwrap(), "--ensemble", "3"]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // `popen` with owned arguments
    let call = |a: Vec<String>| popen(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let run = |extra: &[&str]| {
        ok(&call(args(extra)));
        std::fs::read_to_string(&pe).unwrap()
    };
    let full = run(&[]);
    assert_eq!(
        full,
        std::fs::read_to_string(out.join("pred_popen.jsonl")).unwrap(),
        "predict --ensemble 3 --seed 0 is the demo's popen row"
    );
    // --samples writes the K samples beside each answer and leaves the answers alone
    let sp = d.join("samples.jsonl");
    let said = ok(&call(args(&["--samples", sp.to_str().unwrap()])));
    assert_eq!(std::fs::read_to_string(&pe).unwrap(), full);
    let preds: Vec<serde_json::Value> = full
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let samples: Vec<serde_json::Value> = std::fs::read_to_string(&sp)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), preds.len());
    let mut kinds = [0usize; 3];
    for (s, p) in samples.iter().zip(&preds) {
        assert_eq!(s["file_name"], p["file_name"]);
        assert_eq!(s["question"], p["question"]);
        assert_eq!(s["answer"], p["text"]);
        let ys = s["samples"].as_array().unwrap();
        assert_eq!(ys.len(), 3);
        let texts: Vec<&str> = ys.iter().map(|y| y["text"].as_str().unwrap()).collect();
        let lp: Vec<f64> = ys
            .iter()
            .map(|y| y["mean_logp"].as_f64().unwrap())
            .collect();
        let best = s["most_likely"].as_u64().unwrap() as usize;
        assert!(lp.iter().all(|&x| x <= lp[best]), "{s}");
        let answer = s["answer"].as_str().unwrap();
        match s["copies"].as_u64() {
            Some(i) => assert_eq!(texts.iter().position(|t| *t == answer), Some(i as usize)),
            None => assert!(!texts.contains(&answer), "{s}"),
        }
        kinds[if texts[best] == answer {
            0
        } else if texts.contains(&answer) {
            1
        } else {
            2
        }] += 1;
    }
    let counts = format!(
        "most likely sample in {}, another sample in {}, none of the samples in {} of {}",
        kinds[0],
        kinds[1],
        kinds[2],
        preds.len()
    );
    assert!(said.contains(&counts), "{said}\nwant: {counts}");
    // the samples are the ensemble's: without --ensemble, --samples is refused
    let (greedy, s2) = (d.join("greedy.jsonl"), d.join("s2.jsonl"));
    let e = call(predict(&[
        "--out",
        greedy.to_str().unwrap(),
        "--samples",
        s2.to_str().unwrap(),
    ]));
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("--ensemble"));
    assert!(!greedy.exists() && !s2.exists());
    let bad = call(args(&["--tau", "words"]));
    assert!(!bad.status.success());
    // --text-vote: each answer is the text most of its K samples give, ties to the
    // most likely; it replaces the text half, so --no-text-ensemble with it is refused
    let sv = d.join("vote_samples.jsonl");
    ok(&call(args(&[
        "--text-vote",
        "--samples",
        sv.to_str().unwrap(),
    ])));
    let voted = std::fs::read_to_string(&sv).unwrap();
    assert_eq!(voted.lines().count(), preds.len());
    for l in voted.lines() {
        let s: serde_json::Value = serde_json::from_str(l).unwrap();
        let ys = s["samples"].as_array().unwrap();
        let texts: Vec<&str> = ys.iter().map(|y| y["text"].as_str().unwrap()).collect();
        let votes = |i: usize| texts.iter().filter(|t| **t == texts[i]).count();
        let lp = |i: usize| ys[i]["mean_logp"].as_f64().unwrap();
        let want = (0..3)
            .max_by(|&a, &b| votes(a).cmp(&votes(b)).then(lp(a).total_cmp(&lp(b))))
            .unwrap();
        assert_eq!(s["answer"], texts[want], "{s}");
    }
    let both = call(args(&["--text-vote", "--no-text-ensemble"]));
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("--no-text-ensemble"));

    // --consensus on the most likely sample: an answer names only objects more than
    // half of its samples name; where that holds already the prediction is the one
    // without --consensus, and an edited answer has one mask per <seg> (it is read
    // teacher-forced, so every group is complete)
    let plain = run(&["--no-text-ensemble"]);
    let sc = d.join("consensus_samples.jsonl");
    let consensus = run(&[
        "--consensus",
        "--no-text-ensemble",
        "--samples",
        sc.to_str().unwrap(),
    ]);
    let mut edited = 0;
    assert_eq!(consensus.lines().count(), plain.lines().count());
    for ((l, p), q) in std::fs::read_to_string(&sc)
        .unwrap()
        .lines()
        .zip(consensus.lines())
        .zip(plain.lines())
    {
        let s: serde_json::Value = serde_json::from_str(l).unwrap();
        let p: serde_json::Value = serde_json::from_str(p).unwrap();
        let texts: Vec<&str> = s["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|y| y["text"].as_str().unwrap())
            .collect();
        let answer = s["answer"].as_str().unwrap();
        assert_eq!(p["text"], answer);
        let named = popen::data::vocab::mentions;
        let votes = |c: &str| texts.iter().filter(|t| named(t).contains(&c)).count();
        let best = texts[s["most_likely"].as_u64().unwrap() as usize];
        if named(best).iter().all(|c| 2 * votes(c) > texts.len()) {
            assert_eq!(answer, best, "{s}");
            assert_eq!(p, serde_json::from_str::<serde_json::Value>(q).unwrap());
        } else {
            edited += 1;
            assert!(
                named(answer).iter().all(|c| 2 * votes(c) > texts.len()),
                "{s}"
            );
            let masks = p["masks"].as_array().unwrap().len();
            assert_eq!(masks, answer.matches("<seg>").count(), "{p}");
        }
    }
    assert!(
        edited > 0,
        "no answer named an object most samples leave out"
    );
}

#[test]
fn stage3_trains_only_the_prompt_and_refuses_without_minilm() {
    let d = tmp("stage3");
    let out = d.join("demo");
    ok(&popen(&["demo", "--quick", "--out", out.to_str().unwrap()]));
    // the frozen model: every tensor of the stage-2 run is bit-identical in stage 3's,
    // which adds only the prompt
    let a = popen::model::StFile::open(out.join("pref/model.safetensors")).unwrap();
    let b = popen::model::StFile::open(out.join("ensemble/model.safetensors")).unwrap();
    let (na, nb) = (a.names(), b.names());
    let extra: Vec<&String> = nb.iter().filter(|n| !na.contains(n)).collect();
    assert_eq!(extra, ["ensemble_prompt"]);
    for n in &na {
        assert_eq!(
            a.f32(n).unwrap(),
            b.f32(n).unwrap(),
            "{n} changed in stage 3"
        );
    }
    let p = b.f32("ensemble_prompt").unwrap();
    assert_eq!(p.shape[0], 10);

    // without MiniLM, Lti refuses to start and names the script; --no-lti trains
    let train = out.join("world/pref.json");
    let args = |o: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "ensemble",
            "--from",
            out.join("pref").to_str().unwrap(),
            "--data",
            train.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |a: Vec<String>, minilm: &str| {
        Command::new(BIN)
            .args(&a)
            .env("POPEN_MINILM_DIR", minilm)
            .output()
            .unwrap()
    };
    let no = d.join("no_minilm");
    let e = run(args(&no, &["--steps", "2"]), "/nonexistent/minilm");
    assert!(!e.status.success());
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(msg.contains("tools/fetch_minilm.sh"), "{msg}");
    assert!(!no.join("model.safetensors").exists(), "nothing trained");
    ok(&run(
        args(&no, &["--steps", "2", "--no-lti"]),
        "/nonexistent/minilm",
    ));
    assert!(no.join("model.safetensors").exists());

    // killed at random moments and resumed: the same bits as an uninterrupted run
    // long enough (about 0.9 s uninterrupted on 2 cores) that a kill 30–430 ms after a
    // start finds it running
    let long = ["--no-lti", "--steps", "30", "--checkpoint-every", "1"];
    let a = d.join("a");
    ok(&run(args(&a, &long), "/nonexistent/minilm"));
    let b = d.join("b");
    let kills = kill_and_resume(
        &args(&b, &long),
        &b,
        Kills {
            seed: 5,
            attempts: 30,
            kill_until: 20,
            base_ms: 30,
            spread_ms: 400,
        },
    );
    assert!(kills >= 1, "no kill landed on a running stage 3");
    assert!(
        std::fs::read(a.join("model.safetensors")).unwrap()
            == std::fs::read(b.join("model.safetensors")).unwrap(),
        "resumed stage 3 differs after {kills} kills"
    );

    // on a device the frozen LLM decodes fused, and each checkpoint lists every tensor
    // (apart again): the saved frozen tensors are stage 2's, bit for bit
    let emu = d.join("emu");
    let on_emu = ["--no-lti", "--steps", "3", "--checkpoint-every", "1"];
    ok(&run(
        args(&emu, &[&on_emu[..], &["--device", "emu"]].concat()),
        "/nonexistent/minilm",
    ));
    let pref = popen::model::StFile::open(out.join("pref/model.safetensors")).unwrap();
    let got = popen::model::StFile::open(emu.join("model.safetensors")).unwrap();
    let extra: Vec<String> = got
        .names()
        .into_iter()
        .filter(|n| !pref.names().contains(n))
        .collect();
    assert_eq!(extra, ["ensemble_prompt"]);
    for n in &pref.names() {
        assert_eq!(
            pref.f32(n).unwrap(),
            got.f32(n).unwrap(),
            "{n} on the emulator"
        );
    }
}
