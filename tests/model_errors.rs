//! Bad input is a clear `Err` naming the file and the tensor or field, never a panic.
use popen::model::forward::{forward_files, run_dir, Inputs};
use popen::model::io::{write_safetensors, HostTensor, IntTensor, OutValue};
use popen::model::{StDtype, StFile};
use std::path::{Path, PathBuf};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(name)
}

/// A copy of a golden directory to break.
fn copy_of(name: &str, tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popen-model-err-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors", "inputs.safetensors"] {
        std::fs::copy(golden(name).join(f), d.join(f)).unwrap();
    }
    d
}

/// The error message of running `dir` on its `inputs.safetensors`.
fn run_err(dir: &Path) -> String {
    let e = Inputs::read(dir.join("inputs.safetensors")).and_then(|i| run_dir(dir, &i));
    e.expect_err("expected an error").to_string()
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "`{p}` missing from: {msg}");
    }
}

/// Rewrites `path` with `edit` applied to its (name, dtype, values) list.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<(String, StDtype, HostTensor)>)) {
    let f = StFile::open(path).unwrap();
    let mut v: Vec<_> = f
        .names()
        .into_iter()
        .map(|n| (n.clone(), f.info(&n).unwrap().0, f.f32(&n).unwrap()))
        .collect();
    drop(f);
    edit(&mut v);
    let out: Vec<(String, OutValue<'_>)> = v
        .iter()
        .map(|(n, d, t)| (n.clone(), OutValue::Float(t, *d)))
        .collect();
    write_safetensors(path, &out).unwrap();
}

/// A safetensors file from a raw header and data section.
fn raw_file(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

fn write_inputs(path: &Path, ids: Option<IntTensor>, mask: Option<IntTensor>) {
    let mut v = Vec::new();
    if let Some(i) = &ids {
        v.push(("input_ids".to_string(), OutValue::Int(i)));
    }
    if let Some(m) = &mask {
        v.push(("attention_mask".to_string(), OutValue::Int(m)));
    }
    write_safetensors(path, &v).unwrap();
}

const MISSING: &str = "encoder.layer.1.output.dense.bias";

#[test]
fn missing_tensor_names_file_and_tensor() {
    let d = copy_of("bert", "missing");
    rewrite(&d.join("model.safetensors"), |v| {
        v.retain(|(n, _, _)| n != MISSING)
    });
    assert_has(
        &run_err(&d),
        &["model.safetensors", "missing tensor", MISSING],
    );
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let d = copy_of("bert", "shape");
    rewrite(&d.join("model.safetensors"), |v| {
        let t = &mut v.iter_mut().find(|(n, _, _)| n == MISSING).unwrap().2;
        *t = HostTensor::new(vec![25], vec![0.0; 25]).unwrap();
    });
    assert_has(
        &run_err(&d),
        &["model.safetensors", MISSING, "[25]", "[24]"],
    );
}

#[test]
fn integer_weight_is_refused() {
    let d = copy_of("bert", "intweight");
    let path = d.join("model.safetensors");
    let f = StFile::open(&path).unwrap();
    let mut hosts: Vec<(String, HostTensor)> = f
        .names()
        .into_iter()
        .map(|n| (n.clone(), f.f32(&n).unwrap()))
        .collect();
    drop(f);
    let i = hosts.iter().position(|(n, _)| n == MISSING).unwrap();
    let (name, _) = hosts.remove(i);
    let ints = IntTensor {
        shape: vec![24],
        data: vec![1; 24],
    };
    let mut out: Vec<(String, OutValue<'_>)> = hosts
        .iter()
        .map(|(n, t)| (n.clone(), OutValue::Float(t, StDtype::F32)))
        .collect();
    out.push((name, OutValue::Int(&ints)));
    write_safetensors(&path, &out).unwrap();
    assert_has(
        &run_err(&d),
        &["model.safetensors", MISSING, "expected a float tensor"],
    );
}

#[test]
fn unsupported_dtype_is_refused_at_open() {
    let d = copy_of("bert", "f64");
    let p = d.join("x.safetensors");
    raw_file(
        &p,
        r#"{"w":{"dtype":"F64","shape":[2],"data_offsets":[0,16]}}"#,
        &[0u8; 16],
    );
    let e = StFile::open(&p).unwrap_err().to_string();
    assert_has(&e, &["x.safetensors", "`w`", "unsupported dtype F64"]);
}

#[test]
fn truncated_file_names_the_tensor_past_the_end() {
    let d = copy_of("bert", "trunc");
    let p = d.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    assert_has(
        &run_err(&d),
        &["model.safetensors", "truncated", "data ends at byte"],
    );
}

#[test]
fn bad_headers_are_refused() {
    let d = copy_of("bert", "headers");
    let p = d.join("bad.safetensors");
    // shorter than the length prefix
    std::fs::write(&p, [1u8, 2, 3]).unwrap();
    assert_has(
        &StFile::open(&p).unwrap_err().to_string(),
        &["bad.safetensors", "3 bytes", "shorter"],
    );
    // a header that claims more than the file holds
    let mut b = 1000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&p, &b).unwrap();
    assert_has(
        &StFile::open(&p).unwrap_err().to_string(),
        &["bad.safetensors", "claims 1000 bytes", "only 2"],
    );
    // an absurd header length
    let mut b = (1u64 << 40).to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&p, &b).unwrap();
    assert_has(
        &StFile::open(&p).unwrap_err().to_string(),
        &["bad.safetensors", "absurdly large"],
    );
    // offsets inconsistent with shape
    raw_file(
        &p,
        r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
        &[0u8; 8],
    );
    assert_has(
        &StFile::open(&p).unwrap_err().to_string(),
        &["`w`", "needs 12 bytes"],
    );
    // not JSON
    raw_file(&p, "{not json", &[]);
    assert_has(
        &StFile::open(&p).unwrap_err().to_string(),
        &["bad.safetensors", "not a JSON object"],
    );
}

