#!/usr/bin/env python3
"""Writes tests/fixtures/mask/cases.json: small random mask pairs of odd sizes with
their IoU (pycocotools.mask.iou on COCO RLE; empty-vs-empty = 1.0, LISA's convention,
which pycocotools does not apply itself) and Boundary IoU / boundaries from Cheng et
al.'s reference code (cv2.erode of the zero-padded mask, `d` iterations of 3x3).

    /work/main/.venv/bin/python tools/mask_fixtures.py

Masks are stored as hex of np.packbits (row-major, MSB first, padded to a byte).
Regenerate only with this script.
"""
import json
import os

import cv2
import numpy as np
from pycocotools import mask as mask_utils

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "mask", "cases.json")


def mask_to_boundary(mask, dilation_ratio):
    # Cheng et al. 2021, boundary_iou/utils/boundary_utils.py (same arithmetic)
    h, w = mask.shape
    img_diag = np.sqrt(h**2 + w**2)
    dilation = int(round(dilation_ratio * img_diag))
    if dilation < 1:
        dilation = 1
    new_mask = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    kernel = np.ones((3, 3), dtype=np.uint8)
    new_mask_erode = cv2.erode(new_mask, kernel, iterations=dilation)
    return mask - new_mask_erode[1 : h + 1, 1 : w + 1], dilation


def boundary_iou(gt, dt, ratio):
    gb, d = mask_to_boundary(gt, ratio)
    db, _ = mask_to_boundary(dt, ratio)
    inter = int(((gb * db) > 0).sum())
    union = int(((gb + db) > 0).sum())
    return (inter / union if union else 1.0), gb, db, d


def random_mask(rng, h, w):
    m = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(0, 4)):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if rng.random() < 0.5:
            ax = (int(rng.integers(1, max(2, w // 2))), int(rng.integers(1, max(2, h // 2))))
            cv2.ellipse(m, c, ax, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            c2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.rectangle(m, c, c2, 1, -1)
    # holes and specks
    for _ in range(rng.integers(0, h * w // 30 + 1)):
        m[rng.integers(0, h), rng.integers(0, w)] ^= 1
    return m


def hexbits(m):
    return np.packbits(m.astype(np.uint8).ravel()).tobytes().hex()


def main():
    rng = np.random.default_rng(2021)
    cases = []
    sizes = [(1, 1), (1, 7), (9, 1), (3, 5), (17, 13), (31, 29), (45, 23), (7, 61), (63, 37), (51, 51)]
    for i in range(48):
        h, w = sizes[i % len(sizes)] if i < len(sizes) else (int(rng.integers(1, 64)) | 1, int(rng.integers(1, 64)) | 1)
        ratio = [0.02, 0.05, 0.1, 0.2][i % 4]
        gt = random_mask(rng, h, w)
        dt = random_mask(rng, h, w) if i % 3 else np.roll(gt, int(rng.integers(-3, 4)), axis=1)
        if i == 5:
            gt[:] = 0
            dt[:] = 0
        if i == 6:
            gt[:] = 1
        rg = mask_utils.encode(np.asfortranarray(gt))
        rd = mask_utils.encode(np.asfortranarray(dt))
        inter = int(np.logical_and(gt, dt).sum())
        union = int(np.logical_or(gt, dt).sum())
        iou = float(mask_utils.iou([rd], [rg], [0])[0][0]) if union else 1.0
        assert abs(iou - (inter / union if union else 1.0)) < 1e-12
        biou, gb, db, d = boundary_iou(gt, dt, ratio)
        cases.append({
            "h": h, "w": w, "dilation_ratio": ratio, "d": d,
            "gt": hexbits(gt), "pred": hexbits(dt),
            "gt_boundary": hexbits(gb), "pred_boundary": hexbits(db),
            "intersection": inter, "union": union, "iou": iou, "boundary_iou": biou,
        })
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"generator": "tools/mask_fixtures.py", "cases": cases}, f, indent=0)
    print(f"wrote {len(cases)} cases to {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
