//! CLIP vision tower (`CLIPVisionModel`): patch embedding (a conv without bias), a
//! learned class token, learned absolute positions, `pre_layrnorm` (sic, the HF
//! spelling), pre-LN encoder blocks with quick-GELU MLPs, and `post_layernorm` applied to
//! the class token only (the pooled output).  A tower whose config asks for it
//! (`popen_stem_channels`, ours) adds a convolutional stem's output to the patch
//! embedding ([`super::stem`]); no Hugging Face CLIP has one.
//!
//! Hidden states are numbered as HF numbers them: state 0 is the embedding output
//! after `pre_layrnorm`, state i is the output of block i, so the last state is
//! `last_hidden_state` and state L−1 is the "penultimate" one LLaVA reads.
//!
//! B batch, C hidden size, P patch size, NP patches, S = NP + 1 positions, I MLP size.
use super::config::ClipVisionConfig;
use super::io::StDtype;
use super::stem::{ConvStem, StemActs};
use super::weights::{save_params, Checkpoint};
use crate::backend::{Backend, Cpu, RowCopy};
use crate::error::{Error, Result};
use crate::nn::attention::AttnActs;
use crate::nn::layers::ImageShape;
use crate::nn::layers::{MlpActs, NormStats};
use crate::nn::{Attention, AttnCtx, Embedding, LayerNorm, Mlp, PatchEmbed, Tensor};
use num_traits::Float;
use std::path::Path;

/// Tensor name prefixes of a CLIP vision tower: inside a `CLIPModel` / published
/// `CLIPVisionModel` checkpoint (`vision_model.`), or bare as transformers 5 saves a
/// `CLIPVisionModel`.
pub const CLIP_PREFIXES: &[&str] = &["vision_model.", ""];
/// A tensor every CLIP vision checkpoint has, to find the prefix by.
pub const CLIP_MARKER: &str = "embeddings.class_embedding";

/// One pre-LN encoder block: `x += attn(ln1(x)); x += mlp(ln2(x))`.
#[derive(Clone, Debug)]
pub struct ClipLayer<F: Float = f32, B: Backend<F> = Cpu> {
    /// LayerNorm before attention (ln1).
    pub layer_norm1: LayerNorm<F, B>,
    /// Bidirectional self-attention with biases (`self_attn.{q,k,v,out}_proj`).
    pub self_attn: Attention<F, B>,
    /// LayerNorm before the MLP (ln2).
    pub layer_norm2: LayerNorm<F, B>,
    /// `mlp.fc1` (C → I) and `mlp.fc2` (I → C), with `hidden_act` between.
    pub mlp: Mlp<F, B>,
}

/// `CLIPVisionModel`.
#[derive(Clone, Debug)]
pub struct ClipVision<F: Float = f32, B: Backend<F> = Cpu> {
    /// Sizes and hyper-parameters (HF `vision_config`).
    pub cfg: ClipVisionConfig,
    /// Backend that holds the weights and runs the forward pass.
    pub be: B,
    /// Prefix of the tower's tensor names in the checkpoint it came from (`vision_model.`
    /// or empty); [`ClipVision::save_weights`] writes the same names.
    pub prefix: String,
    /// (C)
    pub class_embedding: Tensor<F, B>,
    /// conv weight (C, CH, P, P), no bias
    pub patch_embedding: PatchEmbed<F, B>,
    /// The convolutional stem added to the patch embedding (ours; `cfg.stem_channels`
    /// above 0), listed as `embeddings.stem.*`.
    pub stem: Option<ConvStem<F, B>>,
    /// (S, C)
    pub position_embedding: Embedding<F, B>,
    /// LayerNorm on the embeddings (class token + patches + positions); gives state 0.
    pub pre_layrnorm: LayerNorm<F, B>,
    /// `encoder.layers.{i}`, `num_hidden_layers` (L) of them.
    pub layers: Vec<ClipLayer<F, B>>,
    /// LayerNorm on the class token of state L; gives the pooled output.
    pub post_layernorm: LayerNorm<F, B>,
}

/// Outputs of [`ClipVision::forward`]; buffers are row-major.
#[derive(Clone, Debug)]
pub struct ClipOutput<Buf> {
    /// Batch size B.
    pub b: usize,
    /// hidden states 0..=upto, each (B, S, C)
    pub hidden_states: Vec<Buf>,
    /// post_layernorm(state L [:, 0]) (B, C); None when the forward stopped early
    pub pooler_output: Option<Buf>,
}

