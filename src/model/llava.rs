//! LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP vision tower read at
//! `vision_feature_layer` (−2: the penultimate block) with the class token dropped, the
//! projector `linear_2(GELU(linear_1(f)))`, the projected patches written into the text
//! sequence at the image-token positions, and the LLaMA decoder.
//!
//! Image tokens: the LLaVA processor already repeats the image token once per patch, and
//! then the features replace those embeddings in order (image 0's patches fill the first
//! K image tokens of the batch, and so on).  A prompt with a single image token per
//! image is expanded here instead: that token becomes K positions (K = patches, plus one
//! with the `full` strategy), as the first LLaVA releases did.
//!
//! Checkpoint names come in two layouts, both read and written back as found:
//! transformers ≥ 4.52 in memory (`model.vision_tower.…`, `model.multi_modal_projector.…`,
//! `model.language_model.…`, `lm_head.weight`) and the published LLaVA-1.5 files
//! (`vision_tower.vision_model.…`, `multi_modal_projector.…`, `language_model.model.…`,
//! `language_model.lm_head.weight`); transformers 5 saves the latter without the
//! `vision_model.` level.
//!
//! B batch, T tokens, NI images, K image tokens per image, Cv / C vision / text width.
use super::clip::{ClipVision, CLIP_MARKER};
use super::config::LlavaConfig;
use super::llama::{llama_config, load_llama, LlamaNames, LLAMA_MARKER};
use super::weights::{save_params, Checkpoint};
use super::StDtype;
use crate::backend::{Backend, Cpu};
use crate::error::{Error, Result};
use crate::nn::{Linear, Llama, Mlp, Tensor};
use num_traits::Float;
use std::path::Path;

/// Vision tower prefixes, most specific first.
pub const LLAVA_VISION_PREFIXES: &[&str] = &[
    "model.vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.vision_model.",
    "vision_tower.",
];
/// Projector prefixes.
pub const LLAVA_PROJECTOR_PREFIXES: &[&str] =
    &["model.multi_modal_projector.", "multi_modal_projector."];
/// Language model (decoder) prefixes.
pub const LLAVA_TEXT_PREFIXES: &[&str] = &["model.language_model.", "language_model.model."];
/// Output head names.
pub const LLAVA_HEAD_NAMES: &[&str] = &["lm_head.weight", "language_model.lm_head.weight"];

/// Where one LLaVA checkpoint keeps each part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlavaNames {
    /// Prefix of the vision tower's tensors (one of [`LLAVA_VISION_PREFIXES`]).
    pub vision: String,
    /// Prefix of the projector's `linear_{1,2}` tensors (one of [`LLAVA_PROJECTOR_PREFIXES`]).
    pub projector: String,
    /// Decoder prefix and output head name.
    pub text: LlamaNames,
}

impl LlavaNames {
    /// Finds the layout of `ck` by probing one tensor of each part.
    pub fn detect(ck: &Checkpoint) -> Result<Self> {
        let vision = ck.find_prefix(LLAVA_VISION_PREFIXES, CLIP_MARKER)?;
        let projector = ck.find_prefix(LLAVA_PROJECTOR_PREFIXES, "linear_1.weight")?;
        let decoder = ck.find_prefix(LLAVA_TEXT_PREFIXES, LLAMA_MARKER)?;
        let head = LLAVA_HEAD_NAMES
            .iter()
            .find(|h| ck.contains(h))
            .map(|h| h.to_string())
            // a tied head is absent; name it as its layout would, for saving
            .unwrap_or_else(|| {
                if decoder.starts_with("language_model.") {
                    "language_model.lm_head.weight".into()
                } else {
                    "lm_head.weight".into()
                }
            });
        Ok(Self {
            vision,
            projector,
            text: LlamaNames { decoder, head },
        })
    }

    /// The layout transformers ≥ 4.52 uses in memory.
    pub fn current() -> Self {
        Self {
            vision: "model.vision_tower.".into(),
            projector: "model.multi_modal_projector.".into(),
            text: LlamaNames {
                decoder: "model.language_model.".into(),
                head: "lm_head.weight".into(),
            },
        }
    }

    /// The layout of the published LLaVA-1.5 checkpoints.
    pub fn published() -> Self {
        Self {
            vision: "vision_tower.vision_model.".into(),
            projector: "multi_modal_projector.".into(),
            text: LlamaNames {
                decoder: "language_model.model.".into(),
                head: "language_model.lm_head.weight".into(),
            },
        }
    }
}

