//! The trainer end to end on a tiny LLaMA language model: kill-and-resume ends with
//! byte-identical weights, the same seed gives the same weights at 1 and 2 threads, a
//! NaN stops the run and keeps the last checkpoint, a run directory of another model
//! is a clear error, and the metrics log and loss plot are written.
//!
//! The process tests re-run this test binary as a child (`child_entry`, ignored in
//! normal runs) with the run's settings in environment variables, so the parent can
//! kill it with SIGKILL at random moments.
use popen::backend::{Backend, Cpu};
use popen::model::{Checkpoint, StDtype};
use popen::nn::{Llama, LlamaConfig, Rng, Tensor};
use popen::train::{read_train_state, Dataset, LossParts, TrainConfig, Trainable, Trainer};
use popen::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Environment variables of the child process.
const ENV_RUN: &str = "POPEN_TEST_TRAIN_RUN";
const ENV_SPEC: &str = "POPEN_TEST_TRAIN_SPEC";
/// Vocabulary and sequence length of the toy language (odd sizes on purpose).
const VOCAB: usize = 13;
const SEQ: usize = 11;

/// Everything a child needs to train: the model's size and the trainer's settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Spec {
    hidden: usize,
    layers: usize,
    examples: usize,
    train: TrainConfig,
}

fn spec(steps: u64) -> Spec {
    Spec {
        hidden: 16,
        layers: 2,
        examples: 23,
        train: TrainConfig {
            lr: 3e-3,
            warmup_steps: 5,
            total_steps: steps,
            // 3 × 11 = 33 rows per micro-batch: more than one rayon task per reduction
            micro_batch: 3,
            grad_accum_steps: 2,
            checkpoint_every: 3,
            log_every: 2,
            keep_checkpoints: 2,
            prefetch: 2,
            seed: 7,
            ..TrainConfig::default()
        },
    }
}

/// A tiny LLaMA on next-token prediction.  The loss weights each sequence by a draw
/// from the run's RNG, so a resume that lost the RNG state would diverge.
struct ToyLm {
    llama: Llama,
    /// Micro-batch calls so far; `nan_at` / `inf_grad_at` inject a fault at that call.
    calls: usize,
    nan_at: Option<usize>,
    inf_grad_at: Option<usize>,
}

impl ToyLm {
    fn new(hidden: usize, layers: usize) -> Self {
        let cfg = LlamaConfig {
            vocab_size: VOCAB,
            hidden_size: hidden,
            intermediate_size: hidden * 2 - 3,
            num_hidden_layers: layers,
            num_attention_heads: 2,
            num_key_value_heads: Some(1),
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 32,
            tie_word_embeddings: false,
        };
        ToyLm {
            llama: Llama::new(Cpu, cfg, 11).unwrap(),
            calls: 0,
            nan_at: None,
            inf_grad_at: None,
        }
    }
}

