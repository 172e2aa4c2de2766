//! PixelLM's pixel decoder: the whole backward against f64 central finite differences
//! on a tiny odd-sized config (grid 3×5, M = 3 targets over B = 2 images, output
//! 13×11), for d feats, d emb and a sample of every parameter, without and with the
//! pixel skip (q = 2, pixels 24×40); every parameter receives a gradient; a frozen
//! decoder still returns d emb; the skip reads the pixels; two targets alike on one
//! image get the same logits; bad inputs are errors.
//!
//! The scalar checked is L = Σ w ∘ logits with fixed random weights w.
use popen::backend::Cpu;
use popen::model::seg::decoder::{DecoderImages, PixelDecoder, PixelDecoderConfig};
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
        skip_patch: 0,
    }
}

/// The pixel skip's patch size in the skip cases.
const Q: usize = 2;

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
    /// (B, 3, 4·3·Q, 4·5·Q), read only by a decoder with a skip
    px: T,
    emb: T,
    w: T,
}

fn case(skip_patch: usize) -> Case {
    let c = PixelDecoderConfig {
        skip_patch,
        ..cfg()
    };
    let mut rng = Rng::new(41);
    let g = c.grid_h * c.grid_w;
    let dec = PixelDecoder::new(BE, c.clone(), 7).unwrap();
    Case {
        dec,
        f0: randn(&mut rng, B * g * c.vision_dim, 1.0),
        f1: randn(&mut rng, B * g * c.vision_dim, 1.0),
        emb: randn(&mut rng, IMG_OF.len() * 2 * c.dim, 1.0),
        w: randn(&mut rng, IMG_OF.len() * OUT.0 * OUT.1, 1.0),
        px: randn(&mut rng, B * 3 * 16 * g * Q * Q, 1.0),
    }
}

fn images<'a>(f0: &'a T, f1: &'a T, px: &'a T) -> DecoderImages<'a, T> {
    DecoderImages {
        levels: [f0, f1],
        pixels: Some(px),
        b: B,
    }
}

fn loss(dec: &PixelDecoder<f64, Cpu>, f0: &T, f1: &T, px: &T, emb: &T, w: &T) -> f64 {
    let (out, _) = dec
        .forward(images(f0, f1, px), emb, &IMG_OF, OUT.0, OUT.1)
        .unwrap();
    dot(&out, w)
}