impl<F: Float, B: Backend<F>> ClipVision<F, B> {
    /// Zero-initialised (norms at 1/0), every tensor trainable; fill with
    /// [`ClipVision::load`] or by name through [`ClipVision::params_mut`].  An error
    /// when the config asks for a stem its patch size cannot hold.
    pub fn new(be: B, cfg: ClipVisionConfig) -> Result<Self> {
        let (c, eps) = (cfg.hidden_size, cfg.layer_norm_eps as f32);
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| ClipLayer {
                layer_norm1: LayerNorm::new(&be, c, eps),
                self_attn: Attention::new(
                    &be,
                    c,
                    cfg.num_attention_heads,
                    cfg.num_attention_heads,
                    cfg.head_dim(),
                    true,
                    None,
                    false,
                ),
                layer_norm2: LayerNorm::new(&be, c, eps),
                mlp: Mlp::new(&be, c, cfg.intermediate_size, cfg.hidden_act.into(), true),
            })
            .collect();
        let stem = match cfg.stem_channels {
            0 => None,
            c1 => Some(ConvStem::new(&be, cfg.num_channels, c1, c, cfg.patch_size)?),
        };
        Ok(ClipVision {
            class_embedding: Tensor::zeros(&be, &[c]),
            patch_embedding: PatchEmbed::new(&be, cfg.num_channels, c, cfg.patch_size, false),
            stem,
            position_embedding: Embedding::new(&be, cfg.num_positions(), c),
            pre_layrnorm: LayerNorm::new(&be, c, eps),
            post_layernorm: LayerNorm::new(&be, c, eps),
            layers,
            cfg,
            be,
            prefix: String::new(),
        })
    }

    /// Every parameter with its HF name relative to the tower (`embeddings.…`,
    /// `encoder.layers.i.…`, `pre_layrnorm.…`, `post_layernorm.…`), in a fixed order.
    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor<F, B>)> {
        let mut out: Vec<(String, &mut Tensor<F, B>)> = vec![
            (
                "embeddings.class_embedding".into(),
                &mut self.class_embedding,
            ),
            (
                "embeddings.patch_embedding.weight".into(),
                &mut self.patch_embedding.weight,
            ),
            (
                "embeddings.position_embedding.weight".into(),
                &mut self.position_embedding.weight,
            ),
            ("pre_layrnorm.weight".into(), &mut self.pre_layrnorm.weight),
            ("pre_layrnorm.bias".into(), &mut self.pre_layrnorm.bias),
        ];
        if let Some(stem) = &mut self.stem {
            for (n, t) in stem.params_mut() {
                out.push((format!("embeddings.stem.{n}"), t));
            }
        }
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("encoder.layers.{i}");
            let a = &mut l.self_attn;
            for (n, lin) in [
                ("q_proj", &mut a.q),
                ("k_proj", &mut a.k),
                ("v_proj", &mut a.v),
                ("out_proj", &mut a.o),
            ] {
                out.push((format!("{p}.self_attn.{n}.weight"), &mut lin.weight));
                if let Some(b) = &mut lin.bias {
                    out.push((format!("{p}.self_attn.{n}.bias"), b));
                }
            }
            out.push((format!("{p}.layer_norm1.weight"), &mut l.layer_norm1.weight));
            out.push((format!("{p}.layer_norm1.bias"), &mut l.layer_norm1.bias));
            for (n, lin) in [("fc1", &mut l.mlp.fc1), ("fc2", &mut l.mlp.fc2)] {
                out.push((format!("{p}.mlp.{n}.weight"), &mut lin.weight));
                if let Some(b) = &mut lin.bias {
                    out.push((format!("{p}.mlp.{n}.bias"), b));
                }
            }
            out.push((format!("{p}.layer_norm2.weight"), &mut l.layer_norm2.weight));
            out.push((format!("{p}.layer_norm2.bias"), &mut l.layer_norm2.bias));
        }
        out.push((
            "post_layernorm.weight".into(),
            &mut self.post_layernorm.weight,
        ));
        out.push(("post_layernorm.bias".into(), &mut self.post_layernorm.bias));
        out
    }

    /// Freeze (`false`) or unfreeze every parameter.
    pub fn set_trainable(&mut self, trainable: bool) {
        let be = self.be.clone();
        for (_, t) in self.params_mut() {
            t.set_trainable(&be, trainable);
        }
    }

    /// A tower filled from `ck`, whose tensor names start with `prefix`; frozen.
    pub fn load(be: B, cfg: ClipVisionConfig, ck: &Checkpoint, prefix: &str) -> Result<Self> {
        let mut m = Self::new(be.clone(), cfg)?;
        m.prefix = prefix.to_string();
        m.set_trainable(false);
        ck.load_params(&be, m.params_mut(), |n| format!("{prefix}{n}"))?;
        Ok(m)
    }

    /// Writes every parameter to one safetensors file, named `prefix + HF name`.
    pub fn save_weights(&mut self, path: impl AsRef<Path>, dtype: StDtype) -> Result<()> {
        let (be, prefix) = (self.be.clone(), self.prefix.clone());
        let params: Vec<(String, &Tensor<F, B>)> = self
            .params_mut()
            .into_iter()
            .map(|(n, t)| (n, &*t))
            .collect();
        save_params(&be, path, params, |n| format!("{prefix}{n}"), dtype)
    }

    /// pixels (B, CH, H, W) → hidden states 0..=`upto` (at most L) and, when `upto` is
    /// L, the pooled output.  H and W must equal `image_size`: the position table has
    /// one row per patch of that size.
    pub fn forward(&self, pixels: &B::Buf, b: usize, upto: usize) -> Result<ClipOutput<B::Buf>> {
        let be = &self.be;
        let cfg = &self.cfg;
        let (c, s) = (cfg.hidden_size, cfg.num_positions());
        let (ch, hw) = (cfg.num_channels, cfg.image_size);
        let n_layers = self.layers.len();
        if upto > n_layers {
            return Err(Error::arg(
                "ClipVision::forward",
                format!("hidden state {upto} asked of a tower with {n_layers} layers"),
            ));
        }
        if b == 0 || be.len(pixels) != b * ch * hw * hw {
            return Err(Error::shape(
                "ClipVision::forward",
                format!(
                    "pixel buffer of {} values is not (B={b}, {ch}, {hw}, {hw}) \
                     (num_channels, image_size from the config)",
                    be.len(pixels)
                ),
            ));
        }
        // embeddings: x[b, 0] = class, x[b, 1 + p] = patch p; then + positions
        let img = ImageShape { b, h: hw, w: hw };
        let (_, mut patches) = self.patch_embedding.forward(be, pixels, img)?; // (B, NP, C)
        if let Some(stem) = &self.stem {
            be.axpy(&mut patches, F::one(), &stem.forward(be, pixels, img)?.0)?;
        }
        let x = self.embed(&patches, b)?; // (B, S, C)
        let (mut x, _) = self.pre_layrnorm.forward(be, &x)?;
        let ctx = AttnCtx {
            b,
            t: s,
            pos0: 0,
            bias: None,
            key_mask: None,
        };
        let mut hidden_states = vec![x.clone()];
        for l in &self.layers[..upto] {
            let (h, _) = l.layer_norm1.forward(be, &x)?;
            let (a, _) = l.self_attn.forward(be, h, &ctx, None)?;
            let (xm, h, _) = l.layer_norm2.forward_added(be, &x, &a)?;
            x = xm;
            let (m, _) = l.mlp.forward(be, h)?;
            be.axpy(&mut x, F::one(), &m)?;
            hidden_states.push(x.clone());
        }
        let pooler_output = if upto == n_layers {
            let mut cls = be.zeros(b * c);
            for bi in 0..b {
                be.copy_range(&mut cls, bi * c, &x, bi * s * c, c)?;
            }
            Some(self.post_layernorm.forward(be, &cls)?.0)
        } else {
            None
        };
        Ok(ClipOutput {
            b,
            hidden_states,
            pooler_output,
        })
    }
}

