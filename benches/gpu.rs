//! GPU throughput at sizes that fill the chip, for `tools/gpu_check.sh` on a lent GPU.
//!
//! One JSON object per line on stdout (`{"name": .., "ms": .., "gb_s" | "gflop_s" |
//! "tokens_s": ..}`), so the check script can put them beside PyTorch's numbers
//! (`tools/bench_gpu_torch.py` runs the same shapes). Without the `cuda` feature or a
//! GPU it prints one line saying so and exits 0.
//!
//! Timing: after warm-up, `reps` rounds of `n` back-to-back launches closed by one
//! synchronize; the median round over `n` is the time per call (the launch gaps are
//! amortised, as in a training step where launches queue up). Inputs are random, never
//! zeros. Bytes are counted as the fewest a kernel must move (each input read once, each
//! output written once).
//!
//! `cargo bench --features cuda --bench gpu` (or the binary with `--bench`); the
//! optional argument filters by name, e.g. `-- --bench attention`.
use popen::backend::{AdamWSlot, AdamWStep, Backend, Conv2dGeom, DeviceBackend};
use popen::kernels::attention::{
    attention_bwd, attention_bwd_tc, attention_fwd, attention_fwd_tc, tensor_core_head_size,
    AttnBwdFn, AttnFwdFn, AttnLayout, AttnShape,
};
use popen::kernels::logprob::{logprob_bwd, logprob_fwd, seq_weighted_sum};
use popen::kernels::mask::{pair_counts, pair_counts_with, soft_iou_bwd, soft_iou_fwd, PairPart};
use popen::kernels::perturb::{perturb, PerturbCfg};
use popen::kernels::philox::Philox;
use popen::kernels::probe::{probe, Probe};
use popen::kernels::{Device, KArg, LaunchCfg};
use popen::nn::llama::{Llama, LlamaConfig};
use std::io::Write;
use std::time::Instant;

/// The LLaMA-7B-shaped stack: 7B's widths and vocabulary, `STACK_LAYERS` layers.
/// Keep in sync with `STACK` in tools/bench_gpu_torch.py.
pub fn stack_cfg() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 32000,
        hidden_size: 4096,
        intermediate_size: 11008,
        num_hidden_layers: STACK_LAYERS,
        num_attention_heads: 32,
        num_key_value_heads: Some(32),
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
    }
}
const STACK_LAYERS: usize = 2;
const STACK_BATCH: usize = 1;
const STACK_SEQ: usize = 2048;

/// Attention shapes (name, shape, padding mask); keep in sync with the torch script.
/// The `_tokens` shape reads every operand token-major, in place, as a model's
/// projections write them (torch: SDPA on `view(B,T,H,HS).transpose(1, 2)`).
fn attn_shapes() -> Vec<(&'static str, AttnShape, bool)> {
    let s7b = AttnShape {
        b: 2,
        nh: 32,
        nkv: 32,
        tq: 2048,
        tk: 2048,
        kv_stride: 2048,
        hs: 128,
        causal: true,
        scale: 1.0 / (128f32).sqrt(),
        layout: AttnLayout::HEADS,
    };
    vec![
        ("b2_h32_t2048_d128_causal_bias", s7b, false),
        (
            "b2_h32_t2048_d128_causal_bias_tokens",
            AttnShape {
                layout: AttnLayout::TOKENS,
                ..s7b
            },
            false,
        ),
        (
            "b8_h32_t1024_d128_bias_mask",
            AttnShape {
                b: 8,
                tq: 1024,
                tk: 1024,
                kv_stride: 1024,
                causal: false,
                ..s7b
            },
            true,
        ),
    ]
}

fn rand_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Philox::new(seed);
    (0..n).map(|_| r.uniform(-1.0, 1.0) as f32).collect()
}

fn rand_u8(n: usize, seed: u64, p: f64) -> Vec<u8> {
    let mut r = Philox::new(seed);
    (0..n).map(|_| (r.uniform(0.0, 1.0) < p) as u8).collect()
}

