//! Correctors of stage 2's `Pt` behind one trait ([`Corrector`]): the world's own
//! ([`WorldCorrector`], exact and offline, the default) and a client of any
//! OpenAI-compatible chat-completions endpoint ([`ChatCorrector`]) that sends the
//! paper's Supp B prompts, so that a user with real MUSE can correct with a hosted or a
//! local LLM.
//!
//! The chat client:
//! - posts `{model, messages: [system: Supp B's prompt, user: question, answer, object
//!   list], temperature: 0}` to `URL/chat/completions` with `Authorization: Bearer KEY`
//!   when a key is given;
//! - reads the correction from the answer's part `(2)`, removing the quote marks the
//!   prompt asks for; an injection is the whole answer;
//! - retries a timeout, a connection error, HTTP 429 or 5xx up to `retries` times,
//!   waiting `backoff_ms · 2^k`; HTTP 401, 403 and 404 stop the run (a wrong key, model
//!   or URL fails every request alike); any other failure skips the request;
//! - caches each answer on disk under a hash of the request body, the body kept beside
//!   it and compared on read, so that a rerun costs nothing and a hash collision is a
//!   miss, not a wrong answer;
//! - counts every outcome ([`ChatCounts`], in `RUN/collect.json` under `chat`).
//!
//! The image is not sent: the prompts go to text-only endpoints too, and the object
//! list carries what the image would (the ground truth's objects).
use crate::data::corrector::{correct, inject, Context};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Supp B's prompt for correcting an answer.
pub const CORRECT_PROMPT: &str = "You are an assistant designed to help me correct an \
incorrect answer to a question about an image. I will provide you with an image, a question, \
an answer from an LVLM, and an object list. You need to modify, add, or delete certain words or \
sentences in the LVLM's answer to correct mistakes, including incorrect objects and faulty \
reasoning. The corrected answer should include only the objects in the object list. You should \
return: (1) The original LVLM's answer I provided, in which you should mark the deleted or \
modified parts in the answer in quotes. (2) Your corrected answer, in which you should mark the \
modified or added parts compared to the original answer in quotes. Please ensure that only the \
modified, deleted, or added parts are marked. Do not mark synonyms as modifications. Please \
retain the sentence structure and content of the LVLM's original answer as much as possible, \
without adding extra information beyond what is necessary for correction.";

/// Supp B's prompt for introducing errors into a correct answer.
pub const INJECT_PROMPT: &str = "You are an assistant designed to help me intentionally \
introduce errors into a correct answer to a question about an image. I will provide you with an \
image, a question, and a correct answer. You need to modify, add, or delete certain words or \
sentences in the correct answer to introduce some mistakes, such as incorrect objects and faulty \
reasoning. You should return the modified answer. Please introduce errors into only a small \
portion of the content (e.g., one or two objects). Please do not perform synonym replacement.";

/// Writes `yc` for a sampled answer and `y` from a correct one (Sec. 3.2, Supp B).
pub trait Corrector {
    /// The corrected answer to `y` (equal to `y` up to spacing when it has no error);
    /// `None` when no correction could be had for this answer (counted by the
    /// implementation; the collection draws another answer).
    fn correct(&mut self, question: &str, y: &str, ctx: &Context) -> Result<Option<String>>;
    /// `yg` with errors introduced; `None` when none could be (no absent object to name,
    /// or the request failed).  `absent` lists absent objects most tempting first.
    fn inject(
        &mut self,
        question: &str,
        yg: &str,
        absent: &[&str],
        seed: u64,
    ) -> Result<Option<String>>;
}

/// The world's corrector and injector ([`correct`], [`inject`]): exact and offline.
#[derive(Clone, Copy, Debug, Default)]
pub struct WorldCorrector {
    /// The chance that an injected answer's first error deletes a target rather than
    /// naming an absent object (`[collect] omit`).
    pub omit: f32,
}

impl Corrector for WorldCorrector {
    fn correct(&mut self, _q: &str, y: &str, ctx: &Context) -> Result<Option<String>> {
        Ok(Some(correct(y, ctx)))
    }
    fn inject(&mut self, _q: &str, yg: &str, absent: &[&str], seed: u64) -> Result<Option<String>> {
        Ok(inject(yg, absent, self.omit, seed).map(|(y, _)| y))
    }
}

/// Which corrector `Pt` uses (`[collect] corrector`, `--corrector`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorrectorKind {
    /// The world's own exact, offline corrector ([`WorldCorrector`]).
    #[default]
    World,
    /// An OpenAI-compatible chat-completions endpoint ([`ChatCorrector`], `[collect.chat]`).
    Chat,
}

