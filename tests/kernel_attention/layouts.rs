//! Operand layouts: keys read in place from a KV cache's strided blocks, token-major
//! operands, and the tensor-core kernels' shared-memory fragment reads.
use super::*;

/// `c` with its keys and values in blocks of `tk + extra` rows, the extra rows NaN (as
/// a preallocated KV cache's unused rows): a read past Tk poisons the output.
fn strided(c: &Case, extra: usize) -> Case {
    let s = AttnShape {
        kv_stride: c.s.tk + extra,
        ..c.s
    };
    let pad = |x: &[f64]| -> Vec<f64> {
        let n = c.s.tk * c.s.hs;
        let blocks = c.s.b * c.s.nkv;
        (0..blocks)
            .flat_map(|g| {
                let mut v = x[g * n..(g + 1) * n].to_vec();
                v.resize((c.s.tk + extra) * c.s.hs, f64::NAN);
                v
            })
            .collect()
    };
    Case {
        s,
        q: c.q.clone(),
        k: pad(&c.k),
        v: pad(&c.v),
        bias: c.bias.clone(),
        mask: c.mask.clone(),
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// The forward reads keys in place from blocks of `kv_stride ≥ Tk` rows (a KV cache
/// with room to grow): the CPU twin and the kernel give bit for bit what they give on
/// the packed keys, over every kernel case (causal, GQA, masks, several key tiles).
#[test]
fn forward_reads_strided_keys_in_place() {
    for c in kernel_cases() {
        let cs = strided(&c, 5);
        let (o, l) = run_cpu_fwd_f32(&c);
        let (os, ls) = run_cpu_fwd_f32(&cs);
        assert_eq!(bits(&os), bits(&o), "cpu {}", tag(&c));
        assert_eq!(bits(&ls), bits(&l), "cpu {}", tag(&c));
        for dev in Device::test_devices() {
            let (o, l) = dev_fwd(&dev, &c);
            let (os, ls) = dev_fwd(&dev, &cs);
            assert_eq!(bits(&os), bits(&o), "{dev:?} {}", tag(&c));
            assert_eq!(bits(&ls), bits(&l), "{dev:?} {}", tag(&c));
            if tensor_core_head_size(c.s.hs) {
                let (o, l) = dev_fwd_with(&dev, &c, attention_fwd_tc);
                let (os, ls) = dev_fwd_with(&dev, &cs, attention_fwd_tc);
                assert_eq!(bits(&os), bits(&o), "{dev:?} tc {}", tag(&c));
                assert_eq!(bits(&ls), bits(&l), "{dev:?} tc {}", tag(&c));
            }
        }
    }
}

/// A stride below Tk is an error, and the backward takes packed keys only.
#[test]
fn strided_keys_are_checked() {
    let c = case(shape(1, 2, 1, 3, 4, 8, true), 5, false, false, false);
    let bad = AttnShape {
        kv_stride: 3,
        ..c.s
    };
    let (q, k) = (f32s(&c.q), f32s(&c.k));
    let (mut out, mut lse) = (vec![0.0f32; q.len()], vec![0.0f32; 6]);
    let e = attention_fwd_cpu(&bad, &q, &k, &k, None, None, &mut out, &mut lse).unwrap_err();
    assert!(e.to_string().contains("kv_stride"), "{e}");
    let cs = strided(&c, 2);
    let (qs, ks) = (f32s(&cs.q), f32s(&cs.k));
    attention_fwd_cpu(&cs.s, &qs, &ks, &ks, None, None, &mut out, &mut lse).unwrap();
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; q.len()],
        vec![0.0f32; ks.len()],
        vec![0.0f32; ks.len()],
    );
    let e = attention_bwd_cpu(
        &cs.s, &qs, &ks, &ks, None, None, &out, &lse, &out, &mut dq, &mut dk, &mut dv, None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("packed"), "{e}");
}

/// x (B, n1, n2, HS) → (B, n2, n1, HS): head-major to token-major (n1 = H, n2 = T)
/// and back (n1 = T, n2 = H).
fn swap_mid(x: &[f32], [b, n1, n2, hs]: [usize; 4]) -> Vec<f32> {
    let mut o = vec![f32::NAN; x.len()];
    for bi in 0..b {
        for i in 0..n1 {
            for j in 0..n2 {
                let (src, dst) = (((bi * n1 + i) * n2 + j) * hs, ((bi * n2 + j) * n1 + i) * hs);
                o[dst..dst + hs].copy_from_slice(&x[src..src + hs]);
            }
        }
    }
    o
}