/// Median seconds per call of `f` (see the module docs).
fn time(dev: &Device, n: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    dev.synchronize().expect("synchronize");
    let mut ts: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            for _ in 0..n {
                f();
            }
            dev.synchronize().expect("synchronize");
            t0.elapsed().as_secs_f64() / n as f64
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    ts[reps / 2]
}

/// One more call of `f`, profiled: its launches by kernel, printed as
/// `{"profile": what, "kernel", "calls", "ms"}` rows (tools/gpu_summary.py collects them).
fn profile_once(dev: &Device, what: &str, f: impl FnOnce()) {
    dev.set_profiling(true);
    f();
    let rows = dev.take_profile().expect("profile");
    dev.set_profiling(false);
    for r in rows {
        println!(
            "{{\"profile\":\"{what}\",\"kernel\":{:?},\"calls\":{},\"ms\":{:.4}}}",
            r.name, r.calls, r.ms
        );
    }
}

fn emit(name: &str, secs: f64, unit: &str, per_call: f64) {
    println!(
        "{{\"name\":\"{name}\",\"ms\":{:.4},\"{unit}\":{:.2}}}",
        secs * 1e3,
        per_call / secs
    );
    std::io::stdout().flush().ok();
}

fn bench_memory(dev: &Device, want: &dyn Fn(&str) -> bool) {
    // the copy ceiling through our own launch path: 1 GiB read + 1 GiB written
    if want("copy") {
        let n = 256usize << 20;
        let src = dev.upload(&rand_f32(n, 1)).unwrap();
        let mut dst = dev.zeros::<f32>(n).unwrap();
        let t = time(dev, 10, 5, || {
            dev.launch(
                "copy_f32",
                LaunchCfg::new([132 * 16, 1, 1], [256, 1, 1], 0),
                &[dst.arg_mut(), src.arg(), KArg::I64(n as i64)],
            )
            .unwrap()
        });
        emit("copy_f32_1GiB", t, "gb_s", 8.0 * n as f64 / 1e9);
    }
    // Np = 30 noisy copies of 8 images of 3×512×512 (bytes: each copy written once; the
    // source image is read once per copy as well, as the CPU bench counts)
    if want("perturb") {
        let (b, ch, h, w) = (8usize, 3usize, 512usize, 512usize);
        let cfg = PerturbCfg {
            np: 30,
            sigma: 0.5,
            rect_h: (h / 8, h / 2),
            rect_w: (w / 8, w / 2),
            seed: 7,
            first_copy: 0,
        };
        let e = b * ch * h * w;
        let img = dev.upload(&rand_f32(e, 2)).unwrap();
        let mut out = dev.zeros::<f32>(cfg.np * e).unwrap();
        let mut rects = dev.zeros::<i32>(cfg.np * b * 4).unwrap();
        let t = time(dev, 10, 5, || {
            perturb(dev, &img, b, ch, h, w, &cfg, &mut out, &mut rects).unwrap()
        });
        emit(
            "perturb_30x8x3x512x512",
            t,
            "gb_s",
            8.0 * (cfg.np * e) as f64 / 1e9,
        );
        profile_once(dev, "perturb", || {
            perturb(dev, &img, b, ch, h, w, &cfg, &mut out, &mut rects).unwrap()
        });
    }
    // log-probs of 8×1024 positions over a 32000-token vocabulary (1 GiB of logits)
    if want("logprob") {
        let (b, t_len, v) = (8usize, 1024usize, 32000usize);
        let r = b * t_len;
        let logits = dev.upload(&rand_f32(r * v, 3)).unwrap();
        let mut rng = Philox::new(4);
        let tg: Vec<i32> = (0..r).map(|_| (rng.next_u32() % v as u32) as i32).collect();
        let targets = dev.upload(&tg).unwrap();
        let w = dev.upload(&vec![1.0f32; r]).unwrap();
        let d_out = dev.upload(&vec![1.0f32; b]).unwrap();
        let (mut lp, mut lse) = (dev.zeros::<f32>(r).unwrap(), dev.zeros::<f32>(r).unwrap());
        let (mut o, mut sc) = (dev.zeros::<f32>(b).unwrap(), dev.zeros::<f32>(b).unwrap());
        let mut dl = dev.zeros::<f32>(r * v).unwrap();
        let t = time(dev, 10, 5, || {
            logprob_fwd(dev, &logits, &targets, v, &mut lp, &mut lse).unwrap()
        });
        emit(
            "logprob_fwd_8192x32000",
            t,
            "gb_s",
            4.0 * (r * v) as f64 / 1e9,
        );
        seq_weighted_sum(dev, &lp, &w, &targets, v, b, t_len, true, &mut o, &mut sc).unwrap();
        let t = time(dev, 10, 5, || {
            logprob_bwd(
                dev, &logits, &lse, &targets, &w, &d_out, &sc, t_len, v, &mut dl,
            )
            .unwrap()
        });
        emit(
            "logprob_bwd_8192x32000",
            t,
            "gb_s",
            8.0 * (r * v) as f64 / 1e9,
        );
    }
    // mask IoU counts: 64 predictions × 16 ground truths of 1024×1024 (bytes: each mask
    // read once)
    if want("mask") {
        let (p, g, h, w) = (64usize, 16usize, 1024usize, 1024usize);
        let pred = dev.upload(&rand_u8(p * h * w, 5, 0.3)).unwrap();
        let gt = dev.upload(&rand_u8(g * h * w, 6, 0.3)).unwrap();
        let mut inter = dev.zeros::<u64>(p * g).unwrap();
        let mut union = dev.zeros::<u64>(p * g).unwrap();
        let t = time(dev, 5, 5, || {
            pair_counts(dev, &pred, &gt, p, g, h, w, &mut inter, &mut union).unwrap()
        });
        emit(
            "mask_pair_counts_64x16x1024x1024",
            t,
            "gb_s",
            ((p + g) * h * w) as f64 / 1e9,
        );
        profile_once(dev, "mask_pair_counts", || {
            pair_counts(dev, &pred, &gt, p, g, h, w, &mut inter, &mut union).unwrap()
        });
        // the other part kernel (3 loads in flight, 3 blocks per SM): if it wins, it
        // becomes PairPart's default
        let t = time(dev, 5, 5, || {
            pair_counts_with(
                dev,
                PairPart::Loads3,
                &pred,
                &gt,
                p,
                g,
                h,
                w,
                &mut inter,
                &mut union,
            )
            .unwrap()
        });
        emit(
            "mask_pair_counts_loads3_64x16x1024x1024",
            t,
            "gb_s",
            ((p + g) * h * w) as f64 / 1e9,
        );
        // soft IoU over 64 masks of 1024×1024 (f32 probabilities, u8 targets)
        let (b, n) = (64usize, 1024 * 1024);
        let prob = dev.upload(&rand_f32(b * n, 7)).unwrap();
        let tgt = dev.upload(&rand_u8(b * n, 8, 0.3)).unwrap();
        let mut iou = dev.zeros::<f32>(b).unwrap();
        let mut sums = dev.zeros::<f32>(3 * b).unwrap();
        let d_iou = dev.upload(&vec![1.0f32; b]).unwrap();
        let mut dp = dev.zeros::<f32>(b * n).unwrap();
        let t = time(dev, 10, 5, || {
            soft_iou_fwd(dev, &prob, &tgt, b, n, &mut iou, &mut sums).unwrap()
        });
        emit(
            "soft_iou_fwd_64x1024x1024",
            t,
            "gb_s",
            5.0 * (b * n) as f64 / 1e9,
        );
        let t = time(dev, 10, 5, || {
            soft_iou_bwd(dev, &tgt, &sums, &d_iou, b, n, &mut dp).unwrap()
        });
        emit(
            "soft_iou_bwd_64x1024x1024",
            t,
            "gb_s",
            5.0 * (b * n) as f64 / 1e9,
        );
    }
}

