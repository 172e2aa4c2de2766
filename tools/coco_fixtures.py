#!/usr/bin/env python
"""Golden fixtures for COCO RLE and polygon rasterization, written by pycocotools.

Writes tests/fixtures/coco/coco_rle.json, read by tests/coco_rle.rs:
  polygons: [{h, w, polys: [[x0, y0, x1, y1, ...], ...], counts}]  counts = compressed
            string of merge(frPyObjects(polys, h, w)); single polygons also get
            `single` = [counts of frPyObjects([p], h, w)[0] for p in polys]
  masks:    [{h, w, bits, counts}]  bits = row-major '0'/'1' string, counts =
            encode(asfortranarray(mask))['counts']
Run: /work/main/.venv/bin/python tools/coco_fixtures.py   (deterministic, seed 0)
"""
import json
import os

import numpy as np
from pycocotools import mask as mu

SEED = 0
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "coco", "coco_rle.json")


def counts_str(rle):
    c = rle["counts"]
    return c.decode("ascii") if isinstance(c, bytes) else c


def random_polygon(rng, h, w, k, spill):
    """k vertices around a random centre; `spill` lets it reach outside the image."""
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    r = rng.uniform(0.5, max(1.5, max(h, w) * (0.9 if spill else 0.4)))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = r * rng.uniform(0.3, 1.0, k)
    xs, ys = cx + rad * np.cos(ang), cy + rad * np.sin(ang)
    if not spill:
        xs, ys = np.clip(xs, 0, w), np.clip(ys, 0, h)
    mode = rng.integers(0, 4)
    if mode == 0:  # integer vertices, common in annotation tools
        xs, ys = np.round(xs), np.round(ys)
    elif mode == 1:  # half-pixel and fifth-pixel grids: ties in the x5 rounding
        xs, ys = np.round(xs * 2) / 2, np.round(ys * 5) / 5
    elif mode == 2:  # two decimals, as COCO json has
        xs, ys = np.round(xs, 2), np.round(ys, 2)
    xy = np.stack([xs, ys], 1).reshape(-1)
    return [float(v) for v in xy]


def main():
    rng = np.random.default_rng(SEED)
    sizes = [(1, 1), (1, 7), (9, 1), (7, 13), (16, 20), (31, 17), (37, 53), (64, 3)]
    polys_out = []
    for i in range(120):
        h, w = sizes[i % len(sizes)]
        n = 1 if i % 3 else int(rng.integers(2, 4))
        polys = [random_polygon(rng, h, w, int(rng.integers(3, 12)), i % 2 == 0) for _ in range(n)]
        polys_out.append((h, w, polys))
    # hand-made cases: repeated vertex, self-intersecting bow tie, fully outside,
    # degenerate line, negative coordinates, a box on exact pixel edges
    hand = [
        (10, 12, [[1.0, 1.0, 1.0, 1.0, 8.0, 2.0, 6.0, 7.0]]),
        (10, 12, [[2.0, 2.0, 5.5, 5.5, 5.5, 5.5, 9.0, 1.0, 9.0, 8.0]]),
        (11, 11, [[0.0, 0.0, 10.0, 10.0, 10.0, 0.0, 0.0, 10.0]]),
        (8, 9, [[-5.0, -5.0, -1.0, -5.0, -1.0, -1.0]]),
        (8, 9, [[20.0, 3.0, 30.0, 3.0, 25.0, 6.0]]),
        (8, 9, [[1.0, 1.0, 7.0, 6.0, 4.0, 3.5]]),
        (9, 8, [[-2.3, -1.7, 6.2, -0.4, 9.9, 10.1, -0.6, 7.0]]),
        (6, 7, [[1.0, 1.0, 5.0, 1.0, 5.0, 4.0, 1.0, 4.0]]),
        (6, 7, [[0.5, 0.5, 4.5, 0.5, 4.5, 3.5, 0.5, 3.5]]),
        (5, 5, [[0.1, 0.1, 0.3, 0.1, 0.2, 0.3]]),
        (5, 5, [[2.0, 2.0, 2.0, 2.0, 2.0, 2.0]]),
    ]
    polys_out.extend(hand)
    # photo-sized images with COCO-like polygons (many vertices, two decimals)
    for h, w in [(480, 640), (333, 500), (427, 640)]:
        for _ in range(3):
            k = int(rng.integers(12, 40))
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, 250)
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad = r * rng.uniform(0.5, 1.0, k)
            xy = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).reshape(-1)
            polys_out.append((h, w, [[round(float(v), 2) for v in xy]]))
    cases = []
    for h, w, polys in polys_out:
        rles = mu.frPyObjects(polys, h, w)
        merged = mu.merge(rles)
        cases.append({
            "h": h, "w": w, "polys": polys,
            "counts": counts_str(merged),
            "single": [counts_str(r) for r in rles],
        })
    masks = []
    for i in range(60):
        h, w = sizes[i % len(sizes)]
        kind = i % 4
        if kind == 0:
            m = rng.random((h, w)) < rng.uniform(0.05, 0.95)
        elif kind == 1:
            m = np.zeros((h, w), bool)
        elif kind == 2:
            m = np.ones((h, w), bool)
        else:  # blobs: long runs exercise multi-character values
            yy, xx = np.mgrid[0:h, 0:w]
            m = (yy - rng.uniform(0, h)) ** 2 + (xx - rng.uniform(0, w)) ** 2 < rng.uniform(1, h * w)
        m8 = np.asfortranarray(m.astype(np.uint8))
        rle = mu.encode(m8)
        assert (mu.decode(rle) == m8).all()
        masks.append({"h": h, "w": w, "bits": "".join("1" if v else "0" for v in m.reshape(-1)),
                      "counts": counts_str(rle)})
    # one big mask with long runs (values needing several characters, negative diffs)
    h, w = 301, 257
    yy, xx = np.mgrid[0:h, 0:w]
    m = ((yy - 150) ** 2 + (xx - 100) ** 2 < 90 ** 2) | ((xx > 200) & (yy < 40))
    rle = mu.encode(np.asfortranarray(m.astype(np.uint8)))
    big = {"h": h, "w": w, "counts": counts_str(rle), "area": int(m.sum())}
    with open(OUT, "w") as f:
        json.dump({"polygons": cases, "masks": masks, "big": big}, f, separators=(",", ":"))
    print(f"wrote {OUT}: {len(cases)} polygon cases, {len(masks)} masks, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
