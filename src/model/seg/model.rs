//! The segmentation model: LLaVA (ViT → projector → LLaMA) + the codebook projection
//! (`seg_head`) + the pixel decoder, with one training step (forward and backward of
//! `L = CE + 2·BCE + 0.5·Dice`) and the pieces inference reuses.
//!
//! B images (one question each) per batch, T tokens per row (image tokens expanded,
//! right-padded), K patches per image, Cv ViT width, H LLM width, D seg width, M targets
//! in the batch, G = S·L codebook tokens per target.
use super::config::{state_index, SegModelConfig};
use super::decoder::{DecoderActs, DecoderImages, PixelDecoder, PixelDecoderConfig};
use super::preprocess::Pixels;
use super::prompt::{Encoded, SegTokenizer};
use crate::backend::{Act, Backend, Cpu};
use crate::error::{Error, Result};
use crate::kernels::logprob::IGNORE_INDEX;
use crate::model::clip::{ClipActs, ClipVision};
use crate::model::config::{ClipVisionConfig, HfAct, HfLlamaConfig, LlavaConfig};
use crate::model::llava::{Llava, LlavaNames};
use crate::nn::layers::MlpActs;
use crate::nn::llama::LlamaActs;
use crate::nn::{randn, Linear, Llama, Mlp, Rng, Tensor};
use num_traits::Float;

/// PixelLM's loss weights: `CE + 2·BCE + 0.5·Dice`.
/// A `[loss]` table may name only some weights: the others keep these defaults.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossWeights {
    pub ce: f32,
    pub bce: f32,
    pub dice: f32,
    /// The auxiliary patch-category loss (ours; [`super::category`]).  0 = off, as in
    /// PixelLM.
    pub patch_class: f32,
    /// The auxiliary category loss on the segmentation embeddings `f` (ours;
    /// [`super::category`]).  0 = off, as in PixelLM.
    pub seg_class: f32,
    /// Score the masks of one category's `<seg>`s against the permutation of its
    /// targets with the least loss, not in the data's order (ours; [`super::matching`]).
    /// Off, as in PixelLM.
    pub instance_matching: bool,
}

impl Default for LossWeights {
    fn default() -> Self {
        LossWeights {
            ce: 1.0,
            bce: 2.0,
            dice: 0.5,
            patch_class: 0.0,
            seg_class: 0.0,
            instance_matching: false,
        }
    }
}

/// One training example: a preprocessed image, its tokenized question and answer, and
/// one ground-truth mask per `<seg>` (at the image's own size, 1 = object).
#[derive(Clone, Debug)]
pub struct Example {
    pub pixels: Pixels,
    pub enc: Encoded,
    /// per target (height·width) of 0/1
    pub masks: Vec<Vec<f32>>,
    /// Category labels for the auxiliary heads (empty = this example trains neither).
    pub classes: super::category::Classes,
    /// Per target, its category name ("" or no entries: unknown), for
    /// [`LossWeights::instance_matching`].
    pub categories: Vec<String>,
}

/// The loss of one batch and its parts (means over the batch's tokens and masks).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SegLoss {
    pub total: f64,
    pub ce: f64,
    pub bce: f64,
    pub dice: f64,
    /// The patch-category cross-entropy (0 without the head or labels).
    pub patch_class: f64,
    /// The category cross-entropy of the segmentation embeddings (0 without the head
    /// or labels).
    pub seg_class: f64,
    /// Labelled (answer) tokens.
    pub n_labels: usize,
    /// Every token the LLM processed (padding excluded).
    pub n_tokens: usize,
    pub n_masks: usize,
}

/// Which parts train (`true`) and which are frozen.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Trainable {
    pub vision: bool,
    pub projector: bool,
    pub llm: bool,
    pub seg_head: bool,
    pub decoder: bool,
}

impl Default for Trainable {
    /// Stage 1 of the tiny model: everything trains (there is no pretrained tower).
    fn default() -> Self {
        Trainable {
            vision: true,
            projector: true,
            llm: true,
            seg_head: true,
            decoder: true,
        }
    }
}

/// The model.
#[derive(Clone, Debug)]
pub struct SegModel<F: Float = f32, B: Backend<F> = Cpu> {
    pub cfg: SegModelConfig,
    pub llava: Llava<F, B>,
    /// `Linear(H,H) → ReLU → Linear(H,D)` on a codebook token's hidden state.
    pub seg_head: Mlp<F, B>,
    pub decoder: PixelDecoder<F, B>,
    /// The auxiliary patch-category head `Linear(Cv, 1 + C)` (present when
    /// `cfg.classes` is not empty; trains with the vision tower).
    pub patch_head: Option<Linear<F, B>>,
    /// The auxiliary category head on `f`, `Linear(L·D, 1 + C)` (present when
    /// `cfg.classes` is not empty; trains with the codebook head).
    pub seg_class_head: Option<Linear<F, B>>,
}

