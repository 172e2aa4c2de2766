//! The kernels (emulator, plus a GPU when present) against the CPU twin: forward (SIMT,
//! tensor-core, bf16), backward, decode, bad sizes, determinism.
use super::*;

/// f32 kernel vs the exact (f64) answer on the same inputs: out is a convex
/// combination of v rows, so its error relative to max|v| is a few f32 ulps of the
/// scores (|score| < ~10, error ~1e-6) plus the weighted sum (~HS·2^-24): 1e-5 of the
/// largest entry leaves a margin of ~5 while a wrong mask, bias or scale is off by >1e-2.
#[test]
fn attention_fwd_matches_cpu() {
    for dev in Device::test_devices() {
        for c in kernel_cases() {
            let (want_o, want_l) = run_cpu_fwd_f64(&c);
            let (o, l) = dev_fwd(&dev, &c);
            let e = rel_err(&to64(&o), &want_o);
            assert!(e < 1e-5, "{dev:?} {}: out rel err {e}", tag(&c));
            assert_lse_close(&to64(&l), &want_l, 1e-5, &format!("{dev:?} {}", tag(&c)));
        }
    }
}

/// The tensor-core forward vs the exact answer on every kernel case whose head size it
/// takes (40, 128, 72: one, sixteen and nine 8-wide steps; causal, GQA, bias, masks,
/// partial tiles, tiles of padding only).  Its products are 3×TF32 on the emulator too
/// (operands read as TF32 there as on a GPU): about 21 of f32's 24 bits per operand, an
/// error of at most 1.1e-6 of the largest entry here, under the f32 bound above.  A GPU
/// may accumulate each product more coarsely than the emulator's f32: 4e-5 there.
/// Dropping one of the three products moves out by 2e-4; a wrong fragment layout by
/// O(max|v|).  Head sizes it does not take are an error, not a wrong answer.
#[test]
fn attention_fwd_tc_matches_cpu() {
    let mut ran = 0;
    for dev in Device::test_devices() {
        let tol = if dev.kind() == DeviceKind::Emulator {
            1e-5
        } else {
            4e-5
        };
        for c in kernel_cases() {
            if !tensor_core_head_size(c.s.hs) {
                let s = &c.s;
                let up = |x: &[f64]| dev.upload(&f32s(x)).unwrap();
                let (q, k, v) = (up(&c.q), up(&c.k), up(&c.v));
                let mut out = dev.zeros::<f32>(c.q.len()).unwrap();
                let mut lse = dev.zeros::<f32>(s.b * s.nh * s.tq).unwrap();
                let e = attention_fwd_tc(&dev, s, &q, &k, &v, None, None, &mut out, &mut lse)
                    .unwrap_err();
                assert!(e.to_string().contains("multiple of"), "{e}");
                continue;
            }
            let (want_o, want_l) = run_cpu_fwd_f64(&c);
            let (o, l) = dev_fwd_with(&dev, &c, attention_fwd_tc);
            let e = rel_err(&to64(&o), &want_o);
            assert!(e < tol, "{dev:?} {}: tc out rel err {e}", tag(&c));
            assert_lse_close(&to64(&l), &want_l, tol, &format!("{dev:?} tc {}", tag(&c)));
            ran += 1;
        }
    }
    assert!(ran >= 20, "only {ran} cases ran on tensor cores");
    assert!(tensor_core_head_size(128) && tensor_core_head_size(8) && tensor_core_head_size(5));
    assert!(!tensor_core_head_size(4) && !tensor_core_head_size(20) && !tensor_core_head_size(0));
}

