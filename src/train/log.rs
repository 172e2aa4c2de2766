//! `RUN/metrics.jsonl`: one JSON object per logged step.
//!
//! Fields: `step`, `loss` (mean over the steps since the previous line), one field per
//! named loss part (same window), `lr` and `grad_norm` (of this step, the norm before
//! clipping), `tokens_per_s` (over the window), `elapsed_s` (training wall time over
//! all resumes) and, at validation steps, `val` (the hook's JSON).
//!
//! Lines are appended and flushed as they come.  On resume, lines past the checkpoint's
//! step are dropped (and a torn last line from a kill), so the log has no duplicates.
use crate::error::{Error, Result};
use crate::fsio::write_atomic;
use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `RUN/metrics.jsonl`.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One point of the loss curve, as read back for the plot.
#[derive(Clone, Debug, PartialEq)]
pub struct LossPoint {
    /// Optimizer step of the log line.
    pub step: u64,
    /// Mean loss over the steps since the previous line.
    pub loss: f64,
    /// The named loss parts, by name.
    pub parts: Vec<(String, f64)>,
}

/// The open metrics log.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    /// Every logged loss so far (for `loss.png`).
    pub points: Vec<LossPoint>,
}

/// The keys of a line that are not loss parts.
const FIXED_KEYS: [&str; 7] = [
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "elapsed_s",
    "val",
];

impl MetricsLog {
    /// Opens `RUN/metrics.jsonl` keeping only lines with `step ≤ keep_upto` (all lines
    /// are dropped for a fresh run: `keep_upto = 0`).  A malformed line other than the
    /// last is an error naming the file and line.
    pub fn open(run: &Path, keep_upto: u64) -> Result<Self> {
        let path = run.join(METRICS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let mut kept = Vec::new();
        let mut points = Vec::new();
        {
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let parsed: std::result::Result<Map<String, Value>, _> = serde_json::from_str(line);
                let obj = match parsed {
                    Ok(o) => o,
                    // a kill mid-append leaves a torn last line
                    Err(_) if i + 1 == lines.len() => break,
                    Err(e) => {
                        return Err(Error::Json {
                            path: path.clone(),
                            line: Some(i + 1),
                            msg: e.to_string(),
                        })
                    }
                };
                let step = obj
                    .get("step")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| Error::Data {
                        path: path.clone(),
                        field: format!("line {}: step", i + 1),
                        msg: "missing or not a non-negative integer".into(),
                    })?;
                if step > keep_upto {
                    continue;
                }
                if let Some(p) = point_of(step, &obj) {
                    points.push(p);
                }
                kept.push(*line);
            }
        }
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        write_atomic(&path, body.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog { path, file, points })
    }

    /// Appends one line (and remembers its loss for the plot).
    pub fn append(&mut self, line: &Map<String, Value>) -> Result<()> {
        let step = line.get("step").and_then(Value::as_u64).unwrap_or(0);
        if let Some(p) = point_of(step, line) {
            self.points.push(p);
        }
        let mut text = serde_json::to_string(line).expect("metrics serialise");
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// The loss and its parts of one line, if it has a loss.
fn point_of(step: u64, obj: &Map<String, Value>) -> Option<LossPoint> {
    let loss = obj.get("loss")?.as_f64()?;
    let parts = obj
        .iter()
        .filter(|(k, _)| !FIXED_KEYS.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
        .collect();
    Some(LossPoint { step, loss, parts })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resume_drops_later_and_torn_lines() {
        let dir = std::env::temp_dir().join(format!("popen-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(METRICS_FILE);
        std::fs::write(
            &p,
            "{\"step\":1,\"loss\":2.0,\"ce\":1.5}\n{\"step\":2,\"loss\":1.0}\n{\"step\":3,\"loss\":0.5}\n{\"step\":4,\"lo",
        )
        .unwrap();
        let mut log = MetricsLog::open(&dir, 2).unwrap();
        assert_eq!(log.points.len(), 2);
        assert_eq!(log.points[0].parts, vec![("ce".to_string(), 1.5)]);
        let line = json!({"step": 3, "loss": 0.25, "lr": 1e-3});
        log.append(line.as_object().unwrap()).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, vec![1, 2, 3]);
        // a malformed line in the middle is an error naming its line
        std::fs::write(&p, "{\"step\":1}\nnot json\n{\"step\":2}\n").unwrap();
        let err = MetricsLog::open(&dir, 5).err().unwrap().to_string();
        assert!(err.contains("metrics.jsonl:2"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
