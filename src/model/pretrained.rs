//! Any supported Hugging Face directory, loaded by its `model_type`, and saved back as
//! `save_pretrained` would write it: the same `config.json` and the same tensor names.
use super::bert::Bert;
use super::clip::{ClipVision, CLIP_MARKER, CLIP_PREFIXES};
use super::config::{
    BertConfig, ClipVisionConfig, HfConfig, HfLlamaConfig, LlavaConfig, ModelType,
};
use super::io::StDtype;
use super::llama::{llama_config, load_llama, save_llama, LlamaNames};
use super::llava::Llava;
use super::weights::{Checkpoint, SINGLE_FILE};
use crate::backend::{Backend, Cpu};
use crate::error::{Error, Result};
use crate::nn::{Llama, Tensor};
use num_traits::Float;
use std::path::Path;

/// A loaded model of one of the supported architectures.
// One model per load: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Pretrained<F: Float = f32, B: Backend<F> = Cpu> {
    /// `llama`: a `LlamaForCausalLM`.
    Llama {
        /// The decoder with its output head.
        model: Llama<F, B>,
        /// Decoder prefix and head name found in the checkpoint, reused when saving.
        names: LlamaNames,
    },
    /// `clip_vision_model`: a CLIP vision tower.
    ClipVision(ClipVision<F, B>),
    /// `bert`: a BERT encoder, with its pooler when the checkpoint has one.
    Bert(Bert<F, B>),
    /// `llava`: LLaVA-1.5.
    Llava(Llava<F, B>),
}

impl<F: Float, B: Backend<F>> Pretrained<F, B> {
    /// Loads `dir` (config.json + weights), frozen.
    pub fn load_dir(be: B, dir: impl AsRef<Path>) -> Result<(HfConfig, Self)> {
        let hf = HfConfig::read_dir(dir.as_ref())?;
        let m = Self::load(be, &hf, dir)?;
        Ok((hf, m))
    }

    /// Loads the weights in `dir` for the already parsed `hf`.
    pub fn load(be: B, hf: &HfConfig, dir: impl AsRef<Path>) -> Result<Self> {
        let f = hf.fields();
        // Parse the config before touching the (possibly large) weights.
        match hf.model_type {
            ModelType::Llama => {
                let cfg = llama_config(&HfLlamaConfig::from_fields(&f)?, &hf.path, "")?;
                let ck = Checkpoint::open_dir(dir)?;
                let names = LlamaNames::detect_causal_lm(&ck)?;
                let model = load_llama(be, cfg, &ck, &names)?;
                Ok(Pretrained::Llama { model, names })
            }
            ModelType::ClipVision => {
                let cfg = ClipVisionConfig::from_fields(&f)?;
                let ck = Checkpoint::open_dir(dir)?;
                let prefix = ck.find_prefix(CLIP_PREFIXES, CLIP_MARKER)?;
                Ok(Pretrained::ClipVision(ClipVision::load(
                    be, cfg, &ck, &prefix,
                )?))
            }
            ModelType::Bert => {
                let cfg = BertConfig::from_fields(&f)?;
                let ck = Checkpoint::open_dir(dir)?;
                Ok(Pretrained::Bert(Bert::load(be, cfg, &ck)?))
            }
            ModelType::Llava => {
                let cfg = LlavaConfig::from_fields(&f)?;
                let ck = Checkpoint::open_dir(dir)?;
                Ok(Pretrained::Llava(Llava::load(be, cfg, &ck, &hf.path)?))
            }
        }
    }

    /// Every parameter under its checkpoint name.
    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor<F, B>)> {
        match self {
            Pretrained::Llama { model, names } => {
                let names = names.clone();
                model
                    .params_mut()
                    .into_iter()
                    .map(|(n, t)| (names.rename(&n), t))
                    .collect()
            }
            Pretrained::ClipVision(m) => {
                let p = m.prefix.clone();
                m.params_mut()
                    .into_iter()
                    .map(|(n, t)| (format!("{p}{n}"), t))
                    .collect()
            }
            Pretrained::Bert(m) => {
                let p = m.prefix.clone();
                m.params_mut()
                    .into_iter()
                    .map(|(n, t)| (format!("{p}{n}"), t))
                    .collect()
            }
            Pretrained::Llava(m) => m.params_mut(),
        }
    }

    /// Writes `dir/config.json` (the JSON `hf` was read from) and `dir/model.safetensors`
    /// with every parameter in `dtype` under the names it was loaded from.
    pub fn save_pretrained(
        &mut self,
        hf: &HfConfig,
        dir: impl AsRef<Path>,
        dtype: StDtype,
    ) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let cfg_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&hf.json).expect("a JSON value serialises");
        crate::fsio::write_atomic(&cfg_path, (text + "\n").as_bytes())?;
        let path = dir.join(SINGLE_FILE);
        match self {
            Pretrained::Llama { model, names } => save_llama(model, path, names, dtype),
            Pretrained::ClipVision(m) => m.save_weights(path, dtype),
            Pretrained::Bert(m) => m.save_weights(path, dtype),
            Pretrained::Llava(m) => m.save_weights(path, dtype),
        }
    }
}
