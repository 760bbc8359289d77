"""diff.html of a graph report: a standalone page (inline CSS, no scripts, no external assets) rendered from
the report's facts dict alone (report.build): sites, numerics, and before.py / after.py side by side with the
rewritten nodes highlighted and linked to their sites. What it shares with summary.txt is in report_format.py
(report.py imports this module, never the other way)."""

from __future__ import annotations

import difflib
import html
import re
from typing import Any

from .report_format import bits, num, one_line, site_verify, sqnr, vbits, verify_head

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#1d1d1f}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:18px 0 6px}
table{border-collapse:collapse} td,th{border:1px solid #ccd;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#eef} .ok{background:#e3f6e3} .bad{background:#fbd5d5;font-weight:bold}
table.diff{width:100%;table-layout:fixed;font:12px/1.35 ui-monospace,monospace}
table.diff td{border:none;border-right:1px solid #dde;white-space:pre-wrap;word-break:break-all;padding:0 4px}
table.diff td.ln{color:#889;text-align:right} td.fold{padding:0;background:#f4f4f8}
summary{cursor:pointer;color:#557;font-style:italic;padding:1px 6px}
td.added{background:#c8f0c8} td.removed{background:#f8c8c8} td.changed{background:#fff3c4}
td.comment{color:#778} a.tag{background:#335;color:#fff;border-radius:3px;padding:0 4px;margin-right:4px;
text-decoration:none;font-size:11px} .legend span{padding:0 6px;margin-right:8px}
"""
_COLS = ('<colgroup><col style="width:3.5em"><col style="width:calc(50% - 3.5em)"><col style="width:3.5em">'
         '<col style="width:calc(50% - 3.5em)"></colgroup>')
_CONTEXT = 3  # unchanged lines shown around a change
def esc(x) -> str:
    """Any value as HTML text (quotes too: some go into attributes)."""
    return html.escape(str(x), quote=True)


_ASSIGN = re.compile(r"^\s+([A-Za-z_]\w*)(?::\s*\"[^\"]*\")?\s*=\s")


def _code_cell(line: str, side: str, marks: dict[str, int | None], changed: bool) -> str:
    m = _ASSIGN.match(line)
    name = m.group(1) if m else None
    cls, tag, anchor = "", "", ""
    if name in marks:
        cls = "added" if side == "after" else "removed"
        anchor = f' id="{side}-{esc(name)}"'
        if marks[name] is not None:
            tag = f'<a class="tag" href="#site-{esc(marks[name])}">site {esc(marks[name])}</a>'
    elif changed:
        cls = "changed"
    elif line.lstrip().startswith("#"):
        cls = "comment"
    return f'<td class="{cls}"{anchor}>{tag}{esc(line)}</td>'


def render_html(data: dict[str, Any], before: str, after: str) -> str:
    """diff.html: standalone (inline CSS, no scripts, no external assets). Every value from `data` and every
    line of code is escaped: module and node names come from the user's model."""
    out = [(f"<!doctype html><html lang=en><head><meta charset=utf-8><title>polarquant {esc(data['compile_id'])}"
           f"</title><style>{_CSS}</style></head><body>"),
           (f"<h1>polarquant · graph {esc(data['compile_id'])} ({esc(data['graph']['kind'])})</h1>"
            f"<p>{esc(one_line(data))}</p>")]
    out += _sites_table(data)
    out.append(f"<h2>Numerics</h2><p>{esc(verify_head(data['verify']))}</p>")
    out += _numerics_table(data["verify"])
    out.append('<h2>Graph diff</h2><p class="legend"><span style="background:#c8f0c8">added by the passes</span>'
               '<span style="background:#f8c8c8">removed</span><span style="background:#fff3c4">changed arguments'
               f'</span></p><table class="diff">{_COLS}<tr><th></th><th>before.py</th><th></th><th>after.py</th></tr>')
    out += _diff_rows(before, after, data["graph"])
    out.append("</table></body></html>")
    return "\n".join(out)


def _sites_table(data: dict[str, Any]) -> list[str]:
    """One row per site, linked from the diff's tags and linking to the nodes the passes added / removed."""
    g = data["graph"]
    out = [("<h2>Attention sites</h2><table><tr><th>#</th><th>module</th><th>kind</th><th>KV-append</th>"
            "<th>pairing</th><th>GQA</th><th>bits</th><th>values</th><th>status</th><th>nodes</th><th>verify</th></tr>")]
    for f in data["sites"]:
        nodes = [f'<a href="#{side}-{esc(n)}">{esc(n)}</a>' for side in ("after", "before")
                 for n, i in g["added" if side == "after" else "removed"].items() if i == f["index"]]
        status = f["status"] + (f": {f['reason']}" if f["reason"] else "")
        ver = site_verify(data, f["index"])
        out.append(f'<tr id="site-{esc(f["index"])}"><td>{esc(f["index"])}</td><td>{esc(f["module"])}</td>'
                   f'<td>{esc(f["kind"] or "-")}</td><td>{esc(f["kv_append"] or "-")}</td>'
                   f'<td>{esc(f["pairing"] or "-")} ({esc(f["pairing_source"] or "-")})</td><td>{esc(f["gqa"])}</td>'
                   f'<td>{esc(bits(f))}</td><td>{esc(_values_cell(f))}</td>'
                   f'<td class="{"ok" if f["status"] == "rewritten" else ""}">{esc(status)}</td>'
                   f'<td>{" ".join(nodes)}</td><td class="{_cls(ver)}">{esc(ver)}</td></tr>')
    out.append("</table>")
    return out


def _values_cell(f: dict[str, Any]) -> str:
    """'v4/c64', or 'dense: <why>' for a half-compressed site (values asked for, kept dense)."""
    why = f.get("values")
    return vbits(f) + (f": {why}" if why and why != "compressed" else "")


def _numerics_table(v: dict[str, Any]) -> list[str]:
    """Every verify comparison (the latest 200), each linked to its site."""
    rows = [(e, c) for e in v["events"] for c in e["checks"]][-200:]
    if not rows:
        return []
    out = [("<table><tr><th>call</th><th>check</th><th>compared</th><th>max abs</th><th>rel L2</th>"
            "<th>SQNR dB</th><th>cosine</th><th>KL</th><th>top-1</th><th>result</th></tr>")]
    for e, c in rows:
        ok = c.get("ok", True)
        site = f' <a href="#site-{esc(c["site"])}">site {esc(c["site"])}</a>' if c.get("site") is not None else ""
        label = f"{e['check']}" + (f" step {e['step']}" if "step" in e else "")
        out.append(f"<tr><td>{esc(e['call'])}</td><td>{esc(label)}</td><td>{esc(c['name'])}{site}</td>"
                   f"<td>{esc(num(c['max_abs']))}</td><td>{esc(num(c['rel_l2']))}</td><td>{esc(sqnr(c['sqnr_db']))}</td>"
                   f"<td>{esc(num(c['cosine'], '.6f'))}</td><td>{esc(num(c.get('kl')))}</td>"
                   f"<td>{esc(num(c.get('top1')))}</td>"
                   f'<td class="{"ok" if ok else "bad"}">{"ok" if ok else "MISMATCH"}</td></tr>')
    out.append("</table>")
    return out


def _diff_rows(before: str, after: str, g: dict[str, Any]) -> list[str]:
    """before.py | after.py side by side, unchanged runs folded."""
    out = []
    b_lines, a_lines = before.splitlines(), after.splitlines()
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, b_lines, a_lines, autojunk=False).get_opcodes():
        rows = []
        for k in range(max(i2 - i1, j2 - j1)):
            i, j = i1 + k, j1 + k
            left = (f'<td class="ln">{i + 1}</td>' + _code_cell(b_lines[i], "before", g["removed"], op != "equal")
                    if i < i2 else '<td class="ln"></td><td></td>')
            right = (f'<td class="ln">{j + 1}</td>' + _code_cell(a_lines[j], "after", g["added"], op != "equal")
                     if j < j2 else '<td class="ln"></td><td></td>')
            rows.append(f"<tr>{left}{right}</tr>")
        if op == "equal" and len(rows) > 2 * _CONTEXT + 2:  # fold unchanged runs (no anchors live in them)
            hidden = rows[_CONTEXT:-_CONTEXT]
            rows[_CONTEXT:-_CONTEXT] = [(f'<tr><td colspan="4" class="fold"><details><summary>{len(hidden)} unchanged '
                                        f'lines</summary><table class="diff">{_COLS}{"".join(hidden)}</table>'
                                        '</details></td></tr>')]
        out.extend(rows)
    return out


def _cls(verify_text: str) -> str:
    return "ok" if verify_text.startswith("ok") else "bad" if verify_text.startswith("MISMATCH") else ""
