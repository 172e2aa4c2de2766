#!/usr/bin/env python3
"""PyTorch CPU baseline for benches/attention.rs: F.scaled_dot_product_attention with a
float mask (bias γ per key + −inf for causal / padding), on the same shapes, data
layout and flop formula as the criterion bench.

    /work/main/.venv/bin/python tools/bench_attention_torch.py --threads 2

Prints, per shape, the median time and GFLOP/s of
  fwd          SDPA forward under no_grad (inference), the float mask built from γ
               and the causal/padding pattern inside the timed call, as a model does;
  fwd(mask prebuilt)  the same with the mask built beforehand (SDPA alone);
  bwd          backward of SDPA w.r.t. q, k, v (out.backward(dout));
  bwd+dbias    the same with the bias requiring grad (what our backward computes).
Then the process CPU time per call of fwd, fwd(mask prebuilt), fwd+bwd and
fwd+bwd+dbias (compare with `ATTN_CPU_TIME=1 cargo bench --bench attention`).
Flops: forward 4·B·NH·pairs·HS, backward 2.5× that, pairs = (query, key) pairs that the
causal rule lets through (padding not subtracted), as in AttnShape::fwd_flops.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# name, B, NH, NKV, T, HS, causal, padding mask
SHAPES = [
    ("b4_h8_t256_d64_bias_mask", 4, 8, 8, 256, 64, False, True),
    ("b4_h8_t256_d64_causal_bias", 4, 8, 8, 256, 64, True, False),
    ("b2_h8kv2_t512_d128_causal_bias", 2, 8, 2, 512, 128, True, False),
]


def pairs(t, causal):
    return t * (t + 1) // 2 if causal else t * t


SYNC = lambda: None  # noqa: E731  (replaced by torch.cuda.synchronize on a GPU)


CPU_MS = {}  # label -> process CPU time per call (ms), the steadier number on a shared machine


def timeit(fn, reps, warmup=3, label=None):
    for _ in range(warmup):
        fn()
    SYNC()
    ts = []
    c0 = time.process_time()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        SYNC()
        ts.append(time.perf_counter() - t0)
    if label:
        CPU_MS[label] = (time.process_time() - c0) / reps * 1e3
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--only", default="", help="run only shapes whose name contains this")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU SDPA, synchronized)")
    a = ap.parse_args()
    global SYNC
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        SYNC = torch.cuda.synchronize
        # plain f32 math, as our f32 kernels (no TF32 in the matrix products)
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_default_device(dev)
    print(f"torch {torch.__version__}, {a.device}, {torch.get_num_threads()} threads")
    for name, b, nh, nkv, t, hs, causal, masked in SHAPES:
        if a.only not in name:
            continue
        q = torch.rand(b, nh, t, hs) * 2 - 1
        k = torch.rand(b, nkv, t, hs) * 2 - 1
        v = torch.rand(b, nkv, t, hs) * 2 - 1
        bias = torch.rand(b, t) * 2 - 1
        hidden = torch.zeros(b, 1, t, t, dtype=torch.bool)
        if causal:
            hidden |= torch.ones(t, t, dtype=torch.bool).triu(1)
        if masked:
            pad = torch.arange(t) >= t - t // 8
            hidden |= pad.view(1, 1, 1, t)
        neg = torch.zeros(b, 1, t, t).masked_fill(hidden, float("-inf"))
        scale = 1.0 / hs**0.5
        gqa = nkv != nh

        def sdpa(q, k, v, bias):
            mask = bias[:, None, None, :] + neg
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)

        flops = 4.0 * b * nh * pairs(t, causal) * hs
        with torch.no_grad():
            tf = timeit(lambda: sdpa(q, k, v, bias), a.reps, label="fwd")
            # the same with the (B,1,T,T) float mask built outside the timed call
            mask = bias[:, None, None, :] + neg
            tf_pre = timeit(
                lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa),
                a.reps,
                label="fwd(mask prebuilt)",
            )
        dout = torch.rand(b, nh, t, hs) * 2 - 1

        def bwd(with_bias):
            qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
            bb = bias.clone().requires_grad_(with_bias)
            out = sdpa(qq, kk, vv, bb)
            SYNC()
            t0 = time.perf_counter()
            out.backward(dout)
            SYNC()
            return time.perf_counter() - t0

        res = {}
        for with_bias in (False, True):
            # CPU time of forward + backward per call (the forward is untimed in `res`)
            def step(wb=with_bias):
                qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
                sdpa(qq, kk, vv, bias.clone().requires_grad_(wb)).backward(dout)

            timeit(step, max(3, a.reps // 2), label=f"fwd+bwd{'+dbias' if with_bias else ''}")
            for _ in range(3):
                bwd(with_bias)
            res[with_bias] = statistics.median(bwd(with_bias) for _ in range(a.reps))
        print(
            f"{name}: fwd {tf * 1e3:.3f} ms ({flops / tf / 1e9:.2f} GFLOP/s), "
            f"fwd(mask prebuilt) {tf_pre * 1e3:.3f} ms ({flops / tf_pre / 1e9:.2f} GFLOP/s), "
            f"bwd {res[False] * 1e3:.3f} ms ({2.5 * flops / res[False] / 1e9:.2f} GFLOP/s), "
            f"bwd+dbias {res[True] * 1e3:.3f} ms ({2.5 * flops / res[True] / 1e9:.2f} GFLOP/s)"
        )
        print("    cpu time per call: " + ", ".join(f"{k} {v:.3f} ms" for k, v in CPU_MS.items()))


if __name__ == "__main__":
    main()
