#!/usr/bin/env python3
"""Why are a model's masks poor?  For every ground-truth target of a MUSE-schema data
file (with `ann_list`, as the world writes it), take the predicted mask of its question
that overlaps it best and sort the target into

  good        IoU >= 0.5
  shape       IoU < 0.5, the mask lies mostly on the target's own instance
  same_cat    the mask lies mostly on another instance of the target's category
  other_cat   the mask lies mostly on an object of another category
  background  no instance holds 20 % of the mask
  missing     the question's answer has no mask

and print the shares, the IoU histogram and the best masks' precision and recall, and
the mean best IoU of targets with and without an alike sibling (another target of
their category in the same answer: the instances `[loss] instance_matching` is about).
`other_cat` is split by the answer's text: does it name the target's category (the mask
went astray while the text was right) or only the category under the mask (the mask
follows a wrong text)?

    .venv/bin/python tools/mask_failures.py DATA.json PRED.jsonl   # tools/setup_python.sh
"""
import json
import sys

import numpy as np
from pycocotools import mask as cmask


def decode(seg):
    return cmask.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)


def iou(a, b):
    u = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / u if u else 0.0


def main(data_path, pred_path):
    data = json.load(open(data_path))
    preds = {}
    for line in open(pred_path):
        p = json.loads(line)
        preds[(p["file_name"], p["question"])] = p
    kinds = dict(good=0, shape=0, same_cat=0, other_cat=0, background=0, missing=0)
    text = dict(names_target=0, names_mask_object_only=0, neither=0)
    ious, prec, rec = [], [], []
    by_sibling = {True: [], False: []}
    for e in data:
        inst = [decode(a["segmentation"]) for a in e.get("ann_list", [])]
        cats = [a["category_name"] for a in e.get("ann_list", [])]
        for qi, answer in enumerate(e["answers"]):
            pred = preds[(e["file_name"], qi)]
            masks = [decode(m) for m in pred["masks"]]
            words = pred["text"].lower()
            n_cat = {}
            for a in answer:
                n_cat[a["category_name"]] = n_cat.get(a["category_name"], 0) + 1
            for a in answer:
                t = decode(a["segmentation"])
                sibling = n_cat[a["category_name"]] > 1
                if not masks:
                    kinds["missing"] += 1
                    ious.append(0.0)
                    by_sibling[sibling].append(0.0)
                    continue
                best = max(masks, key=lambda m: iou(m, t))
                b = iou(best, t)
                ious.append(b)
                by_sibling[sibling].append(b)
                inter = np.logical_and(best, t).sum()
                prec.append(inter / max(best.sum(), 1))
                rec.append(inter / max(t.sum(), 1))
                if b >= 0.5:
                    kinds["good"] += 1
                    continue
                share = [np.logical_and(best, s).sum() / max(best.sum(), 1) for s in inst]
                own = int(np.argmax([iou(s, t) for s in inst])) if inst else -1
                j = int(np.argmax(share)) if inst else -1
                if j < 0 or share[j] < 0.2:
                    kinds["background"] += 1
                elif j == own:
                    kinds["shape"] += 1
                elif cats[j] == cats[own]:
                    kinds["same_cat"] += 1
                else:
                    kinds["other_cat"] += 1
                    if cats[own] in words:
                        text["names_target"] += 1
                    elif cats[j] in words:
                        text["names_mask_object_only"] += 1
                    else:
                        text["neither"] += 1
    n = sum(kinds.values())
    print(f"{n} targets")
    for k, v in kinds.items():
        print(f"  {k:<10} {v:5d}  {100 * v / max(n, 1):5.1f} %")
    print("  other_cat, by the answer's text: " + ", ".join(f"{k} {v}" for k, v in text.items()))
    ious = np.array(ious)
    print(f"best IoU per target: mean {ious.mean():.3f}, median {np.median(ious):.3f}")
    for lo, hi in [(0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 1.01)]:
        print(f"  IoU in [{lo}, {min(hi, 1)}): {100 * ((ious >= lo) & (ious < hi)).mean():5.1f} %")
    for k, name in [(True, "with"), (False, "without")]:
        v = by_sibling[k]
        if v:
            print(f"best IoU, {len(v)} targets {name} an alike sibling: mean {np.mean(v):.3f}")
    if prec:
        print(f"best mask: precision {np.mean(prec):.3f}, recall {np.mean(rec):.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
