//! Hugging Face `config.json` files, read into plain structs.
//!
//! Only the fields the forward pass needs are read; each is checked (present, the right
//! JSON type, in range) and a problem is an [`Error::Config`] naming the file and the
//! field, with nested fields written `text_config.hidden_size`.  Fields that change the
//! math but that this crate does not implement (a RoPE scaling type, a relative position
//! embedding) are rejected rather than ignored.
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The architectures `popen forward` runs, from `model_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    /// `llama`: a LLaMA decoder.
    Llama,
    /// `clip_vision_model`: a CLIP vision tower.
    ClipVision,
    /// `bert`: a BERT encoder.
    Bert,
    /// `llava`: LLaVA-1.5 (CLIP tower, projector, LLaMA decoder).
    Llava,
}

impl ModelType {
    /// The `model_type` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Llama => "llama",
            ModelType::ClipVision => "clip_vision_model",
            ModelType::Bert => "bert",
            ModelType::Llava => "llava",
        }
    }
}

/// Activation names used by `hidden_act` / `projector_hidden_act`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfAct {
    /// "gelu": the exact erf form.
    GeluErf,
    /// "gelu_new", "gelu_pytorch_tanh", "gelu_fast": the tanh approximation.
    GeluTanh,
    /// "quick_gelu": `x·σ(1.702x)`.
    QuickGelu,
    /// "silu" / "swish".
    Silu,
    /// "relu".
    Relu,
}

impl From<HfAct> for crate::backend::Act {
    fn from(a: HfAct) -> Self {
        use crate::backend::Act;
        match a {
            HfAct::GeluErf => Act::GeluErf,
            HfAct::GeluTanh => Act::GeluTanh,
            HfAct::QuickGelu => Act::QuickGelu,
            HfAct::Silu => Act::Silu,
            HfAct::Relu => Act::Relu,
        }
    }
}

/// A view of one JSON object inside a config file, for field errors with full names.
#[derive(Clone, Copy)]
pub struct Fields<'a> {
    path: &'a Path,
    prefix: &'a str,
    obj: &'a serde_json::Map<String, Value>,
}

impl<'a> Fields<'a> {
    /// The top-level object of `v` (which came from `path`).
    pub fn new(path: &'a Path, v: &'a Value) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| Error::Config {
            path: path.to_path_buf(),
            field: "<root>".into(),
            msg: "config is not a JSON object".into(),
        })?;
        Ok(Self {
            path,
            prefix: "",
            obj,
        })
    }

    fn name(&self, field: &str) -> String {
        if self.prefix.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.prefix)
        }
    }

    /// An error about `field`.
    pub fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.to_path_buf(),
            field: self.name(field),
            msg: msg.into(),
        }
    }

    /// The raw value, treating JSON `null` as absent.
    pub fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    /// A nested object (`text_config`), whose fields are named `prefix.field`.
    pub fn nested(&self, field: &'a str) -> Result<Fields<'a>> {
        let obj = self
            .get(field)
            .ok_or_else(|| self.err(field, "missing"))?
            .as_object()
            .ok_or_else(|| self.err(field, "expected an object"))?;
        Ok(Fields {
            path: self.path,
            prefix: field,
            obj,
        })
    }

    /// A required positive integer.
    pub fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?
            .ok_or_else(|| self.err(field, "missing"))
    }

    /// A positive integer, `default` when absent (transformers' class default: published
    /// configs such as LLaVA-1.5's `text_config` leave the standard sizes out).
    pub fn usize_or(&self, field: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(field)?.unwrap_or(default))
    }

    /// An optional positive integer.
    pub fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(0) => Err(self.err(field, "must be positive, got 0")),
                Some(n) => Ok(Some(n as usize)),
                None => Err(self.err(field, format!("expected a positive integer, got {v}"))),
            },
        }
    }

    /// An optional integer of either sign.
    pub fn opt_i64(&self, field: &str) -> Result<Option<i64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected an integer, got {v}"))),
        }
    }

    /// An optional finite number.
    pub fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.err(field, format!("expected a finite number, got {v}"))),
            },
        }
    }

    /// An optional positive finite number, `default` when absent.
    pub fn pos_f64_or(&self, field: &str, default: f64) -> Result<f64> {
        let x = self.opt_f64(field)?.unwrap_or(default);
        if x > 0.0 {
            Ok(x)
        } else {
            Err(self.err(field, format!("must be positive, got {x}")))
        }
    }

    /// An optional boolean.
    pub fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, format!("expected true/false, got {v}"))),
        }
    }

    /// An optional string.
    pub fn opt_str(&self, field: &str) -> Result<Option<&'a str>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a string, got {v}"))),
        }
    }

    /// An activation name, `default` when absent.
    pub fn act_or(&self, field: &str, default: HfAct) -> Result<HfAct> {
        match self.opt_str(field)? {
            None => Ok(default),
            Some("gelu") => Ok(HfAct::GeluErf),
            Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") => Ok(HfAct::GeluTanh),
            Some("quick_gelu") => Ok(HfAct::QuickGelu),
            Some("silu" | "swish") => Ok(HfAct::Silu),
            Some("relu") => Ok(HfAct::Relu),
            Some(other) => Err(self.err(
                field,
                format!(
                    "unsupported activation `{other}` (supported: gelu, gelu_new, \
                     gelu_pytorch_tanh, quick_gelu, silu, relu)"
                ),
            )),
        }
    }

    /// `Err` unless `num % den == 0`, naming both fields.
    pub fn divisible(
        &self,
        num_field: &str,
        num: usize,
        den_field: &str,
        den: usize,
    ) -> Result<()> {
        if num.is_multiple_of(den) {
            Ok(())
        } else {
            Err(self.err(
                num_field,
                format!("{num} is not divisible by {} = {den}", self.name(den_field)),
            ))
        }
    }
}

/// A parsed `config.json`: its path, raw JSON (kept so that saving writes it back
/// unchanged) and `model_type`.
#[derive(Clone, Debug)]
pub struct HfConfig {
    /// The file read; errors name it.
    pub path: PathBuf,
    /// The whole file as parsed (a JSON object).
    pub json: Value,
    /// Architecture named by the top-level `model_type`.
    pub model_type: ModelType,
}

impl HfConfig {
    /// Reads `dir/config.json` and its `model_type`.
    pub fn read_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::read(dir.as_ref().join("config.json"))
    }

    /// Reads one config file and its `model_type`.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.clone(),
            line: Some(e.line()),
            msg: e.to_string(),
        })?;
        let f = Fields::new(&path, &json)?;
        let mt = f
            .opt_str("model_type")?
            .ok_or_else(|| f.err("model_type", "missing"))?;
        let model_type = match mt {
            "llama" => ModelType::Llama,
            "clip_vision_model" => ModelType::ClipVision,
            "bert" => ModelType::Bert,
            "llava" => ModelType::Llava,
            other => {
                return Err(f.err(
                    "model_type",
                    format!(
                        "unsupported model_type `{other}` (supported: llama, \
                         clip_vision_model, bert, llava)"
                    ),
                ))
            }
        };
        Ok(Self {
            path,
            json,
            model_type,
        })
    }

    /// The top-level fields.
    pub fn fields(&self) -> Fields<'_> {
        Fields::new(&self.path, &self.json).expect("checked in read")
    }
}

/// CLIP vision tower (`CLIPVisionConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipVisionConfig {
    /// Width C of the tower's residual stream; a multiple of `num_attention_heads`
    /// (default 768).
    pub hidden_size: usize,
    /// Inner width I of each block's MLP (default 3072).
    pub intermediate_size: usize,
    /// Encoder blocks L (default 12).
    pub num_hidden_layers: usize,
    /// Attention heads per block (default 12).
    pub num_attention_heads: usize,
    /// Input image channels CH (default 3).
    pub num_channels: usize,
    /// Side of the square input image in pixels; a multiple of `patch_size` (default 224).
    pub image_size: usize,
    /// Side P of one square patch in pixels (default 32).
    pub patch_size: usize,
    /// Epsilon of every LayerNorm (default 1e-5).
    pub layer_norm_eps: f64,
    /// MLP activation (default `quick_gelu`).
    pub hidden_act: HfAct,
    /// Channels of the convolutional stem added to the patch embedding (ours, not
    /// CLIP's: [`crate::model::stem`]); 0 = none, as every Hugging Face CLIP.  Read from
    /// and written to `popen_stem_channels`, absent when 0.
    pub stem_channels: usize,
}

