//! Checkpoints that survive a kill at any moment.
//!
//! Layout of a run directory (the contract other commands read):
//!
//! ```text
//! RUN/train_state.json                 {"step": N, "checkpoint": "checkpoints/step-00000N", …}
//! RUN/model.safetensors                the latest checkpoint's weights (its averaged
//!                                      ones with `[train] ema`, see `train::ema`)
//! RUN/checkpoints/step-NNNNNN/         model.safetensors, optimizer.safetensors, state.json
//!                                      (and ema.safetensors with `[train] ema`)
//! ```
//!
//! A checkpoint spans several files, so it is made visible in one atomic step:
//! 1. everything is written into `checkpoints/step-NNNNNN.tmp/` and flushed to disk;
//! 2. the folder is renamed to `step-NNNNNN` (a rename is atomic);
//! 3. `train_state.json`, which names the checkpoint, is replaced atomically — this is
//!    the moment the checkpoint becomes *the* checkpoint;
//! 4. the top-level `model.safetensors` is replaced atomically by a copy;
//! 5. older checkpoints beyond `keep` and any leftover `.tmp` folders are removed.
//!
//! Resume reads `train_state.json` and the one folder it names, nothing else, so a kill
//! between any two steps leaves either the old or the new checkpoint in force, both
//! whole.  The optimizer moments are stored as exact f32 (`m.NAME`, `v.NAME`).
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::fsio::write_atomic;
use crate::model::io::{write_f32, HostTensor};
use crate::model::Checkpoint;
use crate::nn::Tensor;
use crate::train::adamw::Moments;
use crate::train::loader::Cursor;
use crate::train::TrainConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `RUN/train_state.json`.
pub const TRAIN_STATE_FILE: &str = "train_state.json";
/// `RUN/model.safetensors` and the weights inside each checkpoint folder.
pub const MODEL_FILE: &str = "model.safetensors";
/// The AdamW moments inside a checkpoint folder.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// A copy of the train state inside the checkpoint folder, so that one is
/// self-describing; resume reads the top-level file only.
pub const CHECKPOINT_STATE_FILE: &str = "state.json";
/// Folder of the checkpoint folders.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Suffix of a checkpoint folder still being written.
const TMP_SUFFIX: &str = ".tmp";
/// Bumped when the layout changes, so that an old run is a clear error.
pub const CHECKPOINT_FORMAT: u32 = 1;

/// Everything besides weights and moments needed to continue a run bit-exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// The last checkpointed optimizer step (1-based; the run has taken this many).
    pub step: u64,
    /// The checkpoint folder, relative to the run directory.
    pub checkpoint: String,
    /// Layout version; resume rejects any other than [`CHECKPOINT_FORMAT`].
    pub format: u32,
    /// The next example of the data stream.
    pub cursor: Cursor,
    /// State of the RNG handed to the model ([`crate::nn::Rng::state`]).
    pub rng_state: u64,
    /// AdamW's step count (its bias corrections depend on it).
    pub adamw_t: u64,
    /// Wall time spent training so far, over all resumes.
    pub elapsed_s: f64,
    /// The settings the run was started with (total_steps may grow on resume).
    pub config: TrainConfig,
    /// Examples in the data set the run trains on: a resume on another number would
    /// continue the cursor into another stream.  `None` in runs written before it was
    /// recorded (not checked).
    #[serde(default)]
    pub examples: Option<usize>,
}

/// `checkpoints/step-NNNNNN`, relative to the run directory.
pub fn checkpoint_rel(step: u64) -> String {
    format!("{CHECKPOINTS_DIR}/step-{step:06}")
}

/// The step number of a checkpoint folder name (`step-000012` → 12); `None` for
/// anything else, `.tmp` folders included.
fn parse_step_dir(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| Error::io(path, e))
}

/// Flushes a file or folder to disk (a folder's fsync makes renames in it durable).
fn sync_path(path: &Path) -> Result<()> {
    io(path, std::fs::File::open(path).and_then(|f| f.sync_all()))
}