impl Trainable for ToyLm {
    type Item = Vec<u32>;
    type Be = Cpu;
    fn backend(&self) -> Cpu {
        Cpu
    }
    fn params_mut(&mut self) -> Vec<(String, &mut Tensor<f32, Cpu>)> {
        self.llama.params_mut()
    }
    fn accumulate(&mut self, batch: &[Vec<u32>], scale: f32, rng: &mut Rng) -> Result<LossParts> {
        self.calls += 1;
        let b = batch.len();
        let ids: Vec<u32> = batch.iter().flat_map(|s| s[..SEQ].to_vec()).collect();
        let targets: Vec<i32> = batch
            .iter()
            .flat_map(|s| s[1..].iter().map(|&t| t as i32))
            .collect();
        let (logits, acts) = self.llama.forward(&ids, b, None, None)?;
        let n = b * SEQ;
        let (mut logp, mut lse) = (vec![0.0f32; n], vec![0.0f32; n]);
        Cpu.logprob_fwd(&logits, &targets, VOCAB, &mut logp, &mut lse)?;
        let weights: Vec<f64> = (0..b).map(|_| 0.5 + rng.uniform()).collect();
        let mut loss = 0.0f64;
        let mut dlogp = vec![0.0f32; n];
        for (i, (&lp, d)) in logp.iter().zip(&mut dlogp).enumerate() {
            let w = weights[i / SEQ];
            loss -= w * lp as f64 / n as f64;
            *d = -(w as f32) * scale / n as f32;
        }
        let mut dlogits = vec![0.0f32; n * VOCAB];
        Cpu.logprob_bwd(&logits, &targets, VOCAB, &lse, &dlogp, &mut dlogits)?;
        self.llama.backward(&acts, &dlogits)?;
        if self.nan_at == Some(self.calls) {
            loss = f64::NAN;
        }
        if self.inf_grad_at == Some(self.calls) {
            let (_, p) = &mut self.llama.params_mut()[1];
            p.grad.as_mut().unwrap()[0] = f32::INFINITY;
        }
        let ce = -logp.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        Ok(LossParts {
            loss,
            parts: [("ce".to_string(), ce)].into(),
            tokens: n,
        })
    }
    fn save_weights(&mut self, path: &Path) -> Result<()> {
        let params: Vec<(String, &Tensor)> = self
            .llama
            .params_mut()
            .into_iter()
            .map(|(n, t)| (n, &*t))
            .collect();
        popen::model::weights::save_params(&Cpu, path, params, |n| n.to_string(), StDtype::F32)
    }
    fn load_weights(&mut self, path: &Path) -> Result<()> {
        Checkpoint::open_file(path)?.load_params(&Cpu, self.llama.params_mut(), |n| n.to_string())
    }
}

/// Sequences `start, start+stride, …` mod VOCAB: learnable from the first two tokens.
struct ToyData {
    n: usize,
}

impl Dataset for ToyData {
    type Item = Vec<u32>;
    fn len(&self) -> usize {
        self.n
    }
    fn load(&self, i: usize) -> Result<Vec<u32>> {
        let (start, stride) = (i * 5 % VOCAB, 1 + i % 3);
        Ok((0..=SEQ)
            .map(|j| ((start + j * stride) % VOCAB) as u32)
            .collect())
    }
}

fn train_in_process(
    run: &Path,
    s: &Spec,
    model: &mut ToyLm,
    resume: bool,
) -> Result<popen::train::TrainSummary> {
    Trainer::new(s.train.clone(), run)?
        .resume(resume)
        .progress(false)
        .run(model, &ToyData { n: s.examples })
}

/// The child's body: train (resuming) the run named by the environment.
#[test]
#[ignore = "entry point of the child processes that the other tests start"]
fn child_entry() {
    let run = PathBuf::from(std::env::var(ENV_RUN).expect("set by the parent test"));
    let s: Spec = serde_json::from_str(&std::env::var(ENV_SPEC).unwrap()).unwrap();
    let mut model = ToyLm::new(s.hidden, s.layers);
    train_in_process(&run, &s, &mut model, true).unwrap();
}

fn child(run: &Path, s: &Spec, threads: usize) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child_entry",
            "--exact",
            "--ignored",
            "--test-threads=1",
            "--quiet",
        ])
        .env(ENV_RUN, run)
        .env(ENV_SPEC, serde_json::to_string(s).unwrap())
        .env("RAYON_NUM_THREADS", threads.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn run_child_to_end(run: &Path, s: &Spec, threads: usize) {
    let out = child(run, s, threads).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fresh_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popen-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("model.safetensors")).unwrap()
}

/// After any kill: train_state.json (if present) names a complete checkpoint, and the
/// top-level weights, if present, are a whole file (the first checkpoint may be killed
/// between train_state.json and the weights copy, which resume redoes).
fn assert_consistent(run: &Path) -> Option<u64> {
    let st = read_train_state(run).unwrap()?;
    let dir = run.join(&st.checkpoint);
    for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        assert!(
            dir.join(f).is_file(),
            "checkpoint {} lacks {f}",
            st.checkpoint
        );
    }
    Checkpoint::open_file(dir.join("model.safetensors")).unwrap();
    let top = run.join("model.safetensors");
    if top.exists() {
        Checkpoint::open_file(top).unwrap();
    }
    Some(st.step)
}