/// `LlavaForConditionalGeneration`.
#[derive(Clone, Debug)]
pub struct Llava<F: Float = f32, B: Backend<F> = Cpu> {
    /// The parsed `config.json`.
    pub cfg: LlavaConfig,
    /// Backend that holds the weights and runs the forward pass.
    pub be: B,
    /// CLIP tower, read at `cfg.vision_feature_layer`.
    pub vision_tower: ClipVision<F, B>,
    /// fc1 = `linear_1` (Cv → C), fc2 = `linear_2` (C → C)
    pub projector: Mlp<F, B>,
    /// LLaMA decoder with its output head.
    pub language_model: Llama<F, B>,
    /// The names parameters are listed and saved under.
    pub names: LlavaNames,
}

/// Output of [`Llava::forward`].
#[derive(Clone, Debug)]
pub struct LlavaOutput<Buf> {
    /// (B, T', V), T' = T after image-token expansion
    pub logits: Buf,
    /// T', the sequence length after image-token expansion (T when nothing was expanded).
    pub t: usize,
    /// the token ids of the sequence the decoder saw (B·T'), image tokens included
    pub ids: Vec<u32>,
}

impl<F: Float, B: Backend<F>> Llava<F, B> {
    /// A frozen model filled from `ck` (layout detected); `config_path` goes into errors.
    pub fn load(be: B, cfg: LlavaConfig, ck: &Checkpoint, config_path: &Path) -> Result<Self> {
        let names = LlavaNames::detect(ck)?;
        let vision_tower = ClipVision::load(be.clone(), cfg.vision.clone(), ck, &names.vision)?;
        let lcfg = llama_config(&cfg.text, config_path, "text_config.")?;
        let language_model = load_llama(be.clone(), lcfg, ck, &names.text)?;
        let (cv, c) = (cfg.vision.hidden_size, cfg.text.hidden_size);
        let mut projector = Mlp {
            fc1: Linear::new(&be, cv, c, cfg.projector_bias),
            fc2: Linear::new(&be, c, c, cfg.projector_bias),
            act: cfg.projector_hidden_act.into(),
        };
        let mut pp = Self::projector_params(&mut projector);
        for (_, t) in pp.iter_mut() {
            t.set_trainable(&be, false);
        }
        ck.load_params(&be, pp, |n| format!("{}{n}", names.projector))?;
        Ok(Self {
            cfg,
            be,
            vision_tower,
            projector,
            language_model,
            names,
        })
    }

    fn projector_params(p: &mut Mlp<F, B>) -> Vec<(String, &mut Tensor<F, B>)> {
        let mut out = Vec::new();
        for (n, lin) in [("linear_1", &mut p.fc1), ("linear_2", &mut p.fc2)] {
            out.push((format!("{n}.weight"), &mut lin.weight));
            if let Some(b) = &mut lin.bias {
                out.push((format!("{n}.bias"), b));
            }
        }
        out
    }

