#!/usr/bin/env python3
"""Golden fixture for `popen eval`, computed independently of the Rust code.

Writes tests/fixtures/eval/{data.json, pred.jsonl, vocab.txt, expected.json}: a random
MUSE-schema data set with odd image sizes, predictions (exact, shifted, grown, shrunk,
swapped for another object, spurious, empty, missing, ties), texts with plurals and
multi-word terms, polygon ground truth, and the report that the definitions in `popen::metrics` give.
Masks are encoded and decoded with pycocotools; the assignment uses scipy's
linear_sum_assignment; erosion uses scipy.ndimage.  Regenerate with
    /work/main/.venv/bin/python tools/eval_fixture.py
"""
import json
import math
import os
import re

import numpy as np
from pycocotools import mask as cocomask
from scipy.ndimage import binary_erosion
from scipy.optimize import linear_sum_assignment

SEED = 20240607
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "eval")
DILATION_RATIO = 0.05
FEW_MAX = 3
SCALE = 10**12

VOCAB = """# fixture vocabulary
cup, mug
wine glass, goblet
glass
knife
fork
box, crate
strawberry
teddy bear
dish, plate
laptop, notebook computer
"""
CATEGORIES = ["cup", "mug", "glass", "wine glass", "knife", "fork", "box", "strawberry",
              "teddy bear", "plate", "laptop", "zebra"]
FILLER = ["a", "the", "and", "there", "is", "two", "on", "left", "of", "near", "table"]


# ---------------------------------------------------------------- masks and RLE
def encode(m, rng):
    """COCO RLE of a boolean (H, W) mask: compressed string, or (sometimes) the run list."""
    h, w = m.shape
    if rng.random() < 0.3:
        flat = m.T.reshape(-1).astype(np.uint8)  # column-major
        runs, cur, n = [], 0, 0
        for v in flat:
            if v != cur:
                runs.append(n)
                n, cur = 0, v
            n += 1
        runs.append(n)
        r = {"size": [h, w], "counts": runs}
        # check against pycocotools' own reading of the run list
        back = cocomask.decode(cocomask.frPyObjects(r, h, w))
        assert (back.astype(bool) == m).all()
        return r
    r = cocomask.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [h, w], "counts": r["counts"].decode("ascii")}


def decode(r, hw=None):
    if isinstance(r, list):  # polygons
        h, w = hw
        return cocomask.decode(cocomask.merge(cocomask.frPyObjects(r, h, w))).astype(bool)
    h, w = r["size"]
    if isinstance(r["counts"], list):
        r = cocomask.frPyObjects(r, h, w)
    else:
        r = {"size": [h, w], "counts": r["counts"].encode("ascii")}
    return cocomask.decode(r).astype(bool)


def shape(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    kind = rng.integers(3)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(2, h / 2.5), rng.uniform(2, w / 2.5)
    if kind == 0:
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    elif kind == 1:
        m = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
    else:
        m = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1) & ~(
            (abs(yy - cy) <= ry / 3) & (abs(xx - cx) <= rx / 3))
    if not m.any():
        m[int(cy) % h, int(cx) % w] = True
    return m


def random_ring(rng, h, w):
    """A star-shaped polygon with 5-8 fractional vertices, partly outside at times."""
    n = int(rng.integers(5, 9))
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(2, max(h, w) / 2.5, n)
    xy = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).reshape(-1)
    return [round(float(v), 2) for v in xy]


def shift(m, dy, dx):
    out = np.zeros_like(m)
    h, w = m.shape
    ys, xs = np.nonzero(m)
    ys, xs = ys + dy, xs + dx
    ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out[ys[ok], xs[ok]] = True
    return out


def grow(m):
    return m | shift(m, 1, 0) | shift(m, 0, 1) | shift(m, -1, 0) | shift(m, 0, -1)


def shrink(m):
    return binary_erosion(m, structure=np.ones((3, 3), bool), border_value=0)


# ---------------------------------------------------------------- metrics
def counts(a, b):
    i = int((a & b).sum())
    return i, int(a.sum()) + int(b.sum()) - i


def iou(i, u):
    return 1.0 if u == 0 else i / u