/// The bf16 forward: inputs rounded to bf16 (the CPU twin reads the same rounded
/// values), out rounded to bf16 once at the end: error ≤ 2^-9 of |out| plus the f32
/// part, so 4e-3 of the largest entry.
#[test]
fn attention_fwd_bf16_matches_cpu() {
    use half::bf16;
    for dev in Device::test_devices() {
        for c in kernel_cases().into_iter().step_by(2) {
            let rb = |x: &[f64]| -> Vec<bf16> { x.iter().map(|&v| bf16::from_f64(v)).collect() };
            let (qb, kb, vb) = (rb(&c.q), rb(&c.k), rb(&c.v));
            let cr = Case {
                s: c.s,
                q: qb.iter().map(|x| x.to_f64()).collect(),
                k: kb.iter().map(|x| x.to_f64()).collect(),
                v: vb.iter().map(|x| x.to_f64()).collect(),
                bias: c.bias.clone(),
                mask: c.mask.clone(),
            };
            let (want_o, want_l) = run_cpu_fwd_f64(&cr);
            let bits = |x: &[bf16]| -> Vec<u16> { x.iter().map(|v| v.to_bits()).collect() };
            let s = &c.s;
            let q = dev.upload(&bits(&qb)).unwrap();
            let k = dev.upload(&bits(&kb)).unwrap();
            let v = dev.upload(&bits(&vb)).unwrap();
            let bias = c.bias.as_ref().map(|b| dev.upload(&f32s(b)).unwrap());
            let mask = c.mask.as_ref().map(|m| dev.upload(m).unwrap());
            let mut out = dev.zeros::<u16>(c.q.len()).unwrap();
            let mut lse = dev.zeros::<f32>(s.b * s.nh * s.tq).unwrap();
            attention_fwd_bf16(
                &dev,
                s,
                &q,
                &k,
                &v,
                bias.as_ref(),
                mask.as_ref(),
                &mut out,
                &mut lse,
            )
            .unwrap();
            let o: Vec<f64> = dev
                .download(&out)
                .unwrap()
                .iter()
                .map(|&b| bf16::from_bits(b).to_f64())
                .collect();
            let e = rel_err(&o, &want_o);
            assert!(e < 4e-3, "{dev:?} {}: bf16 out rel err {e}", tag(&c));
            let l = to64(&dev.download(&lse).unwrap());
            assert_lse_close(&l, &want_l, 1e-5, &format!("{dev:?} bf16 {}", tag(&c)));
        }
    }
}

/// Backward kernels vs the f64 twin on the same inputs, the kernel fed its own forward.
/// Gradients are sums over up to Tq·NH/NKV terms of products of order 1, so their
/// rounding error relative to the largest entry is a little above the forward's: 2e-5.
#[test]
fn attention_bwd_matches_cpu() {
    bwd_matches_cpu(attention_bwd, "", |_| true, 2e-5);
}

/// On tensor cores, on the cases whose head size they take (20); on a GPU the
/// 3×TF32 products (on the emulator too: at most 1.5e-6 here) take the bound to 8e-5
/// (see `attention_fwd_tc_matches_cpu`).
#[test]
fn attention_bwd_tc_matches_cpu() {
    bwd_matches_cpu(attention_bwd_tc, "tc ", tensor_core_head_size, 8e-5);
}

fn bwd_matches_cpu(bwd: AttnBwdFn, what: &str, takes: fn(usize) -> bool, gpu_tol: f64) {
    let mut ran = 0;
    for dev in Device::test_devices() {
        let tol = if dev.kind() == DeviceKind::Emulator {
            2e-5
        } else {
            gpu_tol
        };
        for c in kernel_cases() {
            if !takes(c.s.hs) {
                continue;
            }
            ran += 1;
            let s = &c.s;
            let (out, lse) = run_cpu_fwd_f64(&c);
            let want = run_cpu_bwd_f64(&c, &out, &lse, 7);
            let (o32, l32) = dev_fwd(&dev, &c);
            let up = |x: &[f64]| dev.upload(&f32s(x)).unwrap();
            let (q, k, v, dout) = (up(&c.q), up(&c.k), up(&c.v), up(&want.dout));
            let bias = c.bias.as_ref().map(|b| up(b));
            let mask = c.mask.as_ref().map(|m| dev.upload(m).unwrap());
            let (o, l) = (dev.upload(&o32).unwrap(), dev.upload(&l32).unwrap());
            let nan = |n: usize| dev.upload(&vec![f32::NAN; n]).unwrap();
            let (mut dq, mut dk, mut dv) = (nan(c.q.len()), nan(c.k.len()), nan(c.v.len()));
            let mut db = nan(s.b * s.tk);
            bwd(
                &dev,
                s,
                &q,
                &k,
                &v,
                bias.as_ref(),
                mask.as_ref(),
                &o,
                &l,
                &dout,
                &mut dq,
                &mut dk,
                &mut dv,
                Some(&mut db),
            )
            .unwrap();
            for (name, got, want) in [
                ("q", &dq, &want.dq),
                ("k", &dk, &want.dk),
                ("v", &dv, &want.dv),
                ("bias", &db, &want.dbias),
            ] {
                let got = to64(&dev.download(got).unwrap());
                let e = rel_err(&got, want);
                assert!(e < tol, "{dev:?} {what}{}: d{name} rel err {e}", tag(&c));
            }
        }
    }
    assert!(ran >= 20, "only {ran} cases ran");
}

