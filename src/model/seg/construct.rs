//! Building a [`SegModel`]: the tiny model from a seed, or one on a pretrained LLaVA
//! (a run directory loads with [`SegModel::load`], in `run`).

use super::config::{PresenceTokens, SegModelConfig};
use super::decoder::{PixelDecoder, PixelDecoderConfig};
use super::model::SegModel;
use super::prompt::SegTokenizer;
use crate::backend::{Act, Backend};
use crate::error::{Error, Result};
use crate::model::clip::ClipVision;
use crate::model::config::{ClipVisionConfig, HfAct, HfLlamaConfig, LlavaConfig};
use crate::model::llava::{Llava, LlavaNames};
use crate::nn::{randn, Linear, Llama, Mlp, Rng};
use num_traits::Float;

/// The LLaVA configuration of the tiny model.
pub fn tiny_llava_config(cfg: &SegModelConfig, vocab: usize, image_token: u32) -> LlavaConfig {
    let l = &cfg.lvlm;
    LlavaConfig {
        vision: ClipVisionConfig {
            hidden_size: l.vision_hidden,
            intermediate_size: l.vision_intermediate,
            num_hidden_layers: l.vision_layers,
            num_attention_heads: l.vision_heads,
            num_channels: 3,
            image_size: cfg.image_size,
            patch_size: l.patch_size,
            layer_norm_eps: 1e-5,
            hidden_act: HfAct::QuickGelu,
            stem_channels: l.vision_stem,
        },
        text: HfLlamaConfig {
            vocab_size: vocab,
            hidden_size: l.text_hidden,
            intermediate_size: l.text_intermediate,
            num_hidden_layers: l.text_layers,
            num_attention_heads: l.text_heads,
            num_key_value_heads: l.text_kv_heads,
            head_dim: l.text_hidden / l.text_heads.max(1),
            max_position_embeddings: l.max_positions,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
        },
        image_token_index: image_token as usize,
        projector_hidden_act: HfAct::GeluErf,
        vision_feature_layer: cfg.llm_feature_layer,
        drop_class_token: true,
        projector_bias: true,
    }
}

/// Draws `l`'s weight from N(0, 1/fan_in); without a stream it stays zero.
fn linear_init<F: Float, B: Backend<F>>(be: &B, l: &mut Linear<F, B>, rng: Option<&mut Rng>) {
    if let Some(rng) = rng {
        let std = 1.0 / (l.fan_in() as f64).sqrt();
        l.weight.data = be.from_slice(&randn::<F>(rng, l.weight.numel(), std));
    }
}

impl<F: Float, B: Backend<F>> SegModel<F, B> {
    /// The tiny model, every weight drawn from `seed`.
    pub fn new_tiny(be: B, cfg: SegModelConfig, tok: &SegTokenizer, seed: u64) -> Result<Self> {
        let lc = tiny_llava_config(&cfg, tok.vocab_size(), tok.tok.image);
        Self::new(be, cfg, lc, seed)
    }

    /// A model of the given LLaVA shape with every weight drawn from `seed` (a run
    /// directory's trained weights load with [`Self::load`]).
    pub fn new(be: B, cfg: SegModelConfig, lc: LlavaConfig, seed: u64) -> Result<Self> {
        let llcfg = crate::model::llama::llama_config(
            &lc.text,
            std::path::Path::new("config.json"),
            "text_config.",
        )?;
        let mut rng = Rng::new(seed);
        let language_model = Llama::new(be.clone(), llcfg, rng.next_u64())?;
        let mut vision_tower = ClipVision::new(be.clone(), lc.vision.clone())?;
        vision_tower.init_random(rng.next_u64());
        let (cv, h) = (lc.vision.hidden_size, lc.text.hidden_size);
        let mut projector = Mlp {
            fc1: Linear::new(&be, cv, h, lc.projector_bias),
            fc2: Linear::new(&be, h, h, lc.projector_bias),
            act: lc.projector_hidden_act.into(),
        };
        linear_init(&be, &mut projector.fc1, Some(&mut rng));
        linear_init(&be, &mut projector.fc2, Some(&mut rng));
        let llava = Llava {
            cfg: lc,
            be: be.clone(),
            vision_tower,
            projector,
            language_model,
            names: LlavaNames::current(),
        };
        Self::attach(be, cfg, llava, Some(&mut rng))
    }

