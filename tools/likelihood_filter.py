#!/usr/bin/env python3
"""The likelihood baseline for a filter that makes answers name less.

    python3 tools/likelihood_filter.py DATA.json PRED.jsonl SAMPLES.jsonl OTHER.jsonl OUT.jsonl

PRED.jsonl and SAMPLES.jsonl are one `popen predict --ensemble K --no-text-ensemble
--samples SAMPLES.jsonl` run (each answer the most likely of its K samples).  Writes
OUT.jsonl: PRED with its n least likely answers (mean log-probability of the answered
sample) among those naming a category replaced by the world's first no-target answer,
without masks; n is chosen so that OUT names as large a share of the target categories
as OTHER.jsonl does (the recall `tools/mentions.py` prints).  Score OUT and OTHER with
`popen eval` and `tools/mentions.py`: at the same recall, a filter whose signal is better
than the answer's own likelihood names fewer absent objects than OUT.  Standard library
only.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from image_swap import named  # noqa: E402
from mentions import questions  # noqa: E402

NOTHING = "There is nothing like that in this image."


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def recall(d, cats, texts):
    """Share of the questions' target categories the answers name."""
    hit = total = 0
    for key, _, target in questions(d):
        hit += len(named(texts[key], cats) & target)
        total += len(target)
    return hit / max(total, 1)


def main(argv):
    if len(argv) != 6:
        sys.exit(__doc__)
    with open(argv[1]) as f:
        d = json.load(f)
    cats = sorted({a["category_name"] for rec in d for a in rec["ann_list"]})
    preds = read_lines(argv[2])
    key = lambda p: (p["file_name"], p["question"])
    samples = {key(s): s for s in read_lines(argv[3])}
    other = {key(p): p["text"] for p in read_lines(argv[4])}
    for p in preds:
        s = samples.get(key(p))
        if s is None:
            sys.exit(f"{argv[3]} has no samples for question {p['question']} of {p['file_name']}")
        if s["samples"][s["most_likely"]]["text"] != p["text"]:
            sys.exit(f"{argv[2]} is not the most likely sample of {argv[3]} ({key(p)})")
    mean_logp = lambda p: (lambda s: s["samples"][s["most_likely"]]["mean_logp"])(samples[key(p)])
    order = sorted(
        (i for i, p in enumerate(preds) if named(p["text"], cats)),
        key=lambda i: mean_logp(preds[i]),
    )
    want = recall(d, cats, other)
    texts = {key(p): p["text"] for p in preds}
    best = (abs(recall(d, cats, texts) - want), 0)
    for n, i in enumerate(order, start=1):
        texts[key(preds[i])] = NOTHING
        best = min(best, (abs(recall(d, cats, texts) - want), n))
    n = best[1]
    for i in order[:n]:
        preds[i]["text"], preds[i]["masks"] = NOTHING, []
    with open(argv[5], "w") as f:
        for p in preds:
            f.write(json.dumps(p) + "\n")
    print(f"{argv[5]}: the {n} least likely answers naming a category emptied "
          f"(recall {100 * recall(d, cats, {key(p): p['text'] for p in preds}):.1f} %, "
          f"{argv[4]}: {100 * want:.1f} %)")


if __name__ == "__main__":
    main(sys.argv)
