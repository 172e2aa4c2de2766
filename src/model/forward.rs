//! `popen forward`: run a Hugging Face model directory on named input tensors and
//! return named f32 outputs (the contract in DESIGN §7 and the README).
//!
//! Inputs: `input_ids` (I64 \[B,T\]), `attention_mask` (I64 \[B,T\] of 0/1, optional),
//! `token_type_ids` (I64 \[B,T\], optional, BERT only), `pixel_values` (float \[B,3,H,W\]).
//! Outputs by architecture: llama → `logits`, `last_hidden_state`; clip_vision_model →
//! `last_hidden_state`, `pooler_output`, `penultimate_hidden_state`; bert →
//! `last_hidden_state`, `pooler_output`; llava → `logits`.
//!
//! Every input problem is an [`Error::Data`] naming the inputs file and tensor; every
//! config problem an [`Error::Config`] naming `config.json` and the field.
use super::config::{
    BertConfig, ClipVisionConfig, HfConfig, HfLlamaConfig, LlavaConfig, ModelType,
};
use super::io::{HostTensor, IntTensor, StDtype, StFile};
use super::pretrained::Pretrained;
use crate::backend::{Backend, Cpu};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The named tensors of one inputs file.
#[derive(Clone, Debug)]
pub struct Inputs {
    /// The safetensors file read; input errors name it.
    pub path: PathBuf,
    /// Token ids, I64 (B, T); required by every architecture but the CLIP tower.
    pub input_ids: Option<IntTensor>,
    /// Key mask, I64 (B, T): 1 = token, 0 = padding; optional.
    pub attention_mask: Option<IntTensor>,
    /// Segment ids, I64 (B, T); read by BERT only, zeros when absent.
    pub token_type_ids: Option<IntTensor>,
    /// Images (B, CH, H, W), read as f32 from F32/F16/BF16; for LLaVA B counts images.
    pub pixel_values: Option<HostTensor>,
}

impl Inputs {
    /// Reads `path`; each tensor present must have its documented dtype.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let f = StFile::open(path)?;
        let int = |name: &str| -> Result<Option<IntTensor>> {
            match f.info(name) {
                None => Ok(None),
                Some((StDtype::I64, _)) => f.i64(name).map(Some),
                Some((d, _)) => Err(data_err(
                    path,
                    name,
                    format!("expected I64, got {}", d.as_str()),
                )),
            }
        };
        let pixel_values = match f.info("pixel_values") {
            None => None,
            Some((d, _)) if d.is_float() => Some(f.f32("pixel_values")?),
            Some((d, _)) => {
                return Err(data_err(
                    path,
                    "pixel_values",
                    format!("expected F32 (or F16/BF16), got {}", d.as_str()),
                ))
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            input_ids: int("input_ids")?,
            attention_mask: int("attention_mask")?,
            token_type_ids: int("token_type_ids")?,
            pixel_values,
        })
    }

    fn ids(&self, vocab: &str, vocab_size: usize) -> Result<(Vec<u32>, usize, usize)> {
        let t = self
            .input_ids
            .as_ref()
            .ok_or_else(|| data_err(&self.path, "input_ids", "missing (I64 [B,T])".into()))?;
        let (b, tl) = batch_dims(&self.path, "input_ids", &t.shape)?;
        let ids = int_values(&self.path, "input_ids", t, tl, vocab, vocab_size)?;
        Ok((ids, b, tl))
    }

    fn mask(&self, b: usize, t: usize) -> Result<Option<Vec<u8>>> {
        let Some(m) = &self.attention_mask else {
            return Ok(None);
        };
        if m.shape != [b, t] {
            return Err(data_err(
                &self.path,
                "attention_mask",
                format!("shape {:?} differs from input_ids [{b}, {t}]", m.shape),
            ));
        }
        m.data
            .iter()
            .enumerate()
            .map(|(i, &v)| match v {
                0 | 1 => Ok(v as u8),
                _ => Err(data_err(
                    &self.path,
                    "attention_mask",
                    format!("[{}, {}] = {v}: expected 0 or 1", i / t, i % t),
                )),
            })
            .collect::<Result<Vec<u8>>>()
            .map(Some)
    }

    fn pixels(
        &self,
        cfg: &ClipVisionConfig,
        config: &Path,
        prefix: &str,
    ) -> Result<(&HostTensor, usize)> {
        let p = self.pixel_values.as_ref().ok_or_else(|| {
            data_err(&self.path, "pixel_values", "missing (F32 [B,3,H,W])".into())
        })?;
        let (ch, hw) = (cfg.num_channels, cfg.image_size);
        if p.shape.len() != 4 || p.shape[0] == 0 || p.shape[1..] != [ch, hw, hw] {
            return Err(data_err(
                &self.path,
                "pixel_values",
                format!(
                    "shape {:?}, expected [B, {ch}, {hw}, {hw}] ({prefix}num_channels and \
                     {prefix}image_size in {})",
                    p.shape,
                    config.display()
                ),
            ));
        }
        if let Some(i) = p.data.iter().position(|x| !x.is_finite()) {
            return Err(data_err(
                &self.path,
                "pixel_values",
                format!("element {i} is not finite"),
            ));
        }
        Ok((p, p.shape[0]))
    }
}