/// The optimizer step's ops over many tensors (`backend/device/many.rs`): one launch for
/// every tensor against a launch per tensor, on one LLaMA-7B layer's tensors (memory
/// bound: AdamW moves 28 bytes per weight) and on 320 tensors of 8 Ki floats, the tiny
/// model's count (bound by the launches: steps per second, not bytes).  Names and units
/// as `bench_optim` in tools/bench_gpu_torch.py.
fn bench_optim(be: &DeviceBackend, want: &dyn Fn(&str) -> bool) {
    if !want("optim") {
        return;
    }
    let cfg = stack_cfg();
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let layer = [[h * h; 4].as_slice(), &[i * h; 3], &[h; 2]].concat();
    for (tag, sizes) in [("7b_layer", layer), ("320x8k", vec![8192; 320])] {
        let n: usize = sizes.iter().sum();
        // bytes moved for the memory-bound layer; steps per second for the small tensors
        let per = |bytes: f64| -> (&str, f64) {
            if tag == "320x8k" {
                ("steps_s", 1.0)
            } else {
                ("gb_s", bytes * n as f64 / 1e9)
            }
        };
        let mut p: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| be.from_slice(&rand_f32(n, 20 + k as u64)))
            .collect();
        let g: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| be.from_slice(&rand_f32(n, 700 + k as u64)))
            .collect();
        let mut m: Vec<_> = sizes.iter().map(|&n| be.zeros(n)).collect();
        let mut v: Vec<_> = sizes.iter().map(|&n| be.zeros(n)).collect();
        let h = AdamWStep {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
        };
        let t = time(be.device(), 10, 5, || {
            let mut slots: Vec<_> = p
                .iter_mut()
                .zip(&g)
                .zip(m.iter_mut().zip(v.iter_mut()))
                .map(|((param, grad), (m, v))| AdamWSlot { param, grad, m, v })
                .collect();
            be.adamw_step_many(&h, &mut slots).unwrap()
        });
        let (unit, x) = per(28.0);
        emit(&format!("adamw_many_{tag}"), t, unit, x);
        let t = time(be.device(), 10, 5, || {
            for k in 0..sizes.len() {
                be.adamw_step(&h, &mut p[k], &g[k], &mut m[k], &mut v[k])
                    .unwrap()
            }
        });
        emit(&format!("adamw_each_{tag}"), t, unit, x);
        let refs: Vec<_> = g.iter().collect();
        let t = time(be.device(), 10, 5, || {
            std::hint::black_box(be.sum_sq_many(&refs));
        });
        let (unit, x) = per(4.0);
        emit(&format!("sum_sq_many_{tag}"), t, unit, x);
        let t = time(be.device(), 10, 5, || {
            be.fill_many(&mut m.iter_mut().collect::<Vec<_>>(), 0.0)
        });
        emit(&format!("fill_many_{tag}"), t, unit, x);
    }
}

