#!/usr/bin/env python3
"""PyTorch on the GPU, on the shapes of benches/gpu.rs, for tools/gpu_check.sh.

    python3 tools/bench_gpu_torch.py [--only NAME]

One JSON object per line, in the Rust bench's units:
  copy_1GiB            a device-to-device copy (torch's copy_): the memory ceiling
  sgemm_8192           an f32 8192³ matrix product, TF32 off: the f32 matrix ceiling
  logprob_*            log_softmax + gather (fwd) and its backward, the same bytes counted
  attention_*          F.scaled_dot_product_attention with a float mask (bias per key +
                       -inf for causal / padding, built inside the timed call, as a model
                       does), forward, and backward w.r.t. q, k, v and the bias
  adamw_many_*         torch.optim.AdamW(fused=True) on one 7B layer's tensors (gb_s, 28
                       bytes per weight) and on 320 tensors of 8 Ki floats (steps_s);
                       adamw_each_* the same with foreach=False (a launch per tensor);
                       sum_sq_many_* torch._foreach_norm, fill_many_* torch._foreach_zero_
  llama7b_stack_*      transformers' LlamaForCausalLM with the 7B widths and vocabulary
                       and STACK_LAYERS layers, f32, eager attention, TF32 off: forward +
                       mean cross-entropy + backward, tokens/s
Timing as in the Rust bench: warm-up, then rounds of n calls closed by one synchronize,
median round / n. f32 throughout with TF32 off, as our f32 kernels and SGEMM.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

# keep in sync with benches/gpu.rs
STACK = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=2,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
STACK_BATCH, STACK_SEQ = 1, 2048
# name, B, NH, NKV, T, HS, causal, padding mask, token-major operands
ATTN = [
    ("b2_h32_t2048_d128_causal_bias", 2, 32, 32, 2048, 128, True, False, False),
    ("b2_h32_t2048_d128_causal_bias_tokens", 2, 32, 32, 2048, 128, True, False, True),
    ("b8_h32_t1024_d128_bias_mask", 8, 32, 32, 1024, 128, False, True, False),
]


SYNC = torch.cuda.synchronize


def timeit(fn, n, reps=5):
    fn()
    SYNC()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        SYNC()
        ts.append((time.perf_counter() - t0) / n)
    return statistics.median(ts)


def emit(name, secs, unit, per_call):
    print(json.dumps({"name": name, "ms": round(secs * 1e3, 4), unit: round(per_call / secs, 2)}), flush=True)


def pairs(t, causal):
    return t * (t + 1) // 2 if causal else t * t


def bench_copy(dev, n_copy, n_mm, r_lp, v_lp):
    n = n_copy
    src, dst = torch.rand(n) * 2 - 1, torch.empty(n)
    emit("copy_1GiB", timeit(lambda: dst.copy_(src), 10), "gb_s", 8.0 * n / 1e9)
    del src, dst


def bench_sgemm(dev, n_copy, n_mm, r_lp, v_lp):
    x, y = torch.rand(n_mm, n_mm) - 0.5, torch.rand(n_mm, n_mm) - 0.5
    emit(f"sgemm_{n_mm}", timeit(lambda: x @ y, 3), "gflop_s", 2.0 * n_mm**3 / 1e9)
    del x, y


def bench_logprob(dev, n_copy, n_mm, r_lp, v_lp):
    r, v = r_lp, v_lp
    logits = torch.rand(r, v) * 2 - 1
    tg = torch.randint(0, v, (r,))
    fwd = lambda: logits.log_softmax(-1).gather(1, tg[:, None])  # noqa: E731
    emit("logprob_fwd_8192x32000", timeit(fwd, 10), "gb_s", 4.0 * r * v / 1e9)
    lg = logits.clone().requires_grad_(True)
    lp = lg.log_softmax(-1).gather(1, tg[:, None]).sum()
    bwd = lambda: torch.autograd.grad(lp, lg, retain_graph=True)  # noqa: E731
    emit("logprob_bwd_8192x32000", timeit(bwd, 10), "gb_s", 8.0 * r * v / 1e9)
    del logits, lg, lp


def bench_attention(dev, n_copy, n_mm, r_lp, v_lp):
    for name, b, nh, nkv, t, hs, causal, masked, tokens in ATTN:
        # tokens: (B,T,H,HS) as a projection writes it, viewed as (B,H,T,HS) in place
        def operand(h):
            x = torch.rand(b, t, h, hs) if tokens else torch.rand(b, h, t, hs)
            x = x * 2 - 1
            return x.transpose(1, 2) if tokens else x

        q, k, v = operand(nh), operand(nkv), operand(nkv)
        bias = torch.rand(b, t) * 2 - 1
        hidden = torch.zeros(b, 1, t, t, dtype=torch.bool)
        if causal:
            hidden |= torch.ones(t, t, dtype=torch.bool).triu(1)
        if masked:
            hidden |= (torch.arange(t) >= t - t // 8).view(1, 1, 1, t)
        neg = torch.zeros(b, 1, t, t).masked_fill(hidden, float("-inf"))
        scale = 1.0 / hs**0.5

        def sdpa(q, k, v, bias):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :] + neg, scale=scale)

        flops = 4.0 * b * nh * pairs(t, causal) * hs
        with torch.no_grad():
            emit(f"attention_fwd_{name}", timeit(lambda: sdpa(q, k, v, bias), 5), "gflop_s", flops / 1e9)
        qq, kk, vv, bb = (x.clone().requires_grad_(True) for x in (q, k, v, bias))
        out = sdpa(qq, kk, vv, bb)
        dout = torch.rand_like(out) * 2 - 1
        bwd = lambda: torch.autograd.grad(out, (qq, kk, vv, bb), dout, retain_graph=True)  # noqa: E731
        emit(f"attention_bwd_{name}", timeit(bwd, 5), "gflop_s", 2.5 * flops / 1e9)
        del q, k, v, neg, hidden, qq, kk, vv, bb, out


def bench_stack(dev, n_copy, n_mm, r_lp, v_lp):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**STACK, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).to(dev)
    model.train()
    n = STACK_BATCH * STACK_SEQ
    ids = torch.randint(0, STACK["vocab_size"], (STACK_BATCH, STACK_SEQ))
    tg = torch.randint(0, STACK["vocab_size"], (STACK_BATCH, STACK_SEQ))

    def step():
        model.zero_grad(set_to_none=False)
        logits = model(input_ids=ids).logits
        F.cross_entropy(logits.view(-1, STACK["vocab_size"]), tg.view(-1)).backward()

    layers = STACK["num_hidden_layers"]
    emit(f"llama7b_stack_L{layers}_b{STACK_BATCH}_t{STACK_SEQ}_fwd_bwd", timeit(step, 1), "tokens_s", float(n))
    # one more step under the profiler: GPU time by kernel, as benches/gpu.rs prints ours
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = getattr(ev, "self_cuda_time_total", 0.0)
        if us > 0:
            print(json.dumps({"profile": "stack", "kernel": ev.key, "calls": ev.count, "ms": round(us / 1e3, 4)}))


def bench_optim(dev, n_copy, n_mm, r_lp, v_lp):
    h, i = STACK["hidden_size"], STACK["intermediate_size"]
    for tag, sizes, small in [("7b_layer", [h * h] * 4 + [i * h] * 3 + [h] * 2, False), ("320x8k", [8192] * 320, True)]:
        n = sum(sizes)
        ps = [torch.nn.Parameter(torch.randn(k) * 0.02) for k in sizes]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        for kind, kw in [("many", dict(fused=True)), ("each", dict(foreach=False))]:
            opt = torch.optim.AdamW(ps, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, **kw)
            t = timeit(opt.step, 10)
            if small:
                emit(f"adamw_{kind}_{tag}", t, "steps_s", 1.0)
            else:
                emit(f"adamw_{kind}_{tag}", t, "gb_s", 28.0 * n / 1e9)
            del opt
        grads = [p.grad for p in ps]
        t = timeit(lambda: torch.stack(torch._foreach_norm(grads)), 10)
        emit(f"sum_sq_many_{tag}", t, *(("steps_s", 1.0) if small else ("gb_s", 4.0 * n / 1e9)))
        t = timeit(lambda: torch._foreach_zero_(grads), 10)
        emit(f"fill_many_{tag}", t, *(("steps_s", 1.0) if small else ("gb_s", 4.0 * n / 1e9)))


SECTIONS = [
    ("copy", bench_copy),
    ("optim", bench_optim),
    ("sgemm", bench_sgemm),
    ("logprob", bench_logprob),
    ("attention", bench_attention),
    ("stack", bench_stack),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script, times nothing real")
    a = ap.parse_args()
    want = lambda name: a.only in name  # noqa: E731
    global SYNC, ATTN, STACK_SEQ
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    # sizes: (copy elements, sgemm side, logprob rows, vocabulary)
    n_copy, n_mm, r_lp, v_lp = 256 << 20, 8192, 8 * 1024, 32000
    if a.smoke:
        SYNC = lambda: None  # noqa: E731
        dev = torch.device("cpu")
        n_copy, n_mm, r_lp, v_lp = 1 << 20, 256, 64, 1000
        ATTN = [(n, b, 4, 4, 64, 32, c, m, tok) for (n, b, _, _, _, _, c, m, tok) in ATTN]
        STACK.update(vocab_size=1000, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
        STACK_SEQ = 64
        print(json.dumps({"torch": torch.__version__, "smoke": True}), flush=True)
    else:
        dev = torch.device("cuda")
        print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}), flush=True)
    torch.set_default_device(dev)
    sizes = (n_copy, n_mm, r_lp, v_lp)
    for name, fn in SECTIONS:
        if want(name):
            try:
                fn(dev, *sizes)
            except Exception as e:  # one failing section must not lose the others
                print(json.dumps({"section": name, "error": repr(e)}), flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