/// Which implementation runs a forward and its backward.
#[derive(Clone, Copy, Debug)]
enum Impl<'a> {
    Cpu,
    Simt(&'a Device),
    Tc(&'a Device),
}

/// Forward, then the backward fed that forward's own out and lse, on f32 inputs in the
/// layout of `s`: [out, lse, dq, dk, dv, dbias].
fn fwd_bwd(im: Impl<'_>, s: &AttnShape, c: &Case, [q, k, v, dout]: [&[f32]; 4]) -> [Vec<f32>; 6] {
    let bias = c.bias.as_deref().map(f32s);
    let (nq, nk, nl) = (q.len(), k.len(), s.b * s.nh * s.tq);
    let dev = match im {
        Impl::Cpu => {
            let (mut o, mut l) = (vec![f32::NAN; nq], vec![f32::NAN; nl]);
            let b = bias.as_deref();
            attention_fwd_cpu(s, q, k, v, b, c.mask.as_deref(), &mut o, &mut l).unwrap();
            let (mut dq, mut dk, mut dv) =
                (vec![f32::NAN; nq], vec![f32::NAN; nk], vec![f32::NAN; nk]);
            let mut db = vec![f32::NAN; s.b * s.tk];
            attention_bwd_cpu(
                s,
                q,
                k,
                v,
                b,
                c.mask.as_deref(),
                &o,
                &l,
                dout,
                &mut dq,
                &mut dk,
                &mut dv,
                Some(&mut db),
            )
            .unwrap();
            return [o, l, dq, dk, dv, db];
        }
        Impl::Simt(d) | Impl::Tc(d) => d,
    };
    let (fwd, bwd): (AttnFwdFn, AttnBwdFn) = match im {
        Impl::Tc(_) => (attention_fwd_tc, attention_bwd_tc),
        _ => (attention_fwd, attention_bwd),
    };
    let up = |x: &[f32]| dev.upload(x).unwrap();
    let nan = |n: usize| dev.upload(&vec![f32::NAN; n]).unwrap();
    let (qd, kd, vd, dod) = (up(q), up(k), up(v), up(dout));
    let bd = bias.as_deref().map(up);
    let md = c.mask.as_ref().map(|m| dev.upload(m).unwrap());
    let (mut o, mut l) = (nan(nq), nan(nl));
    fwd(
        dev,
        s,
        &qd,
        &kd,
        &vd,
        bd.as_ref(),
        md.as_ref(),
        &mut o,
        &mut l,
    )
    .unwrap();
    let (mut dq, mut dk, mut dv, mut db) = (nan(nq), nan(nk), nan(nk), nan(s.b * s.tk));
    bwd(
        dev,
        s,
        &qd,
        &kd,
        &vd,
        bd.as_ref(),
        md.as_ref(),
        &o,
        &l,
        &dod,
        &mut dq,
        &mut dk,
        &mut dv,
        Some(&mut db),
    )
    .unwrap();
    [o, l, dq, dk, dv, db].map(|x| dev.download(&x).unwrap())
}

/// Token-major operands (a linear layer's (B·T, H·HS) output read in place): the CPU
/// twin and the kernels, SIMT and tensor cores, forward and backward, give bit for bit
/// what they give on the same values head-major, for every operand token-major and for
/// two mixes (LLaMA's: q and k rotated and split, v and out token-major), over kernel
/// cases with GQA, causal rows, bias, masks, HS = 3 (rows not float4-aligned) and
/// several tiles.  A kernel that indexed a token-major operand as head-major (or took
/// one operand's bit for another's) would read other heads' rows and fail.
#[test]
fn token_major_operands_give_the_same_bits() {
    let mixes = [
        AttnLayout::TOKENS,
        AttnLayout {
            q: false,
            k: false,
            v: true,
            out: true,
        },
        AttnLayout {
            q: true,
            k: true,
            v: false,
            out: false,
        },
    ];
    let devs = Device::test_devices();
    let mut ran = 0;
    for c in kernel_cases().into_iter().step_by(4) {
        let s = c.s;
        let (qd, kd) = ([s.b, s.nh, s.tq, s.hs], [s.b, s.nkv, s.tk, s.hs]);
        let (q, k, v) = (f32s(&c.q), f32s(&c.k), f32s(&c.v));
        let dout = f32s(&Rng(9).vec(q.len(), 1.0));
        let mut impls = vec![Impl::Cpu];
        for d in &devs {
            impls.push(Impl::Simt(d));
            if tensor_core_head_size(s.hs) {
                impls.push(Impl::Tc(d));
            }
        }
        for &im in &impls {
            let want = fwd_bwd(im, &s, &c, [&q, &k, &v, &dout]);
            for lay in mixes {
                let ls = AttnShape { layout: lay, ..s };
                // to token-major: swap (H, T); back: swap (T, H)
                let to = |x: &[f32], tok: bool, [b, h, t, hs]: [usize; 4]| {
                    if tok {
                        swap_mid(x, [b, h, t, hs])
                    } else {
                        x.to_vec()
                    }
                };
                let back = |x: &[f32], tok: bool, [b, h, t, hs]: [usize; 4]| {
                    if tok {
                        swap_mid(x, [b, t, h, hs])
                    } else {
                        x.to_vec()
                    }
                };
                let ins = [
                    to(&q, lay.q, qd),
                    to(&k, lay.k, kd),
                    to(&v, lay.v, kd),
                    to(&dout, lay.out, qd),
                ];
                let [o, l, dq, dk, dv, db] =
                    fwd_bwd(im, &ls, &c, [&ins[0], &ins[1], &ins[2], &ins[3]]);
                let got = [
                    back(&o, lay.out, qd),
                    l,
                    back(&dq, lay.q, qd),
                    back(&dk, lay.k, kd),
                    back(&dv, lay.v, kd),
                    db,
                ];
                let names = ["out", "lse", "dq", "dk", "dv", "dbias"];
                for ((name, g), w) in names.iter().zip(&got).zip(&want) {
                    let diff = (0..w.len()).filter(|&i| g[i].to_bits() != w[i].to_bits());
                    let (n, first) = (diff.clone().count(), diff.min());
                    assert!(
                        n == 0,
                        "{im:?} {lay:?} {name}: {n} of {} differ, the first at {first:?}; {}",
                        w.len(),
                        tag(&c)
                    );
                }
                ran += 1;
            }
        }
    }
    assert!(ran >= 40, "only {ran} runs");
}

/// A token-major key or value operand is packed: a cache's stride is an error, not a
/// misread; and a wrong length names the operand's token-major dimensions.
#[test]
fn token_major_keys_are_packed() {
    let c = case(shape(1, 2, 1, 3, 4, 8, false), 5, false, false, false);
    let lay = AttnLayout {
        k: true,
        ..AttnLayout::HEADS
    };
    let s = AttnShape {
        kv_stride: 6,
        layout: lay,
        ..c.s
    };
    let (q, k) = (f32s(&c.q), vec![0.0f32; 6 * 8]);
    let (mut out, mut lse) = (vec![0.0f32; q.len()], vec![0.0f32; 6]);
    let e = attention_fwd_cpu(&s, &q, &k, &k, None, None, &mut out, &mut lse).unwrap_err();
    assert!(e.to_string().contains("token-major"), "{e}");
    let s = AttnShape { layout: lay, ..c.s };
    let e = attention_fwd_cpu(
        &s,
        &q,
        &k[..5 * 8],
        &f32s(&c.v),
        None,
        None,
        &mut out,
        &mut lse,
    )
    .unwrap_err();
    assert!(e.to_string().contains("k (B,Tk,NKV,HS)"), "{e}");
}

/// The tensor-core kernels' fragment reads from shared memory take one wavefront each
/// (no bank conflict), at every head width they take: the emulator's
/// `emu_selftest_mma_banks` counts the wavefronts of every read `mma_load_a` / `_b` /
/// `_bt` / `_bt_a_order` make from a tile, by the same offsets the kernels use.  The
/// strides are the kernels' (kernels/attention*.cu): q-side, k and v tiles ft_ks ≡ 4 mod
/// 32 (the forward's v, read as B, 4 more: ≡ 8 mod 32), Pᵀ / dSᵀ 36, and the tiles read
/// both as B and Bᵀ (k in dQ; q and dout in dK / dV) swizzled at tc_sw, a multiple of
/// 32.  The count can fail: a B read at a stride ≡ 4 mod 32 (the backward before the
/// swizzle) takes two wavefronts, and a Bᵀ read (in either order) of a tile at a
/// multiple of 32 left plain takes eight.
#[test]
fn tensor_core_fragment_reads_are_conflict_free() {
    let dev = Device::emulator();
    let waves = |kind: i32, ld: usize, sw: bool, qs: usize| -> i32 {
        let mut out = dev.zeros::<i32>(1).unwrap();
        dev.launch(
            "emu_selftest_mma_banks",
            LaunchCfg::new([1, 1, 1], [32, 1, 1], 0),
            &[
                out.arg_mut(),
                KArg::I32(kind),
                KArg::I32(ld as i32),
                KArg::I32(i32::from(sw)),
                KArg::I32(qs as i32),
            ],
        )
        .unwrap();
        dev.download(&out).unwrap()[0]
    };
    let (a, b, bt, bt_a_order) = (0, 1, 2, 3);
    let up32 = |x: usize| x.div_ceil(32) * 32;
    for qs in (8..=128).step_by(8) {
        assert!(tensor_core_head_size(qs));
        let ks = up32(qs - 4) + 4;
        let sw = up32(qs);
        let reads = [
            ("q, dout, k, v as A", a, ks, false, qs),
            ("k, v as Bᵀ", bt, ks, false, qs),
            ("k, v as Bᵀ in A order", bt_a_order, ks, false, qs),
            ("Pᵀ, dSᵀ as A", a, 36, false, 32),
            ("the forward's v as B", b, ks + 4, false, qs),
            ("swizzled as A", a, sw, true, qs),
            ("swizzled as Bᵀ", bt, sw, true, qs),
            ("swizzled as Bᵀ in A order", bt_a_order, sw, true, qs),
            ("swizzled as B", b, sw, true, qs),
        ];
        for (what, kind, ld, swz, cols) in reads {
            assert_eq!(waves(kind, ld, swz, cols), 1, "qs {qs}: {what} (ld {ld})");
        }
        assert_eq!(waves(b, ks, false, qs), 2, "qs {qs}: B at ld {ks}");
        assert_eq!(waves(bt, sw, false, qs), 8, "qs {qs}: Bᵀ at ld {sw}, plain");
        assert_eq!(
            waves(bt_a_order, sw, false, qs),
            8,
            "qs {qs}: Bᵀ in A order at ld {sw}, plain"
        );
    }
}
