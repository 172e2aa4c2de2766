//! Property round trips for the formats the fuzzers see least of (issue 12): a fuzzer
//! rarely builds a valid file, so these build valid ones and check that what is written
//! is what is read back.
use popen::data::muse::{MuseAnn, MuseImage, RleJson, Segmentation};
use popen::data::polygon::mask_from_polygons;
use popen::data::sample::load_muse;
use popen::data::{Mask, Rle};
use popen::metrics::raster::{rle_runs, segmentation_runs, Runs};
use popen::model::io::{write_safetensors, OutValue};
use popen::model::{HostTensor, IntTensor, StDtype, StFile};
use proptest::prelude::*;
use std::path::PathBuf;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popen_roundtrips_{}_{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A random mask of an odd-ish size; `density` in 0..=8 eighths, so empty and full
/// masks come up too.
fn mask() -> impl Strategy<Value = Mask> {
    (1usize..23, 1usize..29, 0u32..=8, any::<u64>()).prop_map(|(h, w, density, seed)| {
        let mut s = seed | 1;
        Mask::from_fn(h, w, |_, _| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 32) as u32 % 8) < density
        })
    })
}

/// Column-major copy of a row-major mask (COCO's pixel order, as `Runs` are).
fn column_major(m: &Mask) -> Vec<u8> {
    let mut out = vec![0u8; m.height * m.width];
    for y in 0..m.height {
        for x in 0..m.width {
            out[x * m.height + y] = u8::from(m.get(y, x) != 0);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn rle_encode_decode_round_trips(m in mask()) {
        let r = Rle::from_mask(&m);
        prop_assert_eq!(r.area() as usize, m.area());
        let s = r.to_compressed();
        let back = Rle::from_compressed(m.height, m.width, &s).unwrap();
        prop_assert_eq!(&back, &r);
        prop_assert_eq!(back.to_mask().unwrap(), m.clone());
        // the evaluator's run-based reading of the same JSON agrees, without a dense mask
        let runs = rle_runs(&RleJson::from_rle(&r), m.height, m.width).unwrap();
        prop_assert_eq!(Runs::from_counts(&runs), Runs::from_dense(&column_major(&m)));
    }

    #[test]
    fn polygons_to_runs_match_the_dense_raster(
        h in 1usize..31,
        w in 1usize..31,
        rings in prop::collection::vec(prop::collection::vec(-4.0f64..36.0, 0..14), 1..4),
    ) {
        // the readers paint each ring densely; the evaluator unites the rings' runs
        let dense = mask_from_polygons(&rings, h, w).unwrap();
        let runs = segmentation_runs(&Segmentation::Polygons(rings.clone()), h, w).unwrap();
        prop_assert_eq!(runs, Runs::from_dense(&column_major(&dense)));
    }

    #[test]
    fn safetensors_write_read_round_trips(
        tensors in prop::collection::vec(
            (prop::collection::vec(0usize..4, 0..4), 0usize..4, any::<u64>()),
            1..6,
        ),
    ) {
        let dtypes = [StDtype::F32, StDtype::F16, StDtype::BF16];
        let mut floats = Vec::new();
        let mut ints = Vec::new();
        for (k, (shape, kind, seed)) in tensors.iter().enumerate() {
            let n: usize = shape.iter().product();
            let name = format!("t{k}.weight");
            if *kind == 3 {
                let data = (0..n).map(|i| (*seed as i64).wrapping_mul(i as i64 + 1)).collect();
                ints.push((name, IntTensor { shape: shape.clone(), data }));
            } else {
                let data = (0..n)
                    .map(|i| ((seed.wrapping_mul(i as u64 + 7) >> 40) as f32 - 8e6) / 1e3)
                    .collect();
                floats.push((name, HostTensor::new(shape.clone(), data).unwrap(), dtypes[*kind]));
            }
        }
        let mut out: Vec<(String, OutValue<'_>)> = Vec::new();
        for (n, t, d) in &floats {
            out.push((n.clone(), OutValue::Float(t, *d)));
        }
        for (n, t) in &ints {
            out.push((n.clone(), OutValue::Int(t)));
        }
        let p = scratch("st").join("model.safetensors");
        write_safetensors(&p, &out).unwrap();
        let f = StFile::open(&p).unwrap();
        prop_assert_eq!(f.names().len(), out.len());
        for (n, t, d) in &floats {
            // what the dtype can hold: f32 as is, f16 / bf16 rounded to nearest even
            let want: Vec<f32> = t.data.iter().map(|&x| match d {
                StDtype::F16 => half::f16::from_f32(x).to_f32(),
                StDtype::BF16 => half::bf16::from_f32(x).to_f32(),
                _ => x,
            }).collect();
            let got = f.f32(n).unwrap();
            prop_assert_eq!(&got.shape, &t.shape);
            prop_assert_eq!(got.data, want);
        }
        for (n, t) in &ints {
            prop_assert_eq!(&f.i64(n).unwrap(), t);
        }
    }

    #[test]
    fn muse_write_read_round_trips(
        images in prop::collection::vec(
            (prop::collection::vec(prop::collection::vec(mask(), 0..3), 1..3), any::<bool>()),
            1..4,
        ),
    ) {
        // every mask of one image must have the image's size: take it from the first
        let mut records = Vec::new();
        let mut want: Vec<(String, Vec<Mask>)> = Vec::new();
        for (i, (questions, with_text)) in images.iter().enumerate() {
            let Some(first) = questions.iter().flatten().next() else { continue };
            let (h, w) = (first.height, first.width);
            let mut answers = Vec::new();
            let mut texts = Vec::new();
            for (q, masks) in questions.iter().enumerate() {
                let masks: Vec<Mask> = masks
                    .iter()
                    .map(|m| Mask::from_fn(h, w, |y, x| y < m.height && x < m.width && m.get(y, x) != 0))
                    .collect();
                answers.push(masks.iter().enumerate().map(|(k, m)| MuseAnn {
                    category_name: format!("thing {k}"),
                    bbox: vec![],
                    segmentation: Segmentation::Rle(RleJson::from_rle(&Rle::from_mask(m))),
                }).collect::<Vec<_>>());
                texts.push(format!("answer {q}:{}", " {seg}".repeat(masks.len())));
                want.push((format!("question {q} of {i}"), masks));
            }
            records.push(MuseImage {
                file_name: format!("images/img {i}.png"),
                coco_url: None,
                height: h as u32,
                width: w as u32,
                questions: (0..questions.len()).map(|q| format!("question {q} of {i}")).collect(),
                answers,
                text_answers: with_text.then_some(texts),
                ann_list: None,
            });
        }
        let d = scratch("muse");
        let p = d.join("data.json");
        popen::fsio::write_atomic(&p, serde_json::to_string(&records).unwrap().as_bytes()).unwrap();
        let samples = load_muse(&p, &d).unwrap();
        prop_assert_eq!(samples.len(), want.len());
        for (s, (question, masks)) in samples.iter().zip(&want) {
            prop_assert_eq!(&s.question, question);
            prop_assert!(s.image_path.starts_with(&d));
            let got: Vec<&Mask> = s.targets.iter().map(|t| &t.mask).collect();
            prop_assert_eq!(got, masks.iter().collect::<Vec<_>>());
            if let Some(a) = &s.answer {
                prop_assert_eq!(a.matches("<seg>").count(), masks.len());
            }
        }
    }
}
