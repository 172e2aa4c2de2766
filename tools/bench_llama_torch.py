#!/usr/bin/env python
"""Forward+backward tokens/s of transformers' LlamaForCausalLM on the CPU, for the
side-by-side comparison with `cargo bench --bench llama` (same config, batch, sequence
length and thread count).

The loss is the mean next-token cross-entropy over all B*T positions (the Rust bench
runs the same: log-prob of a target per position, backward of the mean). The config
must stay in sync with BENCH_CFG in benches/llama.rs.

usage: /work/main/.venv/bin/python tools/bench_llama_torch.py [--threads 2] [--iters 5]

On a shared machine set OMP_WAIT_POLICY=PASSIVE: otherwise idle OpenMP threads spin
and the wall time swings by several times with the other processes' load.
"""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# ~25M parameters: keep in sync with benches/llama.rs
CFG = dict(
    vocab_size=8000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
BATCH = 4
SEQ = 128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", help="sdpa (default, fastest) or eager")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG, attn_implementation=args.attn))
    model.train()
    nparams = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, CFG["vocab_size"], (BATCH, SEQ))
    targets = torch.randint(0, CFG["vocab_size"], (BATCH, SEQ))

    def step() -> None:
        model.zero_grad(set_to_none=False)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits.view(-1, CFG["vocab_size"]), targets.view(-1)
        )
        loss.backward()

    for _ in range(args.warmup):
        step()
    times = []
    cpu0 = time.process_time()
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    cpu_per_step = (time.process_time() - cpu0) / args.iters
    times.sort()
    med = times[len(times) // 2]
    tokens = BATCH * SEQ
    print(
        json.dumps(
            {
                "impl": f"torch {torch.__version__} ({args.attn})",
                "threads": args.threads,
                "params": nparams,
                "batch": BATCH,
                "seq": SEQ,
                "median_s": round(med, 4),
                "min_s": round(times[0], 4),
                "tokens_per_s": round(tokens / med, 1),
                # CPU seconds per step: steadier than wall time on a shared machine
                # (with OMP_WAIT_POLICY=PASSIVE, so idle OpenMP threads do not spin)
                "cpu_s_per_step": round(cpu_per_step, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
