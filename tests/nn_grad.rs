//! Every layer's backward against f64 central finite differences, on tiny odd shapes,
//! plus the frozen-slot behaviour (weight gradient skipped, activation gradient kept).
//!
//! The scalar checked is L = Σ w ∘ out with fixed random weights w, so dL/dout = w.
use popen::backend::{Act, AttnLayout, AttnShape, Backend, Cols, Cpu};
use popen::nn::layers::ImageShape;
use popen::nn::AttnCtx;
use popen::nn::{
    randn, Attention, Embedding, LayerNorm, Linear, Mlp, PatchEmbed, RmsNorm, Rng, SwiGluMlp,
};

type T = Vec<f64>;
const BE: Cpu = Cpu;
/// Central-difference step: truncation error O(h²) ≈ 1e-10, rounding ≈ 1e-16/h.
const H: f64 = 1e-5;
const ATOL: f64 = 1e-7;
const RTOL: f64 = 1e-5;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compare `analytic[i]` with the central difference of `loss_at(i, ±H)` for every i.
fn check(name: &str, analytic: &[f64], mut loss_at: impl FnMut(usize, f64) -> f64) {
    assert!(!analytic.is_empty(), "{name}: nothing to check");
    let mut worst = 0.0f64;
    for (i, &a) in analytic.iter().enumerate() {
        let num = (loss_at(i, H) - loss_at(i, -H)) / (2.0 * H);
        let err = (a - num).abs();
        assert!(
            err <= ATOL + RTOL * num.abs().max(a.abs()),
            "{name}[{i}]: analytic {a:.10} vs numeric {num:.10}"
        );
        worst = worst.max(err);
    }
    // a backward that returned all zeros would pass only if the loss were flat
    assert!(
        analytic.iter().any(|v| v.abs() > 1e-6),
        "{name}: gradient is all zero"
    );
}

fn rnd(rng: &mut Rng, n: usize) -> T {
    randn::<f64>(rng, n, 1.0)
}

fn perturbed(x: &[f64], i: usize, d: f64) -> T {
    let mut y = x.to_vec();
    y[i] += d;
    y
}

#[test]
fn linear_backward_matches_finite_differences() {
    let mut rng = Rng::new(1);
    let (n, i, o) = (5, 7, 3);
    for bias in [true, false] {
        let mut lin: Linear<f64, Cpu> = Linear::new(&BE, i, o, bias);
        lin.weight.data = rnd(&mut rng, o * i);
        if let Some(b) = &mut lin.bias {
            b.data = rnd(&mut rng, o);
        }
        let x = rnd(&mut rng, n * i);
        let w = rnd(&mut rng, n * o);
        let loss = |l: &Linear<f64, Cpu>, x: &T| dot(&l.forward(&BE, x).unwrap(), &w);
        let mut l2 = lin.clone();
        let dx = l2.backward(&BE, &x, &w, true).unwrap().unwrap();
        check("linear dx", &dx, |k, d| loss(&lin, &perturbed(&x, k, d)));
        check("linear dW", l2.weight.grad.as_ref().unwrap(), |k, d| {
            let mut l = lin.clone();
            l.weight.data[k] += d;
            loss(&l, &x)
        });
        if bias {
            check(
                "linear db",
                l2.bias.as_ref().unwrap().grad.as_ref().unwrap(),
                |k, d| {
                    let mut l = lin.clone();
                    l.bias.as_mut().unwrap().data[k] += d;
                    loss(&l, &x)
                },
            );
        }
    }
}

#[test]
fn frozen_linear_skips_weight_grad_but_carries_dx() {
    let mut rng = Rng::new(2);
    let (n, i, o) = (3, 5, 4);
    let mut lin: Linear<f64, Cpu> = Linear::new(&BE, i, o, true);
    lin.weight.data = rnd(&mut rng, o * i);
    let mut frozen = lin.clone();
    frozen.weight.set_trainable(&BE, false);
    frozen.bias.as_mut().unwrap().set_trainable(&BE, false);
    let x = rnd(&mut rng, n * i);
    let dy = rnd(&mut rng, n * o);
    let dx_f = frozen.backward(&BE, &x, &dy, true).unwrap().unwrap();
    let dx_t = lin.backward(&BE, &x, &dy, true).unwrap().unwrap();
    assert!(frozen.weight.grad.is_none() && frozen.bias.as_ref().unwrap().grad.is_none());
    assert_eq!(
        dx_f, dx_t,
        "a frozen weight must not change the activation gradient"
    );
    assert!(dx_f.iter().any(|v| *v != 0.0));
}