fn check_backward(skip_patch: usize) {
    let Case {
        dec,
        f0,
        f1,
        px,
        emb,
        w,
    } = case(skip_patch);
    let mut d2 = dec.clone();
    let (out, acts) = dec
        .forward(images(&f0, &f1, &px), &emb, &IMG_OF, OUT.0, OUT.1)
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
            num(&|d| loss(&dec, &pert(&f0, i, d), &f1, &px, &emb, &w)),
        );
        close(
            "dfeat1",
            i,
            df1[i],
            num(&|d| loss(&dec, &f0, &pert(&f1, i, d), &px, &emb, &w)),
        );
    }
    for (i, &a) in demb.iter().enumerate() {
        close(
            "demb",
            i,
            a,
            num(&|d| loss(&dec, &f0, &f1, &px, &pert(&emb, i, d), &w)),
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
    assert_eq!(
        grads.iter().any(|(n, _)| n.contains(".pixel_skip.")),
        skip_patch > 0
    );
    for (pi, (name, g)) in grads.iter().enumerate() {
        for i in [0, g.len() / 2, g.len() - 1] {
            let at = |d: f64| {
                let mut dd = dec.clone();
                dd.params_mut()[pi].1.data[i] += d;
                loss(&dd, &f0, &f1, &px, &emb, &w)
            };
            close(name, i, g[i], num(&at));
        }
    }
}

#[test]
fn decoder_backward_matches_finite_differences() {
    check_backward(0);
}

#[test]
fn decoder_with_pixel_skip_backward_matches_finite_differences() {
    check_backward(Q);
}

/// The skip makes the masks depend on the pixels; without it they do not.
#[test]
fn only_the_pixel_skip_reads_the_pixels() {
    for (skip, reads) in [(0, false), (Q, true)] {
        let Case {
            dec,
            f0,
            f1,
            px,
            emb,
            ..
        } = case(skip);
        let run = |px: &T| {
            dec.forward(images(&f0, &f1, px), &emb, &IMG_OF, OUT.0, OUT.1)
                .unwrap()
                .0
        };
        // one pixel of image 1 changes: image 1's targets (0 and 2) may move, image 0's may not
        let mut px2 = px.clone();
        let n1 = px.len() / B;
        px2[n1 + 5] += 1.0;
        let (a, b) = (run(&px), run(&px2));
        let per = OUT.0 * OUT.1;
        let moved = |t: usize| a[t * per..(t + 1) * per] != b[t * per..(t + 1) * per];
        assert_eq!(moved(0), reads, "skip {skip}: target of image 1");
        assert!(!moved(1), "skip {skip}: target of image 0 moved");
    }
}

#[test]
fn targets_alike_get_alike_masks() {
    // targets 0 and 2 both belong to image 1: with the same embedding, each reads the
    // same keys under the same positional encoding (tiled to every target), so their
    // logits are the same to the bit, with or without the skip
    for skip in [0, Q] {
        let Case {
            dec,
            f0,
            f1,
            px,
            mut emb,
            ..
        } = case(skip);
        let per_target = emb.len() / IMG_OF.len();
        let first = emb[..per_target].to_vec();
        emb[2 * per_target..].copy_from_slice(&first);
        let (out, _) = dec
            .forward(images(&f0, &f1, &px), &emb, &IMG_OF, OUT.0, OUT.1)
            .unwrap();
        let per = OUT.0 * OUT.1;
        assert!(
            out.iter().all(|x| x.is_finite()),
            "skip {skip}: logits not finite"
        );
        assert_eq!(out[..per], out[2 * per..], "skip {skip}: targets 0 and 2");
        assert_ne!(
            out[..per],
            out[per..2 * per],
            "skip {skip}: image 0's target"
        );
    }
}

#[test]
fn every_parameter_receives_a_gradient() {
    let Case {
        mut dec,
        f0,
        f1,
        px,
        emb,
        w,
    } = case(Q);
    let (_, acts) = dec
        .forward(images(&f0, &f1, &px), &emb, &IMG_OF, OUT.0, OUT.1)
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
        px,
        emb,
        w,
    } = case(Q);
    let mut frozen = dec.clone();
    for (_, t) in frozen.params_mut() {
        t.set_trainable(&BE, false);
    }
    let (_, acts) = dec
        .forward(images(&f0, &f1, &px), &emb, &IMG_OF, OUT.0, OUT.1)
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
    // a decoder config written before the pixel skip reads as without one
    let old: PixelDecoderConfig = serde_json::from_str(
        r#"{"vision_dim":5,"dim":8,"depth":2,"heads":2,"mlp_dim":7,"scales":2,"grid_h":3,"grid_w":5}"#,
    )
    .unwrap();
    assert_eq!(old, cfg());
    let Case {
        dec,
        f0,
        f1,
        px,
        emb,
        ..
    } = case(Q);
    let fwd = |f0: &T, px: Option<&T>, emb: &T, img_of: &[usize], oh: usize| {
        let img = DecoderImages {
            levels: [f0, &f1],
            pixels: px,
            b: B,
        };
        dec.forward(img, emb, img_of, oh, 11).is_err()
    };
    let p = Some(&px);
    assert!(
        fwd(&f0, p, &emb, &[1, 0, 2], 13),
        "image index past the batch"
    );
    assert!(fwd(&f0[1..].to_vec(), p, &emb, &IMG_OF, 13), "feats size");
    assert!(fwd(&f0, p, &emb[1..].to_vec(), &IMG_OF, 13), "emb size");
    assert!(fwd(&f0, p, &emb, &IMG_OF, 0), "empty output");
    assert!(fwd(&f0, None, &emb, &IMG_OF, 13), "a skip without pixels");
    assert!(
        fwd(&f0, Some(&px[1..].to_vec()), &emb, &IMG_OF, 13),
        "pixels size"
    );
    assert!(!fwd(&f0, p, &emb, &IMG_OF, 13));
}