def boundary(m, d):
    return m & ~binary_erosion(m, structure=np.ones((3, 3), bool), iterations=d, border_value=0)


def boundary_iou(a, b, ratio):
    h, w = a.shape
    d = max(1, round(ratio * math.sqrt(h * h + w * w)))
    ba, bb = boundary(a, d), boundary(b, d)
    return iou(*counts(ba, bb))


def opt(w, rows, cols):
    if not rows or not cols:
        return 0
    sub = np.array([[w[r][c] for c in cols] for r in rows], dtype=np.float64)
    # integer weights below 2**53 are exact in float64
    assert sub.sum() < 2**53
    ri, ci = linear_sum_assignment(sub, maximize=True)
    return sum(w[rows[a]][cols[b]] for a, b in zip(ri, ci))


def assignment(w, p, g):
    """Maximum-weight assignment, ties lexicographic (row 0 takes the lowest column it
    can, unmatched last, ...); zero-weight pairs are unmatched."""
    out = [None] * p
    if p == 0 or g == 0:
        return out
    target = opt(w, list(range(p)), list(range(g)))
    cols = list(range(g))
    fixed = 0
    for r in range(p):
        rest = list(range(r + 1, p))
        for c in list(cols):
            if w[r][c] == 0:
                continue
            others = [x for x in cols if x != c]
            if fixed + w[r][c] + opt(w, rest, others) == target:
                out[r] = c
                fixed += w[r][c]
                cols.remove(c)
                break
    return out


def plural(word):
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y"):
        return word[:-1] + "ies"
    return word + "s"


def words(text):
    return re.findall(r"[^\W\d_]+", text.lower())


def parse_vocab(text):
    canon, written = [], {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        terms = [tuple(words(t)) for t in line.split(",")]
        canon.append(" ".join(terms[0]))
        for t in terms:
            written[t] = len(canon) - 1
    table = {}
    for t, o in written.items():
        table.setdefault(t[:-1] + (plural(t[-1]),), o)
    table.update(written)
    return canon, table


def mentions(text, canon, table):
    ws = words(text)
    longest = max(len(t) for t in table)
    out, i = [], 0
    while i < len(ws):
        for k in range(min(longest, len(ws) - i), 0, -1):
            if tuple(ws[i:i + k]) in table:
                out.append(canon[table[tuple(ws[i:i + k])]])
                i += k
                break
        else:
            i += 1
    return out


def present_objects(names, canon, table):
    s = set()
    for n in names:
        m = mentions(n, canon, table)
        s.update(m if m else [" ".join(words(n))])
    return s


# ---------------------------------------------------------------- data
def make(rng):
    canon, table = parse_vocab(VOCAB)
    data, lines = [], []
    sizes = [(23, 37), (31, 19), (41, 29), (17, 53), (29, 31), (37, 23)]
    for img in range(12):
        h, w = sizes[img % len(sizes)]
        n_obj = int(rng.integers(2, 9))
        objs = [shape(rng, h, w) for _ in range(n_obj)]
        segs = [None] * len(objs)
        if img % 4 == 1:
            objs.append(objs[0].copy())  # a duplicate object: ties between ground truths
            segs.append(None)
        if img % 5 == 0:
            # polygon ground truth (1-2 rings, fractional vertices), rasterized by
            # pycocotools' frPyObjects + merge
            for k in range(2):
                rings = [random_ring(rng, h, w) for _ in range(1 + int(rng.random() < 0.4))]
                objs.append(cocomask.decode(cocomask.merge(cocomask.frPyObjects(rings, h, w))).astype(bool))
                segs.append(rings)
        cats = [CATEGORIES[int(rng.integers(len(CATEGORIES)))] for _ in objs]
        ann = [{"category_name": c, "bbox": [],
                "segmentation": sg if sg is not None else encode(m, rng)}
               for c, m, sg in zip(cats, objs, segs)]
        questions, answers, q_targets = [], [], []
        for q in range(int(rng.integers(2, 6))):
            k = int(rng.integers(0, min(len(objs), 6) + 1)) if rng.random() > 0.15 else 0
            tg = sorted(rng.choice(len(objs), size=k, replace=False).tolist())
            questions.append(f"question {q} about image {img}")
            answers.append([ann[t] for t in tg])
            q_targets.append(tg)
        rec = {"file_name": f"img_{img:02d}.jpg", "height": h, "width": w,
               "questions": questions, "answers": answers}
        if img % 3 != 2:  # some images without ann_list: objects come from the answers
            rec["ann_list"] = ann
        data.append(rec)
        for q, tg in enumerate(q_targets):
            if rng.random() < 0.12:
                continue  # missing line
            preds = []
            for t in tg:
                r = rng.random()
                m = objs[t]
                if r < 0.25:
                    preds.append(m.copy())
                elif r < 0.45:
                    preds.append(shift(m, int(rng.integers(-3, 4)), int(rng.integers(-3, 4))))
                elif r < 0.55:
                    preds.append(grow(m))
                elif r < 0.62:
                    preds.append(shrink(m))
                elif r < 0.78:
                    preds.append(objs[int(rng.integers(len(objs)))].copy())  # wrong object
                elif r < 0.85:
                    preds.append(m.copy())
                    preds.append(m.copy())  # the same mask twice: ties between predictions
                # else dropped
            for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.4 else 0):
                preds.append(shape(rng, h, w))
            if rng.random() < 0.1:
                preds.append(np.zeros((h, w), bool))
            order = rng.permutation(len(preds))
            preds = [preds[i] for i in order]
            toks = []
            for _ in range(int(rng.integers(0, 9))):
                r = rng.random()
                if r < 0.4:
                    toks.append(FILLER[int(rng.integers(len(FILLER)))])
                else:
                    c = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
                    if rng.random() < 0.4:
                        parts = c.split(" ")
                        c = " ".join(parts[:-1] + [plural(parts[-1])])
                    if rng.random() < 0.2:
                        c = c.upper()
                    toks.append(c)
            text = " ".join(toks) + ("." if toks else "")
            text = text.replace(" and ", ", and-")
            lines.append(json.dumps({"file_name": rec["file_name"], "question": q,
                                     "text": text,
                                     "masks": [encode(m, rng) for m in preds]}))
    # shuffle line order: the evaluator must not depend on it
    order = rng.permutation(len(lines))
    lines = [lines[i] for i in order]
    return data, lines, (canon, table)


