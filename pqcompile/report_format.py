"""What the text summary (report.py) and the HTML page (report_html.py) both show, formatted once from the
report's facts dict: numbers, bits, per-site verify results, the verify tables and the one-line summary.
It imports neither renderer, so they do not import each other."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate


def num(x, fmt: str = ".3g") -> str:
    if x is None:
        return "-"
    return format(x, fmt) if isinstance(x, float) else str(x)


def sqnr(x) -> str:
    return "exact" if x is None else f"{x:.1f}"  # verify writes None when the two sides are equal


def ratio(a, b) -> str:
    return f"{a / b:.3f}x" if a is not None and b else "-"


def bits(f: dict[str, Any]) -> str:
    """'4+4/g128' (the polar codec) or 'polar-hybrid 4+4/g128' for a rewritten site, '-' otherwise."""
    if not f["radius_bits"]:
        return "-"
    kind = f.get("codec") or "polar"
    return ("" if kind == "polar" else f"{kind} ") + f"{f['radius_bits']}+{f['angle_bits']}/g{f['group_size']}"


def one_line(data: dict[str, Any]) -> str:
    """'polarquant: 2/2 attention sites rewritten, keys 0.27x' (the INFO line per graph)."""
    t = data["totals"]
    line = f"polarquant: {t['rewritten']}/{t['sites']} attention sites rewritten"
    dtypes = sorted({f["key_dtype"] for f in data["sites"] if f["key_dtype"]})
    if t["key_ratio"] is not None:
        line += f", keys {t['key_ratio']:.2f}x of {'/'.join(dtypes)}"
    if t.get("values_compressed"):  # reports before values were wired in have no such key
        line += f", values {t['value_ratio']:.2f}x ({t['values_compressed']}/{t['rewritten']} sites)"
    return line


def vbits(f: dict[str, Any]) -> str:
    """'v4/c64' for compressed values, 'dense' for a found site's dense values, '-' otherwise."""
    if f.get("value_bits"):
        return f"v{f['value_bits']}/c{f['value_group']}"
    return "dense" if f.get("value_bytes_per_token_before") else "-"


def value_lines(data: dict[str, Any]) -> list[str]:
    """The value-cache table of summary.txt (none for reports written before values were wired in)."""
    sites = [f for f in data["sites"] if f.get("value_bytes_per_token_before")]
    if not sites:
        return []
    t = data["totals"]
    rows = [[f["index"], f["module"], f["value_dtype"] or "-", f["value_head_dim"] or "-", vbits(f),
             num(f["key_bits_per_element"], ".3g"), num(f["value_bits_per_element"], ".3g"),
             num(f["value_bytes_per_token_before"]), num(f["value_bytes_per_token_after"], ".1f"),
             ratio(f["value_bytes_per_token_after"], f["value_bytes_per_token_before"])] for f in sites]
    rows.append(["", "total", "", "", "", "", "", num(t["value_bytes_per_token_before"]),
                 num(float(t["value_bytes_per_token_after"]), ".1f"),
                 ratio(t["value_bytes_per_token_after"], t["value_bytes_per_token_before"])])
    head = "Value cache bytes per token and batch row (steady state)"
    if t.get("kv_ratio") is not None:
        head += f"; keys + values together {t['kv_ratio']:.3f}x"
    return ["", head, tabulate(rows, headers=["#", "module", "dtype", "head dim", "values", "K bits/elem",
                                              "V bits/elem", "before", "after", "ratio"])]


def site_verify(data: dict[str, Any], index: int) -> str:
    """The latest kernel check of one site: 'ok (SQNR 41.2 dB)', 'MISMATCH ...', or the verify status."""
    kernel = [e for e in data["verify"]["events"] if e["check"] == "kernel"]
    if not kernel:
        return data["verify"].get("skipped") and "skipped" or data["verify"]["status"]
    checks = [c for c in kernel[-1]["checks"] if c.get("site") == index]
    if not checks:
        return "-"
    worst = min((c["sqnr_db"] for c in checks if c["sqnr_db"] is not None), default=None)
    return ("ok" if all(c["ok"] for c in checks) else "MISMATCH") + (
        " (exact)" if worst is None else f" (SQNR {worst:.1f} dB)")


def verify_head(v: dict[str, Any]) -> str:
    """'Verify: first: passed; checked 1, failed 0' (the first line of the verify section)."""
    head = f"Verify: {v['mode']}: {v['status']}"
    if v.get("skipped"):
        head += f" ({v['skipped']})"
    if v.get("fallback"):
        head += "; FALLBACK: the original graph runs from now on"
    if "checked" in v:
        head += f"; checked {v['checked']}, failed {v['failed']}"
    return head


def verify_lines(v: dict[str, Any]) -> list[str]:
    """The verify section of summary.txt: the head line, kernel checks (failures first), drift tables."""
    lines = [verify_head(v)]
    kernel = [e for e in v["events"] if e["check"] == "kernel"]
    shown = [e for e in kernel if not e["ok"]][:3] + ([kernel[-1]] if kernel and kernel[-1]["ok"] else [])
    for e in shown:
        lines.append(f"kernel check, call {e['call']}: {'ok' if e['ok'] else 'MISMATCH'}, action {e['action']}")
        rows = [[c["name"], c.get("what", ""), num(c["max_abs"]), num(c["rel_l2"]), sqnr(c["sqnr_db"]),
                 num(c["cosine"], ".6f"), "ok" if c["ok"] else "MISMATCH"] for c in e["checks"]]
        lines.append(tabulate(rows, headers=["compared", "what", "max abs", "rel L2", "SQNR dB", "cosine", "result"]))
    drift = [e for e in v["events"] if e["check"] == "drift"]
    if drift:
        lines.append("drift vs a full-precision shadow (step 0 = prefill: compressed vs dense keys)")
        rows = [[e["step"], c["name"], num(c["rel_l2"]), num(c["cosine"], ".6f"), num(c.get("kl")),
                 num(c.get("top1"))] for e in drift for c in e["checks"]]
        lines.append(tabulate(rows, headers=["step", "compared", "rel L2", "cosine", "KL", "top-1"]))
    return lines
