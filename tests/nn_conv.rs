//! The 2-D layers (Conv2d, ConvTranspose2x2, CrossAttention): forwards against direct
//! definitions (PyTorch weight layouts included), every backward against f64 central
//! finite differences on odd sizes, parameter and input gradients.
//!
//! The scalar checked is L = Σ w ∘ out with fixed random weights w, so dL/dout = w.
use popen::backend::Cpu;
use popen::nn::{randn, Conv2d, ConvTranspose2x2, CrossAttention, CrossIn, Linear, Rng};

mod common;
use common::fd::{check, dot, perturbed, rnd, T};

const BE: Cpu = Cpu;

fn fill(rng: &mut Rng, l: &mut Linear<f64, Cpu>) {
    l.weight.data = randn(rng, l.weight.numel(), 0.5);
    if let Some(b) = &mut l.bias {
        b.data = randn(rng, b.numel(), 0.5);
    }
}

/// Check dW and db of `lin` (found in the layer by `get`) against finite differences.
fn check_linear<L: Clone>(
    name: &str,
    layer: &L,
    trained: &Linear<f64, Cpu>,
    get: impl Fn(&mut L) -> &mut Linear<f64, Cpu>,
    loss: impl Fn(&L) -> f64,
) {
    check(
        &format!("{name}.w"),
        trained.weight.grad.as_ref().unwrap(),
        |k, d| {
            let mut l = layer.clone();
            get(&mut l).weight.data[k] += d;
            loss(&l)
        },
    );
    if let Some(b) = &trained.bias {
        check(&format!("{name}.b"), b.grad.as_ref().unwrap(), |k, d| {
            let mut l = layer.clone();
            get(&mut l).bias.as_mut().unwrap().data[k] += d;
            loss(&l)
        });
    }
}

#[test]
fn conv2d_matches_a_direct_convolution_and_its_backward_matches_finite_differences() {
    let mut rng = Rng::new(31);
    let (b, h, w, ic, oc) = (2, 5, 7, 3, 4);
    for (k, pad) in [(3, 1), (1, 0), (2, 1)] {
        // PyTorch layout (OC, IC, K, K), converted
        let wt = rnd(&mut rng, oc * ic * k * k);
        let mut conv: Conv2d<f64, Cpu> = Conv2d::new(&BE, ic, oc, k, pad, true);
        conv.lin.weight.data = Conv2d::<f64, Cpu>::from_torch_layout(&wt, oc, ic, k).unwrap();
        conv.lin.bias.as_mut().unwrap().data = rnd(&mut rng, oc);
        let x = rnd(&mut rng, b * h * w * ic);
        let (y, acts) = conv.forward(&BE, &x, b, h, w).unwrap();
        let (ho, wo) = (h + 2 * pad - k + 1, w + 2 * pad - k + 1);
        assert_eq!(y.len(), b * ho * wo * oc);
        // y[b, oy, ox, o] = bias[o] + Σ wt[o, c, ky, kx] x[b, oy+ky−pad, ox+kx−pad, c]
        for (bi, oy, ox, o) in [(1, 0, 0, 2), (0, ho - 1, wo - 1, 3), (1, 2, 3, 0)] {
            let mut want = conv.lin.bias.as_ref().unwrap().data[o];
            for c in 0..ic {
                for ky in 0..k {
                    for kx in 0..k {
                        let (iy, ix) = (
                            oy as i64 + ky as i64 - pad as i64,
                            ox as i64 + kx as i64 - pad as i64,
                        );
                        if (0..h as i64).contains(&iy) && (0..w as i64).contains(&ix) {
                            want += wt[((o * ic + c) * k + ky) * k + kx]
                                * x[((bi * h + iy as usize) * w + ix as usize) * ic + c];
                        }
                    }
                }
            }
            let got = y[((bi * ho + oy) * wo + ox) * oc + o];
            assert!(
                (got - want).abs() < 1e-12,
                "k={k} ({bi},{oy},{ox},{o}): {got} vs {want}"
            );
        }
        let g = rnd(&mut rng, y.len());
        let loss = |c: &Conv2d<f64, Cpu>, x: &T| dot(&c.forward(&BE, x, b, h, w).unwrap().0, &g);
        let mut c2 = conv.clone();
        let dx = c2.backward(&BE, &acts, &g).unwrap();
        check(&format!("conv k={k} dx"), &dx, |i, d| {
            loss(&conv, &perturbed(&x, i, d))
        });
        check_linear(
            &format!("conv k={k}"),
            &conv,
            &c2.lin,
            |c| &mut c.lin,
            |c| loss(c, &x),
        );
    }
    let conv: Conv2d<f64, Cpu> = Conv2d::new(&BE, 3, 2, 3, 0, false);
    assert!(
        conv.forward(&BE, &vec![0.0; 2 * 2 * 2 * 3], 2, 2, 2)
            .is_err(),
        "kernel larger than input"
    );
    assert!(
        conv.forward(&BE, &vec![0.0; 10], 1, 3, 3).is_err(),
        "wrong input size"
    );
}

