#!/usr/bin/env python3
"""What a model's answers name, against what the images hold.

    python3 tools/mentions.py DATA.json PRED.jsonl [PRED_B.jsonl]

For each prediction file (`popen predict`'s output on the MUSE-schema DATA.json):
the categories its answers name (the world's category words, singular or plural, as
`tools/image_swap.py` reads them), the share present in the answer's image
(precision per mention), the share of the questions' target categories named
(recall), and how many answers name no category at all, on questions with targets and
on questions without.  With a second file: of the first file's mentions of absent and
of present categories, the share the second file's answer to the same question no
longer names.  A change that drops absent mentions more often than present ones tells
the two apart; one that drops both alike only names less.  Standard library only.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from image_swap import named  # noqa: E402


def load_preds(path):
    with open(path) as f:
        preds = [json.loads(line) for line in f if line.strip()]
    return {(p["file_name"], p["question"]): p["text"] for p in preds}


def questions(d):
    """(key, categories in the image, target categories) of every question."""
    for rec in d:
        objects = {a["category_name"] for a in rec["ann_list"]}
        for i, answer in enumerate(rec["answers"]):
            yield (rec["file_name"], i), objects, {a["category_name"] for a in answer}


def report(d, cats, path, preds):
    total = present = tp = targets = 0
    silent = {True: 0, False: 0}
    count = {True: 0, False: 0}
    for key, objects, target in questions(d):
        if key not in preds:
            sys.exit(f"{path} has no answer to question {key[1]} of {key[0]}")
        names = named(preds[key], cats)
        total += len(names)
        present += len(names & objects)
        tp += len(names & target)
        targets += len(target)
        count[bool(target)] += 1
        silent[bool(target)] += not names
    pct = lambda a, b: 100 * a / max(b, 1)
    print(
        f"{path}: {total} categories named, {pct(present, total):.1f} % present in the image; "
        f"{pct(tp, targets):.1f} % of target categories named; answers naming none: "
        f"{silent[True]} / {count[True]} questions with targets, "
        f"{silent[False]} / {count[False]} without"
    )


def dropped(d, cats, a, b):
    gone = {True: 0, False: 0}
    seen = {True: 0, False: 0}
    for key, objects, _ in questions(d):
        before, after = named(a[key], cats), named(b[key], cats)
        for c in before:
            seen[c in objects] += 1
            gone[c in objects] += c not in after
    pct = lambda x, n: 100 * x / max(n, 1)
    print(
        f"no longer named: {gone[False]} / {seen[False]} absent mentions "
        f"({pct(gone[False], seen[False]):.1f} %), {gone[True]} / {seen[True]} present "
        f"({pct(gone[True], seen[True]):.1f} %)"
    )


def main(argv):
    if len(argv) not in (3, 4):
        sys.exit(__doc__)
    with open(argv[1]) as f:
        d = json.load(f)
    cats = sorted({a["category_name"] for rec in d for a in rec["ann_list"]})
    preds = [load_preds(p) for p in argv[2:]]
    for p, pr in zip(argv[2:], preds):
        report(d, cats, p, pr)
    if len(preds) == 2:
        dropped(d, cats, *preds)


if __name__ == "__main__":
    main(sys.argv)