    /// POPEN on a pretrained LLaVA (LLaVA-1.5): the vocabulary grows to the
    /// tokenizer's (the codebook tokens are new), the image token must be the
    /// tokenizer's `<image>`, the vision tower is frozen (as PixelLM freezes it), and a
    /// fresh codebook projection and pixel decoder are added.
    /// `vocab` and `image_token` are the tokenizer's size and `<image>` id.
    pub fn from_llava(
        be: B,
        mut cfg: SegModelConfig,
        mut llava: Llava<F, B>,
        vocab: usize,
        image_token: u32,
        seed: u64,
    ) -> Result<Self> {
        if llava.cfg.image_token_index != image_token as usize {
            return Err(Error::arg(
                "SegModel::from_llava",
                format!(
                    "the model's image_token_index is {} but the tokenizer's <image> is {image_token}",
                    llava.cfg.image_token_index
                ),
            ));
        }
        cfg.llm_feature_layer = llava.cfg.vision_feature_layer;
        if cfg.image_size != llava.cfg.vision.image_size {
            return Err(Error::arg(
                "SegModel::from_llava",
                format!(
                    "model.image_size = {} but the vision tower takes {}",
                    cfg.image_size, llava.cfg.vision.image_size
                ),
            ));
        }
        let v = vocab.max(llava.cfg.text.vocab_size);
        llava.language_model.grow_vocab(v)?;
        llava.cfg.text.vocab_size = v;
        llava.vision_tower.set_trainable(false);
        let mut rng = Rng::new(seed);
        Self::with_llava(be, cfg, llava, &mut rng)
    }

    /// [`Self::from_llava`] on a Hugging Face LLaVA directory (`config.json`, weights,
    /// `tokenizer.json`).
    pub fn from_llava_dir(
        be: B,
        cfg: SegModelConfig,
        dir: &std::path::Path,
        seed: u64,
    ) -> Result<(Self, SegTokenizer)> {
        let tok = SegTokenizer::load(&dir.join("tokenizer.json"), cfg.group_len())?;
        let (_, p) = crate::model::pretrained::Pretrained::<F, B>::load_dir(be.clone(), dir)?;
        let crate::model::pretrained::Pretrained::Llava(mut llava) = p else {
            return Err(Error::Config {
                path: dir.join("config.json"),
                field: "model_type".into(),
                msg: "a segmentation model is built on a `llava` model".into(),
            });
        };
        // loaded frozen: the LLM and projector train in stage 1 (the tower stays frozen)
        llava.language_model.set_trainable(true);
        for lin in [&mut llava.projector.fc1, &mut llava.projector.fc2] {
            lin.weight.set_trainable(&be, true);
            if let Some(b) = &mut lin.bias {
                b.set_trainable(&be, true);
            }
        }
        let m = Self::from_llava(be, cfg, llava, tok.vocab_size(), tok.tok.image, seed)?;
        Ok((m, tok))
    }

    /// Adds a fresh codebook projection and pixel decoder to a LLaVA model.
    pub fn with_llava(
        be: B,
        cfg: SegModelConfig,
        llava: Llava<F, B>,
        rng: &mut Rng,
    ) -> Result<Self> {
        Self::attach(be, cfg, llava, Some(rng))
    }