#[test]
fn conv_transpose_matches_pytorch_definition_and_its_backward_matches_finite_differences() {
    let mut rng = Rng::new(32);
    let (b, h, w, ic, oc) = (2, 3, 5, 3, 4);
    let wt = rnd(&mut rng, ic * oc * 4); // PyTorch (IC, OC, 2, 2)
    let mut ct: ConvTranspose2x2<f64, Cpu> = ConvTranspose2x2::new(&BE, ic, oc);
    ct.lin.weight.data = ConvTranspose2x2::<f64, Cpu>::from_torch_layout(&wt, ic, oc).unwrap();
    ct.bias.data = rnd(&mut rng, oc);
    let x = rnd(&mut rng, b * h * w * ic);
    let (y, acts) = ct.forward(&BE, &x, b, h, w).unwrap();
    // y[b, 2y+dy, 2x+dx, o] = bias[o] + Σ_c x[b, y, x, c] wt[c, o, dy, dx]
    for (bi, yy, xx, dy, dxx, o) in [(1, 2, 4, 1, 0, 3), (0, 0, 0, 0, 1, 1)] {
        let mut want = ct.bias.data[o];
        for c in 0..ic {
            want += x[((bi * h + yy) * w + xx) * ic + c] * wt[((c * oc + o) * 2 + dy) * 2 + dxx];
        }
        let got = y[((bi * 2 * h + 2 * yy + dy) * 2 * w + 2 * xx + dxx) * oc + o];
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }
    let g = rnd(&mut rng, y.len());
    let loss =
        |c: &ConvTranspose2x2<f64, Cpu>, x: &T| dot(&c.forward(&BE, x, b, h, w).unwrap().0, &g);
    let mut c2 = ct.clone();
    let dx = c2.backward(&BE, &acts, &g).unwrap();
    check("convT dx", &dx, |i, d| loss(&ct, &perturbed(&x, i, d)));
    check_linear("convT", &ct, &c2.lin, |c| &mut c.lin, |c| loss(c, &x));
    check("convT bias", c2.bias.grad.as_ref().unwrap(), |k, d| {
        let mut c = ct.clone();
        c.bias.data[k] += d;
        loss(&c, &x)
    });
}

