#!/usr/bin/env python3
"""Does a model's answer text read the image?  Ask every question about another image.

    python3 tools/image_swap.py make DATA.json SWAP.json
    popen predict --checkpoint RUN --data DATA.json --out PRED.jsonl
    popen predict --checkpoint RUN --data SWAP.json --out PRED_SWAP.jsonl
    python3 tools/image_swap.py compare DATA.json PRED.jsonl PRED_SWAP.jsonl

`make` gives record i the image (and `ann_list`) of record i + 1 (the last gets the
first's), keeping its questions and answers, and writes SWAP.json beside DATA.json so
the image paths resolve.  `compare` reports how many answers change, and, of the
categories the answers name (the world's category words, singular or plural), the
share present in the image shown and in the image the question was written for.  A
model that ignores the image answers the same text either way; one that reads it names
what the shown image holds.  Standard library only.
"""
import json
import re
import sys


def make(data_path, out_path):
    with open(data_path) as f:
        d = json.load(f)
    out = []
    for i, rec in enumerate(d):
        other = d[(i + 1) % len(d)]
        s = dict(rec)
        s["file_name"] = other["file_name"]
        s["height"], s["width"] = other["height"], other["width"]
        s["ann_list"] = other["ann_list"]
        out.append(s)
    with open(out_path, "w") as f:
        json.dump(out, f)
    print(f"{len(out)} records, each with the next record's image: {out_path}")


def named(text, cats):
    return {c for c in cats if re.search(r"\b" + re.escape(c) + r"(s|es)?\b", text)}


def compare(data_path, pred_path, swap_path):
    with open(data_path) as f:
        d = json.load(f)
    index = {rec["file_name"]: i for i, rec in enumerate(d)}
    cats = sorted({a["category_name"] for rec in d for a in rec["ann_list"]})
    with open(pred_path) as f:
        plain = [json.loads(line) for line in f if line.strip()]
    with open(swap_path) as f:
        swapped = [json.loads(line) for line in f if line.strip()]
    if len(plain) != len(swapped):
        sys.exit(f"{pred_path} has {len(plain)} lines, {swap_path} {len(swapped)}")
    same = sum(a["text"] == b["text"] for a, b in zip(plain, swapped))
    print(f"answers unchanged with another image: {same} / {len(plain)}")

    def shares(preds, shift):
        """Named categories; shares present in the image shown, the question's own
        image, and an unrelated one (two records on from the shown image: chance)."""
        total = in_shown = in_asked = in_other = 0
        for p0, p in zip(plain, preds):
            i = index[p0["file_name"]]  # the image the question was written for
            present = lambda j: {a["category_name"] for a in d[j % len(d)]["ann_list"]}
            shown, asked, other = present(i + shift), present(i), present(i + shift + 2)
            for c in named(p["text"], cats):
                total += 1
                in_shown += c in shown
                in_asked += c in asked
                in_other += c in other
        pct = lambda x: 100 * x / max(total, 1)
        return total, pct(in_shown), pct(in_asked), pct(in_other)

    t, s, _, o = shares(plain, 0)
    print(f"own image: {t} categories named, {s:.1f} % present in it ({o:.1f} % in an unrelated image)")
    t, s, a, o = shares(swapped, 1)
    print(
        f"another image: {t} categories named, {s:.1f} % present in the image shown, "
        f"{a:.1f} % in the image the question was written for ({o:.1f} % in an unrelated image)"
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