/// The chat endpoint's settings (`[collect.chat]`).  The key is never written to a
/// config file: it comes from `--chat-key` or the environment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatCfg {
    /// Base URL, e.g. `https://api.openai.com/v1` or `http://localhost:8000/v1`
    /// (`--chat-url`, else `POPEN_CHAT_URL`).
    pub url: String,
    /// Model name (`--chat-model`, else `POPEN_CHAT_MODEL`).
    pub model: String,
    /// Seconds one request may take.
    pub timeout_s: f64,
    /// Extra attempts after a timeout, a connection error, HTTP 429 or 5xx.
    pub retries: usize,
    /// Wait before the first retry, doubled each time.
    pub backoff_ms: u64,
    /// Answers cached here (default: `RUN/chat_cache`).
    pub cache: Option<PathBuf>,
    /// Bearer key (`--chat-key`, else `POPEN_CHAT_KEY`, else `OPENAI_API_KEY`).
    #[serde(skip)]
    pub key: Option<String>,
}

impl Default for ChatCfg {
    fn default() -> Self {
        ChatCfg {
            url: String::new(),
            model: String::new(),
            timeout_s: 60.0,
            retries: 3,
            backoff_ms: 1000,
            cache: None,
            key: None,
        }
    }
}

impl ChatCfg {
    /// Fills what is unset from the environment (`POPEN_CHAT_URL`, `POPEN_CHAT_MODEL`,
    /// `POPEN_CHAT_KEY`, `OPENAI_API_KEY`).
    pub fn with_env(mut self) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if self.url.is_empty() {
            self.url = var("POPEN_CHAT_URL").unwrap_or_default();
        }
        if self.model.is_empty() {
            self.model = var("POPEN_CHAT_MODEL").unwrap_or_default();
        }
        if self.key.is_none() {
            self.key = var("POPEN_CHAT_KEY").or_else(|| var("OPENAI_API_KEY"));
        }
        self
    }
}

/// Outcomes of the chat corrector's requests.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCounts {
    /// Requests asked of the corrector (cached or not).
    pub requests: usize,
    /// Answered from the disk cache.
    pub cached: usize,
    /// Usable answers (from the endpoint or the cache).
    pub answered: usize,
    /// Answered, but not in the asked form (no part `(2)`, no content): skipped.
    pub malformed: usize,
    /// Attempts that timed out or could not connect.
    pub timeouts: usize,
    /// Attempts answered with an HTTP error status.
    pub http_errors: usize,
    /// Attempts made again after a retryable failure.
    pub retries: usize,
    /// Requests given up after their last attempt failed: skipped.
    pub failed: usize,
    /// What the last failed attempt said.
    pub last_error: Option<String>,
}

/// A client of an OpenAI-compatible chat-completions endpoint (see the module docs).
pub struct ChatCorrector {
    cfg: ChatCfg,
    cache: PathBuf,
    agent: ureq::Agent,
    /// Outcomes of the requests made so far (written to `RUN/collect.json` under `chat`).
    pub counts: ChatCounts,
}

/// What one attempt gave.
enum Attempt {
    Content(String),
    Retry(String),
    Fail(String),
}

/// FNV-1a, 64 bits: the cache file's name (the request beside it decides a hit).
fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The corrected answer in a correction reply: the text after the last `(2)`, with a
/// leading label ("Corrected answer:") and the quote marks removed.  `None` without a
/// `(2)` or with nothing after it.
pub fn parse_correction(reply: &str) -> Option<String> {
    let at = reply.rfind("(2)")?;
    let mut part = reply[at + 3..].trim();
    if let Some(colon) = part.find(':') {
        // "Your corrected answer: …" — a label is short and has no sentence end in it
        if colon < 40 && !part[..colon].contains(['.', '"', '\u{201c}']) {
            part = part[colon + 1..].trim();
        }
    }
    let clean: String = part
        .chars()
        .filter(|c| !matches!(c, '"' | '\u{201c}' | '\u{201d}'))
        .collect();
    let clean = clean.split_whitespace().collect::<Vec<_>>().join(" ");
    (!clean.is_empty()).then_some(clean)
}

impl ChatCorrector {
    /// A client for `cfg`, caching under `cfg.cache` or `default_cache`.  Errors when no
    /// URL or model is set.
    pub fn new(cfg: ChatCfg, default_cache: &Path) -> Result<Self> {
        if cfg.url.is_empty() || cfg.model.is_empty() {
            return Err(Error::arg(
                "chat corrector",
                "needs a base URL and a model: --chat-url and --chat-model (or POPEN_CHAT_URL \
                 and POPEN_CHAT_MODEL)",
            ));
        }
        if !(cfg.timeout_s.is_finite() && cfg.timeout_s > 0.0) {
            return Err(Error::arg(
                "chat corrector",
                format!("timeout_s = {}: need a positive number", cfg.timeout_s),
            ));
        }
        let cache = cfg
            .cache
            .clone()
            .unwrap_or_else(|| default_cache.to_path_buf());
        std::fs::create_dir_all(&cache).map_err(|e| Error::io(&cache, e))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs_f64(cfg.timeout_s)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(ChatCorrector {
            cfg,
            cache,
            agent,
            counts: ChatCounts::default(),
        })
    }

