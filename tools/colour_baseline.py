#!/usr/bin/env python3
"""How much of a target's category does its colour alone say?  For every distinct
ground-truth target of a MUSE-schema data file, a 4x4x4 RGB histogram of its pixels
(plus its box's aspect ratio) names its category by the nearest neighbour (cosine)
among the targets of *other* images: the baseline `popen probe-embeddings`' region
features are read against (docs/stage1.md).

    .venv/bin/python tools/colour_baseline.py DATA.json [IMAGE_ROOT]   # tools/setup_python.sh
"""
import json
import os
import sys

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def main():
    data = sys.argv[1]
    root = sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(data)
    feats, cats, groups = [], [], []
    for g, rec in enumerate(json.load(open(data))):
        img = Image.open(os.path.join(root, rec["file_name"])).convert("RGB")
        im = np.asarray(img).astype(float) / 255
        seen = set()
        for answer in rec["answers"]:
            for t in answer:
                m = mask_utils.decode(t["segmentation"]).astype(bool)
                key = (t["category_name"], int(m.sum()), tuple(t["bbox"]))
                if key in seen or not m.any():
                    continue
                seen.add(key)
                px = im[m]
                hist = np.histogramdd(px, bins=(4, 4, 4), range=[(0, 1)] * 3)[0].ravel()
                _, _, w, h = t["bbox"]
                feats.append(np.concatenate([hist / len(px), [w / max(h, 1e-9) / 4]]))
                cats.append(t["category_name"])
                groups.append(g)
    x = np.array(feats)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cats, groups = np.array(cats), np.array(groups)
    cos = x @ x.T
    cos[groups[:, None] == groups[None, :]] = -np.inf
    nn = cos.argmax(1)
    print(f"{len(cats)} targets, {len(set(cats))} categories: colour-histogram "
          f"nearest-neighbour category accuracy {(cats[nn] == cats).mean():.4f}")


if __name__ == "__main__":
    main()