#[test]
fn linear_grads_accumulate() {
    let mut rng = Rng::new(3);
    let mut lin: Linear<f64, Cpu> = Linear::new(&BE, 4, 3, true);
    lin.weight.data = rnd(&mut rng, 12);
    let x = rnd(&mut rng, 8);
    let dy = rnd(&mut rng, 6);
    lin.backward(&BE, &x, &dy, false).unwrap();
    let once = lin.weight.grad.clone().unwrap();
    lin.backward(&BE, &x, &dy, false).unwrap();
    let twice = lin.weight.grad.clone().unwrap();
    for (a, b) in once.iter().zip(&twice) {
        assert!(
            (2.0 * a - b).abs() < 1e-12,
            "parameter grads must accumulate (+=)"
        );
    }
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let mut rng = Rng::new(4);
    let (n, c) = (3, 7);
    let mut ln: RmsNorm<f64, Cpu> = RmsNorm::new(&BE, c, 1e-5);
    ln.weight.data = rnd(&mut rng, c);
    let x = rnd(&mut rng, n * c);
    let w = rnd(&mut rng, n * c);
    let loss = |l: &RmsNorm<f64, Cpu>, x: &T| dot(&l.forward(&BE, x).unwrap().0, &w);
    let mut l2 = ln.clone();
    let (_, rstd) = ln.forward(&BE, &x).unwrap();
    let dx = l2.backward(&BE, &x, &rstd, &w).unwrap();
    check("rmsnorm dx", &dx, |k, d| loss(&ln, &perturbed(&x, k, d)));
    check("rmsnorm dw", l2.weight.grad.as_ref().unwrap(), |k, d| {
        let mut l = ln.clone();
        l.weight.data[k] += d;
        loss(&l, &x)
    });
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    let mut rng = Rng::new(5);
    let (n, c) = (4, 5);
    let mut ln: LayerNorm<f64, Cpu> = LayerNorm::new(&BE, c, 1e-5);
    ln.weight.data = rnd(&mut rng, c);
    ln.bias.data = rnd(&mut rng, c);
    let x = rnd(&mut rng, n * c);
    let w = rnd(&mut rng, n * c);
    let loss = |l: &LayerNorm<f64, Cpu>, x: &T| dot(&l.forward(&BE, x).unwrap().0, &w);
    let mut l2 = ln.clone();
    let (_, st) = ln.forward(&BE, &x).unwrap();
    let dx = l2.backward(&BE, &x, &st, &w).unwrap();
    check("layernorm dx", &dx, |k, d| loss(&ln, &perturbed(&x, k, d)));
    check("layernorm dw", l2.weight.grad.as_ref().unwrap(), |k, d| {
        let mut l = ln.clone();
        l.weight.data[k] += d;
        loss(&l, &x)
    });
    check("layernorm db", l2.bias.grad.as_ref().unwrap(), |k, d| {
        let mut l = ln.clone();
        l.bias.data[k] += d;
        loss(&l, &x)
    });
}

#[test]
fn rope_split_backward_matches_finite_differences() {
    let mut rng = Rng::new(6);
    let (b, t, nh, hs, pos0) = (2, 3, 3, 6, 5);
    let n = b * t * nh * hs;
    let x = rnd(&mut rng, n);
    let w = rnd(&mut rng, n);
    let fwd = |x: &T| {
        let mut o = vec![0.0; n];
        BE.heads_split(
            x,
            Cols::whole(nh * hs),
            b,
            t,
            nh,
            hs,
            pos0,
            Some(1e4),
            &mut o,
        )
        .unwrap();
        dot(&o, &w)
    };
    let mut dx = vec![0.0; n];
    BE.heads_split_bwd(
        &w,
        b,
        t,
        nh,
        hs,
        pos0,
        Some(1e4),
        &mut dx,
        Cols::whole(nh * hs),
    )
    .unwrap();
    check("rope dx", &dx, |k, d| fwd(&perturbed(&x, k, d)));
}