/// The decode kernel (split over 128-key chunks) vs the CPU decode, with caches longer
/// than one chunk and within one (one launch, no reduce), GQA, bias with −inf entries
/// (batch 1's first four keys: rows that see no key with the bias), and len = 0; head sizes read as floats
/// (7, 6), as float4s by groups of 16 and 8 lanes (40, 32) and by whole warps (128),
/// and summed over keys by rows of threads (HS <= 64) or a thread per dimension (128).
#[test]
fn attention_decode_matches_cpu() {
    for dev in Device::test_devices() {
        for hs in [7, 6, 40, 32, 128] {
            let (b, nh, nkv, tmax) = (2, 6, 2, 300);
            let mut r = Rng(77);
            let kc = f32s(&r.vec(b * nkv * tmax * hs, 1.5));
            let vc = f32s(&r.vec(b * nkv * tmax * hs, 1.0));
            let mut bias = f32s(&r.vec(b * tmax, 1.0));
            bias[3] = f32::NEG_INFINITY;
            bias[tmax + 200] = f32::NEG_INFINITY;
            bias[tmax..tmax + 4].fill(f32::NEG_INFINITY);
            let q = f32s(&r.vec(b * nh * hs, 1.5));
            let scale = 1.0 / (hs as f32).sqrt();
            let (qd, kd, vd) = (
                dev.upload(&q).unwrap(),
                dev.upload(&kc).unwrap(),
                dev.upload(&vc).unwrap(),
            );
            for len in [0, 1, 4, 129, 300] {
                // the bias of the valid keys (B,len)
                let bl: Vec<f32> = (0..b)
                    .flat_map(|bi| bias[bi * tmax..][..len].to_vec())
                    .collect();
                let bd = dev.upload(&bl).unwrap();
                for use_bias in [false, true] {
                    let bopt = use_bias.then_some(&bl[..]);
                    let mut want = vec![0.0f32; b * nh * hs];
                    let mut want_lse = vec![0.0f32; b * nh];
                    attention_decode_cpu(
                        b,
                        nh,
                        nkv,
                        tmax,
                        len,
                        hs,
                        scale,
                        &q,
                        &kc,
                        &vc,
                        bopt,
                        &mut want,
                        Some(&mut want_lse),
                    )
                    .unwrap();
                    let mut out = dev.upload(&vec![f32::NAN; b * nh * hs]).unwrap();
                    let mut lse = dev.upload(&vec![f32::NAN; b * nh]).unwrap();
                    let bd_opt = use_bias.then_some(&bd);
                    attention_decode(
                        &dev,
                        b,
                        nh,
                        nkv,
                        tmax,
                        len,
                        hs,
                        scale,
                        &qd,
                        &kd,
                        &vd,
                        bd_opt,
                        &mut out,
                        Some(&mut lse),
                    )
                    .unwrap();
                    let got = to64(&dev.download(&out).unwrap());
                    let e = rel_err(&got, &to64(&want));
                    assert!(
                        e < 1e-5,
                        "{dev:?} hs {hs} len {len} bias {use_bias}: rel err {e}"
                    );
                    let got_lse = dev.download(&lse).unwrap();
                    if len == 0 {
                        assert!(got.iter().all(|x| *x == 0.0));
                        assert!(got_lse
                            .iter()
                            .chain(&want_lse)
                            .all(|x| *x == f32::NEG_INFINITY));
                    } else {
                        // a row that sees no key: −inf and zeros, on both
                        let blind = |l: &f32| *l == f32::NEG_INFINITY;
                        let rows = b * nh;
                        for i in 0..rows {
                            assert_eq!(blind(&got_lse[i]), blind(&want_lse[i]), "row {i}");
                        }
                        let blind_rows = want_lse.iter().filter(|l| blind(l)).count();
                        let hidden = use_bias && len <= 4;
                        assert_eq!(blind_rows, if hidden { rows / 2 } else { 0 });
                        let seen: Vec<usize> =
                            (0..rows).filter(|&i| !blind(&want_lse[i])).collect();
                        let pick =
                            |v: &[f32]| to64(&seen.iter().map(|&i| v[i]).collect::<Vec<_>>());
                        let e = rel_err(&pick(&got_lse), &pick(&want_lse));
                        assert!(
                            e < 1e-5,
                            "{dev:?} hs {hs} len {len} bias {use_bias}: lse rel err {e}"
                        );
                    }
                }
            }
        }
    }
}