/// What one encoder block's training forward saves.
#[derive(Clone, Debug)]
pub struct ClipLayerActs<Buf> {
    x: Buf,
    st1: NormStats<Buf>,
    attn: AttnActs<Buf>,
    xm: Buf,
    st2: NormStats<Buf>,
    mlp: MlpActs<Buf>,
}

/// What [`ClipVision::forward_train`] saves for [`ClipVision::backward`].
#[derive(Clone, Debug)]
pub struct ClipActs<Buf> {
    b: usize,
    /// patchified pixels (B·NP, CH·P·P)
    patches: Buf,
    /// the stem's activations, when the tower has one
    stem: Option<StemActs<Buf>>,
    /// class + patches + positions (B, S, C), the input of `pre_layrnorm`
    x0: Buf,
    st0: NormStats<Buf>,
    layers: Vec<ClipLayerActs<Buf>>,
    /// the last hidden state (B, S, C), the output of block `upto − 1`
    out: Buf,
}

impl<Buf> ClipActs<Buf> {
    /// Hidden state `i` (B, S, C), i ≤ `upto` of the forward: the input of block i (which
    /// its activations keep), or the last block's output; None past `upto`.
    pub fn hidden_state(&self, i: usize) -> Option<&Buf> {
        match self.layers.get(i) {
            Some(l) => Some(&l.x),
            None => (i == self.layers.len()).then_some(&self.out),
        }
    }
}

