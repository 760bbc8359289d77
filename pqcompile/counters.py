"""Counters of what the backend did, for tests and reports (like torch._dynamo.utils.counters)."""

from __future__ import annotations

import collections

graphs: list[dict] = []  # one entry per compiled graph
totals: collections.Counter = collections.Counter()


def record(results, sites) -> None:
    entry = {
        "passes": results,
        # kind and status are str enums: they compare equal to "decode", "rewritten", ...
        "sites": [(s.module, s.kind or "", s.status, s.reason, s.pairing) for s in sites],
        # per site, in the order of "sites": "" (values dense, not asked for), "compressed", or why they stay dense
        "values": [s.values for s in sites],
    }
    graphs.append(entry)
    totals["graphs"] += 1
    for s in sites:
        totals[f"sites_{s.status.value}"] += 1
        if s.status == "rewritten":
            totals[f"rewritten_{s.kind.value}"] += 1
            if s.values:  # values_compressed, or values_dense: asked for but kept dense (half-compressed)
                totals["values_compressed" if s.values == "compressed" else "values_dense"] += 1


def clear() -> None:
    graphs.clear()
    totals.clear()
