//! The learnable prompt `p̂` (Sec. 3.3; 10 embeddings, Supp Table 7): the only weights
//! stage 3 trains.  It is kept in the run's `model.safetensors` beside the model's own
//! tensors, under [`PROMPT_TENSOR`], so that one file holds everything a stage-3 run
//! answers with (the model's loader ignores it; stages 1 and 2 have none).
use crate::error::{Error, Result};
use crate::model::io::StFile;
use crate::model::seg::run::WEIGHTS_FILE;
use std::path::Path;

/// The tensor in `RUN/model.safetensors`, (P, C).
pub const PROMPT_TENSOR: &str = "ensemble_prompt";
/// Embeddings in `p̂` (Supp, Table 7).
pub const PROMPT_LEN: usize = 10;

/// `p̂` of a run directory (P·C values), `None` when the run has none (stages 1, 2); a
/// prompt of another hidden size is an error naming the file.
pub fn load_prompt(dir: &Path, hidden: usize) -> Result<Option<Vec<f32>>> {
    let path = dir.join(WEIGHTS_FILE);
    let f = StFile::open(&path)?;
    if !f.contains(PROMPT_TENSOR) {
        return Ok(None);
    }
    let t = f.f32(PROMPT_TENSOR)?;
    if t.shape.len() != 2 || t.shape[1] != hidden || t.shape[0] == 0 {
        return Err(Error::shape(
            "load_prompt",
            format!(
                "{}: `{PROMPT_TENSOR}` is {:?}, the model's hidden size is {hidden} (want [P, {hidden}])",
                path.display(),
                t.shape
            ),
        ));
    }
    Ok(Some(t.data))
}