impl<F: Float, B: Backend<F>> ClipVision<F, B> {
    /// N(0, 0.02²) weights and class/position embeddings, unit norms, zero biases:
    /// a tower trained from scratch (the tiny default) starts here.
    pub fn init_random(&mut self, seed: u64) {
        let be = self.be.clone();
        let mut rng = crate::nn::Rng::new(seed);
        for (name, t) in self.params_mut() {
            // every norm stays at its unit weight (CLIP spells them `pre_layrnorm`,
            // `layer_norm1`/`2` and `post_layernorm`)
            if name.ends_with(".bias") || name.contains("norm") {
                continue;
            }
            t.data = be.from_slice(&crate::nn::randn::<F>(&mut rng, t.numel(), 0.02));
        }
    }

    /// Training forward through blocks 0..`upto`: the activations the backward needs,
    /// which hold hidden states 0..=`upto` ([`ClipActs::hidden_state`]).  Same
    /// arithmetic as [`ClipVision::forward`].
    pub fn forward_train(
        &self,
        pixels: &B::Buf,
        b: usize,
        upto: usize,
    ) -> Result<ClipActs<B::Buf>> {
        let be = &self.be;
        let cfg = &self.cfg;
        let (ch, hw) = (cfg.num_channels, cfg.image_size);
        if upto > self.layers.len() {
            return Err(Error::arg(
                "ClipVision::forward_train",
                format!("hidden state {upto} of a {}-layer tower", self.layers.len()),
            ));
        }
        if b == 0 || be.len(pixels) != b * ch * hw * hw {
            return Err(Error::shape(
                "ClipVision::forward_train",
                format!(
                    "pixel buffer of {} values is not (B={b}, {ch}, {hw}, {hw})",
                    be.len(pixels)
                ),
            ));
        }
        let img = ImageShape { b, h: hw, w: hw };
        let (patches, mut pe) = self.patch_embedding.forward(be, pixels, img)?; // (B, NP, C)
        let stem = match &self.stem {
            Some(stem) => {
                let (y, acts) = stem.forward(be, pixels, img)?;
                be.axpy(&mut pe, F::one(), &y)?;
                Some(acts)
            }
            None => None,
        };
        let x = self.embed(&pe, b)?;
        let x0 = x;
        let (mut x, st0) = self.pre_layrnorm.forward(be, &x0)?;
        let ctx = self.ctx(b);
        let mut layers = Vec::with_capacity(upto);
        for l in &self.layers[..upto] {
            let (ln1, st1) = l.layer_norm1.forward(be, &x)?;
            let (a, attn) = l.self_attn.forward(be, ln1, &ctx, None)?;
            let (xm, ln2, st2) = l.layer_norm2.forward_added(be, &x, &a)?;
            let (m, mlp) = l.mlp.forward(be, ln2)?;
            let xo = be.add_new(&[&xm, &m])?;
            layers.push(ClipLayerActs {
                x,
                st1,
                attn,
                xm,
                st2,
                mlp,
            });
            x = xo;
        }
        Ok(ClipActs {
            b,
            patches,
            stem,
            x0,
            st0,
            layers,
            out: x,
        })
    }

    /// The embeddings x0 (B, S, C) of patch embeddings pe (B, NP, C): row 0 of each
    /// image its class embedding, rows 1.. its patches, every row plus its position's
    /// embedding (a row-broadcast bias over the images).
    fn embed(&self, pe: &B::Buf, b: usize) -> Result<B::Buf> {
        let be = &self.be;
        let (c, s, np) = (
            self.cfg.hidden_size,
            self.cfg.num_positions(),
            self.cfg.num_patches(),
        );
        let mut x = be.uninit(b * s * c);
        let image = |width, off, src_stride| RowCopy {
            rows: b,
            width,
            dst_off: off,
            dst_stride: s * c,
            src_off: 0,
            src_stride,
        };
        // one class row for every image: a source stride of 0
        be.copy_rows(&mut x, &self.class_embedding.data, image(c, 0, 0))?;
        be.copy_rows(&mut x, pe, image(np * c, c, np * c))?;
        be.add_bias(&mut x, &self.position_embedding.weight.data, s * c)?;
        Ok(x)
    }

    fn ctx<'a>(&self, b: usize) -> AttnCtx<'a, B::Buf> {
        AttnCtx {
            b,
            t: self.cfg.num_positions(),
            pos0: 0,
            bias: None,
            key_mask: None,
        }
    }