#[test]
fn cross_attention_backward_matches_finite_differences() {
    let mut rng = Rng::new(33);
    let (b, tq, tk, c) = (2, 3, 7, 8);
    for (nh, ds) in [(2, 2), (2, 1)] {
        let mut a: CrossAttention<f64, Cpu> = CrossAttention::new(&BE, c, nh, ds).unwrap();
        for l in [&mut a.q, &mut a.k, &mut a.v, &mut a.o] {
            fill(&mut rng, l);
        }
        assert_eq!(a.q.fan_out(), c / ds);
        let (xq, xk, xv) = (
            rnd(&mut rng, b * tq * c),
            rnd(&mut rng, b * tk * c),
            rnd(&mut rng, b * tk * c),
        );
        let g = rnd(&mut rng, b * tq * c);
        let loss = |a: &CrossAttention<f64, Cpu>, xq: &T, xk: &T, xv: &T| {
            let (xq, xk, xv) = (CrossIn::Lend(xq), CrossIn::Lend(xk), CrossIn::Lend(xv));
            dot(&a.forward(&BE, xq, xk, xv, b, tq, tk).unwrap().0, &g)
        };
        let ins = (
            CrossIn::Lend(&xq),
            CrossIn::Lend(&xk),
            CrossIn::Own(xv.clone()),
        );
        let (_, acts) = a.forward(&BE, ins.0, ins.1, ins.2, b, tq, tk).unwrap();
        let mut a2 = a.clone();
        let (dq, dk, dv) = a2.backward(&BE, &acts, &g).unwrap();
        check("xattn dxq", &dq, |i, d| {
            loss(&a, &perturbed(&xq, i, d), &xk, &xv)
        });
        check("xattn dxk", &dk, |i, d| {
            loss(&a, &xq, &perturbed(&xk, i, d), &xv)
        });
        check("xattn dxv", &dv, |i, d| {
            loss(&a, &xq, &xk, &perturbed(&xv, i, d))
        });
        let lossp = |a: &CrossAttention<f64, Cpu>| loss(a, &xq, &xk, &xv);
        check_linear("xattn q", &a, &a2.q, |a| &mut a.q, lossp);
        // the key bias adds q·b_k to every score of a query: softmax ignores it
        check("xattn k.w", a2.k.weight.grad.as_ref().unwrap(), |i, d| {
            let mut aa = a.clone();
            aa.k.weight.data[i] += d;
            lossp(&aa)
        });
        let dbk = a2.k.bias.as_ref().unwrap().grad.as_ref().unwrap();
        assert!(
            dbk.iter().all(|v| v.abs() < 1e-12),
            "key bias gradient {dbk:?}"
        );
        check_linear("xattn v", &a, &a2.v, |a| &mut a.v, lossp);
        check_linear("xattn o", &a, &a2.o, |a| &mut a.o, lossp);
        // self-attention is the same layer on one input, kept once: its gradient is the sum
        let x = rnd(&mut rng, b * tq * c);
        let gs = rnd(&mut rng, b * tq * c);
        let same = |x: &T| {
            a.forward(
                &BE,
                CrossIn::Lend(x),
                CrossIn::Same,
                CrossIn::Same,
                b,
                tq,
                tq,
            )
            .unwrap()
        };
        let (_, sacts) = same(&x);
        assert!(sacts.xk.is_none() && sacts.xv.is_none());
        let (d1, d2, d3) = a.clone().backward(&BE, &sacts, &gs).unwrap();
        let dx: T = (0..x.len()).map(|i| d1[i] + d2[i] + d3[i]).collect();
        check("self-attn dx", &dx, |i, d| {
            dot(&same(&perturbed(&x, i, d)).0, &gs)
        });
        // values Same as the keys: the keys read twice, kept once
        let l = CrossIn::Lend;
        let (kv, kvacts) = a
            .forward(&BE, l(&xq), l(&xk), CrossIn::Same, b, tq, tk)
            .unwrap();
        assert_eq!(
            kv,
            a.forward(&BE, l(&xq), l(&xk), l(&xk), b, tq, tk).unwrap().0
        );
        assert!(kvacts.xv.is_none() && kvacts.xv() == &xk);
        // the queries have no previous input; keys and queries of different lengths
        // cannot be one buffer
        let s = CrossIn::Same;
        assert!(a
            .forward(&BE, s, CrossIn::Lend(&x), CrossIn::Lend(&x), b, tq, tq)
            .is_err());
        let e = a
            .forward(
                &BE,
                CrossIn::Lend(&xq),
                CrossIn::Same,
                CrossIn::Lend(&xv),
                b,
                tq,
                tk,
            )
            .unwrap_err();
        assert!(e.to_string().contains("xk"), "{e}");
    }
    assert!(
        CrossAttention::<f64, Cpu>::new(&BE, 6, 2, 2).is_err(),
        "3 channels in 2 heads"
    );
    let a: CrossAttention<f64, Cpu> = CrossAttention::new(&BE, 8, 2, 2).unwrap();
    let (xq, xk, xv) = (vec![0.0; 8], vec![0.0; 16], vec![0.0; 15]);
    let l = CrossIn::Lend;
    assert!(a.forward(&BE, l(&xq), l(&xk), l(&xv), 1, 1, 2).is_err());
}