/// A training forward's results for the caller's objective (see
/// [`SegModel::forward_pass`]), and what the backward needs.
pub struct TrainPass<Buf> {
    /// Per padded position (B·T): log p of the next token (position p − 1 predicts
    /// token p); meaningful where `labelled`.
    pub logp: Vec<f64>,
    /// The positions whose next token is an answer token.
    pub labelled: Vec<bool>,
    /// Per example: the positions holding its answer tokens' log-probs, in answer order
    /// (`Encoded::ids[answer_start..]`).
    pub answer_rows: Vec<Vec<usize>>,
    /// Per mask (the examples with masks, in order): (BCE, Dice).
    pub mask_losses: Vec<(f64, f64)>,
    /// The patch-category cross-entropy; `None` without the head or labelled patches.
    pub patch_loss: Option<f64>,
    /// The segmentation embeddings' category cross-entropy; `None` without the head
    /// or labelled targets.
    pub seg_class_loss: Option<f64>,
    /// Every token the LLM processed (padding excluded).
    pub n_tokens: usize,
    acts: StepActs<Buf>,
}

impl<Buf> TrainPass<Buf> {
    /// The segmentation embeddings `f` of the decoded masks, (M, L·D) row-major (one
    /// row per mask, its L scale embeddings side by side), read back from the device.
    pub fn seg_embeddings<F: Float, B: Backend<F, Buf = Buf>>(&self, be: &B) -> Vec<F> {
        self.acts
            .seg
            .as_ref()
            .map_or_else(Vec::new, |s| be.to_vec(&s.emb))
    }
    /// Each decoded mask's logits at its image's size (H·W), read back from the device.
    pub fn mask_logits<F: Float, B: Backend<F, Buf = Buf>>(&self, be: &B) -> Vec<Vec<F>> {
        self.acts.seg.as_ref().map_or_else(Vec::new, |s| {
            s.per_mask.iter().map(|(lg, _)| be.to_vec(lg)).collect()
        })
    }
}

/// What the forward keeps for the backward.
pub struct StepActs<Buf> {
    b: usize,
    t: usize,
    ids: Vec<u32>,
    image_rows: Vec<usize>,
    vision: ClipActs<Buf>,
    n_states: usize,
    proj: MlpActs<Buf>,
    llm: LlamaActs<Buf>,
    logits: Buf,
    targets: Vec<i32>,
    lse: Buf,
    gather_rows: Vec<u32>,
    /// None when the batch has no target
    seg: Option<SegActs<Buf>>,
    patch: Option<super::category::HeadActs<Buf>>,
    seg_class: Option<super::category::HeadActs<Buf>>,
    idx: [usize; 3],
}

struct SegActs<Buf> {
    /// the segmentation embeddings f (M, L, D)
    emb: Buf,
    head: MlpActs<Buf>,
    dec: DecoderActs<Buf>,
    /// per mask: logits at the image's size (H·W) and the 0/1 target
    per_mask: Vec<(Buf, Buf)>,
}

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

fn linear_init<F: Float, B: Backend<F>>(be: &B, l: &mut Linear<F, B>, rng: &mut Rng) {
    let std = 1.0 / (l.fan_in() as f64).sqrt();
    l.weight.data = be.from_slice(&randn::<F>(rng, l.weight.numel(), std));
}

impl<F: Float, B: Backend<F>> SegModel<F, B> {
    /// The tiny model, every weight drawn from `seed`.
    pub fn new_tiny(be: B, cfg: SegModelConfig, tok: &SegTokenizer, seed: u64) -> Result<Self> {
        let lc = tiny_llava_config(&cfg, tok.vocab_size(), tok.tok.image);
        Self::new(be, cfg, lc, seed)
    }

    /// A model of the given LLaVA shape with every weight drawn from `seed` (load a
    /// checkpoint over it to use trained weights).
    pub fn new(be: B, cfg: SegModelConfig, lc: LlavaConfig, seed: u64) -> Result<Self> {
        let llcfg = crate::model::llama::llama_config(
            &lc.text,
            std::path::Path::new("config.json"),
            "text_config.",
        )?;
        let mut rng = Rng::new(seed);
        let language_model = Llama::new(be.clone(), llcfg, rng.next_u64())?;
        let mut vision_tower = ClipVision::new(be.clone(), lc.vision.clone());
        vision_tower.init_random(rng.next_u64());
        let (cv, h) = (lc.vision.hidden_size, lc.text.hidden_size);
        let mut projector = Mlp {
            fc1: Linear::new(&be, cv, h, lc.projector_bias),
            fc2: Linear::new(&be, h, h, lc.projector_bias),
            act: lc.projector_hidden_act.into(),
        };
        linear_init(&be, &mut projector.fc1, &mut rng);
        linear_init(&be, &mut projector.fc2, &mut rng);
        let llava = Llava {
            cfg: lc,
            be: be.clone(),
            vision_tower,
            projector,
            language_model,
            names: LlavaNames::current(),
        };
        Self::with_llava(be, cfg, llava, &mut rng)
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
        linear_init(&be, &mut seg_head.fc1, rng);
        linear_init(&be, &mut seg_head.fc2, rng);
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
        let decoder = PixelDecoder::new(be.clone(), dcfg, rng.next_u64())?;
        // drawn after every other weight, so a model without the head is unchanged
        let (patch_head, seg_class_head) = if cfg.classes.is_empty() {
            (None, None)
        } else {
            if v.image_size / v.patch_size.max(1) != cfg.image_size / cfg.lvlm.patch_size.max(1) {
                return Err(Error::arg(
                    "SegModel",
                    format!(
                        "model.classes labels a grid of model.lvlm.patch_size = {}, \
                         but the vision tower's patches are {}",
                        cfg.lvlm.patch_size, v.patch_size
                    ),
                ));
            }
            let n = 1 + cfg.classes.len();
            let mut p = Linear::new(&be, v.hidden_size, n, true);
            linear_init(&be, &mut p, rng);
            let mut s = Linear::new(&be, cfg.scales * cfg.seg_dim, n, true);
            linear_init(&be, &mut s, rng);
            (Some(p), Some(s))
        };
        let m = SegModel {
            cfg,
            llava,
            seg_head,
            decoder,
            patch_head,
            seg_class_head,
        };
        m.state_indices()?;
        Ok(m)
    }