impl ClipVisionConfig {
    /// From a `clip_vision_model` config, or the `vision_config` of a LLaVA / CLIP config.
    pub fn from_fields(f: &Fields<'_>) -> Result<Self> {
        let c = Self {
            // defaults: CLIPVisionConfig's (ViT-B/32)
            hidden_size: f.usize_or("hidden_size", 768)?,
            intermediate_size: f.usize_or("intermediate_size", 3072)?,
            num_hidden_layers: f.usize_or("num_hidden_layers", 12)?,
            num_attention_heads: f.usize_or("num_attention_heads", 12)?,
            num_channels: f.usize_or("num_channels", 3)?,
            image_size: f.usize_or("image_size", 224)?,
            patch_size: f.usize_or("patch_size", 32)?,
            layer_norm_eps: f.pos_f64_or("layer_norm_eps", 1e-5)?,
            hidden_act: f.act_or("hidden_act", HfAct::QuickGelu)?,
            stem_channels: f.usize_or("popen_stem_channels", 0)?,
        };
        f.divisible(
            "hidden_size",
            c.hidden_size,
            "num_attention_heads",
            c.num_attention_heads,
        )?;
        f.divisible("image_size", c.image_size, "patch_size", c.patch_size)?;
        let cell = crate::model::stem::STEM_CELL;
        if c.stem_channels > 0 && !c.patch_size.is_multiple_of(cell) {
            return Err(f.err(
                "popen_stem_channels",
                format!(
                    "a stem needs patches of a multiple of {cell} pixels, not {}",
                    c.patch_size
                ),
            ));
        }
        Ok(c)
    }
    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
    /// Sequence length of the tower: patches plus the class token.
    pub fn num_positions(&self) -> usize {
        self.num_patches() + 1
    }
    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// BERT encoder (`BertConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    /// Rows V of the word embedding table (default 30522).
    pub vocab_size: usize,
    /// Width C of the residual stream; a multiple of `num_attention_heads` (default 768).
    pub hidden_size: usize,
    /// Encoder blocks (default 12).
    pub num_hidden_layers: usize,
    /// Attention heads per block (default 12).
    pub num_attention_heads: usize,
    /// Inner width I of each block's MLP (default 3072).
    pub intermediate_size: usize,
    /// MLP activation (default `gelu`, the erf form).
    pub hidden_act: HfAct,
    /// Rows of the absolute position table: the longest input in tokens (default 512).
    pub max_position_embeddings: usize,
    /// Rows of the token-type (segment) table (default 2).
    pub type_vocab_size: usize,
    /// Epsilon of every LayerNorm (default 1e-12).
    pub layer_norm_eps: f64,
}

