//! The segmentation model's configuration: the LVLM's sizes (for the tiny model trained
//! from scratch), the codebook, the pixel decoder and the image preprocessing.  Every
//! field says where its default comes from.  Read from the `[model]` table of a run's
//! TOML config (an unknown key is an error naming it) and saved in `RUN/config.json`
//! under `"popen"`, beside the Hugging Face LLaVA fields.
use serde::{Deserialize, Serialize};

/// Sizes of the LVLM trained from scratch (the tiny default).  A LLaVA-1.5 checkpoint
/// brings its own sizes and ignores this table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TinyLvlm {
    /// ViT width.  Ours: small enough for a 2-core CPU.
    pub vision_hidden: usize,
    /// ViT blocks.  Ours.
    pub vision_layers: usize,
    /// ViT attention heads; divide `vision_hidden`.  Ours (a head width of 32).
    pub vision_heads: usize,
    /// ViT MLP width (CLIP: 4 × width).
    pub vision_intermediate: usize,
    /// Patch size in pixels (CLIP ViT-L/14 uses 14; ours: 16 on a 128 image, an 8 × 8 grid).
    pub patch_size: usize,
    /// Channels of the ViT's convolutional stem (ours, not CLIP's:
    /// [`crate::model::stem`]); 0 = none, CLIP's plain patch embedding (the default, and
    /// how a run directory written before the stem existed reads).
    pub vision_stem: usize,
    /// LLaMA width.  Ours.
    pub text_hidden: usize,
    /// LLaMA blocks.  Ours.
    pub text_layers: usize,
    /// LLaMA query heads; divide `text_hidden`.  Ours (a head width of 32).
    pub text_heads: usize,
    /// LLaMA key/value heads (grouped-query attention when below `text_heads`, which
    /// they divide).  Ours: as many as `text_heads`, as LLaMA-7B.
    pub text_kv_heads: usize,
    /// LLaMA MLP width (LLaMA: about 8/3 × width).
    pub text_intermediate: usize,
    /// Context length (prompt + image tokens + answer).
    pub max_positions: usize,
    /// World tokenizer vocabulary (BPE trained on the data's text).
    pub vocab_size: usize,
}

impl Default for TinyLvlm {
    fn default() -> Self {
        TinyLvlm {
            vision_hidden: 128,
            vision_layers: 4,
            vision_heads: 4,
            vision_intermediate: 512,
            patch_size: 16,
            vision_stem: 0,
            text_hidden: 192,
            text_layers: 4,
            text_heads: 6,
            text_kv_heads: 6,
            text_intermediate: 512,
            max_positions: 256,
            vocab_size: crate::data::tokenizer::WORLD_VOCAB,
        }
    }
}

