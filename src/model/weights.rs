//! A Hugging Face checkpoint directory: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`; tensors filled into model parameters by name.
//!
//! Models expose their parameters as `(HF name, &mut Tensor)` lists (the names without
//! the checkpoint's prefix); [`Checkpoint::load_params`] fills them, checking every
//! shape, and [`save_params`] writes them back under the same names.  Prefixes differ
//! between checkpoint generations (`vision_model.` or none for CLIP, `model.` /
//! `language_model.model.` for a LLaVA's LLaMA, ...): [`Checkpoint::find_prefix`] picks
//! the one a file uses by probing a marker tensor.
use super::io::{HostTensor, OutValue, StDtype, StFile};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::Tensor;
use num_traits::Float;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The single-file checkpoint name `save_pretrained` writes.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name `save_pretrained` writes for a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The tensors of one checkpoint, possibly spread over shards.
#[derive(Debug)]
pub struct Checkpoint {
    /// The file named in errors about tensors that are absent: the single file or the
    /// shard index.
    origin: PathBuf,
    files: Vec<StFile>,
    /// tensor name → index into `files`
    index: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards named by `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        if single.is_file() {
            Self::open_file(single)
        } else if index.is_file() {
            Self::open_index(index)
        } else {
            Err(Error::Safetensors {
                path: dir.to_path_buf(),
                msg: format!("directory holds neither {SINGLE_FILE} nor {INDEX_FILE}"),
            })
        }
    }

    /// One safetensors file.
    pub fn open_file(path: impl AsRef<Path>) -> Result<Self> {
        let f = StFile::open(path.as_ref())?;
        let index = f.names().into_iter().map(|n| (n, 0)).collect();
        Ok(Self {
            origin: path.as_ref().to_path_buf(),
            files: vec![f],
            index,
        })
    }

    /// A shard index: `{"weight_map": {tensor: shard file name}}`.  Every shard is
    /// opened (and validated); a tensor the index places in a shard must be there.
    pub fn open_index(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let dir = path.parent().unwrap_or(Path::new("."));
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            line: Some(e.line()),
            msg: e.to_string(),
        })?;
        let bad = |field: &str, msg: String| Error::Data {
            path: path.to_path_buf(),
            field: field.to_string(),
            msg,
        };
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("weight_map", "missing or not an object".into()))?;
        let mut shard_ids: BTreeMap<String, usize> = BTreeMap::new();
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (name, shard) in map {
            let field = format!("weight_map.{name}");
            let shard = shard
                .as_str()
                .ok_or_else(|| bad(&field, format!("expected a file name, got {shard}")))?;
            // A shard is a file beside the index, never a path elsewhere.
            if shard.is_empty() || shard.contains(['/', '\\']) || shard == ".." {
                return Err(bad(
                    &field,
                    format!("shard `{shard}` is not a plain file name"),
                ));
            }
            let id = match shard_ids.get(shard) {
                Some(&id) => id,
                None => {
                    files.push(StFile::open(dir.join(shard))?);
                    shard_ids.insert(shard.to_string(), files.len() - 1);
                    files.len() - 1
                }
            };
            if !files[id].contains(name) {
                return Err(Error::MissingTensor {
                    path: files[id].path().to_path_buf(),
                    name: format!("{name} (the index {} places it here)", path.display()),
                });
            }
            index.insert(name.clone(), id);
        }
        Ok(Self {
            origin: path.to_path_buf(),
            files,
            index,
        })
    }

    /// The single file or the shard index this checkpoint came from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    /// Whether the checkpoint has `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn file(&self, name: &str) -> Result<&StFile> {
        self.index
            .get(name)
            .map(|&i| &self.files[i])
            .ok_or_else(|| Error::MissingTensor {
                path: self.origin.clone(),
                name: name.to_string(),
            })
    }

    /// Stored dtype of `name`.
    pub fn dtype(&self, name: &str) -> Result<StDtype> {
        let f = self.file(name)?;
        Ok(f.info(name).expect("indexed names exist").0)
    }

    /// `name` as f32.
    pub fn f32(&self, name: &str) -> Result<HostTensor> {
        self.file(name)?.f32(name)
    }

    /// `name` as f32, which must have shape `want`; the error names file and tensor.
    pub fn f32_shaped(&self, name: &str, want: &[usize]) -> Result<HostTensor> {
        let f = self.file(name)?;
        let (_, shape) = f.info(name).expect("indexed names exist");
        if shape != want {
            return Err(Error::Safetensors {
                path: f.path().to_path_buf(),
                msg: format!("tensor `{name}` has shape {shape:?} but the config implies {want:?}"),
            });
        }
        f.f32(name)
    }

    /// The first prefix `p` in `candidates` for which `p + marker` exists.
    pub fn find_prefix(&self, candidates: &[&str], marker: &str) -> Result<String> {
        candidates
            .iter()
            .find(|p| self.contains(&format!("{p}{marker}")))
            .map(|p| p.to_string())
            .ok_or_else(|| Error::MissingTensor {
                path: self.origin.clone(),
                name: format!(
                    "{marker} (looked under the prefixes {})",
                    candidates
                        .iter()
                        .map(|p| format!("`{p}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// Fills every parameter: `rename(name)` gives its checkpoint name.  The shape of
    /// each stored tensor must equal the parameter's (which the config decided).
    pub fn load_params<F: Float, B: Backend<F>>(
        &self,
        be: &B,
        params: Vec<(String, &mut Tensor<F, B>)>,
        rename: impl Fn(&str) -> String,
    ) -> Result<()> {
        for (name, t) in params {
            let stored = rename(&name);
            let h = self.f32_shaped(&stored, &t.shape)?;
            let vals: Vec<F> = h
                .data
                .iter()
                .map(|&x| F::from(x).expect("f32 converts to every float type"))
                .collect();
            t.set(be, &stored, &vals)?;
        }
        Ok(())
    }
}

/// A parameter's values as an f32 host tensor.
pub fn to_host<F: Float, B: Backend<F>>(be: &B, t: &Tensor<F, B>) -> HostTensor {
    HostTensor {
        shape: t.shape.clone(),
        data: be
            .to_vec(&t.data)
            .iter()
            .map(|x| x.to_f32().unwrap_or(f32::NAN))
            .collect(),
    }
}

/// Writes parameters as one safetensors file under `rename(name)`, in `dtype`.
pub fn save_params<F: Float, B: Backend<F>>(
    be: &B,
    path: impl AsRef<Path>,
    params: Vec<(String, &Tensor<F, B>)>,
    rename: impl Fn(&str) -> String,
    dtype: StDtype,
) -> Result<()> {
    let hosts: Vec<(String, HostTensor)> = params
        .into_iter()
        .map(|(n, t)| (rename(&n), to_host(be, t)))
        .collect();
    let out: Vec<(String, OutValue<'_>)> = hosts
        .iter()
        .map(|(n, h)| (n.clone(), OutValue::Float(h, dtype)))
        .collect();
    super::io::write_safetensors(path, &out)
}
