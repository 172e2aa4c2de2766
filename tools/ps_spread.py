#!/usr/bin/env python3
"""How far apart the reference's segmentation embeddings of a `Ps` triple are.

    python3 tools/ps_spread.py RUN/ps.jsonl [RUN_B/ps.jsonl ...]

Eq. 4's margin is a difference of cosines between the policy's embedding `f` of the
medium copy and the reference's `f` of the best and the worst copies.  When the
reference's best and worst embeddings of a target nearly coincide, the margin and its
gradient are near zero whatever the masks of those copies are: `Ls` has nothing to
pull on.  For each file (`popen train pref`'s `RUN/ps.jsonl`) and each collection rule
(`s`, `biou`, `random_s`, `random_biou`), this prints over every target of every
triple: the count, the median, 10th percentile and minimum of cos(f_best, f_worst),
and the median of 1 − cos; targets whose best or worst `f` is zero (no direction) are
counted apart.  Standard library only.
"""
import json
import math
import sys


def cos(a, b):
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def spread(path):
    """Per rule: the sorted cos(f_best, f_worst) of every target of every triple whose
    two `f` have a direction, and the count of those with a zero `f`."""
    out = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            for t in rec["triples"]:
                emb, n = t["ref_emb"], len(t["ref_best"])
                if n == 0:
                    continue
                if len(emb) % (3 * n) != 0:
                    sys.exit(f"{path}: sample {rec['sample']}: ref_emb of {len(emb)} "
                             f"values is not N·3·E for N = {n}")
                e = len(emb) // (3 * n)
                for i in range(n):
                    best = emb[(3 * i) * e:(3 * i + 1) * e]
                    worst = emb[(3 * i + 2) * e:(3 * i + 3) * e]
                    out.setdefault(t["rule"], []).append(cos(best, worst))
    # a zero embedding has no direction: counted apart, not sorted among the cosines
    return {k: (sorted(c for c in v if not math.isnan(c)), sum(map(math.isnan, v)))
            for k, v in out.items()}


def main(paths):
    if not paths:
        sys.exit(__doc__)
    print("| file | rule | targets | median cos | p10 | min | median 1 − cos | zero `f` |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for path in paths:
        for rule, (v, zero) in sorted(spread(path).items()):
            if not v:
                print(f"| {path} | {rule} | 0 | – | – | – | – | {zero} |")
                continue
            med = v[len(v) // 2]
            print(f"| {path} | {rule} | {len(v)} | {med:.6f} | {v[len(v) // 10]:.6f} | "
                  f"{v[0]:.6f} | {1.0 - med:.2e} | {zero} |")


if __name__ == "__main__":
    main(sys.argv[1:])