/// The whole segmentation model's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegModelConfig {
    /// Images: longest side resized to this, padded bottom/right to a square (PixelLM
    /// pads the same way; its CLIP side is 224 or 336, ours 128).
    pub image_size: usize,
    /// Codebook tokens per scale `S` (PixelLM: `seg_token_num` = 3).
    pub tokens_per_scale: usize,
    /// Scales `L` (PixelLM: 2; the decoder implements exactly 2).
    pub scales: usize,
    /// Width `D` of a segmentation embedding `f` (PixelLM: 256, SAM's prompt width).
    pub seg_dim: usize,
    /// Two-way transformer depth per scale (PixelLM / SAM: 2).
    pub decoder_depth: usize,
    /// Two-way transformer attention heads (SAM: 8 at D = 256; ours: 2 at D = 64).
    pub decoder_heads: usize,
    /// Two-way transformer MLP width (SAM: 2048 at D = 256).
    pub decoder_mlp: usize,
    /// ViT hidden states that feed the decoder's two levels (index 0 = embeddings,
    /// i = block i's output; negative counts from the end as in Python).  PixelLM: the
    /// penultimate layer and a middle one; the tiny model: the last and a middle one
    /// (see `llm_feature_layer`).
    pub decoder_layers: [i64; 2],
    /// ViT hidden state the LLM reads (LLaVA's `vision_feature_layer`: −2, because
    /// CLIP's last block is shaped by its contrastive loss).  The tiny tower is trained
    /// from scratch here, so it reads the last state (−1) and no block goes unused.
    pub llm_feature_layer: i64,
    /// The LLaVA v1 system sentence before `USER:`.  Empty for the tiny model, whose
    /// tokenizer never saw it (it would cost ~30 tokens per sample and say nothing).
    pub system_prompt: String,
    /// Longest answer `popen predict` generates, codebook tokens included.
    pub max_new_tokens: usize,
    /// Sizes of the LVLM trained from scratch.
    pub lvlm: TinyLvlm,
    /// Object categories of the auxiliary category heads (ours, not PixelLM's; see
    /// [`super::category`]): empty = no heads.  `popen train sft` fills it from the
    /// training data's categories (sorted) when `loss.patch_class` or `loss.seg_class`
    /// is above 0.
    pub classes: Vec<String>,
    /// The pixel decoder's pixel skip (ours, not PixelLM's; see
    /// [`super::decoder::PixelDecoderConfig::skip_patch`]): the image's pixels, in
    /// patches on the finest mask grid, added to the features the finest mask is read
    /// from.  Off by default (PixelLM's decoder; a run directory written before the skip
    /// existed reads as off); on in `tools/configs/stage1_world.toml`.
    pub pixel_skip: bool,
    /// The presence tokens (ours, not PixelLM's; [`super::evidence`]): more image
    /// tokens per image carrying, per category, the patch-category head's highest
    /// probability over the image's patches, so that the LLM can look up whether a
    /// named object is there.  Needs `classes` (the head).  Off by default (a run
    /// directory written before they existed reads as off).
    pub presence_tokens: PresenceTokens,
    /// The place head (ours, not PixelLM's; [`super::category::place_labels`]): an
    /// auxiliary classifier on each target's `f` that names the tower patch holding the
    /// target's centroid, so that `f` says where the target is as well as what it is.
    /// Off by default (a run directory written before it existed reads as off);
    /// `popen train sft` turns it on when `loss.seg_place` is above 0.
    pub place_head: bool,
}

/// How the patch head's per-category evidence reaches the LLM (`[model]
/// presence_tokens`; [`super::evidence`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceTokens {
    /// Not at all (PixelLM).
    #[default]
    Off,
    /// One token: `Linear(C, H)` of the C evidences.
    One,
    /// One token per category c: `E[c] + e[c]·v`, a learned key for the category and
    /// its evidence along a learned direction (`Linear(C + 1, H)` without bias of
    /// `[onehot(c), e[c]]`), so that the LLM finds a named category by attention.
    PerCategory,
}

impl Default for SegModelConfig {
    fn default() -> Self {
        SegModelConfig {
            image_size: 128,
            tokens_per_scale: 2,
            scales: 2,
            seg_dim: 64,
            decoder_depth: 2,
            decoder_heads: 2,
            decoder_mlp: 128,
            decoder_layers: [-1, 2],
            llm_feature_layer: -1,
            system_prompt: String::new(),
            max_new_tokens: 64,
            lvlm: TinyLvlm::default(),
            classes: Vec::new(),
            pixel_skip: false,
            presence_tokens: PresenceTokens::Off,
            place_head: false,
        }
    }
}

impl SegModelConfig {
    /// Codebook tokens per target (`S·L`).
    pub fn group_len(&self) -> usize {
        self.tokens_per_scale * self.scales
    }

    /// Presence tokens per image ([`PresenceTokens`]).
    pub fn presence_tokens_per_image(&self) -> usize {
        match self.presence_tokens {
            PresenceTokens::Off => 0,
            PresenceTokens::One => 1,
            PresenceTokens::PerCategory => self.classes.len(),
        }
    }
}

/// Resolves a Python-style hidden-state index against `n_states` states.
pub fn state_index(i: i64, n_states: usize) -> Option<usize> {
    let n = n_states as i64;
    let j = if i < 0 { n + i } else { i };
    (0..n).contains(&j).then_some(j as usize)
}