fn data_err(path: &Path, field: &str, msg: String) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        field: field.to_string(),
        msg,
    }
}

/// (B, T) of a [B, T] tensor with both positive.
fn batch_dims(path: &Path, name: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape {
        [b, t] if *b > 0 && *t > 0 => Ok((*b, *t)),
        _ => Err(data_err(
            path,
            name,
            format!("shape {shape:?}, expected [B, T] with B, T > 0"),
        )),
    }
}

/// Values of an I64 [B,T] tensor as u32, each in [0, `limit`).
fn int_values(
    path: &Path,
    name: &str,
    t: &IntTensor,
    tl: usize,
    limit_field: &str,
    limit: usize,
) -> Result<Vec<u32>> {
    t.data
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if v < 0 || v as u64 >= limit as u64 {
                Err(data_err(
                    path,
                    name,
                    format!(
                        "[{}, {}] = {v} is outside [0, {limit}) ({limit_field} = {limit} in the config)",
                        i / tl,
                        i % tl
                    ),
                ))
            } else {
                Ok(v as u32)
            }
        })
        .collect()
}

fn check_len_vs_positions(inputs: &Inputs, t: usize, field: &str, max: usize) -> Result<()> {
    if t > max {
        return Err(data_err(
            &inputs.path,
            "input_ids",
            format!("a sequence of {t} tokens is longer than the position table ({field} = {max})"),
        ));
    }
    Ok(())
}

fn host(shape: Vec<usize>, data: Vec<f32>) -> Result<HostTensor> {
    HostTensor::new(shape, data)
}

/// Runs the model in `dir` on `inputs` (CPU, f32) and returns its outputs by name.
/// The inputs are checked against the config before the weights are read.
pub fn run_dir(dir: impl AsRef<Path>, inputs: &Inputs) -> Result<Vec<(String, HostTensor)>> {
    run_dir_on(Cpu, dir, inputs)
}