/// The device wrappers check sizes before launching (never a launch on bad input).
#[test]
fn device_wrappers_reject_bad_sizes() {
    let dev = Device::emulator();
    let s = shape(2, 6, 2, 3, 5, 8, false);
    let z = |n: usize| dev.zeros::<f32>(n).unwrap();
    let (q, k, v) = (z(2 * 6 * 3 * 8), z(2 * 2 * 5 * 8), z(2 * 2 * 5 * 8 - 1));
    let (mut out, mut lse) = (z(2 * 6 * 3 * 8), z(2 * 6 * 3));
    let e = attention_fwd(&dev, &s, &q, &k, &v, None, None, &mut out, &mut lse).unwrap_err();
    assert!(e.to_string().contains("v (B,NKV,Tk,HS)"), "{e}");
    let mut bad = s;
    bad.hs = 200;
    let e = attention_fwd(&dev, &bad, &q, &k, &k, None, None, &mut out, &mut lse).unwrap_err();
    assert!(e.to_string().contains("head size"), "{e}");
    let (mut dq, mut dk, mut dv) = (z(q.len()), z(k.len()), z(k.len()));
    let mut db = z(7);
    let e = attention_bwd(
        &dev,
        &s,
        &q,
        &k,
        &k,
        None,
        None,
        &out,
        &lse,
        &out,
        &mut dq,
        &mut dk,
        &mut dv,
        Some(&mut db),
    )
    .unwrap_err();
    assert!(e.to_string().contains("dbias"), "{e}");
    let mut o = z(2 * 6 * 8);
    let e = attention_decode(
        &dev,
        2,
        6,
        2,
        5,
        6,
        8,
        1.0,
        &o.clone_zeros(&dev),
        &k,
        &k,
        None,
        &mut o,
        None,
    );
    assert!(e.is_err());
}

trait CloneZeros {
    fn clone_zeros(&self, dev: &Device) -> popen::kernels::DeviceBuf<f32>;
}
impl CloneZeros for popen::kernels::DeviceBuf<f32> {
    fn clone_zeros(&self, dev: &Device) -> popen::kernels::DeviceBuf<f32> {
        dev.zeros(self.len()).unwrap()
    }
}

/// The CPU backward is bitwise reproducible: GQA head sums and dγ sums run in a fixed
/// order, no atomics, so two runs on the same pool give identical bits.
#[test]
fn cpu_bwd_is_deterministic() {
    let c = case(shape(2, 6, 2, 70, 75, 24, true), 41, true, true, false);
    let s = &c.s;
    let (q, k, v, bias) = (
        f32s(&c.q),
        f32s(&c.k),
        f32s(&c.v),
        f32s(c.bias.as_ref().unwrap()),
    );
    let mut out = vec![0.0f32; q.len()];
    let mut lse = vec![0.0f32; s.b * s.nh * s.tq];
    attention_fwd_cpu(
        s,
        &q,
        &k,
        &v,
        Some(&bias),
        c.mask.as_deref(),
        &mut out,
        &mut lse,
    )
    .unwrap();
    let dout = f32s(&Rng(5).vec(q.len(), 1.0));
    let run = || {
        let (mut dq, mut dk, mut dv) = (
            vec![0.0f32; q.len()],
            vec![0.0f32; k.len()],
            vec![0.0f32; v.len()],
        );
        let mut db = vec![0.0f32; s.b * s.tk];
        attention_bwd_cpu(
            s,
            &q,
            &k,
            &v,
            Some(&bias),
            c.mask.as_deref(),
            &out,
            &lse,
            &dout,
            &mut dq,
            &mut dk,
            &mut dv,
            Some(&mut db),
        )
        .unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        (bits(&dq), bits(&dk), bits(&dv), bits(&db))
    };
    let first = run();
    for _ in 0..3 {
        assert!(run() == first, "backward differs between runs");
    }
}