#[test]
fn sigkill_at_random_moments_then_resume_gives_identical_weights() {
    const STEPS: u64 = 40;
    /// Kills wanted; each round waits a random fraction of `1/KILL_SPAN` of the full
    /// run, so most rounds make progress and the run still sees several kills.
    const MIN_KILLS: usize = 6;
    const KILL_SPAN: f64 = 4.0;
    const MAX_ROUNDS: usize = 60;
    let s = spec(STEPS);
    let straight = fresh_dir("straight");
    let t0 = Instant::now();
    run_child_to_end(&straight, &s, 2);
    let full = t0.elapsed();

    let killed = fresh_dir("killed");
    let mut rng = Rng::new(0x5EED);
    let (mut hits, mut steps_seen) = (0, Vec::new());
    for _ in 0..MAX_ROUNDS {
        let mut c = child(&killed, &s, 2);
        std::thread::sleep(full.mul_f64(rng.uniform() / KILL_SPAN));
        if c.try_wait().unwrap().is_some() {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            if read_train_state(&killed).unwrap().unwrap().step == STEPS {
                break;
            }
            continue;
        }
        hits += 1;
        c.kill().unwrap(); // SIGKILL on Unix
        c.wait().unwrap();
        steps_seen.push(assert_consistent(&killed));
    }
    run_child_to_end(&killed, &s, 2);
    assert!(
        hits >= MIN_KILLS,
        "only {hits} kills hit a running child: {steps_seen:?}"
    );
    assert_eq!(read_train_state(&killed).unwrap().unwrap().step, STEPS);
    assert!(
        weights(&straight) == weights(&killed),
        "weights differ after kills (checkpoint steps seen after each kill: {steps_seen:?})"
    );
    // the log has each logged step once, in order, despite the kills
    let text = std::fs::read_to_string(killed.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let want: Vec<u64> = (1..=STEPS).filter(|s| s % 2 == 0).collect();
    assert_eq!(steps, want);
    // only the newest `keep_checkpoints` folders remain, and no leftovers
    let mut left: Vec<String> = std::fs::read_dir(killed.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec!["step-000039", "step-000040"]);
    for d in [straight, killed] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn same_seed_same_weights_at_one_and_two_threads() {
    let s = spec(9);
    let (a, b) = (fresh_dir("t1"), fresh_dir("t2"));
    run_child_to_end(&a, &s, 1);
    run_child_to_end(&b, &s, 2);
    assert!(
        weights(&a) == weights(&b),
        "1 and 2 threads trained different weights"
    );
    // and a different seed trains different weights (the comparison can fail)
    let c = fresh_dir("t3");
    let mut s2 = s.clone();
    s2.train.seed += 1;
    run_child_to_end(&c, &s2, 2);
    assert!(weights(&a) != weights(&c));
    for d in [a, b, c] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn nan_loss_or_gradient_stops_and_keeps_the_last_checkpoint() {
    let s = spec(20);
    // accum 2: call 15 is the first micro-batch of step 8; checkpoints at 3 and 6
    for (nan, inf) in [(Some(15), None), (None, Some(16))] {
        let run = fresh_dir("nan");
        let mut m = ToyLm::new(s.hidden, s.layers);
        m.nan_at = nan;
        m.inf_grad_at = inf;
        let err = train_in_process(&run, &s, &mut m, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("step 8"), "{err}");
        let what = if nan.is_some() {
            "loss"
        } else {
            "gradient norm"
        };
        assert!(err.contains(what), "{err}");
        let st = read_train_state(&run).unwrap().unwrap();
        assert_eq!(st.step, 6);
        let ck = std::fs::read(run.join(&st.checkpoint).join("model.safetensors")).unwrap();
        assert!(
            ck == weights(&run),
            "top-level weights are not the last checkpoint's"
        );
        let bytes = std::fs::read(run.join("model.safetensors")).unwrap();
        let f = Checkpoint::open_file(run.join("model.safetensors")).unwrap();
        for n in f.names() {
            assert!(f.f32(&n).unwrap().data.iter().all(|x| x.is_finite()), "{n}");
        }
        // resuming without the fault finishes the run from step 6
        let mut m = ToyLm::new(s.hidden, s.layers);
        let sum = train_in_process(&run, &s, &mut m, true).unwrap();
        assert_eq!((sum.resumed_from, sum.step), (Some(6), 20));
        assert!(bytes != weights(&run));
        std::fs::remove_dir_all(&run).unwrap();
    }
}

#[test]
fn a_run_of_another_model_is_a_clear_error() {
    let s = spec(3);
    let run = fresh_dir("other");
    train_in_process(&run, &s, &mut ToyLm::new(16, 2), false).unwrap();
    // other width: every shape differs; fewer layers: names of the file match nothing
    for (hidden, layers, what) in [(20, 2, "shape"), (16, 1, "model.layers.1")] {
        let mut s2 = s.clone();
        s2.train.total_steps = 6;
        let err = train_in_process(&run, &s2, &mut ToyLm::new(hidden, layers), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("optimizer.safetensors"), "{err}");
        assert!(err.contains(what), "{err}");
    }
    // resuming with another seed would train on another data stream
    let mut s3 = s.clone();
    s3.train.seed += 1;
    let err = train_in_process(&run, &s3, &mut ToyLm::new(16, 2), true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.seed"), "{err}");
    // a finished run is not overwritten without --resume
    let err = train_in_process(&run, &s, &mut ToyLm::new(16, 2), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--resume"), "{err}");
    std::fs::remove_dir_all(&run).unwrap();
}

#[test]
fn metrics_validation_and_plot_are_written() {
    let mut s = spec(8);
    s.train.val_every = 3;
    s.train.log_every = 4;
    let run = fresh_dir("metrics");
    let mut model = ToyLm::new(s.hidden, s.layers);
    let mut seen = Vec::new();
    let sum = Trainer::new(s.train.clone(), &run)
        .unwrap()
        .progress(false)
        .validate_with(|m: &mut ToyLm, step| {
            seen.push(step);
            Ok(serde_json::json!({ "calls": m.calls }))
        })
        .run(&mut model, &ToyData { n: s.examples })
        .unwrap();
    assert_eq!(seen, vec![3, 6]);
    assert_eq!(sum.step, 8);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![3, 4, 6, 8]);
    assert_eq!(
        lines[0]["val"]["calls"], 6,
        "validation ran after step 3's 2 micro-batches each"
    );
    for l in &lines {
        for k in ["loss", "ce", "lr", "grad_norm", "tokens_per_s", "elapsed_s"] {
            let v = l[k].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v >= 0.0, "{k} = {} in {l}", l[k]);
        }
        assert!(l["tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    // loss falls on this learnable toy language
    let first = lines[0]["loss"].as_f64().unwrap();
    let last = lines[3]["loss"].as_f64().unwrap();
    assert!(last < first, "loss {first} → {last}");
    // warm-up (5 steps) then decay to 0 at step 8
    assert!((lines[0]["lr"].as_f64().unwrap() - 3e-3 * 3.0 / 5.0).abs() < 1e-9);
    let png = image::open(run.join("loss.png")).unwrap();
    assert!(png.width() > 100 && png.height() > 100);
    std::fs::remove_dir_all(&run).unwrap();
}

/// Fails to load one example, as a missing image would.
struct BrokenData {
    bad: usize,
}

impl Dataset for BrokenData {
    type Item = Vec<u32>;
    fn len(&self) -> usize {
        17
    }
    fn load(&self, i: usize) -> Result<Vec<u32>> {
        if i == self.bad {
            return Err(popen::Error::Image {
                path: format!("img{i}.png").into(),
                msg: "does not decode".into(),
            });
        }
        ToyData { n: 17 }.load(i)
    }
}

#[test]
fn a_load_error_stops_the_run_with_its_message() {
    let s = spec(30);
    let run = fresh_dir("broken");
    let err = Trainer::new(s.train.clone(), &run)
        .unwrap()
        .progress(false)
        .run(&mut ToyLm::new(16, 2), &BrokenData { bad: 5 })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("img5.png") && err.contains("does not decode"),
        "{err}"
    );
    std::fs::remove_dir_all(&run).unwrap();
}

/// The run's raw weights of every tensor, by name, from a safetensors file.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let f = Checkpoint::open_file(path).unwrap();
    let mut names = f.names();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let d = f.f32(&n).unwrap().data;
            (n, d)
        })
        .collect()
}

#[test]
fn the_moving_average_is_what_the_run_publishes_and_a_resume_continues_it() {
    use popen::train::ema::decay_at;
    let mut s = spec(9);
    s.train.ema = 0.8;
    s.train.checkpoint_every = 1;
    s.train.keep_checkpoints = 20;
    let run = fresh_dir("ema");
    let mut m = ToyLm::new(s.hidden, s.layers);
    let init: Vec<(String, Vec<f32>)> = {
        let mut v: Vec<(String, Vec<f32>)> = m
            .llama
            .params_mut()
            .into_iter()
            .map(|(n, t)| (n, t.data.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    train_in_process(&run, &s, &mut m, false).unwrap();
    // by hand, from the raw weights each checkpoint kept: w̄ ← d_t·w̄ + (1 − d_t)·w
    let mut avg: Vec<Vec<f64>> = init
        .iter()
        .map(|(_, d)| d.iter().map(|&x| x as f64).collect())
        .collect();
    for t in 1..=9u64 {
        let raw = tensors(&run.join(format!("checkpoints/step-{t:06}/model.safetensors")));
        let d = decay_at(0.8, t) as f64;
        for (a, (_, w)) in avg.iter_mut().zip(&raw) {
            for (x, &y) in a.iter_mut().zip(w) {
                *x = d * *x + (1.0 - d) * y as f64;
            }
        }
    }
    let published = tensors(&run.join("model.safetensors"));
    let last_raw = tensors(&run.join("checkpoints/step-000009/model.safetensors"));
    let (mut err, mut scale, mut moved) = (0f64, 0f64, 0f64);
    for ((a, (name, p)), (_, r)) in avg.iter().zip(&published).zip(&last_raw) {
        assert_eq!(a.len(), p.len(), "{name}");
        for ((&x, &y), &z) in a.iter().zip(p).zip(r) {
            err = err.max((x - y as f64).abs());
            scale = scale.max(x.abs());
            moved = moved.max((y - z).abs() as f64);
        }
    }
    assert!(
        err <= 1e-5 * scale,
        "published vs hand average: {err} (scale {scale})"
    );
    // the average is not the raw weights: the run did not publish those
    assert!(
        moved > 1e3 * err.max(1e-9),
        "the average equals the raw weights ({moved})"
    );
    // a run stopped after step 6 (a NaN at step 8's first micro-batch; checkpoints at 3
    // and 6) and resumed ends where the straight run did, to the byte: the average was
    // checkpointed, not restarted from the raw weights
    let mut s2 = s.clone();
    s2.train.checkpoint_every = 3;
    s2.train.keep_checkpoints = 2;
    let straight = fresh_dir("ema-straight");
    train_in_process(&straight, &s2, &mut ToyLm::new(s.hidden, s.layers), false).unwrap();
    let stopped = fresh_dir("ema-stopped");
    let mut m = ToyLm::new(s.hidden, s.layers);
    m.nan_at = Some(15);
    assert!(train_in_process(&stopped, &s2, &mut m, false).is_err());
    assert_eq!(read_train_state(&stopped).unwrap().unwrap().step, 6);
    let sum = train_in_process(&stopped, &s2, &mut ToyLm::new(s.hidden, s.layers), true).unwrap();
    assert_eq!(sum.resumed_from, Some(6));
    assert!(
        weights(&stopped) == weights(&straight),
        "the resumed average differs"
    );
    for d in [run, straight, stopped] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
