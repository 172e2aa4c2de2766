#!/usr/bin/env python3
"""Does a model know whether a named object is in the image?

`make`: from a world file (MUSE schema, `popen data generate`), writes a probe file
with, per image, counting questions ("How many apples are there? Segment each of
them.") about up to N categories that are present and N that are absent, drawn with
a fixed seed.  The world asks counting questions both about present objects and (as
its no-target family) about absent ones, so the wording alone does not give the
answer away; "Segment the X in this image." would (the world uses it only for absent
objects).

`score`: for each `popen predict` output on the probe file, the share of present
objects answered with a `<seg>` and of absent ones answered without one, and their
mean (balanced accuracy: 50 % is chance, whatever the model's bias toward "nothing").

    python3 tools/presence_probe.py make world/val.json world/probe.json
    popen predict --checkpoint RUN --data world/probe.json --out probe.jsonl
    python3 tools/presence_probe.py score world/probe.json probe.jsonl
"""
import argparse
import json
import random
import re
from pathlib import Path

CATEGORIES_RS = Path(__file__).resolve().parent.parent / "src/data/world/categories.rs"
NOTHING = "There is nothing like that in this image."


def plurals():
    text = CATEGORIES_RS.read_text()
    pairs = dict(re.findall(r'cat!\(\s*"([^"]+)",\s*"([^"]+)"', text))
    if not pairs:
        raise SystemExit(f"no categories found in {CATEGORIES_RS}")
    return pairs


def make(args):
    plural = plurals()
    cats = sorted(plural)
    rng = random.Random(args.seed)
    records = json.loads(Path(args.world).read_text())
    out = []
    for r in records:
        present = sorted({a["category_name"] for a in r["ann_list"]})
        absent = [c for c in cats if c not in present]
        chosen = rng.sample(present, min(args.n, len(present)))
        chosen += rng.sample(absent, min(args.n, len(absent)))
        qs, answers, texts = [], [], []
        for c in chosen:
            anns = [a for a in r["ann_list"] if a["category_name"] == c]
            qs.append(f"How many {plural[c]} are there? Segment each of them.")
            answers.append(anns)
            texts.append(
                "There are " + " ".join(["{seg}"] * len(anns)) + "." if anns else NOTHING
            )
        rec = dict(r, questions=qs, answers=answers, text_answers=texts)
        out.append(rec)
    Path(args.out).write_text(json.dumps(out))
    n = sum(len(r["questions"]) for r in out)
    print(f"{len(out)} images, {n} questions written to {args.out}")


def score(args):
    probe = json.loads(Path(args.probe).read_text())
    present = {}
    for r in probe:
        for i, (q, a) in enumerate(zip(r["questions"], r["answers"])):
            present[(r["file_name"], i)] = present[(r["file_name"], q)] = len(a) > 0
    for f in args.pred:
        tp = fn = tn = fp = 0
        for line in Path(f).read_text().splitlines():
            p = json.loads(line)
            key = (p["file_name"], p["question"])
            if key not in present:
                raise SystemExit(f"{f}: {key} is not a probe question")
            said = "<seg>" in p["text"]
            if present[key]:
                tp, fn = tp + said, fn + (not said)
            else:
                fp, tn = fp + said, tn + (not said)
        if tp + fn == 0 or tn + fp == 0:
            raise SystemExit(f"{f}: needs both present and absent questions")
        hit, rej = tp / (tp + fn), tn / (tn + fp)
        print(
            f"{f}: present answered {tp}/{tp + fn} ({100 * hit:.1f} %), absent answered "
            f"'nothing' {tn}/{tn + fp} ({100 * rej:.1f} %), balanced accuracy "
            f"{50 * (hit + rej):.1f} %"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("world")
    m.add_argument("out")
    m.add_argument("--n", type=int, default=3, help="present and absent categories per image")
    m.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score")
    s.add_argument("probe")
    s.add_argument("pred", nargs="+")
    args = ap.parse_args()
    make(args) if args.cmd == "make" else score(args)


if __name__ == "__main__":
    main()