#[test]
fn two_way_transformer_backward_matches_finite_differences() {
    use popen::nn::TwoWayTransformer;
    let mut rng = Rng::new(34);
    let (b, t, n, c) = (2, 3, 7, 8);
    // depth 2: the first block skips the query encoding, the second adds it
    let mut tr: TwoWayTransformer<f64, Cpu> = TwoWayTransformer::new(&BE, 2, c, 2, 5).unwrap();
    {
        let mut params = Vec::new();
        tr.push_params(&mut params, "t");
        for (name, p) in params {
            if name.ends_with(".weight") && p.shape.len() == 2 {
                p.data = randn(&mut rng, p.numel(), 0.5);
            } else {
                // norms and biases away from their 1/0 init so their gradients are generic
                p.data = p.data.iter().map(|v| v + 0.3 * rng.normal()).collect();
            }
        }
    }
    let (tok, keys, kpe) = (
        rnd(&mut rng, b * t * c),
        rnd(&mut rng, b * n * c),
        rnd(&mut rng, b * n * c),
    );
    let (gq, gk) = (rnd(&mut rng, b * t * c), rnd(&mut rng, b * n * c));
    let loss = |tr: &TwoWayTransformer<f64, Cpu>, tok: &T, keys: &T| {
        let (q, k, _) = tr.forward(&BE, tok, keys, &kpe, b, t, n).unwrap();
        dot(&q, &gq) + dot(&k, &gk)
    };
    let (_, _, acts) = tr.forward(&BE, &tok, &keys, &kpe, b, t, n).unwrap();
    let mut tr2 = tr.clone();
    let (dtok, dkeys) = tr2.backward(&BE, &acts, &gq, &gk).unwrap();
    check("two-way dtokens", &dtok, |i, d| {
        loss(&tr, &perturbed(&tok, i, d), &keys)
    });
    check("two-way dkeys", &dkeys, |i, d| {
        loss(&tr, &tok, &perturbed(&keys, i, d))
    });
    let mut grads = Vec::new();
    tr2.push_params(&mut grads, "t");
    let grads: Vec<(String, T)> = grads
        .into_iter()
        .map(|(n, p)| (n, p.grad.clone().unwrap()))
        .collect();
    for (pi, (name, g)) in grads.iter().enumerate() {
        if name.ends_with("k_proj.bias") {
            assert!(g.iter().all(|v| v.abs() < 1e-10), "{name}");
            continue;
        }
        check(name, g, |i, d| {
            let mut tt = tr.clone();
            let mut ps = Vec::new();
            tt.push_params(&mut ps, "t");
            ps[pi].1.data[i] += d;
            drop(ps);
            loss(&tt, &tok, &keys)
        });
    }
}

