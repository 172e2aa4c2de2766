//! Loading and saving keep Hugging Face names and values; both LLaVA checkpoint layouts,
//! sharded checkpoints and single-token image expansion give the golden outputs.
use popen::backend::Cpu;
use popen::model::forward::{run_dir, Inputs};
use popen::model::io::{write_safetensors, HostTensor, IntTensor, OutValue};
use popen::model::llava::LlavaNames;
use popen::model::{Pretrained, StDtype, StFile};
use std::path::{Path, PathBuf};
mod common;
use common::close::rel_err;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popen-model-rt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every tensor of a file as (name, stored dtype, f32 values), sorted by name.
fn tensors(path: &Path) -> Vec<(String, StDtype, HostTensor)> {
    let f = StFile::open(path).unwrap();
    let mut v: Vec<_> = f
        .names()
        .into_iter()
        .map(|n| {
            let d = f.info(&n).unwrap().0;
            let t = f.f32(&n).unwrap();
            (n, d, t)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Writes `ts` (renamed by `rename`) in their stored dtypes.
fn write_renamed(
    path: &Path,
    ts: &[(String, StDtype, HostTensor)],
    rename: impl Fn(&str) -> String,
) {
    let out: Vec<(String, OutValue<'_>)> = ts
        .iter()
        .map(|(n, d, t)| (rename(n), OutValue::Float(t, *d)))
        .collect();
    write_safetensors(path, &out).unwrap();
}

fn outputs(dir: &Path, inputs: &Inputs) -> Vec<(String, HostTensor)> {
    run_dir(dir, inputs).unwrap()
}

#[test]
fn save_pretrained_writes_the_same_names_and_values() {
    for (name, dtype) in [
        ("llama", StDtype::F32),
        ("llama_bf16", StDtype::BF16),
        ("clip_vision_model", StDtype::F32),
        ("bert", StDtype::F32),
        ("llava", StDtype::F32),
    ] {
        let src = golden(name);
        let (hf, mut m) = Pretrained::<f32, Cpu>::load_dir(Cpu, &src).unwrap();
        let dst = scratch(&format!("save-{name}"));
        m.save_pretrained(&hf, &dst, dtype).unwrap();
        let (a, b) = (
            tensors(&src.join("model.safetensors")),
            tensors(&dst.join("model.safetensors")),
        );
        let names_a: Vec<&str> = a.iter().map(|x| x.0.as_str()).collect();
        let names_b: Vec<&str> = b.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names_a, names_b, "{name}: tensor names after save");
        for ((n, da, ta), (_, db, tb)) in a.iter().zip(&b) {
            assert_eq!(da, db, "{name}/{n}: dtype");
            assert_eq!(ta, tb, "{name}/{n}: values or shape");
        }
        // the saved directory runs and gives bit-identical outputs
        let inputs = Inputs::read(src.join("inputs.safetensors")).unwrap();
        assert_eq!(
            outputs(&src, &inputs),
            outputs(&dst, &inputs),
            "{name}: outputs after save"
        );
    }
}

#[test]
fn llava_loads_every_checkpoint_layout() {
    let src = golden("llava");
    let ts = tensors(&src.join("model.safetensors"));
    let inputs = Inputs::read(src.join("inputs.safetensors")).unwrap();
    let want = StFile::open(src.join("outputs.safetensors"))
        .unwrap()
        .f32("logits")
        .unwrap();
    // the fixture is in transformers 5's saved layout; rewrite it into the others
    let saved = LlavaNames::detect(&popen::model::Checkpoint::open_dir(&src).unwrap()).unwrap();
    assert_eq!(saved.vision, "vision_tower.");
    assert_eq!(saved.text.decoder, "language_model.model.");
    for (label, to) in [
        ("current", LlavaNames::current()),
        ("published", LlavaNames::published()),
    ] {
        let dir = scratch(&format!("llava-{label}"));
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        let rename = |n: &str| -> String {
            for (from, to) in [
                (&saved.vision, &to.vision),
                (&saved.projector, &to.projector),
                (&saved.text.decoder, &to.text.decoder),
            ] {
                if let Some(rest) = n.strip_prefix(from.as_str()) {
                    return format!("{to}{rest}");
                }
            }
            assert_eq!(n, saved.text.head);
            to.text.head.clone()
        };
        write_renamed(&dir.join("model.safetensors"), &ts, rename);
        let ck = popen::model::Checkpoint::open_dir(&dir).unwrap();
        assert_eq!(
            LlavaNames::detect(&ck).unwrap(),
            to,
            "{label}: detected layout"
        );
        let got = outputs(&dir, &inputs);
        let e = rel_err(&got[0].1.data, &want.data);
        assert!(e <= 1e-4, "{label}: relative error {e:.3e}");
        // saving keeps this layout's names
        let (hf, mut m) = Pretrained::<f32, Cpu>::load_dir(Cpu, &dir).unwrap();
        let out = scratch(&format!("llava-{label}-saved"));
        m.save_pretrained(&hf, &out, StDtype::F32).unwrap();
        let mut a = StFile::open(dir.join("model.safetensors")).unwrap().names();
        let mut b = StFile::open(out.join("model.safetensors")).unwrap().names();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{label}: saved names");
    }
}

#[test]
fn sharded_checkpoint_gives_the_golden_outputs() {
    let src = golden("llama");
    let ts = tensors(&src.join("model.safetensors"));
    let dir = scratch("sharded");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let (first, second) = ts.split_at(ts.len() / 2);
    let shards = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut map = serde_json::Map::new();
    for (part, file) in [(first, shards[0]), (second, shards[1])] {
        write_renamed(&dir.join(file), part, |n| n.to_string());
        for (n, _, _) in part {
            map.insert(n.clone(), serde_json::Value::from(file));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let inputs = Inputs::read(src.join("inputs.safetensors")).unwrap();
    assert_eq!(outputs(&src, &inputs), outputs(&dir, &inputs));

    // an index that points outside its directory is refused
    let mut bad = map.clone();
    bad.insert(ts[0].0.clone(), "../model.safetensors".into());
    let index = serde_json::json!({"weight_map": bad});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = run_dir(&dir, &inputs).unwrap_err().to_string();
    assert!(
        e.contains("not a plain file name") && e.contains(&ts[0].0),
        "{e}"
    );
}

#[test]
fn llava_expands_one_image_token_per_image() {
    let src = golden("llava");
    let inputs = Inputs::read(src.join("inputs.safetensors")).unwrap();
    let want = StFile::open(src.join("outputs.safetensors"))
        .unwrap()
        .f32("logits")
        .unwrap();
    let ids = inputs.input_ids.clone().unwrap();
    let (b, t) = (ids.shape[0], ids.shape[1]);
    let image_token = 28;
    // collapse each row's run of image tokens into one
    let mut short = Vec::new();
    for r in ids.data.chunks(t) {
        for (j, &x) in r.iter().enumerate() {
            if x != image_token || j == 0 || r[j - 1] != image_token {
                short.push(x);
            }
        }
    }
    let t_short = short.len() / b;
    assert!(t_short < t);
    let dir = scratch("expand");
    let ids_short = IntTensor {
        shape: vec![b, t_short],
        data: short,
    };
    let px = inputs.pixel_values.clone().unwrap();
    write_safetensors(
        dir.join("inputs.safetensors"),
        &[
            ("input_ids".into(), OutValue::Int(&ids_short)),
            ("pixel_values".into(), OutValue::Float(&px, StDtype::F32)),
        ],
    )
    .unwrap();
    let got = outputs(&src, &Inputs::read(dir.join("inputs.safetensors")).unwrap());
    assert_eq!(
        got[0].1.shape, want.shape,
        "expanded back to the full length"
    );
    let e = rel_err(&got[0].1.data, &want.data);
    assert!(e <= 1e-4, "relative error {e:.3e}");
}

/// A model made (and possibly trained) in Rust, saved, and loaded back as a Hugging Face
/// directory gives the same logits; a tied head is neither saved nor needed.
#[test]
fn rust_llama_with_tied_head_saves_and_reloads() {
    use popen::model::llama::{save_llama, LlamaNames};
    use popen::nn::{Llama, LlamaConfig};
    let cfg = LlamaConfig {
        vocab_size: 23,
        hidden_size: 12,
        intermediate_size: 17,
        num_hidden_layers: 2,
        num_attention_heads: 3,
        num_key_value_heads: Some(1),
        rms_norm_eps: 1e-6,
        rope_theta: 777.0,
        max_position_embeddings: 16,
        tie_word_embeddings: true,
    };
    let mut m = Llama::<f32, Cpu>::new(Cpu, cfg.clone(), 7).unwrap();
    let dir = scratch("tied");
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": 23, "hidden_size": 12, "intermediate_size": 17,
        "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 777.0, "rope_type": "default"},
        "max_position_embeddings": 16, "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let names = LlamaNames {
        decoder: "model.".into(),
        head: "lm_head.weight".into(),
    };
    save_llama(&mut m, dir.join("model.safetensors"), &names, StDtype::F32).unwrap();
    let saved = StFile::open(dir.join("model.safetensors")).unwrap();
    assert!(!saved.contains("lm_head.weight") && saved.contains("model.embed_tokens.weight"));
    let ids: Vec<u32> = vec![1, 5, 22, 0, 9, 3, 3, 7];
    let (want, _) = m.forward(&ids, 2, None, None).unwrap();
    let (_, loaded) = Pretrained::<f32, Cpu>::load_dir(Cpu, &dir).unwrap();
    let Pretrained::Llama { model, .. } = loaded else {
        panic!("not a llama")
    };
    assert!(model.lm_head.is_none());
    let (got, _) = model.forward(&ids, 2, None, None).unwrap();
    assert_eq!(got, want);
}
