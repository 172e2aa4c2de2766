#!/usr/bin/env python
"""Small fixtures in each real data-set format, with the answers a reader must give.

Writes tests/fixtures/readers/{muse,reasonseg,refcoco,grandf}/ (read by
tests/readers_*.rs): tiny 16x20 PNG images, annotation files in the data set's own
format, and expected.json per format, where every mask is computed here by the
reference tools (pycocotools for COCO polygons/RLE, OpenCV the LISA way for
ReasonSeg) and stored as a pycocotools compressed RLE string.

Run: /work/main/.venv/bin/python tools/make_reader_fixtures.py   (deterministic)
"""
import json
import os
import pickle
import shutil

import cv2
import numpy as np
from pycocotools import mask as mu

H, W = 16, 20
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "readers")
rng = np.random.default_rng(7)


def write_png(path, h=H, w=W):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    cv2.imwrite(path, img)


def rle_str(m):
    r = mu.encode(np.asfortranarray(m.astype(np.uint8)))
    return r["counts"].decode("ascii")


def coco_mask(seg, h, w):
    """pycocotools' annToMask: polygons -> merge(frPyObjects), RLE dict -> as is."""
    if isinstance(seg, list):
        rle = mu.merge(mu.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mu.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mu.decode(rle)


def compressed(m):
    r = mu.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": r["counts"].decode("ascii")}


def uncompressed(m):
    flat = m.astype(np.uint8).reshape(-1, order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            run, cur = 0, v
        run += 1
    counts.append(run)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": counts}


def blob(cy, cx, r, h=H, w=W):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.uint8)


def dump(path, obj, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, **kw)


def sample(image_id, image_path, q, qi, answer, targets, objects, h=H, w=W):
    return {"image_id": image_id, "image_path": image_path, "height": h, "width": w,
            "question": q, "question_index": qi, "answer": answer,
            "targets": [{"category": c, "counts": rle_str(m)} for c, m in targets],
            "objects": [{"category": c, "counts": rle_str(m)} for c, m in objects]}


def make_muse():
    d = os.path.join(OUT, "muse")
    write_png(os.path.join(d, "images", "train2017", "000000000001.png"))
    write_png(os.path.join(d, "images", "train2017", "000000000002.png"))
    cup_poly = [[2.3, 3.1, 9.7, 2.2, 10.4, 9.9, 1.6, 8.5]]
    # partly outside the image: clipped
    fork_poly = [[14.5, 10.2, 24.0, 11.0, 23.5, 19.7, 15.2, 18.0], [12.0, 1.0, 14.0, 1.0, 13.0, 3.0]]
    plate = blob(8, 12, 4.5)
    apple = blob(12, 4, 3)
    anns = {
        "cup": {"category_name": "cup", "bbox": [1.6, 2.2, 8.8, 7.7], "segmentation": cup_poly},
        "fork": {"category_name": "fork", "bbox": [12, 1, 12, 18.7], "segmentation": fork_poly},
        "plate": {"category_name": "plate", "bbox": [8, 4, 9, 9], "segmentation": compressed(plate)},
        "apple": {"category_name": "apple", "bbox": [1, 9, 6, 6], "segmentation": uncompressed(apple)},
    }
    records = [
        {"id": 101, "file_name": "images/train2017/000000000001.png", "height": H, "width": W,
         "questions": ["What can I drink from?", "What do I need to eat dinner?", "Is there a spoon?"],
         "answers": [[anns["cup"]], [anns["fork"], anns["plate"]], []],
         "text_answers": ["You can drink from the cup {seg}.",
                          "Use the fork {seg} and the plate {seg}.",
                          "There is no spoon."],
         "ann_list": [anns["cup"], anns["fork"], anns["plate"], anns["apple"]]},
        # coco_url instead of file_name; no text answers, no ann_list
        {"coco_url": "http://images.example.org/train2017/000000000002.png", "height": H, "width": W,
         "questions": ["Which fruit is here?"], "answers": [[anns["apple"]]]},
    ]
    dump(os.path.join(d, "muse.json"), records, indent=1)
    m = {k: coco_mask(a["segmentation"], H, W) for k, a in anns.items()}
    objs1 = [("cup", m["cup"]), ("fork", m["fork"]), ("plate", m["plate"]), ("apple", m["apple"])]
    p1, p2 = "images/train2017/000000000001.png", "images/train2017/000000000002.png"
    exp = [
        sample("101", p1, records[0]["questions"][0], 0, "You can drink from the cup <seg>.",
               [("cup", m["cup"])], objs1),
        sample("101", p1, records[0]["questions"][1], 1, "Use the fork <seg> and the plate <seg>.",
               [("fork", m["fork"]), ("plate", m["plate"])], objs1),
        sample("101", p1, records[0]["questions"][2], 2, "There is no spoon.", [], objs1),
        sample("000000000002", "train2017/000000000002.png", "Which fruit is here?", 0, None,
               [("apple", m["apple"])], [("apple", m["apple"])]),
    ]
    dump(os.path.join(d, "expected.json"), exp, indent=1)

    # bad inputs: each must be an Err that names the file and the field
    b = os.path.join(d, "bad")
    good = dict(records[0])
    def bad(name, rec_or_text):
        p = os.path.join(b, name)
        os.makedirs(b, exist_ok=True)
        if isinstance(rec_or_text, str):
            open(p, "w").write(rec_or_text)
        else:
            dump(p, [rec_or_text], indent=1)
    bad("syntax.json", '[{"file_name": "a.png", "height": 16,\n "width": 20,\n "questions": ["q"] "answers": []}]')
    bad("type.json", [dict(good, height="sixteen")])
    bad("type.json", dict(good, height="sixteen"))
    bad("rle_size.json", dict(good, answers=[[dict(anns["plate"], segmentation=compressed(blob(5, 5, 3, 17, 20)))], [], []],
                               text_answers=["a {seg}", "b", "c"]))
    bad("escape.json", dict(good, file_name="../../secret.png"))
    bad("absolute.json", dict(good, file_name="/etc/passwd"))
    bad("placeholders.json", dict(good, text_answers=["{seg} {seg}", "{seg} {seg}", ""]))
    bad("counts.json", dict(good, answers=[[anns["cup"]]]))
    bad("rle_runs.json", dict(good, answers=[[dict(anns["plate"], segmentation={"size": [H, W], "counts": [5, 3]})], [], []],
                               text_answers=["a {seg}", "b", "c"]))
    # loads (the reader does not open images) but the images are bad
    open(os.path.join(b, "broken.png"), "wb").write(b"\x89PNG\r\n\x1a\n this is not a png")
    write_png(os.path.join(b, "small.png"), 15, 20)
    dump(os.path.join(b, "images.json"), [
        {"file_name": "broken.png", "height": H, "width": W, "questions": ["q"], "answers": [[]]},
        {"file_name": "small.png", "height": H, "width": W, "questions": ["q"], "answers": [[]]},
        {"file_name": "missing.png", "height": H, "width": W, "questions": ["q"], "answers": [[]]},
    ], indent=1)


def lisa_mask(shapes, h, w):
    """LISA's get_mask_from_json: skip 'flag', fill largest first, 'ignore' -> 255."""
    area, valid = [], []
    for s in shapes:
        if "flag" == s["label"].lower():
            continue
        tmp = np.zeros((h, w), np.uint8)
        cv2.polylines(tmp, np.array([s["points"]], dtype=np.int32), True, 1, 1)
        cv2.fillPoly(tmp, np.array([s["points"]], dtype=np.int32), 1)
        area.append(int(tmp.sum()))
        valid.append((s, tmp))
    # LISA sorts with np.argsort(area)[::-1], whose order for equal areas depends on
    # numpy's unstable sort; fix it to file order (what numpy 2.4 gives here too)
    order = sorted(range(len(valid)), key=lambda i: -area[i])
    assert [area[i] for i in order] == [area[i] for i in np.argsort(area)[::-1]]
    mask = np.zeros((h, w), np.uint8)
    for i in order:
        s, _ = valid[i]
        v = 255 if "ignore" in s["label"].lower() else 1
        cv2.polylines(mask, np.array([s["points"]], dtype=np.int32), True, v, 1)
        cv2.fillPoly(mask, np.array([s["points"]], dtype=np.int32), v)
    objects = [(s["label"], t) for s, t in valid if "ignore" not in s["label"].lower()]
    return mask, objects


def make_reasonseg():
    d = os.path.join(OUT, "reasonseg")
    shutil.rmtree(d, ignore_errors=True)
    write_png(os.path.join(d, "val", "img_a.png"))
    write_png(os.path.join(d, "val", "img_b.png"))
    a = {"text": ["What in this picture keeps food cold?", "Where would milk be stored?"],
         "is_sentence": True,
         "shapes": [
             {"label": "target", "points": [[1.7, 1.2], [15.9, 2.4], [17.3, 13.8], [2.2, 14.6]], "shape_type": "polygon"},
             {"label": "ignore", "points": [[6, 5], [11, 5], [11.9, 9.9], [6, 10]], "shape_type": "polygon"},
             {"label": "flag", "points": [[0, 0], [19, 0], [19, 15]], "shape_type": "polygon"},
             {"label": "target", "points": [[8, 7], [9, 7], [9, 8]], "shape_type": "polygon"},
             # equal areas, overlapping: drawn in file order
             {"label": "Ignore_2", "points": [[13, 10], [16, 10], [16, 13], [13, 13]], "shape_type": "polygon"},
             {"label": "target", "points": [[14, 11], [17, 11], [17, 14], [14, 14]], "shape_type": "polygon"},
             {"label": "red flag", "points": [[0, 12], [3, 12], [3, 15]], "shape_type": "polygon"},
         ],
         "imageHeight": H, "imageWidth": W}
    # text as a single string, a polygon that leaves the image, and a cp1252 byte (0x92)
    b = {"text": "the thing you\u2019d sit on", "is_sentence": False,
         "shapes": [{"label": "target", "points": [[-3.5, 4.2], [12.8, -2.0], [25.0, 18.0], [5.0, 20.5]]}]}
    dump(os.path.join(d, "val", "img_a.json"), a, indent=1)
    text_b = json.dumps(b, ensure_ascii=False, indent=1).encode("cp1252")
    open(os.path.join(d, "val", "img_b.json"), "wb").write(text_b)
    exp = []
    for name, ann in [("img_a", a), ("img_b", b)]:
        m, objs = lisa_mask(ann["shapes"], H, W)
        texts = ann["text"] if isinstance(ann["text"], list) else [ann["text"]]
        for qi, q in enumerate(texts):
            s = sample(name, f"val/{name}.png", q, qi, None, [], objs)
            # the reference mask holds 255 (ignore), so store it raw, row-major
            s["targets"] = [{"category": objs[0][0], "values": m.reshape(-1).tolist()}]
            s["is_sentence"] = ann["is_sentence"]
            exp.append(s)
    dump(os.path.join(d, "expected.json"), exp)

    # the OpenCV fill rule on random polygons, odd sizes, partly outside
    cases = []
    for i in range(150):
        h, w = [(23, 31), (16, 20), (7, 9), (40, 13)][i % 4]
        k = int(rng.integers(3, 9))
        pts = np.stack([rng.uniform(-0.3 * w, 1.3 * w, k), rng.uniform(-0.3 * h, 1.3 * h, k)], 1)
        if i % 3 == 0:
            pts = np.round(pts)
        m = np.zeros((h, w), np.uint8)
        cv2.polylines(m, np.array([pts], dtype=np.int32), True, 1, 1)
        cv2.fillPoly(m, np.array([pts], dtype=np.int32), 1)
        cases.append({"h": h, "w": w, "points": pts.tolist(), "counts": rle_str(m)})
    # degenerate shapes: one point, two points, repeated and collinear vertices, a
    # horizontal sliver, a polygon wholly outside, one crossing the image
    hand = [
        [[4.7, 3.2]],
        [[1, 1], [12, 5]],
        [[2, 2], [2, 2], [9, 2], [9, 2], [9, 7]],
        [[1, 5], [6, 5], [14, 5]],
        [[3, 4], [15, 4], [15, 4.9], [3, 4.5]],
        [[-9, -9], [-2, -9], [-2, -3]],
        [[-5, 8], [30, 2], [25, 30]],
        [[10, -5], [10, 30], [11, 30], [11, -5]],
        [[0, 0], [19, 15], [0, 15], [19, 0]],
        [[-500, -300], [800, 7], [9, 900]],
        [[-1000, 3], [1000, 4], [1000, 12], [-1000, 11]],
        [[5, -777], [6, 999], [-333, 8]],
    ]
    for pts in hand:
        h, w = H, W
        m = np.zeros((h, w), np.uint8)
        cv2.polylines(m, np.array([pts], dtype=np.int32), True, 1, 1)
        cv2.fillPoly(m, np.array([pts], dtype=np.int32), 1)
        cases.append({"h": h, "w": w, "points": [[float(x), float(y)] for x, y in pts], "counts": rle_str(m)})
    dump(os.path.join(d, "cv_polygons.json"), cases, separators=(",", ":"))


def make_refcoco():
    d = os.path.join(OUT, "refcoco")
    shutil.rmtree(d, ignore_errors=True)
    imgdir = os.path.join(d, "images", "mscoco", "images", "train2014")
    images = [{"id": 9, "file_name": "COCO_train2014_000000000009.png", "height": H, "width": W},
              {"id": 25, "file_name": "COCO_train2014_000000000025.png", "height": H, "width": W}]
    for im in images:
        write_png(os.path.join(imgdir, im["file_name"]))
    giraffe = blob(7, 6, 4)
    anns = [
        {"id": 1001, "image_id": 9, "category_id": 1, "iscrowd": 0, "area": 0.0, "bbox": [0, 0, 1, 1],
         "segmentation": [[1.5, 2.5, 10.25, 3.0, 9.0, 12.75, 0.5, 11.0]]},
        {"id": 1002, "image_id": 9, "category_id": 2, "iscrowd": 0, "area": 0.0, "bbox": [0, 0, 1, 1],
         "segmentation": [[11.0, 4.0, 22.0, 4.0, 22.0, 14.0, 11.0, 14.0], [3.0, 13.0, 6.0, 13.0, 4.5, 15.5]]},
        {"id": 2001, "image_id": 25, "category_id": 3, "iscrowd": 1, "area": 0.0, "bbox": [0, 0, 1, 1],
         "segmentation": uncompressed(giraffe)},
    ]
    cats = [{"id": 1, "name": "person", "supercategory": "person"},
            {"id": 2, "name": "dog", "supercategory": "animal"},
            {"id": 3, "name": "giraffe", "supercategory": "animal"}]
    inst = {"images": images, "annotations": anns, "categories": cats}
    refs = [
        {"sent_ids": [0, 1], "file_name": "COCO_train2014_000000000009_1001.jpg", "ann_id": 1001,
         "ref_id": 0, "image_id": 9, "split": "train", "category_id": 1,
         "sentences": [{"tokens": ["man", "on", "left"], "raw": "Man on left", "sent_id": 0, "sent": "man on left"},
                       {"tokens": ["person"], "raw": "person!", "sent_id": 1, "sent": "person"}]},
        {"sent_ids": [2], "file_name": "COCO_train2014_000000000009_1002.jpg", "ann_id": 1002,
         "ref_id": 1, "image_id": 9, "split": "testA", "category_id": 2,
         "sentences": [{"tokens": ["dog"], "raw": "the dog \u00e9t\u00e9", "sent_id": 2, "sent": "the dog \u00e9t\u00e9"}]},
        {"sent_ids": [3], "file_name": "COCO_train2014_000000000025_2001.jpg", "ann_id": 2001,
         "ref_id": 2, "image_id": 25, "split": "train", "category_id": 3,
         "sentences": [{"tokens": ["tall", "animal"], "raw": "tall animal", "sent_id": 3, "sent": "tall animal"}]},
    ]
    # refcoco: protocol 2 (as Python 2 era files); refcoco+: the default protocol;
    # refcocog: protocol 0 (text opcodes)
    for ds, split_by, proto in [("refcoco", "unc", 2), ("refcoco+", "unc", None), ("refcocog", "umd", 0)]:
        os.makedirs(os.path.join(d, ds), exist_ok=True)
        with open(os.path.join(d, ds, f"refs({split_by}).p"), "wb") as f:
            if proto is None:
                pickle.dump(refs, f)
            else:
                pickle.dump(refs, f, protocol=proto)
        dump(os.path.join(d, ds, "instances.json"), inst)
    masks = {a["id"]: coco_mask(a["segmentation"], H, W) for a in anns}
    name = {c["id"]: c["name"] for c in cats}
    exp = {}
    for split in ["train", "testA"]:
        out = []
        for r in refs:
            if r["split"] != split:
                continue
            im = next(i for i in images if i["id"] == r["image_id"])
            objs = [(name[a["category_id"]], masks[a["id"]]) for a in anns if a["image_id"] == r["image_id"]]
            for qi, s in enumerate(r["sentences"]):
                out.append(sample(str(r["image_id"]), "images/mscoco/images/train2014/" + im["file_name"],
                                  s["sent"], qi, None, [(name[r["category_id"]], masks[r["ann_id"]])], objs))
        exp[split] = out
    dump(os.path.join(d, "expected.json"), exp, indent=1)


def make_grandf():
    d = os.path.join(OUT, "grandf")
    shutil.rmtree(d, ignore_errors=True)
    write_png(os.path.join(d, "images", "sa_1.png"))
    write_png(os.path.join(d, "images", "sa_2.png"))
    man, horse, tree = blob(5, 5, 3), blob(10, 12, 5), blob(2, 17, 3)
    cap1 = '"A man in a caf\u00e9 rides a horse near a tree. "'
    clean1 = cap1.strip('"').strip()
    def span(text, phrase):
        s = text.index(phrase)
        return [s, s + len(phrase)]
    recs = [
        {"file_name": "sa_1.png", "caption": cap1,
         "groundings": {
             "a horse": {"token_positives": span(clean1, "a horse"), "rle_masks": [compressed(horse)]},
             "A man": {"token_positives": span(clean1, "A man"), "rle_masks": [compressed(man)]},
             "a tree": {"token_positives": span(clean1, "a tree"),
                        "rle_masks": [compressed(tree), compressed(blob(13, 18, 2))]},
         }},
        {"file_name": "sa_2.png", "caption": "An empty field.", "groundings": {}},
    ]
    dump(os.path.join(d, "grandf.json"), recs, indent=1)
    tree_all = np.maximum(tree, blob(13, 18, 2))
    q = "Describe the image in detail, and give a segmentation mask for each thing you mention."
    ans1 = "A man <seg> in a caf\u00e9 rides a horse <seg> near a tree <seg>."
    t1 = [("A man", man), ("a horse", horse), ("a tree", tree_all)]
    exp = [sample("sa_1", "images/sa_1.png", q, 0, ans1, t1, t1),
           sample("sa_2", "images/sa_2.png", q, 0, "An empty field.", [], [])]
    dump(os.path.join(d, "expected.json"), exp, indent=1)


if __name__ == "__main__":
    shutil.rmtree(os.path.join(OUT, "muse"), ignore_errors=True)
    make_muse()
    make_reasonseg()
    make_refcoco()
    make_grandf()
    total = 0
    for root, _, files in os.walk(OUT):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    print(f"wrote {OUT}: {total} bytes")
