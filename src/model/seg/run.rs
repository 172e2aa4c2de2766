//! A model's files in a run directory: `config.json` (the Hugging Face LLaVA config, so
//! `popen forward --model-dir RUN` reads the LLaVA part, plus our fields under
//! `"popen"`), `tokenizer.json` and `model.safetensors` (LLaVA tensors under their
//! Hugging Face names, then `seg_head.*` and `mask_decoder.*`).  Each file is written
//! under a temporary name and renamed.
use super::config::SegModelConfig;
use super::model::{SegModel, Trainable};
use super::prompt::SegTokenizer;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::config::{HfAct, HfConfig, LlavaConfig};
use crate::model::io::StDtype;
use crate::model::llava::Llava;
use crate::model::weights::{save_params, Checkpoint};
use crate::nn::Tensor;
use num_traits::Float;
use serde_json::{json, Value};
use std::path::Path;

/// The run directory's config: the LLaVA config, ours under `"popen"`.
pub const CONFIG_FILE: &str = "config.json";
/// The run directory's tokenizer, codebook tokens included.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The run directory's weights (f32): LLaVA's, then `seg_head.*` and `mask_decoder.*`.
pub const WEIGHTS_FILE: &str = "model.safetensors";

fn act_name(a: HfAct) -> &'static str {
    match a {
        HfAct::GeluErf => "gelu",
        HfAct::GeluTanh => "gelu_pytorch_tanh",
        HfAct::QuickGelu => "quick_gelu",
        HfAct::Silu => "silu",
        HfAct::Relu => "relu",
    }
}

/// The Hugging Face `LlavaConfig` JSON of `c`.
pub fn llava_json(c: &LlavaConfig) -> Value {
    let (v, t) = (&c.vision, &c.text);
    let mut j = json!({
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": c.image_token_index,
        "projector_hidden_act": act_name(c.projector_hidden_act),
        "vision_feature_layer": c.vision_feature_layer,
        "vision_feature_select_strategy": if c.drop_class_token { "default" } else { "full" },
        "multimodal_projector_bias": c.projector_bias,
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "num_channels": v.num_channels,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": act_name(v.hidden_act),
        },
        "text_config": {
            "model_type": "llama",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "tie_word_embeddings": t.tie_word_embeddings,
            "hidden_act": "silu",
        },
    });
    if v.stem_channels > 0 {
        j["vision_config"]["popen_stem_channels"] = json!(v.stem_channels);
    }
    j
}

impl<F: Float, B: Backend<F>> SegModel<F, B> {
    /// Writes `config.json`, `tokenizer.json` and `model.safetensors` into `dir`.
    pub fn save(&mut self, dir: &Path, tok: &SegTokenizer) -> Result<()> {
        self.save_config(dir, tok, None)?;
        self.save_weights(&dir.join(WEIGHTS_FILE))
    }

    /// Writes `config.json` (the LLaVA config, ours under `"popen"`, and `run` — a
    /// stage's run config — under `"popen_run"` when given) and `tokenizer.json`.
    pub fn save_config(&self, dir: &Path, tok: &SegTokenizer, run: Option<Value>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut cfg = llava_json(&self.llava.cfg);
        cfg["popen"] = serde_json::to_value(&self.cfg).expect("config serializes");
        if let Some(r) = run {
            cfg["popen_run"] = r;
        }
        let text = serde_json::to_string_pretty(&cfg).expect("json serializes");
        crate::fsio::write_atomic(dir.join(CONFIG_FILE), text.as_bytes())?;
        tok.save(&dir.join(TOKENIZER_FILE))
    }

    /// Writes only the weights (f32).
    pub fn save_weights(&mut self, path: &Path) -> Result<()> {
        let be = self.llava.be.clone();
        let params: Vec<(String, &Tensor<F, B>)> = self
            .params_mut()
            .into_iter()
            .map(|(n, t)| (n, &*t))
            .collect();
        save_params(&be, path, params, |n| n.to_string(), StDtype::F32)
    }

    /// Fills every parameter from a safetensors file written by [`Self::save_weights`];
    /// a file of another model (a missing tensor, another shape) is an error naming it.
    pub fn load_weights(&mut self, path: &Path) -> Result<()> {
        let be = self.llava.be.clone();
        let ck = Checkpoint::open_file(path)?;
        ck.load_params(&be, self.params_mut(), |n| n.to_string())
    }

