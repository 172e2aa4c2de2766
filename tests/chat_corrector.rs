//! The chat corrector against a mock OpenAI-compatible server on loopback: a
//! well-formed answer, the disk cache (a rerun asks nothing), a malformed answer, a 500
//! then a 200 (retried), a timeout (retried, then given up), a 400 (given up at once),
//! a 401 (stops the run), an answer that is not JSON; each a counted outcome.  Then
//! `popen train pref --corrector chat` end to end on a tiny world.
use popen::data::chat::{
    parse_correction, ChatCfg, ChatCorrector, Corrector, CORRECT_PROMPT, INJECT_PROMPT,
};
use popen::data::corrector::Context;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the mock answers one request.
#[derive(Clone, Debug)]
enum Reply {
    /// 200 with this message content.
    Content(String),
    /// This status and body.
    Status(u16, String),
    /// Waits, then answers with the content.
    Slow(u64, String),
}

/// What the mock saw: per request, its Authorization header and body.
type Seen = Arc<Mutex<Vec<(Option<String>, String)>>>;

/// A server on 127.0.0.1 answering requests in order from `script` (the last reply
/// repeats); returns its base URL and the log of requests.
fn mock(script: Vec<Reply>) -> (String, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", l.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut n = 0;
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let (mut len, mut auth) = (0usize, None);
            let mut line = String::new();
            let mut first = true;
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let t = line.trim_end();
                if first {
                    assert!(t.starts_with("POST /v1/chat/completions "), "{t}");
                    first = false;
                }
                if t.is_empty() {
                    break;
                }
                let lower = t.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if lower.starts_with("authorization:") {
                    auth = Some(t["authorization:".len()..].trim().to_string());
                }
            }
            let mut body = vec![0u8; len];
            if r.read_exact(&mut body).is_err() {
                continue;
            }
            log.lock()
                .unwrap()
                .push((auth, String::from_utf8(body).unwrap()));
            let reply = script[n.min(script.len() - 1)].clone();
            n += 1;
            let (status, text) = match reply {
                Reply::Content(c) => (200, chat_json(&c)),
                Reply::Status(code, b) => (code, b),
                Reply::Slow(ms, c) => {
                    std::thread::sleep(Duration::from_millis(ms));
                    (200, chat_json(&c))
                }
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    (url, seen)
}

