#!/usr/bin/env python3
"""PyTorch CPU on the shapes of benches/{perturb,mask,logprob}.rs, for comparison with
the criterion numbers of the CPU twins (`cargo bench --bench <name>`).

    /work/main/.venv/bin/python tools/bench_kernels_torch.py [--threads N]

Prints the median time of each op (and GB/s counted the same way as the Rust benches)
and a memory-copy baseline measured in the same run.
"""
import argparse
import time

import torch

H, W = 480, 640


def bench(fn, reps=10, warm=2):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def report(name, t, nbytes):
    print(f"{name:<40} {t * 1e3:9.3f} ms  {nbytes / t / 2**30:7.2f} GiB/s")


def blobs(n, g):
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    m = torch.zeros(n, H, W, dtype=torch.uint8)
    for k in range(n):
        cy, cx = torch.randint(0, H, (1,), generator=g).item(), torch.randint(0, W, (1,), generator=g).item()
        r = torch.randint(20, 220, (1,), generator=g).item()
        m[k] = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).to(torch.uint8) * 255
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(0)

    n = 32 << 20
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    report("memcpy_32MB (read+write)", bench(lambda: dst.copy_(src)), 2 * n)

    # ---- perturb: Np=30 copies of a 3x336x336 image, noise in a random rectangle
    np_, c, h, w = 30, 3, 336, 336
    img = torch.rand(c, h, w, generator=g)

    def perturb():
        out = img.unsqueeze(0).repeat(np_, 1, 1, 1)
        for k in range(np_):
            rh = int(torch.randint(h // 8, h // 2 + 1, (1,)))
            rw = int(torch.randint(w // 8, w // 2 + 1, (1,)))
            y0 = int(torch.randint(0, h - rh + 1, (1,)))
            x0 = int(torch.randint(0, w - rw + 1, (1,)))
            out[k, :, y0:y0 + rh, x0:x0 + rw] += 0.5 * torch.randn(c, rh, rw)
        return out

    def perturb_full():
        return img.unsqueeze(0) + 0.5 * torch.randn(np_, c, h, w)

    report("perturb_30x3x336x336 fwd", bench(perturb), 2 * np_ * c * h * w * 4)
    report("perturb_30x3x336x336 fwd_full_rect", bench(perturb_full), 2 * np_ * c * h * w * 4)

    # ---- mask: IoU by tensor ops
    p1, g1 = blobs(1, g), blobs(1, g)

    def iou_1x1():
        a, b = p1 != 0, g1 != 0
        return (a & b).sum(), (a | b).sum()

    report("pair_counts_1x1_480x640", bench(iou_1x1), 2 * H * W)
    pm, gm = blobs(16, g), blobs(4, g)

    def iou_16x4():
        a, b = (pm != 0)[:, None], (gm != 0)[None]
        return (a & b).sum((2, 3)), (a | b).sum((2, 3))

    report("pair_counts_16x4_480x640", bench(iou_16x4), 2 * 16 * 4 * H * W)

    def boundary(m, d):
        # erosion by d iterations of 3x3 with zero padding = min-pool of width 2d+1
        x = (m != 0).float()[None]
        e = -torch.nn.functional.max_pool2d(-torch.nn.functional.pad(x, (d, d, d, d)), 2 * d + 1, stride=1)
        return (x - e)[0] > 0

    d = 16

    def biou():
        bp, bg = boundary(p1, d), boundary(g1, d)
        return (bp & bg).sum(), (bp | bg).sum()

    report("boundary_iou_480x640", bench(biou), 2 * H * W)
    nb = 8
    prob = torch.rand(nb, H * W, generator=g, requires_grad=True)
    tgt = (blobs(nb, g).reshape(nb, -1) != 0).float()

    def soft_fwd():
        with torch.no_grad():
            i = (prob * tgt).sum(1)
            return (i + 1e-6) / (prob.sum(1) + tgt.sum(1) - i + 1e-6)

    def soft_bwd():
        prob.grad = None
        i = (prob * tgt).sum(1)
        iou = (i + 1e-6) / (prob.sum(1) + tgt.sum(1) - i + 1e-6)
        iou.sum().backward()

    report("soft_iou_8x480x640 fwd", bench(soft_fwd), 5 * nb * H * W)
    report("soft_iou_8x480x640 fwd+bwd (autograd)", bench(soft_bwd), 5 * nb * H * W)

    # ---- logprob: B=4, T=64, V=32000
    b, t, v = 4, 64, 32000
    logits = (torch.rand(b, t, v, generator=g) * 20 - 10).requires_grad_(True)
    targets = torch.randint(0, v, (b, t), generator=g)
    wts = torch.ones(b, t)
    wts[:, :8] = 0

    def lp_fwd():
        with torch.no_grad():
            lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
            return (lp * wts).sum(1) / (wts != 0).sum(1)

    def lp_bwd():
        logits.grad = None
        lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        ((lp * wts).sum(1) / (wts != 0).sum(1)).sum().backward()

    report("logprob_4x64x32000 fwd", bench(lp_fwd), b * t * v * 4)
    report("logprob_4x64x32000 fwd+bwd (autograd)", bench(lp_bwd), 2 * b * t * v * 4)


if __name__ == "__main__":
    main()
