#!/usr/bin/env python3
"""Wall-time of `popen eval-masks` against the OpenCV + numpy script a user would write
for the same report (Boundary IoU via cv2.erode, as in Cheng et al.'s reference code).

    python tools/bench_eval_masks.py [--n 300] [--popen target/release/popen] [--reps 3]

Generates N pairs of 480x640 PNG masks (blobs, the prediction a jittered copy of the
reference) under a temp folder, runs both, checks that the reports agree (IoU and
Boundary IoU per file to 1e-12, gIoU, cIoU), and prints the best-of-reps times and their
ratio popen / python (the goal is <= 2/3).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

H, W = 480, 640


def make_dataset(root, n, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "pred"), exist_ok=True)
    os.makedirs(os.path.join(root, "gt"), exist_ok=True)
    for i in range(n):
        gt = np.zeros((H, W), np.uint8)
        for _ in range(rng.integers(1, 4)):
            c = (int(rng.integers(0, W)), int(rng.integers(0, H)))
            ax = (int(rng.integers(10, 200)), int(rng.integers(10, 150)))
            cv2.ellipse(gt, c, ax, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        if i % 25 == 0:
            gt[:] = 0  # some empty references
        # prediction: shifted, dilated or eroded reference plus a spurious blob
        pred = np.roll(gt, (int(rng.integers(-15, 16)), int(rng.integers(-15, 16))), axis=(0, 1))
        k = np.ones((int(rng.integers(1, 9)),) * 2, np.uint8)
        pred = cv2.dilate(pred, k) if rng.random() < 0.5 else cv2.erode(pred, k)
        if rng.random() < 0.3:
            cv2.circle(pred, (int(rng.integers(0, W)), int(rng.integers(0, H))), int(rng.integers(5, 60)), 255, -1)
        name = f"m{i:04d}.png"
        cv2.imwrite(os.path.join(root, "pred", name), pred)
        cv2.imwrite(os.path.join(root, "gt", name), gt)


# ---- the script a user would write -------------------------------------------------
def mask_to_boundary(mask, dilation_ratio=0.02):
    h, w = mask.shape
    img_diag = np.sqrt(h**2 + w**2)
    dilation = int(round(dilation_ratio * img_diag))
    if dilation < 1:
        dilation = 1
    new_mask = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    kernel = np.ones((3, 3), dtype=np.uint8)
    new_mask_erode = cv2.erode(new_mask, kernel, iterations=dilation)
    return mask - new_mask_erode[1 : h + 1, 1 : w + 1]


def python_report(pred_dir, gt_dir, ratio=0.02):
    names = sorted(f for f in os.listdir(pred_dir) if f.lower().endswith(".png"))
    cases, si, su = {}, 0, 0
    for n in names:
        p = (cv2.imread(os.path.join(pred_dir, n), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8)
        g = (cv2.imread(os.path.join(gt_dir, n), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8)
        i = int(np.logical_and(p, g).sum())
        u = int(np.logical_or(p, g).sum())
        bp, bg = mask_to_boundary(p, ratio), mask_to_boundary(g, ratio)
        bi = int(((bp * bg) > 0).sum())
        bu = int(((bp + bg) > 0).sum())
        cases[n] = {
            "iou": i / u if u else 1.0,
            "boundary_iou": bi / bu if bu else 1.0,
            "intersection": i,
            "union": u,
        }
        si += i
        su += u
    giou = float(np.mean([c["iou"] for c in cases.values()]))
    return {"cases": cases, "giou": giou, "ciou": si / su if su else 1.0}


# ------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--popen", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "popen"))
    ap.add_argument("--dir", default=None, help="reuse/keep the data set here")
    a = ap.parse_args()
    root = a.dir or tempfile.mkdtemp(prefix="popen-bench-masks-")
    if not os.path.exists(os.path.join(root, "gt")):
        make_dataset(root, a.n)
    pred, gt = os.path.join(root, "pred"), os.path.join(root, "gt")
    out = os.path.join(root, "popen_report.json")

    t_py, t_rs = [], []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        ref = python_report(pred, gt)
        t_py.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run([a.popen, "eval-masks", "--pred", pred, "--gt", gt, "--out", out],
                       check=True, stdout=subprocess.DEVNULL)
        t_rs.append(time.perf_counter() - t0)

    got = json.load(open(out))
    worst = 0.0
    for n, c in ref["cases"].items():
        g = got["cases"][n]
        assert g["intersection"] == c["intersection"] and g["union"] == c["union"], n
        worst = max(worst, abs(g["iou"] - c["iou"]), abs(g["boundary_iou"] - c["boundary_iou"]))
    worst = max(worst, abs(got["giou"] - ref["giou"]), abs(got["ciou"] - ref["ciou"]))
    assert worst < 1e-12, f"reports differ by {worst}"
    n = len(ref["cases"])
    print(f"{n} pairs of {H}x{W} masks in {root}; reports agree (max diff {worst:.1e})")
    print(f"python (OpenCV+numpy): best {min(t_py):.3f} s  all {['%.3f' % t for t in t_py]}")
    print(f"popen eval-masks:      best {min(t_rs):.3f} s  all {['%.3f' % t for t in t_rs]}")
    print(f"ratio popen/python = {min(t_rs) / min(t_py):.3f} (goal <= 0.667)")


if __name__ == "__main__":
    sys.exit(main())
