//! The tiny segmentation model of the model-level tests (seg_model.rs, pref.rs).
use popen::model::seg::config::TinyLvlm;
use popen::model::seg::SegModelConfig;

/// An 8×8-pixel, 70-token model: every part present, small enough for f64 finite
/// differences over the whole model.
pub fn tiny_cfg() -> SegModelConfig {
    SegModelConfig {
        image_size: 8,
        tokens_per_scale: 2,
        scales: 2,
        seg_dim: 6,
        decoder_depth: 1,
        decoder_heads: 1,
        decoder_mlp: 6,
        decoder_layers: [-1, 1],
        llm_feature_layer: -2,
        system_prompt: String::new(),
        max_new_tokens: 12,
        lvlm: TinyLvlm {
            vision_hidden: 6,
            vision_layers: 2,
            vision_heads: 2,
            vision_intermediate: 10,
            patch_size: 4,
            text_hidden: 8,
            text_layers: 2,
            text_heads: 2,
            text_kv_heads: 1,
            text_intermediate: 12,
            max_positions: 64,
            vocab_size: 70,
        },
    }
}
