//! PixelLM's pixel decoder: the whole backward against f64 central finite differences
//! on a tiny odd-sized config (grid 3×5, M = 3 targets over B = 2 images, output
//! 13×11), for d feats, d emb and a sample of every parameter; every parameter receives
//! a gradient; a frozen decoder still returns d emb; bad inputs are errors.
//!
//! The scalar checked is L = Σ w ∘ logits with fixed random weights w.
use popen::backend::Cpu;
use popen::model::seg::decoder::{PixelDecoder, PixelDecoderConfig};
use popen::nn::{randn, Rng};

type T = Vec<f64>;
const BE: Cpu = Cpu;
const H: f64 = 1e-5;
/// Looser than a single layer's check: the decoder is some forty ops deep, and the
/// O(h²) truncation error grows with the curvature it stacks up.
const ATOL: f64 = 1e-6;
const RTOL: f64 = 1e-4;
const B: usize = 2;
const IMG_OF: [usize; 3] = [1, 0, 1];
const OUT: (usize, usize) = (13, 11);

fn cfg() -> PixelDecoderConfig {
    PixelDecoderConfig {
        vision_dim: 5,
        dim: 8,
        depth: 2,
        heads: 2,
        mlp_dim: 7,
        scales: 2,
        grid_h: 3,
        grid_w: 5,
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn close(name: &str, i: usize, a: f64, num: f64) {
    assert!(
        (a - num).abs() <= ATOL + RTOL * num.abs().max(a.abs()),
        "{name}[{i}]: analytic {a:.10} vs numeric {num:.10}"
    );
}

struct Case {
    dec: PixelDecoder<f64, Cpu>,
    f0: T,
    f1: T,
    emb: T,
    w: T,
}

fn case() -> Case {
    let c = cfg();
    let mut rng = Rng::new(41);
    let g = c.grid_h * c.grid_w;
    let dec = PixelDecoder::new(BE, c.clone(), 7).unwrap();
    Case {
        dec,
        f0: randn(&mut rng, B * g * c.vision_dim, 1.0),
        f1: randn(&mut rng, B * g * c.vision_dim, 1.0),
        emb: randn(&mut rng, IMG_OF.len() * 2 * c.dim, 1.0),
        w: randn(&mut rng, IMG_OF.len() * OUT.0 * OUT.1, 1.0),
    }
}

fn loss(dec: &PixelDecoder<f64, Cpu>, f0: &T, f1: &T, emb: &T, w: &T) -> f64 {
    let (out, _) = dec
        .forward([f0, f1], B, emb, &IMG_OF, OUT.0, OUT.1)
        .unwrap();
    dot(&out, w)
}

#[test]
fn decoder_backward_matches_finite_differences() {
    let Case {
        dec,
        f0,
        f1,
        emb,
        w,
    } = case();
    let mut d2 = dec.clone();
    let (out, acts) = dec
        .forward([&f0, &f1], B, &emb, &IMG_OF, OUT.0, OUT.1)
        .unwrap();
    assert_eq!(out.len(), IMG_OF.len() * OUT.0 * OUT.1);
    assert!(out.iter().all(|v| v.is_finite()));
    let ([df0, df1], demb) = d2.backward(&acts, &w).unwrap();
    let num = |f: &dyn Fn(f64) -> f64| (f(H) - f(-H)) / (2.0 * H);
    let pert = |x: &T, i: usize, d: f64| {
        let mut y = x.clone();
        y[i] += d;
        y
    };
    for i in 0..f0.len() {
        close(
            "dfeat0",
            i,
            df0[i],
            num(&|d| loss(&dec, &pert(&f0, i, d), &f1, &emb, &w)),
        );
        close(
            "dfeat1",
            i,
            df1[i],
            num(&|d| loss(&dec, &f0, &pert(&f1, i, d), &emb, &w)),
        );
    }
    for (i, &a) in demb.iter().enumerate() {
        close(
            "demb",
            i,
            a,
            num(&|d| loss(&dec, &f0, &f1, &pert(&emb, i, d), &w)),
        );
    }
    // both levels and both scales' embeddings matter
    for (name, g) in [("dfeat0", &df0), ("dfeat1", &df1), ("demb", &demb)] {
        assert!(g.iter().any(|v| v.abs() > 1e-6), "{name} is all zero");
    }
    // a sample of every parameter: first, middle and last element
    let grads: Vec<(String, T)> = d2
        .params_mut()
        .into_iter()
        .map(|(n, t)| (n, t.grad.clone().unwrap()))
        .collect();
    for (pi, (name, g)) in grads.iter().enumerate() {
        for i in [0, g.len() / 2, g.len() - 1] {
            let at = |d: f64| {
                let mut dd = dec.clone();
                dd.params_mut()[pi].1.data[i] += d;
                loss(&dd, &f0, &f1, &emb, &w)
            };
            close(name, i, g[i], num(&at));
        }
    }
}

#[test]
fn every_parameter_receives_a_gradient() {
    let Case {
        mut dec,
        f0,
        f1,
        emb,
        w,
    } = case();
    let (_, acts) = dec
        .forward([&f0, &f1], B, &emb, &IMG_OF, OUT.0, OUT.1)
        .unwrap();
    dec.backward(&acts, &w).unwrap();
    let params = dec.params_mut();
    assert!(params.iter().all(|(n, _)| n.starts_with("mask_decoder.")));
    let mut names: Vec<&String> = params.iter().map(|(n, _)| n).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), params.len(), "parameter names are unique");
    for (name, t) in &params {
        let g = t.grad.as_ref().unwrap();
        if name.ends_with("k_proj.bias") {
            // adds the same q·b to every score of a query: softmax ignores it
            assert!(g.iter().all(|v| v.abs() < 1e-10), "{name}: {g:?}");
        } else {
            assert!(
                g.iter().any(|v| v.abs() > 1e-8),
                "{name} received no gradient"
            );
        }
    }
}

