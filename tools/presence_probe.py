#!/usr/bin/env python3
"""Does a model know whether a named object is in the image?

`make`: from a world file (MUSE schema, `popen data generate`), writes a probe file
with, per image, counting questions ("How many apples are there? Segment each of
them.") about up to N categories that are present and N that are absent, drawn with
a fixed seed: uniformly, or with `--cooccur-from TRAIN.json` in proportion to how
often each occurs beside the image's own categories in that file (the tempting
absent objects; stage 1's `[data] presence_absent = "cooccur"` draws the same way).
The world asks counting questions both about present objects and (as
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
        [--cooccur-from world/train.json]
    popen predict --checkpoint RUN --data world/probe.json --out probe.jsonl
    python3 tools/presence_probe.py score world/probe.json probe.jsonl
    python3 tools/presence_probe.py abstain world/probe.json world/abstain.json
    popen score-answers --checkpoint RUN --data world/abstain.json --out scores.jsonl
    python3 tools/presence_probe.py auc world/probe.json scores.jsonl
        [--cooccur-from world/train.json]

With `--cooccur-from`, `auc` also splits the absent objects by how often they come
with the image's own categories in that file (never, then the rarer and the more
common half), to tell an object checked in the image from a scene recognized as a
whole: a model that knows a kitchen rejects a guitar without looking for one.
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


def cooccurrence(path):
    """(a, b) -> the number of images of the MUSE file `path` holding both."""
    counts = {}
    for r in json.loads(Path(path).read_text()):
        cats = {a["category_name"] for a in r["ann_list"]}
        for a in cats:
            for b in cats:
                counts[(a, b)] = counts.get((a, b), 0) + 1
    return counts


def weighted_sample(rng, items, weights, k):
    """Up to k of items without replacement, each in proportion to its weight among
    those left (uniform once every weight left is 0)."""
    items, weights, out = list(items), list(weights), []
    while len(out) < k and items:
        total = sum(weights)
        j = rng.choices(range(len(items)), weights=weights)[0] if total > 0 else rng.randrange(len(items))
        out.append(items.pop(j))
        weights.pop(j)
    return out


def make(args):
    plural = plurals()
    cats = sorted(plural)
    rng = random.Random(args.seed)
    records = json.loads(Path(args.world).read_text())
    cooc = cooccurrence(args.cooccur_from) if args.cooccur_from else None
    out = []
    for r in records:
        present = sorted({a["category_name"] for a in r["ann_list"]})
        absent = [c for c in cats if c not in present]
        chosen = rng.sample(present, min(args.n, len(present)))
        if cooc is None:
            chosen += rng.sample(absent, min(args.n, len(absent)))
        else:
            w = [sum(cooc.get((p, c), 0) for p in present) for c in absent]
            chosen += weighted_sample(rng, absent, w, args.n)
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


def roc_auc(pos, neg):
    """P(a > b) for a drawn from pos and b from neg, ties half."""
    return 100 * sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def tempting(probe, train):
    """(file_name, question) -> how often the asked category comes with the image's own
    in the MUSE file `train`: images holding both, summed over the present categories,
    over the images holding them (0: never seen beside the scene's objects)."""
    cooc = cooccurrence(train)
    category = {p: c for c, p in plurals().items()}
    out = {}
    for r in probe:
        present = sorted({a["category_name"] for a in r["ann_list"]})
        norm = max(1, sum(cooc.get((p, p), 0) for p in present))
        for q in r["questions"]:
            c = category[q.split()[2]]
            out[(r["file_name"], q)] = sum(cooc.get((p, c), 0) for p in present) / norm
    return out


def auc(args):
    probe = json.loads(Path(args.probe).read_text())
    present = presence(probe)
    weight = tempting(probe, args.cooccur_from) if args.cooccur_from else None
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
        mean = lambda xs: sum(xs) / len(xs)
        print(
            f"{f}: AUC of 'nothing' likelihood, absent over present {roc_auc(pos, neg):.1f} % "
            f"({len(pos)} absent, {len(neg)} present); mean log p(nothing) absent {mean(pos):.2f}, "
            f"present {mean(neg):.2f}"
        )
        if weight is None:
            continue
        # the absent objects split by how tempting they are: never beside the scene's
        # objects in the training file, then the rest in halves by co-occurrence
        absent = sorted((weight[k], v) for k, v in score.items() if not present[k])
        never = [v for w, v in absent if w == 0]
        rest = [v for w, v in absent if w > 0]
        h = len(rest) // 2
        for name, part in [("never beside", never), ("rarely beside", rest[:h]), ("often beside", rest[h:])]:
            if part:
                print(f"  absent objects {name} the scene's objects: {len(part)}, AUC {roc_auc(part, neg):.1f} %")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("world")
    m.add_argument("out")
    m.add_argument("--n", type=int, default=3, help="present and absent categories per image")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--cooccur-from", help="draw absent categories by co-occurrence in this MUSE file")
    s = sub.add_parser("score")
    s.add_argument("probe")
    s.add_argument("pred", nargs="+")
    a = sub.add_parser("abstain")
    a.add_argument("probe")
    a.add_argument("out")
    u = sub.add_parser("auc")
    u.add_argument("probe")
    u.add_argument("scores", nargs="+")
    u.add_argument(
        "--cooccur-from",
        help="also split the absent objects by co-occurrence with the scene's in this MUSE file",
    )
    args = ap.parse_args()
    {"make": make, "score": score, "abstain": abstain, "auc": auc}[args.cmd](args)


if __name__ == "__main__":
    main()