#[test]
fn activations_backward_match_finite_differences() {
    let mut rng = Rng::new(7);
    let x = rnd(&mut rng, 11);
    let w = rnd(&mut rng, 11);
    for act in [Act::QuickGelu, Act::GeluErf, Act::GeluTanh, Act::Silu] {
        let fwd = |x: &T| {
            let mut o = vec![0.0; 11];
            BE.act_fwd(act, x, &mut o).unwrap();
            dot(&o, &w)
        };
        let mut dx = vec![0.0; 11];
        BE.act_bwd(act, &x, &w, &mut dx).unwrap();
        check(&format!("{act:?} dx"), &dx, |k, d| {
            fwd(&perturbed(&x, k, d))
        });
    }
}

#[test]
fn gelu_variants_match_known_values() {
    // references: PyTorch gelu(1.0) = 0.8413447460685429, gelu(1.0, approximate="tanh")
    // = 0.8411919906082768, quick_gelu(1.0) = 1·σ(1.702) = 0.8457957659328212
    let mut o = vec![0.0f64; 1];
    for (act, want) in [
        (Act::GeluErf, 0.841_344_746_068_542_9),
        (Act::GeluTanh, 0.841_191_990_608_276_8),
        (Act::QuickGelu, 0.845_795_765_932_821_2),
    ] {
        BE.act_fwd(act, &vec![1.0], &mut o).unwrap();
        assert!(
            (o[0] - want).abs() < 1e-12,
            "{act:?}(1) = {} want {want}",
            o[0]
        );
    }
}

#[test]
fn mlp_and_swiglu_backward_match_finite_differences() {
    let mut rng = Rng::new(8);
    let (n, c, hdim) = (3, 5, 7);
    let x = rnd(&mut rng, n * c);
    let w = rnd(&mut rng, n * c);
    for act in [Act::QuickGelu, Act::GeluErf] {
        let mut m: Mlp<f64, Cpu> = Mlp::new(&BE, c, hdim, act, true);
        for l in [&mut m.fc1, &mut m.fc2] {
            l.weight.data = rnd(&mut rng, l.weight.numel());
            l.bias.as_mut().unwrap().data = rnd(&mut rng, l.fan_out());
        }
        let loss = |m: &Mlp<f64, Cpu>, x: &T| dot(&m.forward(&BE, x.clone()).unwrap().0, &w);
        let mut m2 = m.clone();
        let (_, acts) = m.forward(&BE, x.clone()).unwrap();
        assert_eq!(acts.x, x, "the MLP keeps its input");
        let dx = m2.backward(&BE, &acts, &w).unwrap();
        check("mlp dx", &dx, |k, d| loss(&m, &perturbed(&x, k, d)));
        check("mlp fc1.w", m2.fc1.weight.grad.as_ref().unwrap(), |k, d| {
            let mut mm = m.clone();
            mm.fc1.weight.data[k] += d;
            loss(&mm, &x)
        });
    }
    let mut s: SwiGluMlp<f64, Cpu> = SwiGluMlp::new(&BE, c, hdim);
    for l in [&mut s.gate, &mut s.up, &mut s.down] {
        l.weight.data = rnd(&mut rng, l.weight.numel());
    }
    let loss = |m: &SwiGluMlp<f64, Cpu>, x: &T| dot(&m.forward(&BE, x.clone()).unwrap().0, &w);
    let mut s2 = s.clone();
    let (_, acts) = s.forward(&BE, x.clone()).unwrap();
    let dx = s2.backward(&BE, &acts, &w).unwrap();
    check("swiglu dx", &dx, |k, d| loss(&s, &perturbed(&x, k, d)));
    check(
        "swiglu gate.w",
        s2.gate.weight.grad.as_ref().unwrap(),
        |k, d| {
            let mut mm = s.clone();
            mm.gate.weight.data[k] += d;
            loss(&mm, &x)
        },
    );
    check(
        "swiglu up.w",
        s2.up.weight.grad.as_ref().unwrap(),
        |k, d| {
            let mut mm = s.clone();
            mm.up.weight.data[k] += d;
            loss(&mm, &x)
        },
    );
}