/// RMSNorm and LayerNorm, forward and backward, on 64 Mi floats in rows of C: a warp per
/// row up to 1024 floats, a block per row above (`backend/device/norm.rs`), so C = 1024
/// and 1025 sit on either side of the switch.  Bytes: x read and out written (forward);
/// x and dout read, dx written (backward; the weight's gradient is a column sum).
fn bench_norm(be: &DeviceBackend, want: &dyn Fn(&str) -> bool) {
    if !want("norm") {
        return;
    }
    let total = 64usize << 20;
    for c in [64usize, 1024, 1025, 4096] {
        let rows = total / c;
        let n = rows * c;
        let x = be.from_slice(&rand_f32(n, 30));
        let dout = be.from_slice(&rand_f32(n, 31));
        let w = be.from_slice(&rand_f32(c, 32));
        let b = be.from_slice(&rand_f32(c, 33));
        let (mut out, mut dx) = (be.uninit(n), be.uninit(n));
        let (mut mean, mut rstd) = (be.uninit(rows), be.uninit(rows));
        let (mut dw, mut db) = (be.zeros(c), be.zeros(c));
        let gb = |k: f64| k * 4.0 * n as f64 / 1e9;
        let t = time(be.device(), 10, 5, || {
            be.rmsnorm_fwd(&x, Some(&w), 1e-5, c, &mut out, &mut rstd)
                .unwrap()
        });
        emit(&format!("rmsnorm_fwd_c{c}"), t, "gb_s", gb(2.0));
        let t = time(be.device(), 10, 5, || {
            be.rmsnorm_bwd(&dout, &x, Some(&w), &rstd, c, &mut dx, Some(&mut dw))
                .unwrap()
        });
        emit(&format!("rmsnorm_bwd_c{c}"), t, "gb_s", gb(3.0));
        let t = time(be.device(), 10, 5, || {
            be.layernorm_fwd(&x, &w, &b, 1e-5, c, &mut out, &mut mean, &mut rstd)
                .unwrap()
        });
        emit(&format!("layernorm_fwd_c{c}"), t, "gb_s", gb(2.0));
        let t = time(be.device(), 10, 5, || {
            be.layernorm_bwd(
                &dout,
                &x,
                &w,
                &mean,
                &rstd,
                c,
                &mut dx,
                Some(&mut dw),
                Some(&mut db),
            )
            .unwrap()
        });
        emit(&format!("layernorm_bwd_c{c}"), t, "gb_s", gb(3.0));
    }
}

