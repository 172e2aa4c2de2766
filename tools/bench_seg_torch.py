#!/usr/bin/env python
"""Seconds per training step of the tiny segmentation model (tools/configs/
stage1_world.toml's shapes) written plainly in PyTorch on the CPU, for the
side-by-side comparison with `popen train sft` (issue: "training tokens/s of the tiny
model against the same model in PyTorch").  Same shapes and the same work per step:

- CLIP-style ViT (128 wide, 4 blocks, 4 heads, MLP 512, patch 16 on a 128 x 128 image,
  class token, pre-LN, quick-GELU), LLaVA projector (linear, GELU, linear) on its last
  state;
- LLaMA decoder (192 wide, 4 blocks, 6 heads, SwiGLU 512, RoPE, RMSNorm, vocab 800) over
  64 image tokens + the text, causal, CE over the answer positions;
- codebook head Linear(H, H) -> ReLU -> Linear(H, 64) on 4 rows per target, the 2 rows
  of each scale averaged;
- pixel decoder per target: two ViT levels (the last state and state 2), each
  Linear(128 -> 64) and a 1x1 conv -> LN2d -> 3x3 conv -> LN2d neck; per scale a
  depth-2 two-way transformer (SAM's: token self-attention, token->image and
  image->token cross-attention at half width, MLP 128, 2 heads) between [mask token, f]
  and the image tokens plus a positional encoding; ConvTranspose 2x2 -> LN2d -> GELU;
  a 3-layer hypernetwork MLP; scale 1 on level 1 upsampled x2 and gated by
  sigmoid(mask0) + 1; both scales' logits resized to 128 x 128 and averaged;
- loss CE + 2 BCE + 2 Dice (the config's weights), AdamW step.

Batch: 16 questions of 112 positions (64 image + 48 text, the world's ~110) and 30
target masks (the world averages 1.9 per question).  Prints one JSON line.

usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_seg_torch.py [--threads 2] [--iters 10]
       [--text 48] [--masks 30]

`cargo bench --bench seg_step` times our step on a fixed world batch and prints its
padded positions and masks; `--text 42 --masks 25` gives this script the same shapes
(16 x (64 + 42) = 1696 positions).
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

B, T_TEXT, IMG, PATCH = 16, 48, 128, 16
GRID = IMG // PATCH
K = GRID * GRID
CV, CV_LAYERS, CV_HEADS, CV_MLP = 128, 4, 4, 512
H, LAYERS, HEADS, MLP, VOCAB = 192, 4, 6, 512, 800
D, DEPTH, DHEADS, DMLP = 64, 2, 2, 128
M = 30
GROUP = 4  # codebook tokens per target: 2 scales x 2


class ViTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(CV), nn.LayerNorm(CV)
        self.attn = nn.MultiheadAttention(CV, CV_HEADS, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(CV, CV_MLP), nn.Linear(CV_MLP, CV)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.fc1(self.ln2(x))
        return x + self.fc2(h * torch.sigmoid(1.702 * h))


def rope(x, pos):
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = pos[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class LlamaBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(H, eps=1e-6), nn.RMSNorm(H, eps=1e-6)
        self.qkv = nn.Linear(H, 3 * H, bias=False)
        self.o = nn.Linear(H, H, bias=False)
        self.gate = nn.Linear(H, 2 * MLP, bias=False)
        self.down = nn.Linear(MLP, H, bias=False)

    def forward(self, x, pos):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, t, 3, HEADS, H // HEADS).permute(2, 0, 3, 1, 4)
        q, k = rope(q, pos), rope(k, pos)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, H))
        g, u = self.gate(self.n2(x)).chunk(2, -1)
        return x + self.down(F.silu(g) * u)


class Attn(nn.Module):
    """SAM's attention with an internal width (downsampling)."""

    def __init__(self, dim, inner):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.o = nn.Linear(inner, dim)
        self.inner = inner

    def forward(self, q, k, v):
        b = q.shape[0]
        sh = lambda x: x.view(b, -1, DHEADS, self.inner // DHEADS).transpose(1, 2)
        y = F.scaled_dot_product_attention(sh(self.q(q)), sh(self.k(k)), sh(self.v(v)))
        return self.o(y.transpose(1, 2).reshape(b, -1, self.inner))


class TwoWayBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attn(D, D)
        self.t2i, self.i2t = Attn(D, D // 2), Attn(D, D // 2)
        self.mlp = nn.Sequential(nn.Linear(D, DMLP), nn.ReLU(), nn.Linear(DMLP, D))
        self.norms = nn.ModuleList([nn.LayerNorm(D) for _ in range(4)])

    def forward(self, q, k, qpe, kpe):
        q = self.norms[0](q + self.self_attn(q + qpe, q + qpe, q))
        q = self.norms[1](q + self.t2i(q + qpe, k + kpe, k))
        q = self.norms[2](q + self.mlp(q))
        k = self.norms[3](k + self.i2t(k + kpe, q + qpe, q))
        return q, k


class TwoWay(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([TwoWayBlock() for _ in range(DEPTH)])
        self.final = Attn(D, D // 2)
        self.norm = nn.LayerNorm(D)

    def forward(self, q, k, kpe):
        qpe = q
        for blk in self.blocks:
            q, k = blk(q, k, qpe, kpe)
        q = self.norm(q + self.final(q + qpe, k + kpe, k))
        return q, k


class LN2d(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x):  # (n, c, h, w)
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.ModuleList([nn.Linear(CV, D) for _ in range(2)])
        self.neck = nn.ModuleList([
            nn.Sequential(nn.Conv2d(D, D, 1, bias=False), LN2d(D), nn.Conv2d(D, D, 3, padding=1, bias=False), LN2d(D))
            for _ in range(2)])
        self.mask_token = nn.Parameter(torch.randn(2, D))
        self.tw = nn.ModuleList([TwoWay() for _ in range(2)])
        self.up = nn.ModuleList([nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2), LN2d(D), nn.GELU()) for _ in range(2)])
        self.hyper = nn.ModuleList([
            nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D)) for _ in range(2)])
        self.register_buffer("gauss", torch.randn(2, D // 2))

    def pe(self, h, w):
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h * 2 - 1, (torch.arange(w) + 0.5) / w * 2 - 1, indexing="ij")
        c = torch.stack([xs, ys], -1).view(-1, 2) @ self.gauss * (2 * math.pi)
        return torch.cat([c.sin(), c.cos()], -1)

    def scale(self, s, keys, f, h, w):
        m = f.shape[0]
        tokens = torch.stack([self.mask_token[s].expand(m, D), f], 1)
        q, k = self.tw[s](tokens, keys, self.pe(h, w)[None])
        u = self.up[s](k.transpose(1, 2).reshape(m, D, h, w))
        hv = self.hyper[s](q[:, 0])
        return torch.einsum("mchw,mc->mhw", u, hv)

    def forward(self, feats, f, img_of):
        z = []
        for l in range(2):
            p = self.proj[l](feats[l]).transpose(1, 2).reshape(B, D, GRID, GRID)
            z.append(self.neck[l](p))
        k0 = z[0][img_of].flatten(2).transpose(1, 2)
        l0 = self.scale(0, k0, f[:, 0], GRID, GRID)  # (m, 16, 16)
        up1 = F.interpolate(z[1], scale_factor=2, mode="bilinear", align_corners=False)[img_of]
        up1 = up1 * (torch.sigmoid(l0)[:, None] + 1)
        k1 = up1.flatten(2).transpose(1, 2)
        l1 = self.scale(1, k1, f[:, 1], 2 * GRID, 2 * GRID)  # (m, 32, 32)
        r = lambda x: F.interpolate(x[:, None], size=(IMG, IMG), mode="bilinear", align_corners=False)[:, 0]
        return (r(l0) + r(l1)) / 2


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, CV, PATCH, PATCH, bias=False)
        self.cls = nn.Parameter(torch.randn(CV))
        self.vpos = nn.Parameter(torch.randn(K + 1, CV) * 0.02)
        self.pre = nn.LayerNorm(CV)
        self.vit = nn.ModuleList([ViTBlock() for _ in range(CV_LAYERS)])
        self.projector = nn.Sequential(nn.Linear(CV, H), nn.GELU(), nn.Linear(H, H))
        self.embed = nn.Embedding(VOCAB, H)
        self.llm = nn.ModuleList([LlamaBlock() for _ in range(LAYERS)])
        self.norm = nn.RMSNorm(H, eps=1e-6)
        self.head = nn.Linear(H, VOCAB, bias=False)
        self.seg_head = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, D))
        self.dec = Decoder()

    def forward(self, px, ids, targets, seg_rows, img_of, masks):
        x = self.patch(px).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(B, 1, CV), x], 1) + self.vpos
        x = self.pre(x)
        states = [x]
        for blk in self.vit:
            x = blk(x)
            states.append(x)
        img = self.projector(x[:, 1:])
        h = torch.cat([img, self.embed(ids)], 1)
        pos = torch.arange(h.shape[1], dtype=torch.float32)
        for blk in self.llm:
            h = blk(h, pos)
        h = self.norm(h)
        logits = self.head(h[:, K:])
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
        rows = h.reshape(-1, H)[seg_rows]  # (M*GROUP, H)
        f = self.seg_head(rows).view(M, 2, 2, D).mean(2)  # (M, L, D)
        ml = self.dec([states[-1][:, 1:], states[2][:, 1:]], f, img_of)
        bce = F.binary_cross_entropy_with_logits(ml, masks, reduction="none").mean((1, 2)).mean()
        p = torch.sigmoid(ml).flatten(1)
        t = masks.flatten(1)
        dice = (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()
        return ce + 2 * bce + 2 * dice


def main():
    global T_TEXT, M
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--text", type=int, default=T_TEXT,
                    help="text positions per question (benches/seg_step.rs prints its batch's)")
    ap.add_argument("--masks", type=int, default=M, help="target masks in the batch")
    a = ap.parse_args()
    T_TEXT, M = a.text, a.masks
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    px = torch.randn(B, 3, IMG, IMG)
    ids = torch.randint(0, VOCAB, (B, T_TEXT))
    targets = torch.full((B, T_TEXT), -100)
    targets[:, 20:] = torch.randint(0, VOCAB, (B, T_TEXT - 20))  # the answer part
    t = K + T_TEXT
    seg_rows = torch.tensor([(i % B) * t + K + 24 + j for i in range(M) for j in range(GROUP)])
    img_of = torch.tensor([i % B for i in range(M)])
    masks = (torch.rand(M, IMG, IMG) < 0.05).float()

    def step():
        opt.zero_grad(set_to_none=False)
        loss = model(px, ids, targets, seg_rows, img_of, masks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.iters):
        s = time.perf_counter()
        step()
        times.append(time.perf_counter() - s)
    times.sort()
    med = times[len(times) // 2]
    print(json.dumps({
        "params": sum(p.numel() for p in model.parameters()),
        "threads": a.threads,
        "batch": B,
        "positions": B * t,
        "masks": M,
        "s_per_step_median": med,
        "s_per_step_min": times[0],
        "tokens_per_s": B * t / med,
    }))


if __name__ == "__main__":
    main()