    fn endpoint(&self) -> String {
        format!("{}/chat/completions", self.cfg.url.trim_end_matches('/'))
    }

    fn attempt(&mut self, body: &str) -> Result<Attempt> {
        let mut req = self
            .agent
            .post(&self.endpoint())
            .header("Content-Type", "application/json");
        if let Some(k) = &self.cfg.key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        let mut resp = match req.send(body) {
            Ok(r) => r,
            Err(e) => {
                self.counts.timeouts += 1;
                return Ok(Attempt::Retry(format!("no answer: {e}")));
            }
        };
        let status = resp.status().as_u16();
        let text = match resp.body_mut().read_to_string() {
            Ok(t) => t,
            Err(e) => {
                self.counts.timeouts += 1;
                return Ok(Attempt::Retry(format!("reading the answer: {e}")));
            }
        };
        if status != 200 {
            self.counts.http_errors += 1;
            let what = format!(
                "HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            );
            return match status {
                401 | 403 | 404 => Err(Error::arg(
                    "chat corrector",
                    format!("{} answered {what}", self.endpoint()),
                )),
                429 | 500..=599 => Ok(Attempt::Retry(what)),
                _ => Ok(Attempt::Fail(what)),
            };
        }
        let v: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => return Ok(Attempt::Fail(format!("not JSON: {e}"))),
        };
        match v["choices"][0]["message"]["content"].as_str() {
            Some(c) => Ok(Attempt::Content(c.to_string())),
            None => Ok(Attempt::Fail("no choices[0].message.content".into())),
        }
    }

    /// The endpoint's reply to `system` + `user`, from the cache when it holds it;
    /// `None` when every attempt failed (counted).
    pub fn ask(&mut self, system: &str, user: &str) -> Result<Option<String>> {
        self.counts.requests += 1;
        let body = json!({
            "model": self.cfg.model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            "temperature": 0,
        })
        .to_string();
        let file = self
            .cache
            .join(format!("{:016x}.json", fnv64(body.as_bytes())));
        if let Ok(t) = std::fs::read_to_string(&file) {
            if let Ok(v) = serde_json::from_str::<Value>(&t) {
                if v["request"].as_str() == Some(&body) {
                    if let Some(c) = v["content"].as_str() {
                        self.counts.cached += 1;
                        return Ok(Some(c.to_string()));
                    }
                }
            }
        }
        let mut wait = self.cfg.backoff_ms;
        for k in 0..=self.cfg.retries {
            if k > 0 {
                self.counts.retries += 1;
                std::thread::sleep(Duration::from_millis(wait));
                wait = wait.saturating_mul(2);
            }
            match self.attempt(&body)? {
                Attempt::Content(c) => {
                    let rec = json!({"request": body, "content": c}).to_string();
                    crate::fsio::write_atomic(&file, rec.as_bytes())?;
                    return Ok(Some(c));
                }
                Attempt::Retry(e) => self.counts.last_error = Some(e),
                Attempt::Fail(e) => {
                    self.counts.last_error = Some(e);
                    break;
                }
            }
        }
        self.counts.failed += 1;
        Ok(None)
    }
}

fn object_list(ctx: &Context) -> String {
    let mut names: Vec<&str> = ctx.mentioned.iter().map(String::as_str).collect();
    if let Some(t) = &ctx.targets {
        names.extend(t.iter().map(|(n, _)| n.as_str()));
    }
    let mut seen = Vec::new();
    for n in names {
        if !seen.contains(&n) {
            seen.push(n);
        }
    }
    seen.join(", ")
}

impl Corrector for ChatCorrector {
    fn correct(&mut self, question: &str, y: &str, ctx: &Context) -> Result<Option<String>> {
        let user = format!(
            "Question: {question}\nLVLM's answer: {y}\nObject list: {}",
            object_list(ctx)
        );
        let Some(reply) = self.ask(CORRECT_PROMPT, &user)? else {
            return Ok(None);
        };
        let yc = parse_correction(&reply);
        if yc.is_some() {
            self.counts.answered += 1;
        } else {
            self.counts.malformed += 1;
        }
        Ok(yc)
    }

    fn inject(&mut self, question: &str, yg: &str, _a: &[&str], _s: u64) -> Result<Option<String>> {
        let user = format!("Question: {question}\nCorrect answer: {yg}");
        let Some(reply) = self.ask(INJECT_PROMPT, &user)? else {
            return Ok(None);
        };
        let y = reply
            .trim()
            .trim_matches(|c| matches!(c, '"' | '\u{201c}' | '\u{201d}'))
            .trim()
            .to_string();
        if y.is_empty() {
            self.counts.malformed += 1;
            return Ok(None);
        }
        self.counts.answered += 1;
        Ok(Some(y))
    }
}