#[test]
fn unsupported_model_type_names_the_field() {
    let d = copy_of("bert", "mtype");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(d.join("config.json"), cfg.replace("\"bert\"", "\"t5\"")).unwrap();
    assert_has(&run_err(&d), &["config.json", "model_type", "t5"]);
}

#[test]
fn bad_config_field_is_named() {
    let d = copy_of("llava", "cfgfield");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    let cfg = cfg.replace("\"num_key_value_heads\": 1", "\"num_key_value_heads\": 2");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    assert_has(
        &run_err(&d),
        &[
            "config.json",
            "text_config.num_attention_heads",
            "divisible",
        ],
    );
}

#[test]
fn token_id_out_of_range_names_input_and_position() {
    let d = copy_of("bert", "oov");
    let ids = IntTensor {
        shape: vec![1, 3],
        data: vec![1, 41, 2],
    };
    write_inputs(&d.join("inputs.safetensors"), Some(ids), None);
    assert_has(
        &run_err(&d),
        &[
            "inputs.safetensors",
            "input_ids",
            "[0, 1] = 41",
            "vocab_size = 41",
        ],
    );
    let ids = IntTensor {
        shape: vec![1, 2],
        data: vec![-1, 0],
    };
    write_inputs(&d.join("inputs.safetensors"), Some(ids), None);
    assert_has(&run_err(&d), &["input_ids", "= -1"]);
}

#[test]
fn sequence_longer_than_position_table() {
    let d = copy_of("bert", "long");
    let ids = IntTensor {
        shape: vec![1, 17],
        data: vec![3; 17],
    };
    write_inputs(&d.join("inputs.safetensors"), Some(ids), None);
    assert_has(
        &run_err(&d),
        &[
            "inputs.safetensors",
            "17 tokens",
            "max_position_embeddings = 16",
        ],
    );
    // llama too
    let d = copy_of("llama", "long");
    let ids = IntTensor {
        shape: vec![1, 33],
        data: vec![3; 33],
    };
    write_inputs(&d.join("inputs.safetensors"), Some(ids), None);
    assert_has(&run_err(&d), &["33 tokens", "max_position_embeddings = 32"]);
}

