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

Greedy answers show only what a model ranks first: a model that leans towards counting
looks blind even if its likelihoods do tell present from absent.  `abstain` writes the
probe's questions each answered with each of the world's "nothing here" answers;
`popen score-answers` gives their log-likelihoods, and `auc` the probability that an
absent object's question gets more "nothing" likelihood (log-sum over the answers) than a
present one's: the ROC AUC, 50 % at chance, threshold- and bias-free.

    python3 tools/presence_probe.py make world/val.json world/probe.json
    popen predict --checkpoint RUN --data world/probe.json --out probe.jsonl
    python3 tools/presence_probe.py score world/probe.json probe.jsonl
    python3 tools/presence_probe.py abstain world/probe.json world/abstain.json
    popen score-answers --checkpoint RUN --data world/abstain.json --out scores.jsonl
    python3 tools/presence_probe.py auc world/probe.json scores.jsonl
"""
import argparse
import json
import math
import random
import re
from pathlib import Path

CATEGORIES_RS = Path(__file__).resolve().parent.parent / "src/data/world/categories.rs"
INSTRUCTIONS_RS = CATEGORIES_RS.parent / "instructions.rs"
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


def nothing_answers():
    m = re.search(r"NO_TARGET_ANSWERS: \[&str; \d+\] = \[(.*?)\];", INSTRUCTIONS_RS.read_text(), re.S)
    if not m:
        raise SystemExit(f"NO_TARGET_ANSWERS not found in {INSTRUCTIONS_RS}")
    return re.findall(r'"([^"]+)"', m.group(1))


def presence(probe):
    """(file_name, question) -> whether its object is present."""
    return {
        (r["file_name"], q): len(a) > 0
        for r in probe
        for q, a in zip(r["questions"], r["answers"])
    }


def abstain(args):
    probe = json.loads(Path(args.probe).read_text())
    answers = nothing_answers()
    out = []
    for r in probe:
        qs = [q for q in r["questions"] for _ in answers]
        out.append(
            dict(r, questions=qs, answers=[[] for _ in qs], text_answers=answers * len(r["questions"]))
        )
    Path(args.out).write_text(json.dumps(out))
    print(f"{sum(len(r['questions']) for r in out)} answers to score written to {args.out}")


def auc(args):
    present = presence(json.loads(Path(args.probe).read_text()))
    for f in args.scores:
        logps = {}
        for line in Path(f).read_text().splitlines():
            s = json.loads(line)
            key = (s["file_name"], s["question"])
            if key not in present:
                raise SystemExit(f"{f}: {key} is not a probe question")
            logps.setdefault(key, []).append(s["logp"])
        score = {k: max(v) + math.log(sum(math.exp(x - max(v)) for x in v)) for k, v in logps.items()}
        pos = [v for k, v in score.items() if not present[k]]
        neg = [v for k, v in score.items() if present[k]]
        if not pos or not neg:
            raise SystemExit(f"{f}: needs both present and absent questions")
        wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
        mean = lambda xs: sum(xs) / len(xs)
        print(
            f"{f}: AUC of 'nothing' likelihood, absent over present {100 * wins / (len(pos) * len(neg)):.1f} % "
            f"({len(pos)} absent, {len(neg)} present); mean log p(nothing) absent {mean(pos):.2f}, "
            f"present {mean(neg):.2f}"
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
    a = sub.add_parser("abstain")
    a.add_argument("probe")
    a.add_argument("out")
    u = sub.add_parser("auc")
    u.add_argument("probe")
    u.add_argument("scores", nargs="+")
    args = ap.parse_args()
    {"make": make, "score": score, "abstain": abstain, "auc": auc}[args.cmd](args)


if __name__ == "__main__":
    main()