/// The pixel decoder's image ops (`kernels/image.cu`) through the device backend, at a
/// 7B-scale decoder's sizes: 8 images of 32×32 features, 64 masks resized to 1024×1024.
fn bench_image(be: &DeviceBackend, want: &dyn Fn(&str) -> bool) {
    if !want("image") {
        return;
    }
    let dev = be.device();
    let gb = |floats: usize| 4.0 * floats as f64 / 1e9;
    // im2col of a 3×3 conv, padding 1: the input read once, the columns written once
    let g = Conv2dGeom {
        b: 8,
        h: 32,
        w: 32,
        c: 256,
        k: 3,
        pad: 1,
    };
    let (nx, no) = (8 * 32 * 32 * 256, 8 * 32 * 32 * 9 * 256);
    let x = be.from_slice(&rand_f32(nx, 11));
    let (mut cols, mut dx) = (be.zeros(no), be.zeros(nx));
    let t = time(dev, 10, 5, || be.im2col(&x, &g, &mut cols).unwrap());
    emit("im2col_8x32x32x256_k3", t, "gb_s", gb(nx + no));
    let t = time(dev, 10, 5, || be.im2col_bwd(&cols, &g, &mut dx).unwrap());
    emit("im2col_bwd_8x32x32x256_k3", t, "gb_s", gb(nx + no));
    // depth-to-space ×2 of 8 × 32×32 × 4·256 (a permutation: read once, written once)
    let n = 8 * 32 * 32 * 4 * 256;
    let y = be.from_slice(&rand_f32(n, 12));
    let mut up = be.zeros(n);
    let t = time(dev, 10, 5, || {
        be.depth_to_space(&y, 8, 32, 32, 256, 2, &mut up).unwrap()
    });
    emit("depth_to_space_8x32x32x1024_r2", t, "gb_s", gb(2 * n));
    // per-row scale of 8 × 64×64 rows of 256 channels
    let (rows, c) = (8 * 64 * 64, 256);
    let (a, s) = (
        be.from_slice(&rand_f32(rows * c, 13)),
        be.from_slice(&rand_f32(rows, 14)),
    );
    let mut o = be.zeros(rows * c);
    let t = time(dev, 10, 5, || be.mul_rows(&a, &s, c, &mut o).unwrap());
    emit("mul_rows_32768x256", t, "gb_s", gb(2 * rows * c + rows));
    // 64 masks of 128×128 logits resized to 1024×1024, and the backward
    let (m, h, hi) = (64usize, 128usize, 1024usize);
    let lo = be.from_slice(&rand_f32(m * h * h, 15));
    let mut big = be.zeros(m * hi * hi);
    let mut dlo = be.zeros(m * h * h);
    let t = time(dev, 5, 5, || {
        be.resize_bilinear(&lo, m, h, h, 1, hi, hi, &mut big)
            .unwrap()
    });
    emit(
        "resize_64x128x128_to_1024",
        t,
        "gb_s",
        gb(m * (h * h + hi * hi)),
    );
    let t = time(dev, 5, 5, || {
        be.resize_bilinear_bwd(&big, m, h, h, 1, hi, hi, &mut dlo)
            .unwrap()
    });
    emit(
        "resize_bwd_64x1024_to_128",
        t,
        "gb_s",
        gb(m * (h * h + hi * hi)),
    );
    profile_once(dev, "resize_bwd", || {
        be.resize_bilinear_bwd(&big, m, h, h, 1, hi, hi, &mut dlo)
            .unwrap()
    });
    // BCE + Dice over the 64 full-size masks (logits and targets read; the backward
    // takes the forward's sums, reads both once and writes the gradient)
    let p = hi * hi;
    let target: Vec<f32> = rand_u8(m * p, 16, 0.3).iter().map(|&v| v as f32).collect();
    let tg = be.from_slice(&target);
    let mut dl = be.zeros(m * p);
    let sums = be.mask_loss_fwd(&big, &tg, m, p).unwrap().sums;
    let t = time(dev, 5, 5, || {
        be.mask_loss_fwd(&big, &tg, m, p).unwrap();
    });
    emit("mask_loss_fwd_64x1024x1024", t, "gb_s", gb(2 * m * p));
    let t = time(dev, 5, 5, || {
        be.mask_loss_bwd(&big, &tg, &sums, m, p, 2.0, 0.5, &mut dl)
            .unwrap()
    });
    emit("mask_loss_bwd_64x1024x1024", t, "gb_s", gb(3 * m * p));
    profile_once(dev, "mask_loss_bwd", || {
        be.mask_loss_bwd(&big, &tg, &sums, m, p, 2.0, 0.5, &mut dl)
            .unwrap()
    });
}