#[test]
fn frozen_decoder_still_returns_demb() {
    let Case {
        mut dec,
        f0,
        f1,
        emb,
        w,
    } = case();
    let mut frozen = dec.clone();
    for (_, t) in frozen.params_mut() {
        t.set_trainable(&BE, false);
    }
    let (_, acts) = dec
        .forward([&f0, &f1], B, &emb, &IMG_OF, OUT.0, OUT.1)
        .unwrap();
    let (dfe_t, demb_t) = dec.backward(&acts, &w).unwrap();
    let (dfe_f, demb_f) = frozen.backward(&acts, &w).unwrap();
    assert!(frozen.params_mut().iter().all(|(_, t)| t.grad.is_none()));
    assert_eq!(demb_f, demb_t, "freezing must not change d emb");
    assert_eq!(dfe_f, dfe_t);
    assert!(demb_f.iter().any(|v| v.abs() > 1e-6));
}

#[test]
fn bad_configs_and_inputs_are_errors() {
    let bad = |f: &dyn Fn(&mut PixelDecoderConfig)| {
        let mut c = cfg();
        f(&mut c);
        PixelDecoder::<f64, Cpu>::new(BE, c, 0).is_err()
    };
    assert!(bad(&|c| c.scales = 3));
    assert!(bad(&|c| c.dim = 6)); // D/2 = 3 does not split into 2 heads
    assert!(bad(&|c| c.dim = 7));
    assert!(bad(&|c| c.grid_w = 0));
    assert!(serde_json::from_str::<PixelDecoderConfig>(
        r#"{"vision_dim":5,"dim":8,"depth":2,"heads":2,"mlp_dim":7,"scales":2,"grid_h":3,"grid_w":5,"extra":1}"#
    )
    .is_err());
    let Case {
        dec, f0, f1, emb, ..
    } = case();
    let fwd = |f0: &T, emb: &T, img_of: &[usize], oh: usize| {
        dec.forward([f0, &f1], B, emb, img_of, oh, 11).is_err()
    };
    assert!(fwd(&f0, &emb, &[1, 0, 2], 13), "image index past the batch");
    assert!(fwd(&f0[1..].to_vec(), &emb, &IMG_OF, 13), "feats size");
    assert!(fwd(&f0, &emb[1..].to_vec(), &IMG_OF, 13), "emb size");
    assert!(fwd(&f0, &emb, &IMG_OF, 0), "empty output");
    assert!(!fwd(&f0, &emb, &IMG_OF, 13));
}