#[test]
fn embedding_backward_scatters_repeated_ids() {
    let mut rng = Rng::new(9);
    let (v, c) = (5, 3);
    let mut e: Embedding<f64, Cpu> = Embedding::new(&BE, v, c);
    e.weight.data = rnd(&mut rng, v * c);
    let ids = [1u32, 4, 1, 0];
    let w = rnd(&mut rng, ids.len() * c);
    let loss = |e: &Embedding<f64, Cpu>| dot(&e.forward(&BE, &ids).unwrap(), &w);
    let mut e2 = e.clone();
    e2.backward(&BE, &ids, &w).unwrap();
    check("embedding dW", e2.weight.grad.as_ref().unwrap(), |k, d| {
        let mut ee = e.clone();
        ee.weight.data[k] += d;
        loss(&ee)
    });
    assert!(
        e.forward(&BE, &[5]).is_err(),
        "an id past the table must be an error"
    );
}

#[test]
fn patch_embed_backward_matches_finite_differences() {
    let mut rng = Rng::new(10);
    let (b, ch, hh, ww, p, oc) = (2, 3, 6, 9, 3, 4);
    let img = ImageShape { b, h: hh, w: ww };
    let mut pe: PatchEmbed<f64, Cpu> = PatchEmbed::new(&BE, ch, oc, p, true);
    pe.weight.data = rnd(&mut rng, pe.weight.numel());
    pe.bias.as_mut().unwrap().data = rnd(&mut rng, oc);
    let px = rnd(&mut rng, b * ch * hh * ww);
    let np = (hh / p) * (ww / p);
    let w = rnd(&mut rng, b * np * oc);
    let loss = |pe: &PatchEmbed<f64, Cpu>, px: &T| dot(&pe.forward(&BE, px, img).unwrap().1, &w);
    // the matmul form equals a direct stride-P convolution
    let (_, out) = pe.forward(&BE, &px, img).unwrap();
    let (gw, bi, o, gy, gx) = (ww / p, 1, 2, 1, 2);
    let mut conv = pe.bias.as_ref().unwrap().data[o];
    for c in 0..ch {
        for ky in 0..p {
            for kx in 0..p {
                conv += pe.weight.data[((o * ch + c) * p + ky) * p + kx]
                    * px[((bi * ch + c) * hh + gy * p + ky) * ww + gx * p + kx];
            }
        }
    }
    assert!((out[((bi * np) + gy * gw + gx) * oc + o] - conv).abs() < 1e-12);
    let mut pe2 = pe.clone();
    let (patches, _) = pe.forward(&BE, &px, img).unwrap();
    let dpx = pe2.backward(&BE, &patches, &w, img, true).unwrap().unwrap();
    check("patch dpixels", &dpx, |k, d| {
        loss(&pe, &perturbed(&px, k, d))
    });
    check("patch dW", pe2.weight.grad.as_ref().unwrap(), |k, d| {
        let mut q = pe.clone();
        q.weight.data[k] += d;
        loss(&q, &px)
    });
}

#[allow(clippy::too_many_arguments)]
fn attn_layer(
    rng: &mut Rng,
    c: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
    rope: Option<f32>,
    causal: bool,
    bias: bool,
) -> Attention<f64, Cpu> {
    let mut a: Attention<f64, Cpu> = Attention::new(&BE, c, nh, nkv, hs, bias, rope, causal);
    for l in [&mut a.q, &mut a.k, &mut a.v, &mut a.o] {
        l.weight.data = randn(rng, l.weight.numel(), 0.5);
        if let Some(b) = &mut l.bias {
            b.data = randn(rng, b.numel(), 0.5);
        }
    }
    a
}