    /// [`Self::with_llava`], drawing the new parts' weights from `rng` when given and
    /// leaving them zero otherwise (for [`Self::load`] to read them).
    pub(super) fn attach(
        be: B,
        cfg: SegModelConfig,
        llava: Llava<F, B>,
        mut rng: Option<&mut Rng>,
    ) -> Result<Self> {
        if cfg.scales != 2 {
            return Err(Error::arg(
                "SegModel",
                format!(
                    "the pixel decoder has 2 scales, the config asks for {}",
                    cfg.scales
                ),
            ));
        }
        let h = llava.cfg.text.hidden_size;
        let mut seg_head = Mlp::new(&be, h, h, Act::Relu, true);
        seg_head.fc2 = Linear::new(&be, h, cfg.seg_dim, true);
        linear_init(&be, &mut seg_head.fc1, rng.as_deref_mut());
        linear_init(&be, &mut seg_head.fc2, rng.as_deref_mut());
        let v = &llava.cfg.vision;
        let dcfg = PixelDecoderConfig {
            vision_dim: v.hidden_size,
            dim: cfg.seg_dim,
            depth: cfg.decoder_depth,
            heads: cfg.decoder_heads,
            mlp_dim: cfg.decoder_mlp,
            scales: cfg.scales,
            grid_h: v.grid(),
            grid_w: v.grid(),
            skip_patch: if cfg.pixel_skip {
                skip_patch(v.image_size, v.grid())?
            } else {
                0
            },
        };
        let mut decoder = PixelDecoder::zeroed(be.clone(), dcfg)?;
        if let Some(rng) = rng.as_deref_mut() {
            decoder.init_random(rng.next_u64());
        }
        // the heads' labels are read on the config's grid (super::data::example_of_image)
        if (!cfg.classes.is_empty() || cfg.place_head)
            && v.image_size / v.patch_size.max(1) != cfg.image_size / cfg.lvlm.patch_size.max(1)
        {
            return Err(Error::arg(
                "SegModel",
                format!(
                    "model.classes and model.place_head label a grid of \
                     model.lvlm.patch_size = {}, but the vision tower's patches are {}",
                    cfg.lvlm.patch_size, v.patch_size
                ),
            ));
        }
        // drawn after every other weight, so a model without the heads is unchanged
        let (patch_head, seg_class_head) = if cfg.classes.is_empty() {
            (None, None)
        } else {
            let n = 1 + cfg.classes.len();
            let mut p = Linear::new(&be, v.hidden_size, n, true);
            linear_init(&be, &mut p, rng.as_deref_mut());
            let mut s = Linear::new(&be, cfg.scales * cfg.seg_dim, n, true);
            linear_init(&be, &mut s, rng.as_deref_mut());
            (Some(p), Some(s))
        };
        // drawn last, so a model without presence tokens is unchanged
        let (c, h) = (cfg.classes.len(), llava.cfg.text.hidden_size);
        let presence_proj = match cfg.presence_tokens {
            _ if cfg.presence_tokens != PresenceTokens::Off && c == 0 => {
                return Err(Error::arg(
                    "SegModel",
                    "[model] presence_tokens read the patch-category head, which needs \
                     model.classes (popen train sft fills them when loss.patch_class > 0)",
                ));
            }
            PresenceTokens::Off => None,
            PresenceTokens::One => Some(Linear::new(&be, c, h, true)),
            PresenceTokens::PerCategory => Some(Linear::new(&be, c + 1, h, false)),
        };
        let presence_proj = presence_proj.map(|mut l| {
            linear_init(&be, &mut l, rng.as_deref_mut());
            l
        });
        // drawn after the presence projection, so a model without the head is unchanged
        let seg_place_head = cfg.place_head.then(|| {
            let mut l = Linear::new(&be, cfg.scales * cfg.seg_dim, v.num_patches(), true);
            linear_init(&be, &mut l, rng);
            l
        });
        let m = SegModel {
            cfg,
            llava,
            seg_head,
            decoder,
            patch_head,
            seg_class_head,
            presence_proj,
            seg_place_head,
        };
        m.state_indices()?;
        Ok(m)
    }
}

/// The pixel skip's patch size for an image of `image_size` on a `grid` × `grid` patch
/// grid: scale 1's output grid is 4·grid, so q = image_size / (4·grid), which must be
/// whole.
fn skip_patch(image_size: usize, grid: usize) -> Result<usize> {
    if grid == 0 || !image_size.is_multiple_of(4 * grid) {
        return Err(Error::arg(
            "SegModel",
            format!(
                "[model] pixel_skip needs the image size ({image_size}) to be a multiple of \
                 4 × the patch grid ({grid}); set pixel_skip = false for this tower"
            ),
        ));
    }
    Ok(image_size / (4 * grid))
}

#[cfg(test)]
mod tests {
    use super::skip_patch;

    #[test]
    fn the_skip_patch_divides_the_image_or_is_an_error() {
        assert_eq!(skip_patch(128, 8).unwrap(), 4); // the tiny model: 16-pixel patches
        assert_eq!(skip_patch(8, 2).unwrap(), 1);
        // LLaVA-1.5's CLIP: 336 pixels on a 24 × 24 grid would need q = 3.5
        let e = skip_patch(336, 24).unwrap_err().to_string();
        assert!(e.contains("pixel_skip"), "{e}");
        assert!(skip_patch(128, 0).is_err());
    }
}