impl BertConfig {
    /// From a `bert` config; refuses a non-`absolute` `position_embedding_type` and
    /// `is_decoder: true`.
    pub fn from_fields(f: &Fields<'_>) -> Result<Self> {
        if let Some(pe) = f.opt_str("position_embedding_type")? {
            if pe != "absolute" {
                return Err(f.err(
                    "position_embedding_type",
                    format!("only `absolute` is implemented, got `{pe}`"),
                ));
            }
        }
        if f.bool_or("is_decoder", false)? {
            return Err(f.err("is_decoder", "a decoder BERT is not implemented"));
        }
        let c = Self {
            // defaults: BertConfig's (bert-base-uncased)
            vocab_size: f.usize_or("vocab_size", 30522)?,
            hidden_size: f.usize_or("hidden_size", 768)?,
            num_hidden_layers: f.usize_or("num_hidden_layers", 12)?,
            num_attention_heads: f.usize_or("num_attention_heads", 12)?,
            intermediate_size: f.usize_or("intermediate_size", 3072)?,
            hidden_act: f.act_or("hidden_act", HfAct::GeluErf)?,
            max_position_embeddings: f.usize_or("max_position_embeddings", 512)?,
            type_vocab_size: f.opt_usize("type_vocab_size")?.unwrap_or(2),
            layer_norm_eps: f.pos_f64_or("layer_norm_eps", 1e-12)?,
        };
        f.divisible(
            "hidden_size",
            c.hidden_size,
            "num_attention_heads",
            c.num_attention_heads,
        )?;
        Ok(c)
    }
    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// LLaMA decoder as Hugging Face describes it (`LlamaConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct HfLlamaConfig {
    /// Rows V of the token embedding and of the output head (default 32000).
    pub vocab_size: usize,
    /// Width C of the decoder's residual stream (default 4096).
    pub hidden_size: usize,
    /// Inner width of each block's SwiGLU MLP (default 11008).
    pub intermediate_size: usize,
    /// Decoder blocks (default 32).
    pub num_hidden_layers: usize,
    /// Query heads per block (default 32).
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); divides `num_attention_heads`,
    /// `num_attention_heads` when absent.
    pub num_key_value_heads: usize,
    /// Size of one attention head; even (RoPE), `hidden_size / num_attention_heads`
    /// when absent.
    pub head_dim: usize,
    /// Longest sequence (prompt plus generated tokens) in positions (default 2048).
    pub max_position_embeddings: usize,
    /// Epsilon of every RMSNorm (default 1e-6).
    pub rms_norm_eps: f64,
    /// RoPE base, from `rope_parameters.rope_theta` or `rope_theta`
    /// (default [`DEFAULT_ROPE_THETA`]).
    pub rope_theta: f64,
    /// The output head reuses the token embedding matrix (no `lm_head.weight`;
    /// default false).
    pub tie_word_embeddings: bool,
    /// Biases on the attention projections (default false; true is refused by
    /// [`crate::model::llama::llama_config`]).
    pub attention_bias: bool,
    /// Biases on the MLP projections (default false; true is refused by
    /// [`crate::model::llama::llama_config`]).
    pub mlp_bias: bool,
}