#[test]
fn attention_backward_matches_finite_differences() {
    // causal GQA with RoPE, key bias γ and a padding mask; and bidirectional MHA with biases
    let mut rng = Rng::new(11);
    let (b, t, c) = (2, 5, 6);
    for (nh, nkv, hs, rope, causal, lin_bias) in [
        (3, 1, 4, Some(100.0f32), true, false),
        (2, 2, 3, None, false, true),
    ] {
        let a = attn_layer(&mut rng, c, nh, nkv, hs, rope, causal, lin_bias);
        let x = rnd(&mut rng, b * t * c);
        let gamma = rnd(&mut rng, b * t);
        let mask: Vec<u8> = (0..b * t).map(|i| u8::from(i != 3 && i != 7)).collect();
        let w = rnd(&mut rng, b * t * c);
        let loss = |a: &Attention<f64, Cpu>, x: &T, g: &T| {
            let ctx = AttnCtx {
                b,
                t,
                pos0: 0,
                bias: Some(g),
                key_mask: Some(&mask),
            };
            dot(&a.forward(&BE, x.clone(), &ctx, None).unwrap().0, &w)
        };
        let ctx = AttnCtx {
            b,
            t,
            pos0: 0,
            bias: Some(&gamma),
            key_mask: Some(&mask),
        };
        let (_, acts) = a.forward(&BE, x.clone(), &ctx, None).unwrap();
        let mut a2 = a.clone();
        let (dx, dg) = a2.backward(&BE, &acts, &ctx, &w, true).unwrap();
        check("attn dx", &dx, |k, d| {
            loss(&a, &perturbed(&x, k, d), &gamma)
        });
        let dg = dg.unwrap();
        // masked keys get no bias gradient
        assert_eq!(dg[3], 0.0);
        check("attn dγ", &dg, |k, d| {
            loss(&a, &x, &perturbed(&gamma, k, d))
        });
        check("attn q.w", a2.q.weight.grad.as_ref().unwrap(), |k, d| {
            let mut aa = a.clone();
            aa.q.weight.data[k] += d;
            loss(&aa, &x, &gamma)
        });
        check("attn k.w", a2.k.weight.grad.as_ref().unwrap(), |k, d| {
            let mut aa = a.clone();
            aa.k.weight.data[k] += d;
            loss(&aa, &x, &gamma)
        });
        check("attn v.w", a2.v.weight.grad.as_ref().unwrap(), |k, d| {
            let mut aa = a.clone();
            aa.v.weight.data[k] += d;
            loss(&aa, &x, &gamma)
        });
    }
}

#[test]
fn causal_attention_ignores_future_and_padded_keys() {
    let mut rng = Rng::new(12);
    let s = AttnShape {
        b: 1,
        nh: 2,
        nkv: 1,
        tq: 4,
        tk: 4,
        kv_stride: 4,
        hs: 3,
        causal: true,
        scale: 0.5,
        layout: AttnLayout::HEADS,
    };
    let q = rnd(&mut rng, 2 * 4 * 3);
    let k = rnd(&mut rng, 4 * 3);
    let v = rnd(&mut rng, 4 * 3);
    let run = |k: &T, v: &T, mask: Option<&[u8]>| {
        let (mut o, mut l) = (vec![0.0; 24], vec![0.0; 8]);
        BE.attention_fwd(&s, &q, k, v, None, mask, &mut o, &mut l)
            .unwrap();
        o
    };
    let base = run(&k, &v, None);
    // changing the last key/value changes only the last query's output
    let (mut k2, mut v2) = (k.clone(), v.clone());
    k2[9] += 1.0;
    v2[10] += 1.0;
    let moved = run(&k2, &v2, None);
    for h in 0..2 {
        for i in 0..4 {
            let same = base[(h * 4 + i) * 3..][..3] == moved[(h * 4 + i) * 3..][..3];
            assert_eq!(same, i < 3, "head {h} query {i}");
        }
    }
    // a padded key is invisible: masking key 3 equals the causal output for queries < 3
    let masked = run(&k2, &v2, Some(&[1, 1, 1, 0]));
    assert_eq!(masked[..9], base[..9]);
}