    /// Backward from the gradients of the hidden states `dhidden[i]` (state i, (B, S, C);
    /// `None` = no gradient reaches that state).  Parameter gradients accumulate; the
    /// pixels get none (images are inputs).
    pub fn backward(&mut self, acts: &ClipActs<B::Buf>, dhidden: &[Option<B::Buf>]) -> Result<()> {
        let be = self.be.clone();
        let upto = acts.layers.len();
        if dhidden.len() != upto + 1 {
            return Err(Error::shape(
                "ClipVision::backward",
                format!(
                    "{} hidden-state gradients for {} states",
                    dhidden.len(),
                    upto + 1
                ),
            ));
        }
        let (c, s, np) = (
            self.cfg.hidden_size,
            self.cfg.num_positions(),
            self.cfg.num_patches(),
        );
        let b = acts.b;
        let n = b * s * c;
        let mut dx = match &dhidden[upto] {
            Some(d) => d.clone(),
            None => be.zeros(n),
        };
        let ctx = self.ctx(b);
        for (i, (l, la)) in self.layers[..upto]
            .iter_mut()
            .zip(&acts.layers)
            .enumerate()
            .rev()
        {
            // forward: xo = xm + mlp(ln2(xm))
            let dln2 = l.mlp.backward(&be, &la.mlp, &dx)?;
            let d = l.layer_norm2.backward(&be, &la.xm, &la.st2, &dln2)?;
            be.axpy(&mut dx, F::one(), &d)?;
            // forward: xm = x + attn(ln1(x))
            let (dln1, _) = l.self_attn.backward(&be, &la.attn, &ctx, &dx, false)?;
            let d = l.layer_norm1.backward(&be, &la.x, &la.st1, &dln1)?;
            // state i (the input of block i) may feed a reader too
            match &dhidden[i] {
                Some(dh) => be.add_into(&mut dx, &[&d, dh])?,
                None => be.add_into(&mut dx, &[&d])?,
            }
        }
        // forward: state 0 = pre_layrnorm(x0)
        let dx0 = self.pre_layrnorm.backward(&be, &acts.x0, &acts.st0, &dx)?;
        // forward: x0[b,0] = class + pos[0], x0[b,1+p] = patch[b,p] + pos[1+p]
        // so: dpos += Σ_b dx0[b], dclass += Σ_b dx0[b,0], dpatch[b,p] = dx0[b,1+p]
        let rows = |width, src_off| RowCopy {
            rows: b,
            width,
            dst_off: 0,
            dst_stride: width,
            src_off,
            src_stride: s * c,
        };
        if let Some(g) = &mut self.position_embedding.weight.grad {
            be.bias_bwd(&dx0, g, s * c)?;
        }
        if let Some(g) = &mut self.class_embedding.grad {
            let mut cls = be.uninit(b * c);
            be.copy_rows(&mut cls, &dx0, rows(c, 0))?;
            be.bias_bwd(&cls, g, c)?;
        }
        let mut dpe = be.uninit(b * np * c);
        be.copy_rows(&mut dpe, &dx0, rows(np * c, c))?;
        let hw = self.cfg.image_size;
        let img = ImageShape { b, h: hw, w: hw };
        self.patch_embedding
            .backward(&be, &acts.patches, &dpe, img, false)?;
        // forward: patch[b,p] = patch_embedding + stem (both of the pixels)
        if let (Some(stem), Some(sa)) = (&mut self.stem, &acts.stem) {
            stem.backward(&be, sa, &dpe)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::HfAct;

    #[test]
    fn a_random_tower_starts_with_unit_norms_and_drawn_weights() {
        let cfg = ClipVisionConfig {
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_channels: 3,
            image_size: 16,
            patch_size: 8,
            layer_norm_eps: 1e-5,
            hidden_act: HfAct::QuickGelu,
            stem_channels: 4,
        };
        let mut t = ClipVision::new(Cpu, cfg).unwrap();
        t.init_random(7);
        let (mut norms, mut drawn) = (0, 0);
        for (name, p) in t.params_mut() {
            let v: Vec<f32> = p.data.clone();
            if name.ends_with(".bias") {
                assert!(v.iter().all(|&x| x == 0.0), "{name}");
            } else if name.contains("norm") {
                assert!(v.iter().all(|&x| x == 1.0), "{name}: a norm starts at 1");
                norms += 1;
            } else {
                assert!(v.iter().any(|&x| x != 0.0 && x.abs() < 0.2), "{name}");
                drawn += 1;
            }
        }
        // pre, 2 per layer, post; the stem's two
        assert_eq!(norms, 1 + 2 * 2 + 1 + 2);
        assert!(drawn > 0);
    }
}