/// RoPE base when a config names none (the `LlamaConfig` default).
pub const DEFAULT_ROPE_THETA: f64 = 10_000.0;

impl HfLlamaConfig {
    /// From a `llama` config or LLaVA's `text_config`; refuses an activation other than
    /// `silu`, `pretraining_tp` ≠ 1, an odd head size and a scaled RoPE.
    pub fn from_fields(f: &Fields<'_>) -> Result<Self> {
        let act = f.act_or("hidden_act", HfAct::Silu)?;
        if act != HfAct::Silu {
            return Err(f.err(
                "hidden_act",
                "LLaMA's MLP is SwiGLU: only `silu` is implemented",
            ));
        }
        if f.opt_usize("pretraining_tp")?.unwrap_or(1) != 1 {
            return Err(f.err("pretraining_tp", "only 1 is implemented"));
        }
        // defaults: LlamaConfig's (LLaMA-7B), which LLaVA-1.5's text_config relies on
        let hidden_size = f.usize_or("hidden_size", 4096)?;
        let num_attention_heads = f.usize_or("num_attention_heads", 32)?;
        let num_key_value_heads = f
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        f.divisible(
            "num_attention_heads",
            num_attention_heads,
            "num_key_value_heads",
            num_key_value_heads,
        )?;
        let head_dim = match f.opt_usize("head_dim")? {
            Some(h) => h,
            None => {
                f.divisible(
                    "hidden_size",
                    hidden_size,
                    "num_attention_heads",
                    num_attention_heads,
                )?;
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(f.err(
                "head_dim",
                format!("RoPE needs an even head size, got {head_dim}"),
            ));
        }
        Ok(Self {
            vocab_size: f.usize_or("vocab_size", 32000)?,
            hidden_size,
            intermediate_size: f.usize_or("intermediate_size", 11008)?,
            num_hidden_layers: f.usize_or("num_hidden_layers", 32)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: f.usize_or("max_position_embeddings", 2048)?,
            rms_norm_eps: f.pos_f64_or("rms_norm_eps", 1e-6)?,
            rope_theta: rope_theta(f)?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            attention_bias: f.bool_or("attention_bias", false)?,
            mlp_bias: f.bool_or("mlp_bias", false)?,
        })
    }
}

/// The RoPE base: `rope_parameters.rope_theta` (transformers ≥ 5) or top-level
/// `rope_theta` (older files).  A scaled RoPE (`linear`, `llama3`, `yarn`, ...) changes
/// the frequencies and is refused rather than silently run unscaled.
fn rope_theta(f: &Fields<'_>) -> Result<f64> {
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(v) = f.get(key) {
            let obj = v
                .as_object()
                .ok_or_else(|| f.err(key, "expected an object"))?;
            let rope_type = obj
                .get("rope_type")
                .or_else(|| obj.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            if rope_type != "default" {
                return Err(f.err(
                    &format!("{key}.rope_type"),
                    format!("RoPE scaling `{rope_type}` is not implemented (only `default`)"),
                ));
            }
        }
    }
    let nested = match f.get("rope_parameters") {
        Some(_) => f.nested("rope_parameters")?.opt_f64("rope_theta")?,
        None => None,
    };
    let top = f.opt_f64("rope_theta")?;
    let theta = nested.or(top).unwrap_or(DEFAULT_ROPE_THETA);
    if theta <= 0.0 {
        return Err(f.err("rope_theta", format!("must be positive, got {theta}")));
    }
    Ok(theta)
}

/// LLaVA-1.5 (`LlavaConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct LlavaConfig {
    /// The vision tower (`vision_config`).
    pub vision: ClipVisionConfig,
    /// The language model (`text_config`; only `llama`).
    pub text: HfLlamaConfig,
    /// Token id of the image placeholder whose embeddings the projected patches replace
    /// (`image_token_index`, or `image_token_id`; default 32000); inside the text vocabulary.
    pub image_token_index: usize,
    /// Activation between the projector's `linear_1` and `linear_2` (default `gelu`).
    pub projector_hidden_act: HfAct,
    /// Index into the tower's hidden states (embeddings = 0, layer i output = i + 1);
    /// negative counts from the end, as in Python.
    pub vision_feature_layer: i64,
    /// `default` drops the class token, `full` keeps it.
    pub drop_class_token: bool,
    /// Biases on the projector's linears (`multimodal_projector_bias`, default true).
    pub projector_bias: bool,
}