    /// Every parameter under its checkpoint name (as [`Llava::names`] spells them).
    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor<F, B>)> {
        let names = self.names.clone();
        let mut out: Vec<(String, &mut Tensor<F, B>)> = Vec::new();
        for (n, t) in self.vision_tower.params_mut() {
            out.push((format!("{}{n}", names.vision), t));
        }
        for (n, t) in Self::projector_params(&mut self.projector) {
            out.push((format!("{}{n}", names.projector), t));
        }
        for (n, t) in self.language_model.params_mut() {
            out.push((names.text.rename(&n), t));
        }
        out
    }

    /// Writes every parameter to one safetensors file under [`Llava::names`].
    pub fn save_weights(&mut self, path: impl AsRef<Path>, dtype: StDtype) -> Result<()> {
        let be = self.be.clone();
        let params: Vec<(String, &Tensor<F, B>)> = self
            .params_mut()
            .into_iter()
            .map(|(n, t)| (n, &*t))
            .collect();
        save_params(&be, path, params, |n| n.to_string(), dtype)
    }

    /// Projected image features (NI·K, C) for pixels (NI, CH, H, W).
    pub fn image_features(&self, pixels: &B::Buf, n_images: usize) -> Result<B::Buf> {
        let be = &self.be;
        let idx = self.cfg.feature_index();
        let out = self.vision_tower.forward(pixels, n_images, idx)?;
        let h = &out.hidden_states[idx]; // (NI, S, Cv)
        let (s, cv) = (self.cfg.vision.num_positions(), self.cfg.vision.hidden_size);
        let feats = if self.cfg.drop_class_token {
            let np = s - 1;
            let mut f = be.zeros(n_images * np * cv);
            for i in 0..n_images {
                be.copy_range(&mut f, i * np * cv, h, (i * s + 1) * cv, np * cv)?;
            }
            f
        } else {
            h.clone()
        };
        Ok(self.projector.forward(be, feats)?.0)
    }

    /// ids (B·T), pixels (NI, CH, H, W) when the prompt has image tokens, key mask
    /// (B, T) → logits.  See the module docs for how image tokens are matched.
    pub fn forward(
        &self,
        ids: &[u32],
        b: usize,
        pixels: Option<(&B::Buf, usize)>,
        key_mask: Option<&[u8]>,
    ) -> Result<LlavaOutput<B::Buf>> {
        let be = &self.be;
        let op = "Llava::forward";
        if b == 0 || ids.is_empty() || !ids.len().is_multiple_of(b) {
            return Err(Error::shape(
                op,
                format!("{} ids do not split into {b} rows", ids.len()),
            ));
        }
        let t = ids.len() / b;
        if let Some(m) = key_mask {
            crate::error::check_len(op, "attention mask", m.len(), ids.len())?;
        }
        let img = self.cfg.image_token_index as u32;
        let k = self.cfg.tokens_per_image();
        let c = self.cfg.text.hidden_size;
        let per_row: Vec<usize> = ids
            .chunks(t)
            .map(|r| r.iter().filter(|&&x| x == img).count())
            .collect();
        let total: usize = per_row.iter().sum();
        let n_images = pixels.map_or(0, |p| p.1);
        if total == 0 && n_images == 0 {
            let x = self.language_model.embed(ids)?;
            let (logits, _) = self
                .language_model
                .forward_embeds(x, b, t, key_mask, None, None)?;
            return Ok(LlavaOutput {
                logits,
                t,
                ids: ids.to_vec(),
            });
        }
        let expand = if total == n_images * k {
            false
        } else if total == n_images && k > 1 {
            true
        } else {
            return Err(Error::arg(
                op,
                format!(
                    "input_ids hold {total} image tokens (id {img}) but {n_images} images \
                     give {} image features: write {k} image tokens per image (or one, to be \
                     expanded)",
                    n_images * k
                ),
            ));
        };
        let (ids2, mask2, t2) = if expand {
            let t2 = t + (k - 1) * per_row[0];
            if let Some(r) = per_row.iter().position(|&n| n != per_row[0]) {
                return Err(Error::arg(
                    op,
                    format!(
                        "rows 0 and {r} hold {} and {} single image tokens: expanded to {k} \
                         positions each they would differ in length",
                        per_row[0], per_row[r]
                    ),
                ));
            }
            let mut ids2 = Vec::with_capacity(b * t2);
            let mut mask2 = key_mask.map(|_| Vec::with_capacity(b * t2));
            for (j, &id) in ids.iter().enumerate() {
                let reps = if id == img { k } else { 1 };
                ids2.extend(std::iter::repeat_n(id, reps));
                if let (Some(m2), Some(m)) = (&mut mask2, key_mask) {
                    m2.extend(std::iter::repeat_n(m[j], reps));
                }
            }
            (ids2, mask2, t2)
        } else {
            (ids.to_vec(), key_mask.map(|m| m.to_vec()), t)
        };
        let feats = self.image_features(pixels.expect("n_images > 0").0, n_images)?; // (NI·K, C)
        let mut x = self.language_model.embed(&ids2)?; // (B·T', C)
        let mut slot = 0;
        for (pos, &id) in ids2.iter().enumerate() {
            if id == img {
                be.copy_range(&mut x, pos * c, &feats, slot * c, c)?;
                slot += 1;
            }
        }
        let (logits, _) =
            self.language_model
                .forward_embeds(x, b, t2, mask2.as_deref(), None, None)?;
        Ok(LlavaOutput {
            logits,
            t: t2,
            ids: ids2,
        })
    }
}