/// The ViT's convolutional stem (`popen::model::stem`): its output against the stem
/// written out by hand (4 × 4 cells, the two norms and GELUs, the 3 × 3 conv, then the
/// R × R cells of each patch in (dy, dx, c) order through the merge), on a non-square
/// image in patches of 8 (R = 2); every parameter's gradient against finite differences.
#[test]
fn conv_stem_matches_its_definition_and_its_backward_matches_finite_differences() {
    use popen::backend::{Act, Backend};
    use popen::model::stem::{ConvStem, STEM_CELL};
    use popen::nn::layers::ImageShape;
    let mut rng = Rng::new(47);
    let (b, h, w, ch, c1, c, p) = (2, 16, 24, 3, 3, 5, 8);
    let img = ImageShape { b, h, w };
    let mut stem: ConvStem<f64, Cpu> = ConvStem::new(&BE, ch, c1, c, p).unwrap();
    for (_, t) in stem.params_mut() {
        t.data = randn(&mut rng, t.numel(), 0.5);
    }
    let x = rnd(&mut rng, b * ch * h * w);
    let (y, acts) = stem.forward(&BE, &x, img).unwrap();
    let (q, r) = (STEM_CELL, p / STEM_CELL);
    let (gh, gw, np) = (h / q, w / q, (h / p) * (w / p));
    assert_eq!(y.len(), b * np * c);
    // by hand: y1[b, cy, cx, o] = bias[o] + Σ W[o, ch, py, px] x[b, ch, cy·q+py, cx·q+px]
    let (cw, cb) = (
        &stem.cell.weight.data,
        &stem.cell.bias.as_ref().unwrap().data,
    );
    let mut y1 = vec![0.0; b * gh * gw * c1];
    for bi in 0..b {
        for cy in 0..gh {
            for cx in 0..gw {
                for o in 0..c1 {
                    let mut s = cb[o];
                    for k in 0..ch {
                        for py in 0..q {
                            for px in 0..q {
                                s += cw[((o * ch + k) * q + py) * q + px]
                                    * x[((bi * ch + k) * h + cy * q + py) * w + cx * q + px];
                            }
                        }
                    }
                    y1[((bi * gh + cy) * gw + cx) * c1 + o] = s;
                }
            }
        }
    }
    let norm_act = |ln: &popen::nn::LayerNorm<f64, Cpu>, v: &T| {
        let n = ln.forward(&BE, v).unwrap().0;
        let mut a = vec![0.0; n.len()];
        BE.act_fwd(Act::GeluErf, &n, &mut a).unwrap();
        a
    };
    let a1 = norm_act(&stem.layer_norm1, &y1);
    let y2 = stem.conv.forward(&BE, &a1, b, gh, gw).unwrap().0;
    let a2 = norm_act(&stem.layer_norm2, &y2);
    // out[b, patch (py, px), o] = Σ merge[o, (dy, dx, k)] a2[b, py·r+dy, px·r+dx, k]
    let mw = &stem.merge.weight.data;
    for bi in 0..b {
        for py in 0..h / p {
            for px in 0..w / p {
                for o in 0..c {
                    let mut want = 0.0;
                    for dy in 0..r {
                        for dx in 0..r {
                            for k in 0..c1 {
                                let cell = (bi * gh + py * r + dy) * gw + px * r + dx;
                                want +=
                                    mw[o * r * r * c1 + (dy * r + dx) * c1 + k] * a2[cell * c1 + k];
                            }
                        }
                    }
                    let got = y[((bi * (h / p) + py) * (w / p) + px) * c + o];
                    assert!(
                        (got - want).abs() < 1e-12,
                        "({bi},{py},{px},{o}): {got} vs {want}"
                    );
                }
            }
        }
    }
    let g = rnd(&mut rng, y.len());
    let loss = |s: &ConvStem<f64, Cpu>| dot(&s.forward(&BE, &x, img).unwrap().0, &g);
    let mut trained = stem.clone();
    for (_, t) in trained.params_mut() {
        t.zero_grad(&BE);
    }
    trained.backward(&BE, &acts, &g).unwrap();
    let grads: Vec<(&str, T)> = trained
        .params_mut()
        .into_iter()
        .map(|(n, t)| (n, t.grad.clone().unwrap()))
        .collect();
    assert_eq!(grads.len(), 8);
    for (pi, (name, grad)) in grads.iter().enumerate() {
        check(&format!("stem.{name}"), grad, |k, d| {
            let mut s = stem.clone();
            s.params_mut()[pi].1.data[k] += d;
            loss(&s)
        });
    }
    // a patch that is no whole number of cells, an image of no whole number of patches
    assert!(ConvStem::<f64, Cpu>::new(&BE, ch, c1, c, 6).is_err());
    let bad = ImageShape { b, h: 12, w };
    assert!(stem.forward(&BE, &vec![0.0; b * ch * 12 * w], bad).is_err());
}
