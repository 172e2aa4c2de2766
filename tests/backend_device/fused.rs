//! Fused projections: a frozen attention's q, k and v as one product
//! (`Attention::fuse`), and a frozen SwiGLU MLP's gate and up (`SwiGluMlp::fuse`), equal
//! to the layers apart, on the CPU and on the device: forward, backward, decoding
//! through a KV cache, and back apart.
use super::*;
use popen::nn::attention::LayerKv;
use popen::nn::{Attention, AttnCtx, SwiGluMlp, Tensor};

/// C = 10 into 3 query heads over 1 kv head of 4 (GQA), RoPE, causal, frozen, with
/// random weights (and biases when `bias`).
fn frozen_attention<B: Backend<f32>>(be: &B, bias: bool, r: &mut Philox) -> Attention<f32, B> {
    let mut a = Attention::new(be, 10, 3, 1, 4, bias, Some(100.0), true);
    for l in [&mut a.q, &mut a.k, &mut a.v, &mut a.o] {
        l.weight.data = be.from_slice(&rnd(r, l.weight.numel(), 0.5));
        l.weight.grad = None;
        if let Some(b) = &mut l.bias {
            b.data = be.from_slice(&rnd(r, b.numel(), 0.5));
            b.grad = None;
        }
    }
    a
}

/// An empty cache of 8 positions for batch `b` (1 kv head of 4).
fn cache<B: Backend<f32>>(be: &B, b: usize) -> LayerKv<B::Buf> {
    LayerKv {
        k: be.zeros(b * 8 * 4),
        v: be.zeros(b * 8 * 4),
        len: 0,
        cap: 8,
    }
}

fn fused_equals_apart<B: Backend<f32>>(be: B) {
    let on = be.name();
    for bias in [false, true] {
        let mut r = Philox::new(31);
        let apart = frozen_attention(&be, bias, &mut r);
        let mut fused = apart.clone();
        assert!(fused.fuse(&be).unwrap() && fused.is_fused(), "{on}");
        assert!(!fused.fuse(&be).unwrap(), "{on}: fused twice");
        assert_eq!(be.len(&fused.k.weight.data), 0, "{on}: k keeps its values");
        let what = |s: &str| format!("{on} bias {bias}: {s}");
        // a training pass: outputs, then dx and dγ of the backward
        let (b, t) = (2, 5);
        let x = be.from_slice(&rnd(&mut r, b * t * 10, 1.0));
        let gamma = be.from_slice(&rnd(&mut r, b * t, 1.0));
        let ctx = AttnCtx {
            b,
            t,
            pos0: 0,
            bias: Some(&gamma),
            key_mask: None,
        };
        let (ya, acts_a) = apart.forward(&be, x.clone(), &ctx, None).unwrap();
        let (yf, acts_f) = fused.forward(&be, x.clone(), &ctx, None).unwrap();
        close(&what("forward"), &be.to_vec(&yf), &be.to_vec(&ya));
        let dout = be.from_slice(&rnd(&mut r, b * t * 10, 1.0));
        let (dxa, dga) = apart
            .clone()
            .backward(&be, &acts_a, &ctx, &dout, true)
            .unwrap();
        let (dxf, dgf) = fused.backward(&be, &acts_f, &ctx, &dout, true).unwrap();
        close(&what("dx"), &be.to_vec(&dxf), &be.to_vec(&dxa));
        close(
            &what("dγ"),
            &be.to_vec(&dgf.unwrap()),
            &be.to_vec(&dga.unwrap()),
        );
        // activations of the other layout are refused, not misread
        let e = fused
            .backward(&be, &acts_a, &ctx, &dout, false)
            .unwrap_err();
        assert!(e.to_string().contains("unfuse it first"), "{e}");
        // decoding: a prefill of 3, then one position at a time, then the keys of 2
        // more alone (`fill_cache`): the same outputs and the same cache
        let (mut ca, mut cf) = (cache(&be, b), cache(&be, b));
        for (pos0, tt) in [(0, 3), (3, 1), (4, 1)] {
            let x = be.from_slice(&rnd(&mut r, b * tt * 10, 1.0));
            let ctx = AttnCtx {
                b,
                t: tt,
                pos0,
                bias: None,
                key_mask: None,
            };
            let (ya, _) = apart.forward(&be, x.clone(), &ctx, Some(&mut ca)).unwrap();
            let (yf, _) = fused.forward(&be, x, &ctx, Some(&mut cf)).unwrap();
            close(
                &what(&format!("cached at {pos0}")),
                &be.to_vec(&yf),
                &be.to_vec(&ya),
            );
        }
        let x = be.from_slice(&rnd(&mut r, b * 2 * 10, 1.0));
        let ctx = AttnCtx {
            b,
            t: 2,
            pos0: 5,
            bias: None,
            key_mask: None,
        };
        apart.fill_cache(&be, &x, &ctx, &mut ca).unwrap();
        fused.fill_cache(&be, &x, &ctx, &mut cf).unwrap();
        assert_eq!((ca.len, cf.len), (7, 7), "{on}");
        close(&what("cached keys"), &be.to_vec(&cf.k), &be.to_vec(&ca.k));
        close(&what("cached values"), &be.to_vec(&cf.v), &be.to_vec(&ca.v));
        // apart again: every value as it was, bit for bit
        fused.unfuse(&be).unwrap();
        assert!(!fused.is_fused(), "{on}");
        for (l, m) in [
            (&fused.q, &apart.q),
            (&fused.k, &apart.k),
            (&fused.v, &apart.v),
        ] {
            assert_eq!(be.to_vec(&l.weight.data), be.to_vec(&m.weight.data), "{on}");
            let bias = |l: &popen::nn::Linear<f32, B>| l.bias.as_ref().map(|b| be.to_vec(&b.data));
            assert_eq!(bias(l), bias(m), "{on}");
        }
    }
    // what cannot fuse: a trainable projection, biases on some of the three only
    let mut r = Philox::new(32);
    let mut a = frozen_attention(&be, false, &mut r);
    a.k.weight.set_trainable(&be, true);
    let e = a.fuse(&be).unwrap_err().to_string();
    assert!(e.contains("trainable") && !a.is_fused(), "{on}: {e}");
    let mut a = frozen_attention(&be, false, &mut r);
    a.v.bias = Some(Tensor {
        shape: vec![4],
        data: be.zeros(4),
        grad: None,
    });
    let e = a.fuse(&be).unwrap_err().to_string();
    assert!(e.contains("biases on 1 of 3"), "{on}: {e}");
    assert!(
        be.len(&a.q.weight.data) > 0,
        "{on}: a refused fusion emptied q"
    );
}