/// [`run_dir`] on backend `be` (f32): the weights and activations live where `be`
/// computes; the outputs are read back to the host.
pub fn run_dir_on<B: Backend<f32>>(
    be: B,
    dir: impl AsRef<Path>,
    inputs: &Inputs,
) -> Result<Vec<(String, HostTensor)>> {
    let dir = dir.as_ref();
    let host = |shape: Vec<usize>, data: &B::Buf| host(shape, be.to_vec(data));
    let hf = HfConfig::read_dir(dir)?;
    let f = hf.fields();
    match hf.model_type {
        ModelType::Llama => {
            let hc = HfLlamaConfig::from_fields(&f)?;
            let (ids, b, t) = inputs.ids("vocab_size", hc.vocab_size)?;
            check_len_vs_positions(
                inputs,
                t,
                "max_position_embeddings",
                hc.max_position_embeddings,
            )?;
            let mask = inputs.mask(b, t)?;
            let Pretrained::Llama { model, .. } = Pretrained::<f32, B>::load(be.clone(), &hf, dir)?
            else {
                unreachable!("model_type llama loads a Llama")
            };
            let (logits, acts) = model.forward(&ids, b, mask.as_deref(), None)?;
            Ok(vec![
                ("logits".into(), host(vec![b, t, hc.vocab_size], &logits)?),
                (
                    "last_hidden_state".into(),
                    host(vec![b, t, hc.hidden_size], &acts.hidden)?,
                ),
            ])
        }
        ModelType::ClipVision => {
            let cfg = ClipVisionConfig::from_fields(&f)?;
            let (px, b) = inputs.pixels(&cfg, &hf.path, "")?;
            let (l, s, c) = (cfg.num_hidden_layers, cfg.num_positions(), cfg.hidden_size);
            let Pretrained::ClipVision(m) = Pretrained::<f32, B>::load(be.clone(), &hf, dir)?
            else {
                unreachable!("model_type clip_vision_model loads a ClipVision")
            };
            let mut out = m.forward(&be.from_slice(&px.data), b, l)?;
            let pooled = out.pooler_output.take().expect("full forward pools");
            let last = out.hidden_states.pop().expect("L+1 states");
            let penult = out.hidden_states.pop().expect("L+1 states with L ≥ 1");
            Ok(vec![
                ("last_hidden_state".into(), host(vec![b, s, c], &last)?),
                ("pooler_output".into(), host(vec![b, c], &pooled)?),
                (
                    "penultimate_hidden_state".into(),
                    host(vec![b, s, c], &penult)?,
                ),
            ])
        }
        ModelType::Bert => {
            let cfg = BertConfig::from_fields(&f)?;
            let (ids, b, t) = inputs.ids("vocab_size", cfg.vocab_size)?;
            check_len_vs_positions(
                inputs,
                t,
                "max_position_embeddings",
                cfg.max_position_embeddings,
            )?;
            let mask = inputs.mask(b, t)?;
            if let Some(m) = &mask {
                if let Some(row) = m.chunks(t).position(|r| r.iter().all(|&x| x == 0)) {
                    return Err(data_err(
                        &inputs.path,
                        "attention_mask",
                        format!("row {row} masks every token"),
                    ));
                }
            }
            let types = match &inputs.token_type_ids {
                None => None,
                Some(tt) => {
                    if tt.shape != [b, t] {
                        return Err(data_err(
                            &inputs.path,
                            "token_type_ids",
                            format!("shape {:?} differs from input_ids [{b}, {t}]", tt.shape),
                        ));
                    }
                    Some(int_values(
                        &inputs.path,
                        "token_type_ids",
                        tt,
                        t,
                        "type_vocab_size",
                        cfg.type_vocab_size,
                    )?)
                }
            };
            let c = cfg.hidden_size;
            let Pretrained::Bert(m) = Pretrained::<f32, B>::load(be.clone(), &hf, dir)? else {
                unreachable!("model_type bert loads a Bert")
            };
            let out = m.forward(&ids, types.as_deref(), b, mask.as_deref())?;
            let mut v = vec![(
                "last_hidden_state".to_string(),
                host(vec![b, t, c], &out.last_hidden_state)?,
            )];
            if let Some(p) = out.pooler_output {
                v.push(("pooler_output".into(), host(vec![b, c], &p)?));
            }
            Ok(v)
        }
        ModelType::Llava => {
            let cfg = LlavaConfig::from_fields(&f)?;
            let (ids, b, t) = inputs.ids("text_config.vocab_size", cfg.text.vocab_size)?;
            let mask = inputs.mask(b, t)?;
            let pixels = match &inputs.pixel_values {
                Some(_) => Some(inputs.pixels(&cfg.vision, &hf.path, "vision_config.")?),
                None => None,
            };
            let v = cfg.text.vocab_size;
            let Pretrained::Llava(m) = Pretrained::<f32, B>::load(be.clone(), &hf, dir)? else {
                unreachable!("model_type llava loads a Llava")
            };
            let px = pixels.map(|(p, n)| (be.from_slice(&p.data), n));
            let out = m
                .forward(&ids, b, px.as_ref().map(|(p, n)| (p, *n)), mask.as_deref())
                .map_err(|e| match e {
                    // image-token count and sequence-length problems are input problems
                    Error::InvalidArg { msg, .. } => data_err(&inputs.path, "input_ids", msg),
                    other => other,
                })?;
            Ok(vec![(
                "logits".into(),
                host(vec![b, out.t, v], &out.logits)?,
            )])
        }
    }
}

/// Reads `inputs`, runs `dir` (CPU), writes the outputs as F32 to `out`; returns the
/// outputs.
pub fn forward_files(dir: &Path, inputs: &Path, out: &Path) -> Result<Vec<(String, HostTensor)>> {
    forward_files_on(Cpu, dir, inputs, out)
}

/// [`forward_files`] on backend `be`.
pub fn forward_files_on<B: Backend<f32>>(
    be: B,
    dir: &Path,
    inputs: &Path,
    out: &Path,
) -> Result<Vec<(String, HostTensor)>> {
    let inp = Inputs::read(inputs)?;
    let outputs = run_dir_on(be, dir, &inp)?;
    let refs: Vec<(String, &HostTensor)> = outputs.iter().map(|(n, t)| (n.clone(), t)).collect();
    super::io::write_f32(out, &refs)?;
    Ok(outputs)
}
