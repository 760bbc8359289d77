"""Graph-diff reports: what the passes did to one compiled graph, what it saves, and what verify measured.

Written when options={"report": DIR} or the env var PQCOMPILE_REPORT=DIR is set: one folder per compiled
graph, DIR/compile-<frame>_<n>/ (dynamo's compile id), files named by content:
  summary.txt   tables (tabulate): sites, key-cache bytes per token, verify results
  before.py     the graph as dynamo captured it (print_readable: runnable Python)
  after.py      the graph after the passes
  diff.html     standalone page: before/after side by side, rewritten nodes highlighted and linked to sites
  report.json   the same facts, schema SCHEMA (documented in docs/reports.md)
The facts live in one dict (the JSON); summary (here) and HTML (report_html.py) are rendered from it, with
the formatting both share in report_format.py, so `pqcompile report DIR` re-renders any folder. Verify results arrive after compilation: the files are rewritten on each check.
Also emitted through torch._logging.trace_structured("artifact") for tlparse. An unwritable DIR gives one
warning per folder and compilation proceeds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import fx

from . import codec, report_html, value_codec
from .config import PolarQuantConfig
from .passes.common import VALUES_COMPRESSED, SiteStatus, arg, module_path, val
from .report_format import bits, num, one_line, ratio, site_verify, value_lines, verify_lines
from .value_codec import ValueCodec

log = logging.getLogger(__name__)
SCHEMA = "pqcompile.report/1"
FILES = ("summary.txt", "before.py", "after.py", "diff.html", "report.json")
_RUN = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
_used: set[Path] = set()  # folders this process wrote (dynamo.reset restarts compile ids)
_warned: set[str] = set()


def target_dir(cfg: PolarQuantConfig) -> str | None:
    return cfg.report or os.environ.get("PQCOMPILE_REPORT") or None


# --------------------------------------------------------------------------- facts


def _int(x) -> int | str:
    return int(x) if isinstance(x, int) else str(x)


def _site_facts(i: int, site, cfg: PolarQuantConfig) -> dict[str, Any]:
    key = val(site.append) if site.append is not None else val(arg(site.sdpa, 1, "key"))
    # plain str, not the enums: the dict is rendered as it is, and must equal itself read back from JSON
    facts = {"index": i, "module": site.module, "node": site.sdpa.name, "kind": site.kind.value if site.kind else None,
             "kv_append": site.append.name if site.append is not None else None, "pairing": site.pairing or None,
             "pairing_source": site.pairing_source or None, "gqa": site.gqa, "status": site.status.value,
             "reason": site.reason or None, "codec": None, "radius_bits": None, "angle_bits": None, "group_size": None,
             "kv_heads": None, "head_dim": None, "key_dtype": None, "key_bytes_per_token_before": None,
             "key_bytes_per_token_after": None, "key_bits_per_element": None, **_value_facts(site, cfg)}
    if not isinstance(key, torch.Tensor) or key.dim() != 4:
        return facts
    c = getattr(key, "codec", None) or codec.Codec(cfg.radius_bits, cfg.angle_bits, cfg.group_size,
                                                   kind=cfg.codec)  # compressed
    H, D = _int(key.shape[1]), _int(key.shape[-1])
    facts.update(kv_heads=H, head_dim=D, key_dtype=str(key.dtype).replace("torch.", ""))
    if isinstance(H, int) and isinstance(D, int):
        before = H * D * key.dtype.itemsize
        facts["key_bytes_per_token_before"] = before
        facts["key_bytes_per_token_after"] = before
        facts["key_bits_per_element"] = 8 * key.dtype.itemsize
        if site.status is SiteStatus.REWRITTEN:
            bpe = codec.steady_bits_per_element(c, D)
            facts.update(codec=c.kind, radius_bits=c.radius_bits, angle_bits=c.angle_bits, group_size=c.group_size,
                         key_bytes_per_token_after=bpe * H * D / 8, key_bits_per_element=bpe)
    return facts


def _value_facts(site, cfg: PolarQuantConfig) -> dict[str, Any]:
    """The value cache of a site: whether it is compressed (or why not), its codec and bytes per token."""
    facts = {"values": site.values or None, "value_bits": None, "value_group": None, "value_head_dim": None,
             "value_dtype": None, "value_bits_per_element": None, "value_bytes_per_token_before": None,
             "value_bytes_per_token_after": None}
    value = val(site.value) if site.value is not None else None
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        return facts
    H, Dv = _int(value.shape[1]), _int(value.shape[-1])
    facts.update(value_head_dim=Dv, value_dtype=str(value.dtype).replace("torch.", ""))
    if not (isinstance(H, int) and isinstance(Dv, int)):
        return facts
    before = H * Dv * value.dtype.itemsize
    facts.update(value_bytes_per_token_before=before, value_bytes_per_token_after=before,
                 value_bits_per_element=8 * value.dtype.itemsize)
    if site.status is SiteStatus.REWRITTEN and site.values == VALUES_COMPRESSED:
        vc = getattr(value, "codec", None) or ValueCodec.from_config(cfg)
        bpe = value_codec.steady_bits_per_element(vc, Dv)
        facts.update(value_bits=vc.bits, value_group=vc.channel_group, value_bits_per_element=bpe,
                     value_bytes_per_token_after=bpe * H * Dv / 8)
    return facts


def _changed_nodes(before: fx.GraphModule, after: fx.GraphModule, sites: list) -> dict[str, dict[str, int | None]]:
    """Nodes the passes added / removed, each linked to the site of its module (None if no site matches)."""
    by_module = {s.module: i for i, s in enumerate(sites)}
    names_b = {n.name: n for n in before.graph.nodes}
    names_a = {n.name: n for n in after.graph.nodes}
    added = {k: by_module.get(module_path(n)) for k, n in names_a.items() if k not in names_b}
    removed = {k: by_module.get(module_path(n)) for k, n in names_b.items() if k not in names_a}
    return {"added": added, "removed": removed}


def build(before: fx.GraphModule, after: fx.GraphModule, sites: list, results: list, cfg: PolarQuantConfig,
          compile_id: str) -> dict[str, Any]:
    """The report dict (report.json) of one compiled graph; verify fills in "verify" later."""
    facts = [_site_facts(i, s, cfg) for i, s in enumerate(sites)]
    rewritten = [f for f in facts if f["status"] == "rewritten"]
    kinds = sorted({f["kind"] for f in rewritten})
    before_b = sum(f["key_bytes_per_token_before"] or 0 for f in facts)
    after_b = sum(f["key_bytes_per_token_after"] or 0 for f in facts)
    v_before = sum(f["value_bytes_per_token_before"] or 0 for f in facts)
    v_after = sum(f["value_bytes_per_token_after"] or 0 for f in facts)
    return {
        "schema": SCHEMA,
        "compile_id": compile_id,
        "run": _RUN,
        "versions": {"torch": torch.__version__, "pqcompile": _version()},
        "config": {k: (v.value if hasattr(v, "value") else v) for k, v in vars(cfg).items()} | {
            "verify": cfg.verify_spec},
        "graph": {"kind": "/".join(kinds) or "unchanged", "nodes_before": len(before.graph.nodes),
                  "nodes_after": len(after.graph.nodes), **_changed_nodes(before, after, sites)},
        "sites": facts,
        "totals": {"sites": len(facts), "rewritten": len(rewritten), "declined": len(facts) - len(rewritten),
                   "key_bytes_per_token_before": before_b, "key_bytes_per_token_after": after_b,
                   "key_ratio": after_b / before_b if before_b else None,
                   "values_compressed": sum(f["values"] == VALUES_COMPRESSED for f in rewritten),
                   "value_bytes_per_token_before": v_before, "value_bytes_per_token_after": v_after,
                   "value_ratio": v_after / v_before if v_before else None,
                   "kv_ratio": (after_b + v_after) / (before_b + v_before) if before_b + v_before else None},
        "passes": [{"name": r.name, "matched": r.matched, "rewritten": r.rewritten,
                    "skipped": [list(s) for s in r.skipped]} for r in results],
        "verify": {"mode": cfg.verify_spec, "status": "off" if cfg.verify_spec == "off" else "pending",
                   "events": []},
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pqcompile")
    except Exception:  # noqa: BLE001 (not installed: running from a checkout)
        return "unknown"


# --------------------------------------------------------------------------- text


def render_summary(data: dict[str, Any]) -> str:
    """summary.txt, rendered from the report dict alone."""
    cfg, t, g = data["config"], data["totals"], data["graph"]
    lines = [f"polarquant report · graph {data['compile_id']} ({g['kind']}) · torch {data['versions']['torch']}",
             one_line(data),
             (f"config: {cfg.get('codec', 'polar')} {cfg['radius_bits']}+{cfg['angle_bits']} bits, group "
              f"{cfg['group_size']}, pairing "
             f"{cfg['pairing']}, backend {cfg['backend']}, verify {cfg['verify']} (on_mismatch {cfg['on_mismatch']})"),
             (f"graph: {g['nodes_before']} -> {g['nodes_after']} nodes; added {', '.join(g['added']) or '-'}; "
             f"removed {', '.join(g['removed']) or '-'}"), "", "Attention sites"]
    rows = [[f["index"], f["module"], f["kind"] or "-", f["kv_append"] or "-",
             f"{f['pairing'] or '-'} ({f['pairing_source'] or '-'})", f["gqa"], bits(f), f["status"],
             site_verify(data, f["index"])] for f in data["sites"]]
    lines.append(tabulate(rows, headers=["#", "module", "kind", "KV-append", "pairing (source)", "GQA", "bits",
                                         "status", "verify"]) if rows else "(no attention site in this graph)")
    lines += [f"  #{f['index']} declined: {f['reason']}" for f in data["sites"] if f["status"] == "declined"]
    lines += [f"  #{f['index']} values dense: {f['values']}" for f in data["sites"]
              if f["status"] == "rewritten" and f.get("values") not in (None, "compressed")]
    lines += ["", "Key cache bytes per token and batch row (steady state: group parameters included, tail amortized)"]
    rows = [[f["index"], f["module"], f["key_dtype"] or "-", f["kv_heads"] or "-", f["head_dim"] or "-",
             num(f["key_bytes_per_token_before"]), num(f["key_bytes_per_token_after"], ".1f"),
             ratio(f["key_bytes_per_token_after"], f["key_bytes_per_token_before"])] for f in data["sites"]]
    rows.append(["", "total", "", "", "", num(t["key_bytes_per_token_before"]),
                 num(float(t["key_bytes_per_token_after"]), ".1f"),
                 ratio(t["key_bytes_per_token_after"], t["key_bytes_per_token_before"])])
    lines.append(tabulate(rows, headers=["#", "module", "dtype", "kv heads", "head dim", "before", "after", "ratio"]))
    lines += value_lines(data)
    lines += ["", *verify_lines(data["verify"])]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- files


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def folder_name(compile_id: str) -> str:
    """'compile-<id>': one path component inside the report root whatever the id holds (dynamo's '0/1', or a name
    with '../', a drive, '\\' or NUL: each character outside [A-Za-z0-9_.-] becomes '_'); never '.' or '..'."""
    return "compile-" + _UNSAFE.sub("_", str(compile_id))[:200]


class GraphReport:
    """One compiled graph's report folder; `update(verify_state)` is verify's on_event hook."""

    def __init__(self, root: str, data: dict[str, Any], before: str, after: str):
        self.root, self.data, self.before, self.after = root, data, before, after
        folder = Path(root) / folder_name(data["compile_id"])
        base, n = folder, 1
        while folder.resolve() in _used:
            n += 1
            folder = base.with_name(f"{base.name}-{n}")
        _used.add(folder.resolve())
        self.folder = folder

    @classmethod
    def create(cls, root: str, before: fx.GraphModule, after: fx.GraphModule, sites: list, results: list,
               cfg: PolarQuantConfig) -> GraphReport:
        data = build(before, after, sites, results, cfg, _compile_id())
        rep = cls(root, data, before.print_readable(print_output=False), after.print_readable(print_output=False))
        rep.write()
        _artifact("pqcompile_report", "json", lambda: json.dumps(rep.data))
        _artifact("pqcompile_summary", "string", lambda: render_summary(rep.data))
        return rep

    def update(self, verify_state: dict[str, Any]) -> None:
        self.data["verify"] = verify_state
        self.write()
        _artifact("pqcompile_verify", "json", lambda: json.dumps({"compile_id": self.data["compile_id"],
                                                                  **verify_state}))

    def write(self) -> bool:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            files = {"summary.txt": render_summary(self.data), "before.py": self.before, "after.py": self.after,
                     "diff.html": report_html.render_html(self.data, self.before, self.after),
                     "report.json": json.dumps(self.data, indent=1, default=str)}
            for name, text in files.items():
                (self.folder / name).write_text(text, encoding="utf-8")
            return True
        except OSError as e:
            if self.root not in _warned:
                _warned.add(self.root)
                warnings.warn(f"pqcompile: cannot write reports to {self.root!r} ({e}); compilation proceeds "
                              "without reports", stacklevel=2)
            return False
        except Exception as e:  # noqa: BLE001 (a report must never break compilation)
            if "render" not in _warned:
                _warned.add("render")
                warnings.warn(f"pqcompile: writing the report failed ({type(e).__name__}: {e}); this is a bug in "
                              "pqcompile.report, compilation proceeds", stacklevel=2)
            return False


def _compile_id() -> str:
    from torch._guards import CompileContext

    cid = CompileContext.current_compile_id()
    if cid is not None:
        return str(cid)
    _compile_id.count = getattr(_compile_id, "count", 0) + 1
    return f"x/{_compile_id.count - 1}"


def _artifact(name: str, encoding: str, payload_fn) -> None:
    torch._logging.trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": encoding},
                                    payload_fn=payload_fn)


# --------------------------------------------------------------------------- reading (CLI)


class ReportError(Exception):
    """A folder that is not a (readable) pqcompile report."""


def load(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The report dicts of a report root (DIR) or of one graph folder, sorted by compile id."""
    root = Path(folder)
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder")
    paths = [root / "report.json"] if (root / "report.json").exists() else sorted(root.glob("*/report.json"))
    if not paths:
        raise ReportError(f"{root} is not a pqcompile report folder (no report.json in it or in its subfolders)")
    reports = []
    for p in paths:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReportError(f"{p} is corrupt: {e}") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ReportError(f"{p} is not a pqcompile report (schema {found!r}, expected {SCHEMA!r})")
        missing = [k for k in ("compile_id", "config", "graph", "sites", "totals", "verify") if k not in data]
        if missing:
            raise ReportError(f"{p} is corrupt: missing {', '.join(missing)}")
        try:
            render_summary(data)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ReportError(f"{p} is corrupt: {type(e).__name__}: {e}") from None
        reports.append(data)
    return sorted(reports, key=lambda d: [int(x) if x.isdigit() else 0 for x in d["compile_id"].split("/")])


def latest_run(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reports written by the most recent process (a DIR reused across runs keeps older folders)."""
    def run(d):
        r = d.get("run") or {}
        return str(r.get("started", "")), int(r.get("pid", 0) or 0)

    last = max((run(d) for d in reports), default=None)
    return [d for d in reports if run(d) == last]