fn bench_attention(dev: &Device) {
    for (name, s, masked) in attn_shapes() {
        let (nq, nk) = (s.b * s.nh * s.tq * s.hs, s.b * s.nkv * s.tk * s.hs);
        let up = |v: Vec<f32>| dev.upload(&v).unwrap();
        let (q, k, v) = (
            up(rand_f32(nq, 11)),
            up(rand_f32(nk, 12)),
            up(rand_f32(nk, 13)),
        );
        let bias = up(rand_f32(s.b * s.tk, 14));
        // the last eighth of each row's keys is padding, as in the torch script
        let mask = masked.then(|| {
            let m: Vec<u8> = (0..s.b * s.tk)
                .map(|i| (i % s.tk < s.tk - s.tk / 8) as u8)
                .collect();
            dev.upload(&m).unwrap()
        });
        // the SIMT kernels, then the tensor-core ones (3×TF32, not yet the default)
        // where they take the head size, with their outputs' and gradients' largest
        // differences from the SIMT kernels' on the same inputs
        let mut kinds: Vec<(&str, AttnFwdFn, AttnBwdFn)> = vec![("", attention_fwd, attention_bwd)];
        if tensor_core_head_size(s.hs) {
            kinds.push(("tensorcore_", attention_fwd_tc, attention_bwd_tc));
        }
        let mut fwds = Vec::new();
        for &(tag, fwd, _) in &kinds {
            let mut out = dev.zeros::<f32>(nq).unwrap();
            let mut lse = dev.zeros::<f32>(s.b * s.nh * s.tq).unwrap();
            let t = time(dev, 5, 5, || {
                fwd(
                    dev,
                    &s,
                    &q,
                    &k,
                    &v,
                    Some(&bias),
                    mask.as_ref(),
                    &mut out,
                    &mut lse,
                )
                .unwrap()
            });
            emit(
                &format!("{tag}attention_fwd_{name}"),
                t,
                "gflop_s",
                s.fwd_flops() / 1e9,
            );
            if let Some((simt, _)) = fwds.first() {
                check_row(
                    &format!("{tag}attention_fwd_{name}"),
                    "simt",
                    &dev.download(simt).unwrap(),
                    &dev.download(&out).unwrap(),
                );
            }
            fwds.push((out, lse));
        }
        // every backward reads the SIMT forward's out and lse
        let (out, lse) = &fwds[0];
        let dout = up(rand_f32(nq, 15));
        let mut simt_grads: Option<Vec<Vec<f32>>> = None;
        for &(tag, _, bwd) in &kinds {
            let (mut dq, mut dk, mut dv) = (
                dev.zeros::<f32>(nq).unwrap(),
                dev.zeros::<f32>(nk).unwrap(),
                dev.zeros::<f32>(nk).unwrap(),
            );
            let mut db = dev.zeros::<f32>(s.b * s.tk).unwrap();
            let t = time(dev, 5, 5, || {
                bwd(
                    dev,
                    &s,
                    &q,
                    &k,
                    &v,
                    Some(&bias),
                    mask.as_ref(),
                    out,
                    lse,
                    &dout,
                    &mut dq,
                    &mut dk,
                    &mut dv,
                    Some(&mut db),
                )
                .unwrap()
            });
            emit(
                &format!("{tag}attention_bwd_{name}"),
                t,
                "gflop_s",
                s.bwd_flops() / 1e9,
            );
            let grads: Vec<Vec<f32>> = [&dq, &dk, &dv, &db]
                .iter()
                .map(|x| dev.download(x).unwrap())
                .collect();
            match &simt_grads {
                None => simt_grads = Some(grads),
                Some(want) => {
                    for ((what, got), want) in
                        ["dq", "dk", "dv", "dbias"].iter().zip(&grads).zip(want)
                    {
                        let what = format!("{tag}attention_bwd_{what}_{name}");
                        check_row(&what, "simt", want, got);
                    }
                }
            }
        }
    }
}