class Acc:
    def __init__(self):
        self.n = self.missing = 0
        self.muse_iou = 0.0
        self.muse_denom = self.muse_i = self.muse_u = 0
        self.matched = 0
        self.biou = 0.0
        self.loc = 0
        self.lisa_iou = 0.0
        self.lisa_i = self.lisa_u = 0
        self.resp_h = self.mentions = self.halluc = 0
        self.nt = self.nt_ok = 0
        self.pm = self.tm = 0

    def metrics(self):
        r = lambda a, b: (a / b) if b else None
        c = lambda i, u: (1.0 if u == 0 else i / u) if self.n else None
        return {
            "muse": {"giou": r(self.muse_iou, self.muse_denom), "ciou": c(self.muse_i, self.muse_u),
                     "boundary_iou": r(self.biou, self.matched)},
            "lisa": {"giou": r(self.lisa_iou, self.n), "ciou": c(self.lisa_i, self.lisa_u)},
            "chair_s": r(self.resp_h, self.n), "chair_i": r(self.halluc, self.mentions),
            "n_questions": self.n, "missing": self.missing,
            "loc_error": r(self.loc, self.matched), "no_target_acc": r(self.nt_ok, self.nt),
            "counts": {"predicted_masks": self.pm, "target_masks": self.tm,
                       "matched": self.matched, "loc_errors": self.loc,
                       "mentions": self.mentions, "hallucinated_mentions": self.halluc,
                       "hallucinating_responses": self.resp_h, "no_target_questions": self.nt,
                       "no_target_correct": self.nt_ok},
        }