#[test]
fn logprob_backward_matches_finite_differences() {
    let mut rng = Rng::new(13);
    let (n, v) = (3, 7);
    let logits = rnd(&mut rng, n * v);
    let targets = [2i32, 6, 0];
    let wt = rnd(&mut rng, n);
    let fwd = |x: &T| {
        let (mut lp, mut lse) = (vec![0.0; n], vec![0.0; n]);
        BE.logprob_fwd(x, &targets, v, &mut lp, &mut lse).unwrap();
        dot(&lp, &wt)
    };
    let (mut lp, mut lse) = (vec![0.0; n], vec![0.0; n]);
    BE.logprob_fwd(&logits, &targets, v, &mut lp, &mut lse)
        .unwrap();
    let mut dl = vec![0.0; n * v];
    BE.logprob_bwd(&logits, &targets, v, &lse, &wt, &mut dl)
        .unwrap();
    check("logprob dlogits", &dl, |k, d| {
        fwd(&perturbed(&logits, k, d))
    });
    assert!(BE
        .logprob_fwd(&logits, &[2, 7, 0], v, &mut lp, &mut lse)
        .is_err());
    assert!(BE
        .logprob_fwd(&logits, &[2, -1, 0], v, &mut lp, &mut lse)
        .is_err());
    // the ignore index: log-prob 0 and no gradient on that row, the others unchanged
    let ignored = [2, popen::kernels::logprob::IGNORE_INDEX, 0];
    let (mut lp2, mut lse2) = (vec![0.0; n], vec![0.0; n]);
    BE.logprob_fwd(&logits, &ignored, v, &mut lp2, &mut lse2)
        .unwrap();
    assert_eq!((lp2[0], lp2[1], lp2[2]), (lp[0], 0.0, lp[2]));
    let mut dl2 = vec![0.0; n * v];
    BE.logprob_bwd(&logits, &ignored, v, &lse2, &wt, &mut dl2)
        .unwrap();
    assert!(dl2[v..2 * v].iter().all(|&g| g == 0.0));
    assert_eq!(dl2[..v], dl[..v]);
}

#[test]
fn bad_sizes_are_errors_not_panics() {
    let x = vec![0.0f64; 10];
    let mut o = vec![0.0f64; 10];
    let mut r = vec![0.0f64; 3];
    assert!(BE.rmsnorm_fwd(&x, None, 1e-5, 3, &mut o, &mut r).is_err());
    let a = vec![0.0f64; 6];
    let mut out = vec![0.0f64; 5];
    assert!(BE
        .matmul(
            popen::backend::MatmulSpec {
                m: 2,
                k: 3,
                n: 2,
                ta: false,
                tb: false
            },
            &a,
            &a,
            &mut out,
            popen::backend::Accum::Replace
        )
        .is_err());
    let lin: Linear<f64, Cpu> = Linear::new(&BE, 4, 2, false);
    assert!(lin.forward(&BE, &vec![0.0; 7]).is_err());
}

#[test]
fn fast_f32_exp_is_accurate() {
    use popen::backend::cpu::exp_f32;
    let mut worst = 0.0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let want = (x as f64).exp();
        let rel = ((exp_f32(x) as f64) - want).abs() / want;
        worst = worst.max(rel);
        x += 0.0137;
    }
    assert!(worst < 3e-7, "worst relative error {worst}");
    assert_eq!(exp_f32(0.0), 1.0);
    assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
    assert!(exp_f32(f32::NAN).is_nan());
}

/// Products large enough that the CPU backend cuts the output into blocks, one serial
/// gemm per rayon task: tall (row blocks) and wide (column blocks), every transpose,
/// replace and accumulate, against an f64 triple loop; the same pool gives bitwise the
/// same result run to run.
#[test]
fn blocked_matmul_matches_naive_for_every_layout_and_thread_count() {
    use popen::backend::{Accum, MatmulSpec};
    let mut rng = Rng::new(7);
    let mut rnd32 = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_u64() % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    };
    // (m, k, n): tall → row blocks, wide → column blocks, both above the serial cut-off
    for (m, k, n) in [(150, 64, 100), (60, 64, 200), (97, 33, 250)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (a, b, init) = (rnd32(m * k), rnd32(k * n), rnd32(m * n));
            let s = MatmulSpec { m, k, n, ta, tb };
            let at = |i: usize, kk: usize| if ta { a[kk * m + i] } else { a[i * k + kk] } as f64;
            let bt = |kk: usize, j: usize| if tb { b[j * k + kk] } else { b[kk * n + j] } as f64;
            for acc in [Accum::Replace, Accum::Add] {
                let mut first: Option<Vec<f32>> = None;
                for threads in [1, 2, 3, 2] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut out = init.clone();
                    pool.install(|| Cpu.matmul(s, &a, &b, &mut out, acc))
                        .unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let mut want = if acc == Accum::Add {
                                init[i * n + j] as f64
                            } else {
                                0.0
                            };
                            for kk in 0..k {
                                want += at(i, kk) * bt(kk, j);
                            }
                            let got = out[i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()) * k as f64,
                                "m={m} k={k} n={n} ta={ta} tb={tb} {acc:?} threads={threads} ({i},{j}): {got} vs {want}"
                            );
                        }
                    }
                    if threads == 2 {
                        match &first {
                            None => first = Some(out),
                            Some(f) => assert_eq!(f, &out, "2 threads must be reproducible"),
                        }
                    }
                }
            }
        }
    }
}