#[test]
fn a_fused_attention_equals_its_projections_apart() {
    fused_equals_apart(Cpu);
    for d in backends() {
        fused_equals_apart(d);
    }
}

fn fused_mlp_equals_apart<B: Backend<f32>>(be: B) {
    let on = be.name();
    let mut r = Philox::new(33);
    // C = 10, I = 7 (rows of 7: no float4 alignment), frozen
    let mut apart = SwiGluMlp::new(&be, 10, 7);
    for l in [&mut apart.gate, &mut apart.up, &mut apart.down] {
        l.weight.data = be.from_slice(&rnd(&mut r, l.weight.numel(), 0.5));
        l.weight.grad = None;
    }
    let mut fused = apart.clone();
    assert!(fused.fuse(&be).unwrap() && fused.is_fused(), "{on}");
    assert!(!fused.fuse(&be).unwrap(), "{on}: fused twice");
    for n in [1, 6] {
        let x = be.from_slice(&rnd(&mut r, n * 10, 1.0));
        let (ya, acts_a) = apart.forward(&be, x.clone()).unwrap();
        let (yf, acts_f) = fused.forward(&be, x).unwrap();
        close(
            &format!("{on} mlp {n} rows"),
            &be.to_vec(&yf),
            &be.to_vec(&ya),
        );
        let dy = be.from_slice(&rnd(&mut r, n * 10, 1.0));
        let dxa = apart.backward(&be, &acts_a, &dy).unwrap();
        let dxf = fused.backward(&be, &acts_f, &dy).unwrap();
        close(
            &format!("{on} mlp dx {n} rows"),
            &be.to_vec(&dxf),
            &be.to_vec(&dxa),
        );
        let e = fused.backward(&be, &acts_a, &dy).unwrap_err();
        assert!(e.to_string().contains("fused otherwise"), "{e}");
    }
    fused.unfuse(&be).unwrap();
    assert!(!fused.is_fused(), "{on}");
    for (l, m) in [(&fused.gate, &apart.gate), (&fused.up, &apart.up)] {
        assert_eq!(be.to_vec(&l.weight.data), be.to_vec(&m.weight.data), "{on}");
    }
    apart.up.weight.set_trainable(&be, true);
    let e = apart.fuse(&be).unwrap_err().to_string();
    assert!(e.contains("trainable") && !apart.is_fused(), "{on}: {e}");
}

#[test]
fn a_fused_swiglu_mlp_equals_its_gate_and_up_apart() {
    fused_mlp_equals_apart(Cpu);
    for d in backends() {
        fused_mlp_equals_apart(d);
    }
}