/// Reads `RUN/train_state.json`, or `None` when the run has no checkpoint yet.
pub fn read_train_state(run: &Path) -> Result<Option<TrainState>> {
    let path = run.join(TRAIN_STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    let st: TrainState = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.clone(),
        line: Some(e.line()),
        msg: e.to_string(),
    })?;
    if st.format != CHECKPOINT_FORMAT {
        return Err(Error::Data {
            path,
            field: "format".into(),
            msg: format!(
                "checkpoint format {} is not this build's {CHECKPOINT_FORMAT}",
                st.format
            ),
        });
    }
    // the checkpoint folder is followed on resume: only the one this step names, so a
    // hostile state file cannot point outside the run directory
    if st.checkpoint != checkpoint_rel(st.step) {
        return Err(Error::Data {
            path,
            field: "checkpoint".into(),
            msg: format!(
                "`{}` is not step {}'s checkpoint folder `{}`",
                st.checkpoint,
                st.step,
                checkpoint_rel(st.step)
            ),
        });
    }
    Ok(Some(st))
}

/// The named trainable parameters with their moments, as host tensors to save.
fn moment_tensors<B: Backend<f32>>(
    be: &B,
    params: &[(String, &mut Tensor<f32, B>)],
    moments: &[Option<(B::Buf, B::Buf)>],
) -> Vec<(String, HostTensor)> {
    let mut out = Vec::new();
    for ((name, p), st) in params.iter().zip(moments) {
        let Some((m, v)) = st else { continue };
        for (tag, buf) in [("m", m), ("v", v)] {
            out.push((
                format!("{tag}.{name}"),
                HostTensor {
                    shape: p.shape.clone(),
                    data: be.to_vec(buf),
                },
            ));
        }
    }
    out
}

/// Writes the moments of `params` to `path` (exact f32).
pub fn save_moments<B: Backend<f32>>(
    be: &B,
    path: &Path,
    params: &[(String, &mut Tensor<f32, B>)],
    moments: &[Option<(B::Buf, B::Buf)>],
) -> Result<()> {
    let hosts = moment_tensors(be, params, moments);
    let refs: Vec<(String, &HostTensor)> = hosts.iter().map(|(n, h)| (n.clone(), h)).collect();
    write_f32(path, &refs)
}

/// Reads moments saved by [`save_moments`] for `params`, checking that every tensor
/// in the file belongs to a parameter of the same shape (a run directory of another
/// model is an error naming the file and the tensor).  A trainable parameter without
/// moments (saved before its first step) gets `None`.
pub fn load_moments<B: Backend<f32>>(
    be: &B,
    path: &Path,
    params: &[(String, &mut Tensor<f32, B>)],
) -> Result<Moments<B::Buf>> {
    let ck = Checkpoint::open_file(path)?;
    let mismatch = |msg: String| Error::Safetensors {
        path: path.to_path_buf(),
        msg: format!("{msg}: this checkpoint belongs to another model or configuration"),
    };
    let mut known = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(params.len());
    for (name, p) in params {
        let (mn, vn) = (format!("m.{name}"), format!("v.{name}"));
        known.insert(mn.clone());
        known.insert(vn.clone());
        match (ck.contains(&mn), ck.contains(&vn)) {
            (false, false) => out.push(None),
            (true, true) if p.grad.is_some() => {
                let m = ck.f32_shaped(&mn, &p.shape)?;
                let v = ck.f32_shaped(&vn, &p.shape)?;
                out.push(Some((be.from_slice(&m.data), be.from_slice(&v.data))));
            }
            (true, true) => {
                return Err(mismatch(format!(
                    "parameter `{name}` is frozen in this model but was trained"
                )))
            }
            _ => {
                return Err(mismatch(format!(
                    "`{name}` has only one of its two moments"
                )))
            }
        }
    }
    if let Some(extra) = ck.names().into_iter().find(|n| !known.contains(n)) {
        return Err(mismatch(format!(
            "tensor `{extra}` matches no parameter of the model"
        )));
    }
    Ok(out)
}

/// What a checkpoint writes besides the train state: the model's weights and the
/// optimizer moments, each by a closure so that this module stays model-agnostic.
pub struct CheckpointWriter<'a> {
    /// The run directory `RUN`.
    pub run: &'a Path,
    /// Checkpoint folders kept by [`CheckpointWriter::prune`], newest first (0 acts as 1).
    pub keep: usize,
}