/// A check row beside the timings: the largest |a − b| against reference `a` (its kind
/// named by `against`; NaN sticks; as a string, since JSON has no NaN).
fn check_row(what: &str, against: &str, a: &[f32], b: &[f32]) {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, |m, e| if e > m || e.is_nan() { e } else { m });
    let diff = if diff.is_finite() {
        diff.to_string()
    } else {
        format!("\"{diff}\"")
    };
    println!("{{\"check\":\"{what}\",\"max_abs_diff_vs_{against}\":{diff}}}");
}

/// Forward + backward of the 7B-shaped stack on the device backend: embedding, the
/// layers, the final norm, the LM head, the log-prob of a target per position and the
/// backward of their mean (the loss PyTorch's side uses).
/// The 7B-shaped stack's training step; `tag` prefixes the row's name and the profile
/// (`tensorcore_` with the tensor-core attention kernels).
fn bench_stack(be: DeviceBackend, tag: &str) {
    let cfg = stack_cfg();
    let t0 = Instant::now();
    let mut m: Llama<f32, DeviceBackend> = Llama::new(be.clone(), cfg.clone(), 1).unwrap();
    eprintln!("stack: built in {:.1} s", t0.elapsed().as_secs_f64());
    let (b, t, v) = (STACK_BATCH, STACK_SEQ, cfg.vocab_size);
    let n = b * t;
    let mut rng = Philox::new(9);
    let ids: Vec<u32> = (0..n).map(|_| rng.next_u32() % v as u32).collect();
    let targets: Vec<i32> = (0..n).map(|_| (rng.next_u32() % v as u32) as i32).collect();
    let dlogp = be.from_slice(&vec![-1.0 / n as f32; n]);
    let (mut lp, mut lse) = (be.zeros(n), be.zeros(n));
    let mut dl = be.zeros(n * v);
    let mut step = || {
        m.zero_grad();
        let (logits, acts) = m.forward(&ids, b, None, None).unwrap();
        be.logprob_fwd(&logits, &targets, v, &mut lp, &mut lse)
            .unwrap();
        be.logprob_bwd(&logits, &targets, v, &lse, &dlogp, &mut dl)
            .unwrap();
        m.backward(&acts, &dl).unwrap();
    };
    let t = time(be.device(), 1, 5, &mut step);
    // one more step, profiled: where the time goes, by kernel and product shape
    profile_once(be.device(), &format!("{tag}stack"), step);
    let loss = -be.to_vec(&lp).iter().sum::<f32>() / n as f32;
    eprintln!("stack: loss {loss} (ln V = {})", (v as f32).ln());
    emit(
        &format!(
            "{tag}llama7b_stack_L{STACK_LAYERS}_b{b}_t{t}_fwd_bwd",
            t = STACK_SEQ
        ),
        t,
        "tokens_s",
        n as f64,
    );
}

