"""Summarize py-spy's collapsed stacks (`--format raw`, as bench/profile_dynamic_step.py --py-spy writes them):
the share of samples under each function (inclusive) and at the top of the stack (own), counting only the
samples taken inside the decode steps.

    python bench/py_spy_summary.py bench/results/py_spy-2026-12-02-8layers.txt.gz [--top 60]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re

STEP = "run.<locals>.step"


def read(path: str):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        for line in f:
            m = re.match(r"(.*) (\d+)$", line.rstrip())
            if m:
                yield m.group(1).split(";"), int(m.group(2))


def summarize(path: str) -> tuple[int, collections.Counter, collections.Counter]:
    inclusive, own, total = collections.Counter(), collections.Counter(), 0
    for frames, n in read(path):
        if not any(STEP in f for f in frames):
            continue
        total += n
        names = [re.sub(r":\d+\)", ")", f) for f in frames]  # one entry per function, not per line
        for name in set(names):
            inclusive[name] += n
        own[names[-1]] += n
    return total, inclusive, own


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--top", type=int, default=60)
    args = ap.parse_args()
    total, inclusive, own = summarize(args.path)
    print(f"{total} samples inside decode steps")
    for title, table in (("inclusive", inclusive), ("own", own)):
        print(f"--- {title}")
        for name, n in table.most_common(args.top):
            print(f"{100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