#[test]
fn bad_input_tensors_are_named() {
    let d = copy_of("bert", "inputs");
    let p = d.join("inputs.safetensors");
    // ids stored as floats
    let f = HostTensor::new(vec![1, 2], vec![1.0, 2.0]).unwrap();
    write_safetensors(
        &p,
        &[("input_ids".into(), OutValue::Float(&f, StDtype::F32))],
    )
    .unwrap();
    assert_has(
        &run_err(&d),
        &["inputs.safetensors", "input_ids", "expected I64, got F32"],
    );
    // no ids at all
    write_inputs(
        &p,
        None,
        Some(IntTensor {
            shape: vec![1, 2],
            data: vec![1, 1],
        }),
    );
    assert_has(&run_err(&d), &["input_ids", "missing"]);
    // 1-D ids
    write_inputs(
        &p,
        Some(IntTensor {
            shape: vec![2],
            data: vec![1, 1],
        }),
        None,
    );
    assert_has(&run_err(&d), &["input_ids", "expected [B, T]"]);
    // a mask of the wrong shape, and one with a value that is not 0/1
    let ids = IntTensor {
        shape: vec![1, 2],
        data: vec![1, 2],
    };
    write_inputs(
        &p,
        Some(ids.clone()),
        Some(IntTensor {
            shape: vec![1, 3],
            data: vec![1; 3],
        }),
    );
    assert_has(&run_err(&d), &["attention_mask", "differs from input_ids"]);
    write_inputs(
        &p,
        Some(ids.clone()),
        Some(IntTensor {
            shape: vec![1, 2],
            data: vec![1, 2],
        }),
    );
    assert_has(&run_err(&d), &["attention_mask", "[0, 1] = 2"]);
    write_inputs(
        &p,
        Some(ids),
        Some(IntTensor {
            shape: vec![1, 2],
            data: vec![0, 0],
        }),
    );
    assert_has(&run_err(&d), &["attention_mask", "row 0 masks every token"]);
}

#[test]
fn bad_pixels_are_named() {
    let d = copy_of("clip_vision_model", "pixels");
    let p = d.join("inputs.safetensors");
    let px = HostTensor::new(vec![1, 3, 14, 14], vec![0.5; 3 * 14 * 14]).unwrap();
    write_safetensors(
        &p,
        &[("pixel_values".into(), OutValue::Float(&px, StDtype::F32))],
    )
    .unwrap();
    assert_has(
        &run_err(&d),
        &[
            "inputs.safetensors",
            "pixel_values",
            "[1, 3, 14, 14]",
            "[B, 3, 15, 15]",
            "image_size",
        ],
    );
    let mut px = HostTensor::new(vec![1, 3, 15, 15], vec![0.5; 3 * 15 * 15]).unwrap();
    px.data[7] = f32::NAN;
    write_safetensors(
        &p,
        &[("pixel_values".into(), OutValue::Float(&px, StDtype::F32))],
    )
    .unwrap();
    assert_has(&run_err(&d), &["pixel_values", "element 7 is not finite"]);
}

#[test]
fn llava_image_token_mismatch_is_named() {
    let d = copy_of("llava", "imgtok");
    let p = d.join("inputs.safetensors");
    let inputs = Inputs::read(&p).unwrap();
    let mut ids = inputs.input_ids.clone().unwrap();
    // drop one image token of row 0: 17 image tokens for 2 images of 9
    let j = ids.data.iter().position(|&x| x == 28).unwrap();
    ids.data[j] = 3;
    let px = inputs.pixel_values.clone().unwrap();
    write_safetensors(
        &p,
        &[
            ("input_ids".into(), OutValue::Int(&ids)),
            ("pixel_values".into(), OutValue::Float(&px, StDtype::F32)),
        ],
    )
    .unwrap();
    assert_has(
        &run_err(&d),
        &[
            "inputs.safetensors",
            "input_ids",
            "17 image tokens",
            "18 image features",
        ],
    );
}

#[test]
fn forward_files_writes_nothing_on_error() {
    let d = copy_of("bert", "noout");
    let ids = IntTensor {
        shape: vec![1, 2],
        data: vec![1, 99],
    };
    write_inputs(&d.join("inputs.safetensors"), Some(ids), None);
    let out = d.join("out.safetensors");
    assert!(forward_files(&d, &d.join("inputs.safetensors"), &out).is_err());
    assert!(!out.exists());
}