def evaluate(data, lines, vocab):
    canon, table = vocab
    preds = {}
    for ln in lines:
        p = json.loads(ln)
        preds[(p["file_name"], p["question"])] = p
    accs = {"all": Acc(), "few": Acc(), "many": Acc()}
    for rec in data:
        h, w = rec["height"], rec["width"]
        objects = rec.get("ann_list")
        if objects is None:
            objects = [a for ans in rec["answers"] for a in ans]
        obj_masks = [decode(a["segmentation"], (h, w)) for a in objects]
        present = present_objects([a["category_name"] for a in objects], canon, table)
        for q, ans in enumerate(rec["answers"]):
            gts = [decode(a["segmentation"], (h, w)) for a in ans]
            p = preds.get((rec["file_name"], q))
            missing = p is None
            pms = [decode(r) for r in p["masks"]] if p else []
            text = p["text"] if p else ""
            P, G = len(pms), len(gts)
            cnt = [[counts(a, b) for b in gts] for a in pms]
            wts = [[SCALE if u == 0 else (i * SCALE) // u for (i, u) in row] for row in cnt]
            match = assignment(wts, P, G)
            s = dict(iou=0.0, denom=0, i=0, u=0, matched=0, biou=0.0, loc=0)
            gm = [False] * G
            for pi, gi in enumerate(match):
                if gi is None:
                    s["u"] += int(pms[pi].sum())
                    continue
                gm[gi] = True
                i, u = cnt[pi][gi]
                s["matched"] += 1
                s["iou"] += iou(i, u)
                s["i"] += i
                s["u"] += u
                s["biou"] += boundary_iou(pms[pi], gts[gi], DILATION_RATIO)
                if iou(i, u) < 0.75:
                    for om in obj_masks:
                        if (om == gts[gi]).all():
                            continue
                        oi, ou = counts(pms[pi], om)
                        if ou and oi / ou > 0.25:
                            s["loc"] += 1
                            break
            for gi in range(G):
                if not gm[gi]:
                    s["u"] += int(gts[gi].sum())
            if P == 0 and G == 0:
                s["iou"], s["denom"] = 1.0, 1
            else:
                s["denom"] = max(P, G)
            up = np.zeros((h, w), bool)
            for m in pms:
                up |= m
            ug = np.zeros((h, w), bool)
            for m in gts:
                ug |= m
            li, lu = counts(up, ug)
            ment = mentions(text, canon, table)
            hall = sum(1 for m in ment if m not in present)
            for key in ("all", "few" if G <= FEW_MAX else "many"):
                a = accs[key]
                a.n += 1
                a.missing += int(missing)
                a.muse_iou += s["iou"]
                a.muse_denom += s["denom"]
                a.muse_i += s["i"]
                a.muse_u += s["u"]
                a.matched += s["matched"]
                a.biou += s["biou"]
                a.loc += s["loc"]
                a.lisa_iou += iou(li, lu)
                a.lisa_i += li
                a.lisa_u += lu
                a.resp_h += int(hall > 0)
                a.mentions += len(ment)
                a.halluc += hall
                if G == 0:
                    a.nt += 1
                    a.nt_ok += int(P == 0)
                a.pm += P
                a.tm += G
    rep = accs["all"].metrics()
    rep["by_targets"] = {"few": accs["few"].metrics(), "many": accs["many"].metrics()}
    rep["n_images"] = len(data)
    rep["dilation_ratio"] = DILATION_RATIO
    rep["few_max"] = FEW_MAX
    return rep


def main():
    rng = np.random.default_rng(SEED)
    data, lines, vocab = make(rng)
    rep = evaluate(data, lines, vocab)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "data.json"), "w") as f:
        json.dump(data, f)
    with open(os.path.join(OUT, "pred.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(OUT, "vocab.txt"), "w") as f:
        f.write(VOCAB)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(rep, f, indent=1)
    a = rep
    print(f"{len(data)} images, {a['n_questions']} questions, {a['missing']} missing, "
          f"{a['counts']['matched']} matched, {a['counts']['loc_errors']} loc errors, "
          f"{a['counts']['mentions']} mentions ({a['counts']['hallucinated_mentions']} hallucinated), "
          f"few {a['by_targets']['few']['n_questions']} / many {a['by_targets']['many']['n_questions']}")


if __name__ == "__main__":
    main()
