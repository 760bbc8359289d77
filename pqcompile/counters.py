"""Counters of what the backend did, for tests and reports (like torch._dynamo.utils.counters)."""

from __future__ import annotations

import collections

graphs: list[dict] = []  # one entry per compiled graph
totals: collections.Counter = collections.Counter()


def record(results, sites) -> None:
    entry = {
        "passes": results,
        "sites": [(s.module, s.kind, s.status, s.reason, s.pairing) for s in sites],
    }
    graphs.append(entry)
    totals["graphs"] += 1
    for s in sites:
        totals[f"sites_{s.status}"] += 1
        if s.status == "rewritten":
            totals[f"rewritten_{s.kind}"] += 1


def clear() -> None:
    graphs.clear()
    totals.clear()
