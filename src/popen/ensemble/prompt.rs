//! The learnable prompt `p̂` (Sec. 3.3; 10 embeddings, Supp Table 7): the only weights
//! stage 3 trains, kept beside the model as `RUN/ensemble_prompt.safetensors`.
use crate::error::{Error, Result};
use crate::model::io::{write_f32, HostTensor, StFile};
use std::path::Path;

/// The file in a run directory.
pub const PROMPT_FILE: &str = "ensemble_prompt.safetensors";
/// Its one tensor, (P, C).
pub const PROMPT_TENSOR: &str = "prompt";
/// Embeddings in `p̂` (Supp, Table 7).
pub const PROMPT_LEN: usize = 10;

/// Writes `p̂` (P·C values) atomically.
pub fn save_prompt(dir: &Path, values: &[f32], hidden: usize) -> Result<()> {
    if hidden == 0 || values.is_empty() || !values.len().is_multiple_of(hidden) {
        return Err(Error::shape(
            "save_prompt",
            format!("{} values for hidden size {hidden}", values.len()),
        ));
    }
    let t = HostTensor::new(vec![values.len() / hidden, hidden], values.to_vec())?;
    write_f32(dir.join(PROMPT_FILE), &[(PROMPT_TENSOR.to_string(), &t)])
}

/// `p̂` of a run directory (P·C values), `None` when the run has none (stages 1, 2); a
/// file of another hidden size is an error naming it.
pub fn load_prompt(dir: &Path, hidden: usize) -> Result<Option<Vec<f32>>> {
    let path = dir.join(PROMPT_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let t = StFile::open(&path)?.f32(PROMPT_TENSOR)?;
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