impl LlavaConfig {
    /// From a `llava` config with nested `vision_config` and `text_config`; refuses a
    /// list of feature layers and an index outside the tower's hidden states.
    pub fn from_fields(f: &Fields<'_>) -> Result<Self> {
        let vision = ClipVisionConfig::from_fields(&f.nested("vision_config")?)?;
        let tf = f.nested("text_config")?;
        if let Some(mt) = tf.opt_str("model_type")? {
            if mt != "llama" {
                return Err(tf.err(
                    "model_type",
                    format!("only a `llama` language model is implemented, got `{mt}`"),
                ));
            }
        }
        let text = HfLlamaConfig::from_fields(&tf)?;
        let image_token_index = match f.opt_i64("image_token_index")? {
            Some(i) => i,
            // LlavaConfig's default
            None => f.opt_i64("image_token_id")?.unwrap_or(32000),
        };
        if image_token_index < 0 || image_token_index as usize >= text.vocab_size {
            return Err(f.err(
                "image_token_index",
                format!(
                    "{image_token_index} is outside the vocabulary (text_config.vocab_size = {})",
                    text.vocab_size
                ),
            ));
        }
        let layers = vision.num_hidden_layers as i64;
        let vision_feature_layer = match f.get("vision_feature_layer") {
            Some(v) if v.is_array() => {
                return Err(f.err(
                    "vision_feature_layer",
                    "a list of feature layers is not implemented",
                ))
            }
            _ => f.opt_i64("vision_feature_layer")?.unwrap_or(-2),
        };
        if vision_feature_layer < -(layers + 1) || vision_feature_layer > layers {
            return Err(f.err(
                "vision_feature_layer",
                format!(
                    "{vision_feature_layer} is out of range for {layers} vision layers \
                     ({} hidden states)",
                    layers + 1
                ),
            ));
        }
        let drop_class_token = match f.opt_str("vision_feature_select_strategy")? {
            None | Some("default") => true,
            Some("full") => false,
            Some(s) => {
                return Err(f.err(
                    "vision_feature_select_strategy",
                    format!("expected `default` or `full`, got `{s}`"),
                ))
            }
        };
        Ok(Self {
            vision,
            text,
            image_token_index: image_token_index as usize,
            projector_hidden_act: f.act_or("projector_hidden_act", HfAct::GeluErf)?,
            vision_feature_layer,
            drop_class_token,
            projector_bias: f.bool_or("multimodal_projector_bias", true)?,
        })
    }

    /// The hidden-state index `vision_feature_layer` selects (0 = embeddings).
    pub fn feature_index(&self) -> usize {
        let n = self.vision.num_hidden_layers as i64 + 1;
        let i = self.vision_feature_layer;
        (if i < 0 { n + i } else { i }) as usize
    }