/// `matmul_new` (a new buffer the CPU backend does not zero first) is bitwise
/// `matmul` with `Accum::Replace` into zeros, on every path: blocked gemm, one serial
/// gemm, gemm's vector paths (m = 1, n = 1), the few-rows dot products, k = 0 and
/// empty outputs, f32 and f64.  Before each product a freed buffer of the output's
/// size full of NaN lies in the heap to be reused: an output element read before it
/// is written would come out NaN.
#[test]
fn matmul_new_is_replace_into_zeros_on_every_path() {
    use popen::backend::{Accum, MatmulSpec};
    fn check<F: popen::backend::cpu::CpuFloat>(rnd: &mut dyn FnMut(usize) -> Vec<f64>) {
        let shapes = [
            (150, 64, 100),
            (60, 64, 200),
            (9, 17, 11),
            (1, 33, 77),
            (77, 33, 1),
            (3, 40, 50),
            (5, 0, 7),
            (0, 4, 6),
        ];
        for (m, k, n) in shapes {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let cast = |v: Vec<f64>| -> Vec<F> {
                    v.into_iter().map(|x| F::from(x).unwrap()).collect()
                };
                let (a, b) = (cast(rnd(m * k)), cast(rnd(k * n)));
                let s = MatmulSpec { m, k, n, ta, tb };
                let mut want = vec![F::zero(); m * n];
                Cpu.matmul(s, &a, &b, &mut want, Accum::Replace).unwrap();
                drop(std::hint::black_box(vec![F::nan(); m * n]));
                let got = Cpu.matmul_new(s, &a, &b).unwrap();
                assert_eq!(got.len(), m * n);
                let bits = |x: &F| x.to_f64().unwrap().to_bits();
                if let Some(i) = (0..m * n).find(|&i| bits(&got[i]) != bits(&want[i])) {
                    panic!(
                        "m={m} k={k} n={n} ta={ta} tb={tb}: element {i} is {:?}, want {:?}",
                        got[i], want[i]
                    );
                }
            }
        }
        let s = MatmulSpec {
            m: 4,
            k: 3,
            n: 5,
            ta: false,
            tb: false,
        };
        let err = Cpu
            .matmul_new(s, &vec![F::zero(); 12], &vec![F::zero(); 14])
            .unwrap_err();
        assert!(err.to_string().contains("15"), "{err}");
    }
    let mut rng = Rng::new(11);
    let mut rnd = |n: usize| -> Vec<f64> {
        (0..n)
            .map(|_| (rng.next_u64() % 2001) as f64 / 1000.0 - 1.0)
            .collect()
    };
    check::<f32>(&mut rnd);
    check::<f64>(&mut rnd);
}

/// `on_worker` runs its closure on a thread of rayon's global pool and hands back the
/// result (the `popen` binary runs every command this way).
#[test]
fn on_worker_runs_on_a_pool_thread() {
    use popen::backend::cpu::on_worker;
    assert_eq!(rayon::current_thread_index(), None);
    let (index, v) = on_worker(|| (rayon::current_thread_index(), 6 * 7));
    assert!(index.is_some());
    assert_eq!(v, 42);
}

#[test]
fn map_jobs_keeps_the_jobs_order_on_the_cpu_and_runs_them_on_the_pool() {
    use popen::backend::{map_jobs, Backend, Cpu};
    assert!(<Cpu as Backend<f32>>::concurrent_callers(&Cpu));
    let jobs: Vec<usize> = (0..64).collect();
    let out = map_jobs::<f32, _, _, _>(&Cpu, jobs, |i| {
        // uneven work, so that the jobs finish out of order
        let spin: u64 = (0..((64 - i) * 2000) as u64).fold(0, |a, x| a ^ x.wrapping_mul(31));
        (i * i, rayon::current_thread_index().is_some(), spin)
    });
    assert_eq!(out.len(), 64);
    for (i, (sq, on_pool, _)) in out.iter().enumerate() {
        assert_eq!(*sq, i * i);
        assert!(on_pool);
    }
}