impl CheckpointWriter<'_> {
    /// Writes the checkpoint of `state.step` by the protocol in the module docs.
    /// `save(dir)` writes [`MODEL_FILE`] and [`OPTIMIZER_FILE`] into the temporary
    /// folder `dir`; its writes need not be atomic, and both files are flushed here.
    pub fn write(&self, state: &TrainState, save: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let ckdir = self.run.join(CHECKPOINTS_DIR);
        io(&ckdir, std::fs::create_dir_all(&ckdir))?;
        let rel = checkpoint_rel(state.step);
        debug_assert_eq!(rel, state.checkpoint);
        let fin = self.run.join(&rel);
        let tmp = PathBuf::from(format!("{}{TMP_SUFFIX}", fin.display()));
        if tmp.exists() {
            io(&tmp, std::fs::remove_dir_all(&tmp))?;
        }
        io(&tmp, std::fs::create_dir_all(&tmp))?;
        save(&tmp)?;
        for f in [MODEL_FILE, OPTIMIZER_FILE] {
            sync_path(&tmp.join(f))?;
        }
        let ema = tmp.join(crate::train::ema::EMA_FILE);
        if ema.exists() {
            sync_path(&ema)?;
        }
        let json = serde_json::to_vec_pretty(state).expect("train state serialises");
        write_atomic(tmp.join(CHECKPOINT_STATE_FILE), &json)?;
        sync_path(&tmp)?;
        // A folder of this step can only be a leftover of a killed run that went past
        // the checkpoint now in force (train_state.json names an earlier one).
        if fin.exists() {
            io(&fin, std::fs::remove_dir_all(&fin))?;
        }
        io(&fin, std::fs::rename(&tmp, &fin))?;
        sync_path(&ckdir)?;
        write_atomic(self.run.join(TRAIN_STATE_FILE), &json)?;
        publish_weights(self.run, &rel)?;
        self.prune(state.step)
    }

    /// Removes `.tmp` leftovers, folders of steps after `current` (an abandoned future
    /// of a resumed run) and all but the newest `keep` checkpoints.  Also run on
    /// resume: a kill between `train_state.json` and the pruning leaves old folders.
    pub fn prune(&self, current: u64) -> Result<()> {
        let ckdir = self.run.join(CHECKPOINTS_DIR);
        let mut steps = Vec::new();
        for e in io(&ckdir, std::fs::read_dir(&ckdir))? {
            let e = io(&ckdir, e)?;
            let name = e.file_name().to_string_lossy().into_owned();
            match parse_step_dir(&name) {
                Some(s) if s <= current => steps.push((s, e.path())),
                Some(_) => io(&e.path(), std::fs::remove_dir_all(e.path()))?,
                None if name.ends_with(TMP_SUFFIX) => {
                    io(&e.path(), std::fs::remove_dir_all(e.path()))?
                }
                None => {}
            }
        }
        steps.sort_unstable_by_key(|(s, _)| std::cmp::Reverse(*s));
        for (_, p) in steps.into_iter().skip(self.keep.max(1)) {
            io(&p, std::fs::remove_dir_all(&p))?;
        }
        Ok(())
    }
}

/// Replaces `RUN/model.safetensors` atomically by the checkpoint's weights: its
/// averaged model when it has one (`[train] ema`), else its raw weights.
pub fn publish_weights(run: &Path, checkpoint_rel: &str) -> Result<()> {
    let dir = run.join(checkpoint_rel);
    let ema = dir.join(crate::train::ema::EMA_FILE);
    let src = if ema.exists() {
        ema
    } else {
        dir.join(MODEL_FILE)
    };
    let bytes = io(&src, std::fs::read(&src))?;
    write_atomic(run.join(MODEL_FILE), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_dir_names() {
        assert_eq!(checkpoint_rel(12), "checkpoints/step-000012");
        assert_eq!(parse_step_dir("step-000012"), Some(12));
        assert_eq!(parse_step_dir("step-000012.tmp"), None);
        assert_eq!(parse_step_dir("other"), None);
    }
}