/// Decoding with the 7B-shaped stack, frozen: a prefill of `DECODE_PROMPT` tokens for
/// `DECODE_BATCH` rows, then `DECODE_STEPS` steps of one token per row through the KV
/// cache (fixed random ids: the model's time, not sampling's), with each layer's q/k/v
/// and gate/up products apart, then fused (`Llama::pack_frozen`).  Rows
/// `llama7b_stack_L2_decode_b8_{apart,fused}` give the steps' tokens/s; a check row
/// the largest difference of the two's last logits.
fn bench_decode(be: DeviceBackend) {
    let cfg = stack_cfg();
    let mut m: Llama<f32, DeviceBackend> = Llama::new(be.clone(), cfg.clone(), 2).unwrap();
    m.set_trainable(false);
    let (b, v) = (DECODE_BATCH, cfg.vocab_size as u32);
    let mut rng = Philox::new(10);
    let mut ids = |n: usize| (0..n).map(|_| rng.next_u32() % v).collect::<Vec<u32>>();
    let prompt = ids(b * DECODE_PROMPT);
    let steps: Vec<Vec<u32>> = (0..DECODE_STEPS).map(|_| ids(b)).collect();
    let mut last = Vec::new();
    for fused in [false, true] {
        if fused {
            m.pack_frozen().unwrap();
        }
        let how = if fused { "fused" } else { "apart" };
        let mut cache = m.new_cache(b);
        m.reserve_cache(&mut cache, DECODE_PROMPT + DECODE_STEPS)
            .unwrap();
        m.forward_cached(&prompt, &mut cache, None, None).unwrap();
        let mut logits = None;
        // each round goes back to the prompt's end and decodes the same steps
        let mut round = || {
            m.truncate_cache(&mut cache, DECODE_PROMPT).unwrap();
            for s in &steps {
                logits = Some(m.forward_cached(s, &mut cache, None, None).unwrap());
            }
        };
        let t = time(be.device(), 1, 5, &mut round);
        profile_once(be.device(), &format!("decode_{how}"), round);
        let name = format!("llama7b_stack_L{STACK_LAYERS}_decode_b{b}_{how}");
        emit(&name, t, "tokens_s", (b * DECODE_STEPS) as f64);
        last.push(be.to_vec(&logits.expect("decoded")));
    }
    check_row("decode_fused_logits", "apart", &last[0], &last[1]);
}
const DECODE_BATCH: usize = 8;
const DECODE_PROMPT: usize = 512;
const DECODE_STEPS: usize = 32;

/// The probes' rates (`probe_tflop_s` rows: `mma_tf32` one HMMA per product, `ffma`):
/// four waves of 128-thread blocks, long enough (16 Ki steps) that launch costs vanish.
fn bench_probes(dev: &Device) {
    const THREADS: u32 = 128;
    const ITERS: usize = 1 << 14;
    for (which, name) in [(Probe::MmaTf32, "mma_tf32"), (Probe::Ffma, "ffma")] {
        let wave = dev
            .resident_blocks(which.kernel(), THREADS, 0)
            .expect("occupancy");
        let blocks = 4 * wave as u32;
        let mut out = dev.zeros::<f32>((blocks * THREADS) as usize).expect("out");
        let secs = time(dev, 1, 5, || {
            probe(dev, which, blocks, THREADS, ITERS, &mut out).expect("probe")
        });
        let flops = which.flops_per_thread(ITERS) * (blocks * THREADS) as f64;
        println!(
            "{{\"name\":\"probe_{name}\",\"ms\":{:.4},\"tflop_s\":{:.1},\"blocks\":{blocks},\"wave\":{wave}}}",
            secs * 1e3,
            flops / secs / 1e12
        );
        std::io::stdout().flush().ok();
    }
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument filters by name
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let dev = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("{{\"skipped\":{:?}}}", format!("no usable GPU: {e}"));
            return;
        }
    };
    let be = DeviceBackend::new(dev);
    if want("probe") {
        bench_probes(be.device());
    }
    bench_memory(be.device(), &want);
    bench_optim(&be, &want);
    bench_norm(&be, &want);
    bench_image(&be, &want);
    if want("attention") {
        bench_attention(be.device());
    }
    if want("decode") {
        bench_decode(be.clone());
    }
    if want("stack") {
        bench_stack(be.clone(), "");
        // attention on the tensor-core kernels (not yet the default)
        bench_stack(be.with_tensor_core_attention(true), "tensorcore_");
    }
}