    /// Hidden-state indices: [LLM features, decoder level 0, decoder level 1].
    pub fn state_indices(&self) -> Result<[usize; 3]> {
        let n = self.llava.cfg.vision.num_hidden_layers + 1;
        let get = |i: i64, what: &str| {
            state_index(i, n).ok_or_else(|| {
                Error::arg(
                    "SegModel",
                    format!("{what} = {i} is not one of the tower's {n} hidden states"),
                )
            })
        };
        Ok([
            get(self.cfg.llm_feature_layer, "llm_feature_layer")?,
            get(self.cfg.decoder_layers[0], "decoder_layers[0]")?,
            get(self.cfg.decoder_layers[1], "decoder_layers[1]")?,
        ])
    }

    /// Every parameter: the LLaVA part under Hugging Face names, then `seg_head.*` and
    /// `mask_decoder.*`.
    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor<F, B>)> {
        let mut out = self.llava.params_mut();
        for (n, lin) in [
            ("fc1", &mut self.seg_head.fc1),
            ("fc2", &mut self.seg_head.fc2),
        ] {
            out.push((format!("seg_head.{n}.weight"), &mut lin.weight));
            if let Some(b) = &mut lin.bias {
                out.push((format!("seg_head.{n}.bias"), b));
            }
        }
        out.extend(self.decoder.params_mut());
        for (n, head) in [
            ("patch_head", &mut self.patch_head),
            ("seg_class_head", &mut self.seg_class_head),
        ] {
            if let Some(l) = head {
                out.push((format!("{n}.weight"), &mut l.weight));
                if let Some(b) = &mut l.bias {
                    out.push((format!("{n}.bias"), b));
                }
            }
        }
        out
    }

    /// Freezes or unfreezes each part.
    pub fn set_trainable(&mut self, t: Trainable) {
        let be = self.llava.be.clone();
        self.llava.vision_tower.set_trainable(t.vision);
        for lin in [&mut self.llava.projector.fc1, &mut self.llava.projector.fc2] {
            lin.weight.set_trainable(&be, t.projector);
            if let Some(b) = &mut lin.bias {
                b.set_trainable(&be, t.projector);
            }
        }
        self.llava.language_model.set_trainable(t.llm);
        for lin in [&mut self.seg_head.fc1, &mut self.seg_head.fc2] {
            lin.weight.set_trainable(&be, t.seg_head);
            if let Some(b) = &mut lin.bias {
                b.set_trainable(&be, t.seg_head);
            }
        }
        for (_, p) in self.decoder.params_mut() {
            p.set_trainable(&be, t.decoder);
        }
        for (head, on) in [
            (&mut self.patch_head, t.vision),
            (&mut self.seg_class_head, t.seg_head),
        ] {
            if let Some(l) = head {
                l.weight.set_trainable(&be, on);
                if let Some(b) = &mut l.bias {
                    b.set_trainable(&be, on);
                }
            }
        }
    }

    fn vision_trains(&mut self) -> bool {
        self.llava
            .vision_tower
            .params_mut()
            .iter()
            .any(|(_, t)| t.grad.is_some())
    }

    /// The inverse scatter of [`Self::patches_of`]: (B·K, Cv) → (B, 1 + K, Cv), class row 0.
    fn unpatches(&self, d: &B::Buf, b: usize) -> Result<B::Buf> {
        let be = &self.llava.be;
        let v = &self.llava.cfg.vision;
        let (k, cv) = (v.num_patches(), v.hidden_size);
        let mut out = be.zeros(b * (k + 1) * cv);
        for i in 0..b {
            be.copy_range(&mut out, (i * (k + 1) + 1) * cv, d, i * k * cv, k * cv)?;
        }
        Ok(out)
    }

    /// The patch-category loss of a batch on its level-0 patches `f0` (B·K, Cv), through
    /// the head; an example without labels has its patches ignored.
    fn patch_forward(
        &self,
        batch: &[Example],
        f0: &B::Buf,
    ) -> Result<Option<(f64, super::category::HeadActs<B::Buf>)>> {
        let Some(head) = &self.patch_head else {
            return Ok(None);
        };
        if batch.iter().all(|e| e.classes.patches.is_empty()) {
            return Ok(None);
        }
        let k = self.tokens_per_image();
        let mut labels = Vec::with_capacity(batch.len() * k);
        for (i, ex) in batch.iter().enumerate() {
            let l = &ex.classes.patches;
            if l.is_empty() {
                labels.extend(std::iter::repeat_n(IGNORE_INDEX, k));
            } else {
                crate::error::check_len(
                    "SegModel",
                    &format!("example {i} patch classes"),
                    l.len(),
                    k,
                )?;
                labels.extend_from_slice(l);
            }
        }
        super::category::forward(&self.llava.be, head, f0.clone(), labels)
    }

    /// The category loss of the segmentation embeddings `emb` (M, L·D) of a batch's
    /// decoded targets (examples with masks, in order); a target of an example without
    /// labels is ignored.
    fn seg_class_forward(
        &self,
        batch: &[Example],
        emb: &B::Buf,
    ) -> Result<Option<(f64, super::category::HeadActs<B::Buf>)>> {
        let Some(head) = &self.seg_class_head else {
            return Ok(None);
        };
        let mut labels = Vec::new();
        for (i, ex) in batch
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.masks.is_empty())
        {
            let t = &ex.classes.targets;
            if t.is_empty() {
                labels.extend(std::iter::repeat_n(IGNORE_INDEX, ex.masks.len()));
            } else {
                crate::error::check_len(
                    "SegModel",
                    &format!("example {i} target classes"),
                    t.len(),
                    ex.masks.len(),
                )?;
                labels.extend_from_slice(t);
            }
        }
        super::category::forward(&self.llava.be, head, emb.clone(), labels)
    }

    /// Image tokens per image (K).
    pub fn tokens_per_image(&self) -> usize {
        self.llava.cfg.vision.num_patches()
    }

    /// The most token ids an example may have: the model's context less the image's K
    /// positions, plus the one image token that stands for them (the model's own
    /// values, so a pretrained LLaVA's, not a config's).
    pub fn max_ids(&self) -> usize {
        (self.llava.cfg.text.max_position_embeddings + 1).saturating_sub(self.tokens_per_image())
    }

    /// `ids` with its one image token expanded to K positions.
    pub fn expand_ids(&self, enc: &Encoded) -> Vec<u32> {
        let k = self.tokens_per_image();
        let img = enc.ids[enc.image_pos];
        let mut out = Vec::with_capacity(enc.ids.len() + k - 1);
        out.extend_from_slice(&enc.ids[..enc.image_pos]);
        out.extend(std::iter::repeat_n(img, k));
        out.extend_from_slice(&enc.ids[enc.image_pos + 1..]);
        out
    }

    /// Stacks the images of a batch into (B, 3, S, S).
    pub fn stack_pixels(&self, px: &[&Pixels]) -> Result<B::Buf> {
        let s = self.cfg.image_size;
        let mut all = Vec::with_capacity(px.len() * 3 * s * s);
        for p in px {
            crate::error::check_len("SegModel", "pixels", p.data.len(), 3 * s * s)?;
            all.extend(p.data.iter().map(|&x| F::from(x).unwrap()));
        }
        Ok(self.llava.be.from_slice(&all))
    }

    /// Codebook embeddings (M, L, D) from hidden states: `rows` are the hidden-state rows
    /// (M·G) that predict each codebook token, in group order.
    pub fn seg_embeddings(
        &self,
        hidden: &B::Buf,
        rows: &[u32],
    ) -> Result<(B::Buf, MlpActs<B::Buf>)> {
        let be = &self.llava.be;
        let h = self.llava.cfg.text.hidden_size;
        let mut g = be.zeros(rows.len() * h);
        be.embedding_fwd(rows, hidden, h, &mut g)?;
        let (out, acts) = self.seg_head.forward(be, &g)?; // (M·G, D)
        Ok((self.average_scales(&out, rows.len())?, acts))
    }

    /// (M·G, D) → (M, L, D): the S tokens of each scale averaged.
    fn average_scales(&self, out: &B::Buf, n_rows: usize) -> Result<B::Buf> {
        let be = &self.llava.be;
        let (s, l, d) = (self.cfg.tokens_per_scale, self.cfg.scales, self.cfg.seg_dim);
        let m = n_rows / (s * l);
        let mut emb = be.zeros(m * l * d);
        let inv = F::from(1.0 / s as f64).unwrap();
        for mi in 0..m {
            for li in 0..l {
                let mut acc = be.zeros(d);
                for si in 0..s {
                    let mut row = be.zeros(d);
                    be.copy_range(&mut row, 0, out, ((mi * l + li) * s + si) * d, d)?;
                    be.axpy(&mut acc, inv, &row)?;
                }
                be.copy_range(&mut emb, (mi * l + li) * d, &acc, 0, d)?;
            }
        }
        Ok(emb)
    }

    /// forward: emb[m,l] = 1/S Σ_s out[m,l,s]   so: dout[m,l,s] = demb[m,l] / S.
    pub(crate) fn average_scales_bwd(&self, demb: &B::Buf, m: usize) -> Result<B::Buf> {
        let be = &self.llava.be;
        let (s, l, d) = (self.cfg.tokens_per_scale, self.cfg.scales, self.cfg.seg_dim);
        let mut dout = be.zeros(m * l * s * d);
        let inv = F::from(1.0 / s as f64).unwrap();
        for ml in 0..m * l {
            let mut row = be.zeros(d);
            be.copy_range(&mut row, 0, demb, ml * d, d)?;
            be.scale(&mut row, inv);
            for si in 0..s {
                be.copy_range(&mut dout, (ml * s + si) * d, &row, 0, d)?;
            }
        }
        Ok(dout)
    }

    /// (BCE, Dice) of each `(logits, target)` pair: the masks of one pixel count side by
    /// side in one launch, so a batch makes one read-back per image size, not per mask.
    fn mask_losses(&self, per_mask: &[(&B::Buf, &B::Buf)]) -> Result<Vec<(f64, f64)>> {
        let be = &self.llava.be;
        let mut by_size: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (i, (lg, _)) in per_mask.iter().enumerate() {
            by_size.entry(be.len(lg)).or_default().push(i);
        }
        let mut out = vec![(f64::NAN, f64::NAN); per_mask.len()];
        for (p, idx) in by_size {
            let (mut lg, mut tg) = (be.zeros(idx.len() * p), be.zeros(idx.len() * p));
            for (j, &i) in idx.iter().enumerate() {
                be.copy_range(&mut lg, j * p, per_mask[i].0, 0, p)?;
                be.copy_range(&mut tg, j * p, per_mask[i].1, 0, p)?;
            }
            let r = be.mask_loss_fwd(&lg, &tg, idx.len(), p)?;
            for (&i, (bce, dice)) in idx.iter().zip(r) {
                out[i] = (
                    bce.to_f64().unwrap_or(f64::NAN),
                    dice.to_f64().unwrap_or(f64::NAN),
                );
            }
        }
        Ok(out)
    }

    /// [`LossWeights::instance_matching`]: within each set of alike targets
    /// ([`super::matching::alike_sets`] of an example's categories), the masks take the
    /// permutation of the set's targets with the least `w.bce·BCE + w.dice·Dice`; the
    /// pass's targets and mask losses are replaced by the permuted ones, so the
    /// backward follows.  One launch per image size scores every pair of every set that
    /// the forward pass did not (a mask against another target of its set).
    fn match_instances(
        &self,
        batch: &[Example],
        pass: &mut TrainPass<B::Buf>,
        w: LossWeights,
    ) -> Result<()> {
        let Some(sa) = pass.acts.seg.as_mut() else {
            return Ok(());
        };
        let mut sets: Vec<Vec<usize>> = Vec::new();
        let mut first = 0;
        for (i, ex) in batch.iter().enumerate() {
            if ex.masks.is_empty() {
                continue;
            }
            if !ex.categories.is_empty() && ex.categories.len() != ex.masks.len() {
                return Err(Error::arg(
                    "SegModel::step",
                    format!(
                        "example {i} has {} masks but {} target categories",
                        ex.masks.len(),
                        ex.categories.len()
                    ),
                ));
            }
            for set in super::matching::alike_sets(&ex.categories) {
                sets.push(set.into_iter().map(|j| first + j).collect());
            }
            first += ex.masks.len();
        }
        if sets.is_empty() {
            return Ok(());
        }
        // the pairs off the diagonal: the forward pass scored each mask's own target
        let pm = &sa.per_mask;
        let pairs: Vec<(&B::Buf, &B::Buf)> = sets
            .iter()
            .flat_map(|s| {
                s.iter().flat_map(move |&i| {
                    s.iter()
                        .filter(move |&&j| j != i)
                        .map(move |&j| (&pm[i].0, &pm[j].1))
                })
            })
            .collect();
        let mut off_diagonal = self.mask_losses(&pairs)?.into_iter();
        for s in &sets {
            let n = s.len();
            let mut pair = Vec::with_capacity(n * n);
            for &i in s {
                for &j in s {
                    pair.push(if j == i {
                        pass.mask_losses[i]
                    } else {
                        off_diagonal
                            .next()
                            .ok_or_else(|| Error::arg("SegModel::step", "a pair loss is missing"))?
                    });
                }
            }
            let cost: Vec<f64> = pair
                .iter()
                .map(|(b, d)| w.bce as f64 * b + w.dice as f64 * d)
                .collect();
            let perm = super::matching::min_cost_assignment(&cost, n)?;
            let targets: Vec<B::Buf> = perm.iter().map(|&p| sa.per_mask[s[p]].1.clone()).collect();
            for ((k, &i), tgt) in s.iter().enumerate().zip(targets) {
                sa.per_mask[i].1 = tgt;
                pass.mask_losses[i] = pair[k * n + perm[k]];
            }
        }
        Ok(())
    }

    /// Logits (S·S) of one target → logits at the image's own size (H·W): crop to the
    /// valid region, resize bilinearly when the image was resized.
    pub fn to_image_logits(&self, logits: &B::Buf, off: usize, px: &Pixels) -> Result<B::Buf> {
        let be = &self.llava.be;
        let s = self.cfg.image_size;
        let (vh, vw) = (px.valid_h, px.valid_w);
        let mut crop = be.zeros(vh * vw);
        for y in 0..vh {
            be.copy_range(&mut crop, y * vw, logits, off + y * s, vw)?;
        }
        if (vh, vw) == (px.height, px.width) {
            return Ok(crop);
        }
        let mut out = be.zeros(px.height * px.width);
        be.resize_bilinear(&crop, 1, vh, vw, 1, px.height, px.width, &mut out)?;
        Ok(out)
    }

    /// Backward of [`Self::to_image_logits`], accumulated into `dlogits` at `off`.
    pub(crate) fn to_image_logits_bwd(
        &self,
        d: &B::Buf,
        off: usize,
        px: &Pixels,
        dlogits: &mut B::Buf,
    ) -> Result<()> {
        let be = &self.llava.be;
        let s = self.cfg.image_size;
        let (vh, vw) = (px.valid_h, px.valid_w);
        let dcrop = if (vh, vw) == (px.height, px.width) {
            d.clone()
        } else {
            let mut dc = be.zeros(vh * vw);
            be.resize_bilinear_bwd(d, 1, vh, vw, 1, px.height, px.width, &mut dc)?;
            dc
        };
        for y in 0..vh {
            be.copy_range(dlogits, off + y * s, &dcrop, y * vw, vw)?;
        }
        Ok(())
    }

    /// One training forward (and, with `backward`, the backward: parameter gradients
    /// accumulate, scaled by `scale`) over a batch.  Returns the batch's loss.
    ///
    /// forward: `L = w_ce·CE + w_bce·BCE + w_dice·Dice`, CE the mean over the labelled
    /// tokens of −log p, BCE and Dice the means over the masks; so the backward feeds
    /// `∂L/∂logp = −w_ce·scale/n_labels` on the labels and `w·scale/M` per mask term
    /// into [`SegModel::backward_pass`].
    pub fn step(
        &mut self,
        batch: &[Example],
        w: LossWeights,
        scale: f32,
        backward: bool,
    ) -> Result<SegLoss> {
        let mut pass = self.forward_pass(batch)?;
        if w.instance_matching {
            self.match_instances(batch, &mut pass, w)?;
        }
        let n_labels = pass.labelled.iter().filter(|&&x| x).count();
        let ce = -pass
            .logp
            .iter()
            .zip(&pass.labelled)
            .filter(|(_, &l)| l)
            .map(|(x, _)| *x)
            .sum::<f64>()
            / n_labels.max(1) as f64;
        let m = pass.mask_losses.len();
        let mf = m.max(1) as f64;
        let bce = pass.mask_losses.iter().map(|x| x.0).sum::<f64>() / mf;
        let dice = pass.mask_losses.iter().map(|x| x.1).sum::<f64>() / mf;
        let patch_class = pass.patch_loss.unwrap_or(0.0);
        let seg_class = pass.seg_class_loss.unwrap_or(0.0);
        let total = w.ce as f64 * ce
            + w.bce as f64 * bce
            + w.dice as f64 * dice
            + w.patch_class as f64 * patch_class
            + w.seg_class as f64 * seg_class;
        let loss = SegLoss {
            total,
            ce,
            bce,
            dice,
            patch_class,
            seg_class,
            n_labels,
            n_tokens: pass.n_tokens,
            n_masks: m,
        };
        if backward {
            let wl = -(w.ce as f64) * scale as f64 / n_labels.max(1) as f64;
            let dlogp: Vec<f64> = pass
                .labelled
                .iter()
                .map(|&l| if l { wl } else { 0.0 })
                .collect();
            let wm = scale as f64 / mf;
            let mask_w = (w.bce as f64 * wm, w.dice as f64 * wm);
            let class_w = (
                w.patch_class as f64 * scale as f64,
                w.seg_class as f64 * scale as f64,
            );
            self.backward_pass(batch, pass, &dlogp, mask_w, None, class_w)?;
        }
        Ok(loss)
    }

    /// The training forward without a loss: each position's next-token log-prob and
    /// each mask's BCE and Dice, for an objective of the caller's (stage 2 weighs the
    /// answer tokens of two responses against each other).  An example with no masks
    /// is text only: its `<seg>` groups are not decoded.
    pub fn forward_pass(&self, batch: &[Example]) -> Result<TrainPass<B::Buf>> {
        self.forward_train(batch)
    }

    fn forward_train(&self, batch: &[Example]) -> Result<TrainPass<B::Buf>> {
        let be = self.llava.be.clone();
        let op = "SegModel::step";
        let b = batch.len();
        if b == 0 {
            return Err(Error::arg(op, "empty batch"));
        }
        let idx = self.state_indices()?;
        let upto = idx.iter().copied().max().unwrap_or(0);
        let k = self.tokens_per_image();
        let hdim = self.llava.cfg.text.hidden_size;
        let v = self.llava.cfg.text.vocab_size;
        let g = self.cfg.group_len();
        for (i, ex) in batch.iter().enumerate() {
            if !ex.masks.is_empty() && ex.masks.len() != ex.enc.groups.len() {
                return Err(Error::arg(
                    op,
                    format!(
                        "example {i}: {} masks for {} <seg> groups",
                        ex.masks.len(),
                        ex.enc.groups.len()
                    ),
                ));
            }
            for (j, m) in ex.masks.iter().enumerate() {
                crate::error::check_len(
                    op,
                    &format!("example {i} mask {j}"),
                    m.len(),
                    ex.pixels.height * ex.pixels.width,
                )?;
            }
        }
        // vision
        let px: Vec<&Pixels> = batch.iter().map(|e| &e.pixels).collect();
        let pixels = self.stack_pixels(&px)?;
        let (hs, vision) = self.llava.vision_tower.forward_train(&pixels, b, upto)?;
        // decoder level 0's patches: the pixel decoder's and the patch head's input
        let f0 = self.patches_of(&hs[idx[1]], b)?;
        let (patch_loss, patch) = self.patch_forward(batch, &f0)?.unzip();
        let (img, proj) = self
            .llava
            .projector
            .forward(&be, &self.patches_of(&hs[idx[0]], b)?)?; // (B·K, H)
                                                               // tokens: expanded, right-padded with EOS (causal attention never looks right)
        let rows: Vec<Vec<u32>> = batch.iter().map(|e| self.expand_ids(&e.enc)).collect();
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if t > self.llava.cfg.text.max_position_embeddings {
            return Err(Error::arg(
                op,
                format!(
                    "a sequence of {t} tokens ({k} of them image tokens) is longer than the \
                     context of {}",
                    self.llava.cfg.text.max_position_embeddings
                ),
            ));
        }
        let pad = batch[0].enc.ids.last().copied().unwrap_or(0);
        let mut ids = Vec::with_capacity(b * t);
        let mut targets = vec![IGNORE_INDEX; b * t];
        let mut label_w = vec![false; b * t];
        let mut image_rows = Vec::with_capacity(b * k);
        let mut gather_rows = Vec::new();
        let mut answer_rows = Vec::with_capacity(b);
        let mut n_tokens = 0;
        for (r, (row, ex)) in rows.iter().zip(batch).enumerate() {
            n_tokens += row.len();
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(pad, t - row.len()));
            let shift = k - 1; // positions after the image token move by K − 1
            for p in ex.enc.answer_start + shift..row.len() {
                // position p − 1 predicts token p
                targets[r * t + p - 1] = row[p] as i32;
                label_w[r * t + p - 1] = true;
            }
            image_rows.extend((0..k).map(|j| r * t + ex.enc.image_pos + j));
            answer_rows.push(
                (ex.enc.answer_start + shift..row.len())
                    .map(|p| r * t + p - 1)
                    .collect(),
            );
            // a text-only example (no masks) decodes none of its groups
            let groups: &[usize] = if ex.masks.is_empty() {
                &[]
            } else {
                &ex.enc.groups
            };
            for &g0 in groups {
                for j in 0..g {
                    gather_rows.push((r * t + g0 + shift + j - 1) as u32);
                }
            }
        }
        if let Some(&bad) = targets.iter().find(|&&x| x >= 0 && x as usize >= v) {
            return Err(Error::arg(
                op,
                format!("token {bad} is outside the vocabulary of {v}"),
            ));
        }
        let mut x = self.llava.language_model.embed(&ids)?;
        for (j, &row) in image_rows.iter().enumerate() {
            be.copy_range(&mut x, row * hdim, &img, j * hdim, hdim)?;
        }
        let (logits, llm) = self
            .llava
            .language_model
            .forward_embeds(x, b, t, None, None, None)?;
        // the log-prob of every next token
        let (mut logp, mut lse) = (be.zeros(b * t), be.zeros(b * t));
        be.logprob_fwd(&logits, &targets, v, &mut logp, &mut lse)?;
        let lp: Vec<f64> = be
            .to_vec(&logp)
            .iter()
            .map(|x| x.to_f64().unwrap_or(f64::NAN))
            .collect();
        // masks
        let m = gather_rows.len() / g;
        let img_of: Vec<usize> = batch
            .iter()
            .enumerate()
            .flat_map(|(r, e)| std::iter::repeat_n(r, e.masks.len()))
            .collect();
        let mut mask_losses = Vec::with_capacity(m);
        let (mut seg_class_loss, mut seg_class) = (None, None);
        let seg = if m > 0 {
            let (emb, head) = self.seg_embeddings(&llm.hidden, &gather_rows)?;
            (seg_class_loss, seg_class) = self.seg_class_forward(batch, &emb)?.unzip();
            let f1 = self.patches_of(&hs[idx[2]], b)?;
            let s = self.cfg.image_size;
            let images = DecoderImages {
                levels: [&f0, &f1],
                pixels: Some(&pixels),
                b,
            };
            let (dl, dec) = self.decoder.forward(images, &emb, &img_of, s, s)?;
            // every target in one upload, then each mask's logits at its image's size
            let all: Vec<F> = batch
                .iter()
                .flat_map(|ex| ex.masks.iter().flatten())
                .map(|&x| F::from(x).unwrap_or_else(F::nan))
                .collect();
            let all = be.from_slice(&all);
            let (mut mi, mut off) = (0, 0);
            let mut per_mask = Vec::with_capacity(m);
            for ex in batch {
                for mask in &ex.masks {
                    let lg = self.to_image_logits(&dl, mi * s * s, &ex.pixels)?;
                    crate::error::check_len(
                        "SegModel::forward_pass",
                        "mask",
                        mask.len(),
                        be.len(&lg),
                    )?;
                    let mut tgt = be.zeros(mask.len());
                    be.copy_range(&mut tgt, 0, &all, off, mask.len())?;
                    per_mask.push((lg, tgt));
                    (mi, off) = (mi + 1, off + mask.len());
                }
            }
            mask_losses =
                self.mask_losses(&per_mask.iter().map(|(l, t)| (l, t)).collect::<Vec<_>>())?;
            Some(SegActs {
                emb,
                head,
                dec,
                per_mask,
            })
        } else {
            None
        };
        Ok(TrainPass {
            logp: lp,
            labelled: label_w,
            answer_rows,
            mask_losses,
            patch_loss,
            seg_class_loss,
            n_tokens,
            acts: StepActs {
                b,
                t,
                ids,
                image_rows,
                vision,
                n_states: upto + 1,
                proj,
                llm,
                logits,
                targets,
                lse,
                gather_rows,
                seg,
                patch,
                seg_class,
                idx,
            },
        })
    }

    /// The backward of [`SegModel::forward_pass`] for a loss `L` given by its gradient:
    /// `dlogp` = ∂L/∂logp per position (b·t; zero where not labelled), `mask_w` =
    /// (∂L/∂BCE_m, ∂L/∂Dice_m), the same for every mask, and `d_emb` = ∂L/∂f for the
    /// segmentation embeddings (M, L·D, as [`TrainPass::seg_embeddings`]; stage 2's
    /// `Ls`), and `class_w` = ∂L/∂ of the patch-category and the seg-category losses
    /// ((0, 0) when the objective has no such term).  Parameter gradients accumulate.
    pub fn backward_pass(
        &mut self,
        batch: &[Example],
        pass: TrainPass<B::Buf>,
        dlogp: &[f64],
        mask_w: (f64, f64),
        d_emb: Option<&[f64]>,
        class_w: (f64, f64),
    ) -> Result<()> {
        let a = pass.acts;
        let be = self.llava.be.clone();
        let hdim = self.llava.cfg.text.hidden_size;
        let v = self.llava.cfg.text.vocab_size;
        let s = self.cfg.image_size;
        let (b, t) = (a.b, a.t);
        crate::error::check_len("SegModel::backward_pass", "dlogp", dlogp.len(), b * t)?;
        let m = pass.mask_losses.len();
        if a.seg.is_none() && d_emb.is_some_and(|d| !d.is_empty()) {
            return Err(Error::arg(
                "SegModel::backward_pass",
                "a gradient for segmentation embeddings, but the batch decoded no mask",
            ));
        }
        let mut dhidden = be.zeros(b * t * hdim);
        let mut dfeats = None;
        if let Some(sa) = &a.seg {
            // ∂L/∂bce_m and ∂L/∂dice_m for every mask
            let mut dlogits_mask = be.zeros(m * s * s);
            let (wb, wd) = (F::from(mask_w.0).unwrap(), F::from(mask_w.1).unwrap());
            let masks = batch
                .iter()
                .flat_map(|ex| ex.masks.iter().map(move |mk| (ex, mk.len())));
            for (mi, ((ex, p), (lg, tgt))) in masks.zip(&sa.per_mask).enumerate() {
                let mut d = be.zeros(p);
                be.mask_loss_bwd(lg, tgt, 1, p, wb, wd, &mut d)?;
                self.to_image_logits_bwd(&d, mi * s * s, &ex.pixels, &mut dlogits_mask)?;
            }
            // decoder → codebook embeddings → the hidden states that predicted them
            let (df, mut demb) = self.decoder.backward(&sa.dec, &dlogits_mask)?;
            if let Some(de) = d_emb {
                crate::error::check_len(
                    "SegModel::backward_pass",
                    "d_emb",
                    de.len(),
                    be.len(&demb),
                )?;
                let de: Vec<F> = de.iter().map(|&x| F::from(x).unwrap()).collect();
                be.axpy(&mut demb, F::one(), &be.from_slice(&de))?;
            }
            if let (Some(ca), Some(head)) = (&a.seg_class, &mut self.seg_class_head) {
                if class_w.1 != 0.0 {
                    let d = super::category::backward(&be, head, ca, class_w.1)?;
                    be.axpy(&mut demb, F::one(), &d)?;
                }
            }
            let dout = self.average_scales_bwd(&demb, m)?;
            let dg = self.seg_head.backward(&be, &sa.head, &dout)?;
            be.embedding_bwd(&a.gather_rows, &dg, hdim, &mut dhidden)?;
            dfeats = Some(df);
        }
        let dlogp: Vec<F> = dlogp.iter().map(|&x| F::from(x).unwrap()).collect();
        let dlogp = be.from_slice(&dlogp);
        let mut dlogits = be.zeros(b * t * v);
        be.logprob_bwd(&a.logits, &a.targets, v, &a.lse, &dlogp, &mut dlogits)?;
        let lm = &mut self.llava.language_model;
        let mut dx = lm.backward_with_hidden(&a.llm, &dlogits, Some(&dhidden))?; // (B·T, H)
                                                                                 // image positions: their gradient goes to the projector, not to a token row
        let mut dimg = be.zeros(a.image_rows.len() * hdim);
        let zero = be.zeros(hdim);
        for (j, &row) in a.image_rows.iter().enumerate() {
            be.copy_range(&mut dimg, j * hdim, &dx, row * hdim, hdim)?;
            be.copy_range(&mut dx, row * hdim, &zero, 0, hdim)?;
        }
        lm.embed_tokens.backward(&be, &a.ids, &dx)?;
        let proj_trains = self.llava.projector.fc1.weight.grad.is_some();
        let vision_trains = self.vision_trains();
        if !(proj_trains || vision_trains) {
            return Ok(());
        }
        let dfeat_llm = self.llava.projector.backward(&be, &a.proj, &dimg)?; // (B·K, Cv)
        if !vision_trains {
            return Ok(());
        }
        let mut dstates: Vec<Option<B::Buf>> = vec![None; a.n_states];
        let mut add = |i: usize, d: B::Buf| -> Result<()> {
            match &mut dstates[i] {
                Some(x) => be.axpy(x, F::one(), &d),
                slot @ None => {
                    *slot = Some(d);
                    Ok(())
                }
            }
        };
        add(a.idx[0], self.unpatches(&dfeat_llm, b)?)?;
        if let Some([d0, d1]) = dfeats {
            add(a.idx[1], self.unpatches(&d0, b)?)?;
            add(a.idx[2], self.unpatches(&d1, b)?)?;
        }
        if let (Some(pa), Some(head)) = (&a.patch, &mut self.patch_head) {
            if class_w.0 != 0.0 {
                let dx = super::category::backward(&be, head, pa, class_w.0)?;
                add(a.idx[1], self.unpatches(&dx, b)?)?;
            }
        }
        self.llava.vision_tower.backward(&a.vision, &dstates)?;
        Ok(())
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