    /// Image tokens each image becomes in the text sequence.
    pub fn tokens_per_image(&self) -> usize {
        self.vision.num_patches() + usize::from(!self.drop_class_token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama_json() -> Value {
        json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
               "intermediate_size": 12, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 1,
               "max_position_embeddings": 16})
    }

    #[test]
    fn rope_theta_both_spellings() {
        let p = Path::new("config.json");
        let mut v = llama_json();
        let c = HfLlamaConfig::from_fields(&Fields::new(p, &v).unwrap()).unwrap();
        assert_eq!(c.rope_theta, DEFAULT_ROPE_THETA);
        v["rope_theta"] = json!(500.0);
        let c = HfLlamaConfig::from_fields(&Fields::new(p, &v).unwrap()).unwrap();
        assert_eq!(c.rope_theta, 500.0);
        v["rope_parameters"] = json!({"rope_theta": 123.0, "rope_type": "default"});
        let c = HfLlamaConfig::from_fields(&Fields::new(p, &v).unwrap()).unwrap();
        assert_eq!(c.rope_theta, 123.0);
        v["rope_parameters"] = json!({"rope_theta": 123.0, "rope_type": "llama3"});
        let e = HfLlamaConfig::from_fields(&Fields::new(p, &v).unwrap()).unwrap_err();
        assert!(e.to_string().contains("llama3"), "{e}");
    }

    /// LLaVA-1.5's published config names only what differs from the class defaults.
    #[test]
    fn llava_published_config_uses_class_defaults() {
        let v = json!({
            "model_type": "llava", "image_token_index": 32000,
            "projector_hidden_act": "gelu", "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "text_config": {"model_type": "llama", "max_position_embeddings": 4096,
                            "rms_norm_eps": 1e-5, "vocab_size": 32064},
            "vision_config": {"hidden_size": 1024, "image_size": 336,
                              "intermediate_size": 4096, "model_type": "clip_vision_model",
                              "num_attention_heads": 16, "num_hidden_layers": 24,
                              "patch_size": 14, "projection_dim": 768}
        });
        let c = LlavaConfig::from_fields(&Fields::new(Path::new("c.json"), &v).unwrap()).unwrap();
        assert_eq!((c.text.hidden_size, c.text.num_hidden_layers), (4096, 32));
        assert_eq!(
            (c.text.intermediate_size, c.text.num_key_value_heads),
            (11008, 32)
        );
        assert_eq!(c.text.rope_theta, DEFAULT_ROPE_THETA);
        assert_eq!(c.vision.hidden_act, HfAct::QuickGelu);
        assert_eq!((c.vision.num_patches(), c.tokens_per_image()), (576, 576));
        assert_eq!(c.feature_index(), 23);
    }

    #[test]
    fn field_errors_name_the_field() {
        let p = Path::new("x/config.json");
        let mut v = llama_json();
        v["num_key_value_heads"] = json!(3);
        let e = HfLlamaConfig::from_fields(&Fields::new(p, &v).unwrap()).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("x/config.json") && s.contains("num_attention_heads"),
            "{s}"
        );
        let mut v = llama_json();
        v["hidden_size"] = json!("eight");
        let s = HfLlamaConfig::from_fields(&Fields::new(p, &v).unwrap())
            .unwrap_err()
            .to_string();
        assert!(s.contains("`hidden_size`"), "{s}");
        let v = json!({"vision_config": {"hidden_size": 4, "intermediate_size": -3},
                       "text_config": llama_json()});
        let s = LlavaConfig::from_fields(&Fields::new(p, &v).unwrap())
            .unwrap_err()
            .to_string();
        assert!(s.contains("vision_config.intermediate_size"), "{s}");
        // a stem (ours) needs patches of whole 4-pixel cells: 336 / 14 has none
        let v = json!({"vision_config": {"hidden_size": 8, "num_attention_heads": 2,
                                         "image_size": 336, "patch_size": 14,
                                         "popen_stem_channels": 16},
                       "text_config": llama_json()});
        let s = LlavaConfig::from_fields(&Fields::new(p, &v).unwrap())
            .unwrap_err()
            .to_string();
        assert!(s.contains("vision_config.popen_stem_channels"), "{s}");
    }
}
