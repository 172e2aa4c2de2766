#!/usr/bin/env python3
"""How fine can a mask be on a g x g logit grid?  For every ground-truth target of a
MUSE-schema data file, the mask is padded bottom/right to the square S x S input (as the
model pads its images), and on each grid g:

  averaged  logits = (mean of the mask over each cell) - 0.5
  fitted    logits fitted by gradient descent on BCE through the resize

are resized bilinearly to S x S (half-pixel centres, as the pixel decoder resizes),
cropped to the image and thresholded at 0; the script prints the mean IoU with the
ground truth and the share of targets above IoU 0.5.  `fitted` is an upper bound of
what a decoder whose finest logits live on that grid can draw.

    .venv/bin/python tools/mask_grid_ceiling.py DATA.json [S] [MAX_TARGETS]   # tools/setup_python.sh

docs/stage1.md's pixel-skip section quotes this on the demo's test split (S = 128).
"""
import json
import sys

import numpy as np
from pycocotools import mask as cmask

GRIDS = (16, 32)
FIT_STEPS = 400
FIT_LR = 2.0


def resize_matrix(g, s):
    """(s, g): bilinear resize of g cells onto s pixels, half-pixel centres, clamped."""
    x = np.clip((np.arange(s) + 0.5) * g / s - 0.5, 0, g - 1)
    i0 = np.floor(x).astype(int)
    i1 = np.minimum(i0 + 1, g - 1)
    w = x - i0
    a = np.zeros((s, g))
    a[np.arange(s), i0] += 1 - w
    a[np.arange(s), i1] += w
    return a


def iou(pred, gt):
    union = (pred | gt).sum()
    return (pred & gt).sum() / union if union else 1.0


def main():
    data = json.load(open(sys.argv[1]))
    s = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    limit = int(sys.argv[3]) if len(sys.argv) > 3 else None
    res = {(g, kind): [] for g in GRIDS for kind in ("averaged", "fitted")}
    targets = [t for rec in data for answer in rec["answers"] for t in answer]
    n = len(targets[:limit] if limit else targets)
    for t in targets[:n]:
        seg = t["segmentation"]
        gt = cmask.decode({"size": seg["size"], "counts": seg["counts"].encode()})
        h, w = gt.shape
        pad = np.zeros((s, s))
        pad[:h, :w] = gt
        valid = np.zeros((s, s))
        valid[:h, :w] = 1
        gt = gt.astype(bool)
        for g in GRIDS:
            a = resize_matrix(g, s)
            avg = pad.reshape(g, s // g, g, s // g).mean((1, 3)) - 0.5
            res[(g, "averaged")].append(iou((a @ avg @ a.T)[:h, :w] > 0, gt))
            z = np.zeros((g, g))
            for _ in range(FIT_STEPS):
                p = 1 / (1 + np.exp(-(a @ z @ a.T)))
                z -= FIT_LR * (a.T @ ((p - pad) * valid) @ a)
            res[(g, "fitted")].append(iou((a @ z @ a.T)[:h, :w] > 0, gt))
    print(f"{n} targets, {s} x {s} input")
    for (g, kind), v in res.items():
        v = np.array(v)
        print(f"{g:3d} x {g:<3d} {kind:9s} mean IoU {v.mean():.3f}  IoU > 0.5 {np.mean(v > 0.5):.3f}")


if __name__ == "__main__":
    main()