    /// Loads a run directory written by [`Self::save`], every part frozen (a stage
    /// unfreezes what it trains with [`Self::set_trainable`]) and the LLM's layers
    /// packed for reading ([`Self::pack_frozen`]).
    pub fn load(be: B, dir: &Path) -> Result<(Self, SegTokenizer)> {
        let (cfg, lc) = read_config(dir)?;
        let tok = SegTokenizer::load(&dir.join(TOKENIZER_FILE), cfg.group_len())?;
        if tok.vocab_size() != lc.text.vocab_size {
            return Err(Error::Config {
                path: dir.join(CONFIG_FILE),
                field: "text_config.vocab_size".into(),
                msg: format!(
                    "{} but {} holds {} tokens",
                    lc.text.vocab_size,
                    TOKENIZER_FILE,
                    tok.vocab_size()
                ),
            });
        }
        // the config sizes what `new` allocates: a config that claims more than the
        // weights file can hold is refused before anything is allocated for it
        let weights = dir.join(WEIGHTS_FILE);
        let have = std::fs::metadata(&weights)
            .map_err(|e| Error::io(&weights, e))?
            .len();
        let need = min_param_count(&cfg, &lc).saturating_mul(4);
        if need > u128::from(have) {
            return Err(Error::Config {
                path: dir.join(CONFIG_FILE),
                field: "text_config".into(),
                msg: format!(
                    "describes a model of at least {} f32 parameters ({need} bytes), but {} \
                     holds {have} bytes",
                    need / 4,
                    weights.display()
                ),
            });
        }
        // read, not drawn: the LLaVA part loads as `popen forward` loads it (no random
        // weights drawn first, no gradient buffers), and the parts POPEN adds are read
        // into zeroed tensors; everything is frozen until a stage unfreezes its parts
        let ck = Checkpoint::open_file(&weights)?;
        let llava = Llava::load(be.clone(), lc, &ck, &dir.join(CONFIG_FILE))?;
        let mut m = Self::attach(be.clone(), cfg, llava, None)?;
        m.set_trainable(Trainable::frozen());
        ck.load_params(&be, m.own_params_mut(), |n| n.to_string())?;
        m.pack_frozen()?;
        Ok((m, tok))
    }
}

/// A lower bound on the parameters `SegModel::new` allocates for `cfg` and `lc` (the
/// large matrices only, in saturating arithmetic, so a hostile config cannot overflow
/// it): LLaMA's embeddings, attention and MLP projections (and an untied head), the
/// ViT's patch embedding, stem and blocks, the projector, the codebook head, the pixel
/// decoder's projections, convolutions and MLPs, and the patch-category head.
pub fn min_param_count(cfg: &SegModelConfig, lc: &LlavaConfig) -> u128 {
    let u = |x: usize| x as u128;
    let t = &lc.text;
    let (h, v) = (u(t.hidden_size), u(t.vocab_size));
    let q = u(t.num_attention_heads).saturating_mul(u(t.head_dim));
    let kv = u(t.num_key_value_heads).saturating_mul(u(t.head_dim));
    let layer = h
        .saturating_mul(q.saturating_add(kv).saturating_mul(2))
        .saturating_add(h.saturating_mul(u(t.intermediate_size)).saturating_mul(3));
    let head = if t.tie_word_embeddings {
        0
    } else {
        v.saturating_mul(h)
    };
    let text = v
        .saturating_mul(h)
        .saturating_add(head)
        .saturating_add(layer.saturating_mul(u(t.num_hidden_layers)));
    let vi = &lc.vision;
    let hv = u(vi.hidden_size);
    let patch = u(vi.num_channels)
        .saturating_mul(u(vi.patch_size))
        .saturating_mul(u(vi.patch_size))
        .saturating_mul(hv);
    let vblock = hv
        .saturating_mul(hv)
        .saturating_mul(4)
        .saturating_add(hv.saturating_mul(u(vi.intermediate_size)).saturating_mul(2));
    let c1 = u(vi.stem_channels);
    let stem =
        c1.saturating_mul(c1)
            .saturating_mul(9)
            .saturating_add(c1.saturating_mul(hv).saturating_mul(
                u(vi.patch_size / crate::model::stem::STEM_CELL).saturating_pow(2),
            ));
    let vision = patch
        .saturating_add(stem)
        .saturating_add(vblock.saturating_mul(u(vi.num_hidden_layers)));
    let projector = hv.saturating_mul(h).saturating_add(h.saturating_mul(h));
    let d = u(cfg.seg_dim);
    let seg_head = h.saturating_mul(h).saturating_add(h.saturating_mul(d));
    let level = hv
        .saturating_mul(d)
        .saturating_add(d.saturating_mul(d).saturating_mul(10))
        .saturating_add(
            d.saturating_mul(u(cfg.decoder_mlp))
                .saturating_mul(2)
                .saturating_mul(u(cfg.decoder_depth)),
        );
    let decoder = level.saturating_mul(u(super::decoder::LEVELS));
    let patch_head = if cfg.classes.is_empty() {
        0
    } else {
        hv.saturating_mul(u(cfg.classes.len()).saturating_add(1))
    };
    // one token: C·H weights and H biases; one per category: (C + 1)·H weights
    let presence = if cfg.presence_tokens == super::config::PresenceTokens::Off {
        0
    } else {
        u(cfg.classes.len()).saturating_add(1).saturating_mul(h)
    };
    [
        text, vision, projector, seg_head, decoder, patch_head, presence,
    ]
    .into_iter()
    .fold(0u128, u128::saturating_add)
}

/// Reads `dir/config.json`: our fields under `"popen"` and the LLaVA config.
pub fn read_config(dir: &Path) -> Result<(SegModelConfig, LlavaConfig)> {
    let path = dir.join(CONFIG_FILE);
    let hf = HfConfig::read(&path)?;
    let lc = LlavaConfig::from_fields(&hf.fields())?;
    let popen = hf.json.get("popen").ok_or_else(|| Error::Config {
        path: path.clone(),
        field: "popen".into(),
        msg: "missing: this is not a popen segmentation model's run directory".into(),
    })?;
    let cfg: SegModelConfig =
        serde_path_to_error::deserialize(popen.clone()).map_err(|e| Error::Config {
            path: path.clone(),
            field: format!("popen.{}", e.path()),
            msg: e.inner().to_string(),
        })?;
    Ok((cfg, lc))
}