fn chat_json(content: &str) -> String {
    serde_json::json!({"choices": [{"message": {"role": "assistant", "content": content}}]})
        .to_string()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popen_chat_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A client with a timeout long enough for a loaded test machine.
fn client(url: &str, cache: &std::path::Path) -> ChatCorrector {
    client_timing_out(url, cache, 10.0)
}

fn client_timing_out(url: &str, cache: &std::path::Path, timeout_s: f64) -> ChatCorrector {
    let cfg = ChatCfg {
        url: url.into(),
        model: "mock-1".into(),
        timeout_s,
        retries: 1,
        backoff_ms: 10,
        key: Some("sk-test".into()),
        ..ChatCfg::default()
    };
    ChatCorrector::new(cfg, cache).unwrap()
}

fn ctx() -> Context {
    Context {
        present: vec![("cup".into(), 1), ("table".into(), 1)],
        targets: Some(vec![("cup".into(), 1)]),
        mentioned: vec!["cup".into(), "table".into()],
    }
}

const GOOD: &str =
    "(1) The \"apple\" <seg> is on the table.\n(2) The \"cup\" <seg> is on the table.";

#[test]
fn a_well_formed_answer_is_parsed_sent_as_asked_and_cached() {
    let (url, seen) = mock(vec![Reply::Content(GOOD.into())]);
    let cache = tmp("good");
    let mut c = client(&url, &cache);
    let y = "The apple <seg> is on the table.";
    let yc = c.correct("Where is the cup?", y, &ctx()).unwrap();
    assert_eq!(yc.as_deref(), Some("The cup <seg> is on the table."));
    assert_eq!((c.counts.requests, c.counts.answered), (1, 1));
    {
        let s = seen.lock().unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0.as_deref(), Some("Bearer sk-test"));
        let body: serde_json::Value = serde_json::from_str(&s[0].1).unwrap();
        assert_eq!(body["model"], "mock-1");
        assert_eq!(body["messages"][0]["content"], CORRECT_PROMPT);
        let user = body["messages"][1]["content"].as_str().unwrap();
        assert!(
            user.contains("Where is the cup?") && user.contains(y) && user.contains("cup, table"),
            "{user}"
        );
    }
    // asked again, and by a new client on the same cache (a rerun): the server is not
    c.correct("Where is the cup?", y, &ctx()).unwrap();
    let mut again = client(&url, &cache);
    let yc2 = again.correct("Where is the cup?", y, &ctx()).unwrap();
    assert_eq!(yc2, yc);
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!((c.counts.cached, again.counts.cached), (1, 1));
    // another request is a miss
    again.correct("Where is the table?", y, &ctx()).unwrap();
    assert_eq!(seen.lock().unwrap().len(), 2);
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn malformed_answers_errors_and_timeouts_are_counted_outcomes() {
    let cache = tmp("bad");
    // no part (2): malformed, skipped
    let (url, _) = mock(vec![Reply::Content("I think the answer is fine.".into())]);
    let mut c = client(&url, &cache);
    assert_eq!(c.correct("q1", "a", &ctx()).unwrap(), None);
    assert_eq!((c.counts.malformed, c.counts.answered), (1, 0));
    // a 500, then a good answer: one retry
    let (url, seen) = mock(vec![
        Reply::Status(500, "overloaded".into()),
        Reply::Content(GOOD.into()),
    ]);
    let mut c = client(&url, &cache);
    assert!(c.correct("q2", "a", &ctx()).unwrap().is_some());
    assert_eq!((c.counts.http_errors, c.counts.retries), (1, 1));
    assert_eq!(seen.lock().unwrap().len(), 2);
    // slower than the timeout twice: given up after one retry
    let (url, _) = mock(vec![Reply::Slow(4000, GOOD.into())]);
    let mut c = client_timing_out(&url, &cache, 1.0);
    assert_eq!(c.correct("q3", "a", &ctx()).unwrap(), None);
    assert_eq!(
        (c.counts.timeouts, c.counts.retries, c.counts.failed),
        (2, 1, 1)
    );
    assert!(c.counts.last_error.is_some());
    // a 400 is not retried
    let (url, seen) = mock(vec![Reply::Status(400, "bad request".into())]);
    let mut c = client(&url, &cache);
    assert_eq!(c.correct("q4", "a", &ctx()).unwrap(), None);
    assert_eq!((c.counts.retries, c.counts.failed), (0, 1));
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert!(c.counts.last_error.as_deref().unwrap().contains("HTTP 400"));
    // a 200 that is not JSON: given up
    let (url, _) = mock(vec![Reply::Status(200, "<html>".into())]);
    let mut c = client(&url, &cache);
    assert_eq!(c.correct("q5", "a", &ctx()).unwrap(), None);
    assert_eq!(c.counts.failed, 1);
    // a 401 stops the run with the endpoint's words
    let (url, _) = mock(vec![Reply::Status(401, "invalid key".into())]);
    let mut c = client(&url, &cache);
    let e = c.correct("q6", "a", &ctx()).unwrap_err().to_string();
    assert!(e.contains("401") && e.contains("invalid key"), "{e}");
    // nothing listens: a connection error, retried, then given up
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = client(&format!("http://127.0.0.1:{port}/v1"), &cache);
    assert_eq!(c.correct("q7", "a", &ctx()).unwrap(), None);
    assert_eq!((c.counts.timeouts, c.counts.failed), (2, 1));
    // no URL or model: a clear error
    let e = ChatCorrector::new(ChatCfg::default(), &cache)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--chat-url"), "{e}");
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn injection_uses_the_second_prompt_and_the_whole_answer() {
    let (url, seen) = mock(vec![Reply::Content(
        "\"The apple <seg> is on the table.\"".into(),
    )]);
    let cache = tmp("inject");
    let mut c = client(&url, &cache);
    let y = c
        .inject(
            "Where is the cup?",
            "The cup <seg> is on the table.",
            &[],
            0,
        )
        .unwrap();
    assert_eq!(y.as_deref(), Some("The apple <seg> is on the table."));
    let body: serde_json::Value = serde_json::from_str(&seen.lock().unwrap()[0].1).unwrap();
    assert_eq!(body["messages"][0]["content"], INJECT_PROMPT);
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn corrections_are_read_from_part_two() {
    assert_eq!(
        parse_correction(
            "(1) A \"dog\" sits.\n(2) Your corrected answer: A \u{201c}cat\u{201d} sits."
        )
        .as_deref(),
        Some("A cat sits.")
    );
    assert_eq!(
        parse_correction("(2) The cup <seg> is here.").as_deref(),
        Some("The cup <seg> is here.")
    );
    assert_eq!(parse_correction("(1) only the first part"), None);
    assert_eq!(parse_correction("(2)   "), None);
}

#[test]
fn train_pref_collects_pt_with_the_chat_corrector() {
    let d = tmp("cli");
    std::fs::create_dir_all(&d).unwrap();
    let bin = env!("CARGO_BIN_EXE_popen");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(bin)
            .args(args)
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let w = d.join("world");
    run(&[
        "data",
        "generate",
        "--out",
        &s(&w),
        "--n",
        "2",
        "--seed",
        "3",
        "--split",
        "train",
    ]);
    let cfg = d.join("tiny.toml");
    std::fs::write(
        &cfg,
        "[model]\nimage_size = 32\nseg_dim = 8\ndecoder_heads = 2\ndecoder_mlp = 16\n\
         max_new_tokens = 16\n[model.lvlm]\nvision_hidden = 16\nvision_layers = 2\n\
         vision_heads = 2\nvision_intermediate = 32\npatch_size = 8\ntext_hidden = 16\n\
         text_layers = 2\ntext_heads = 2\ntext_kv_heads = 1\ntext_intermediate = 32\n\
         max_positions = 128\nvocab_size = 200\n[train]\nmicro_batch = 2\nwarmup_steps = 1\n",
    )
    .unwrap();
    let data = s(&w.join("train.json"));
    let sft = d.join("sft");
    run(&[
        "train",
        "sft",
        "--data",
        &data,
        "--out",
        &s(&sft),
        "--config",
        &s(&cfg),
        "--steps",
        "1",
    ]);
    // every correction names the table; injections name a lamp
    let (url, seen) = mock(vec![Reply::Content(
        "(1) x\n(2) There is a \"table\" here.".into(),
    )]);
    let pref = d.join("pref");
    let pcfg = d.join("pref.toml");
    std::fs::write(&pcfg, "[train]\nmicro_batch = 2\nwarmup_steps = 1\n").unwrap();
    let out = run(&[
        "train",
        "pref",
        "--from",
        &s(&sft),
        "--data",
        &data,
        "--out",
        &s(&pref),
        "--config",
        &s(&pcfg),
        "--steps",
        "1",
        "--no-ls",
        "--corrector",
        "chat",
        "--chat-url",
        &url,
        "--chat-model",
        "mock-1",
        "--chat-key",
        "sk-cli",
    ]);
    assert!(out.contains("chat corrector took"), "{out}");
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pref.join("collect.json")).unwrap()).unwrap();
    let asked = seen.lock().unwrap().len() as u64;
    assert!(asked > 0);
    assert_eq!(c["chat"]["requests"].as_u64().unwrap(), asked);
    assert_eq!(c["chat"]["answered"].as_u64().unwrap(), asked);
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .all(|(a, _)| a.as_deref() == Some("Bearer sk-cli")));
    // the pairs carry the endpoint's corrections; the key is not in the run's config
    let pt = std::fs::read_to_string(pref.join("pt.jsonl")).unwrap();
    assert!(pt.contains("There is a table here."), "{pt}");
    let config = std::fs::read_to_string(pref.join("config.json")).unwrap();
    assert!(!config.contains("sk-cli"), "the key was saved");
    assert!(pref.join("chat_cache").read_dir().unwrap().count() > 0);
    let _ = std::fs::remove_dir_all(&d);
}
