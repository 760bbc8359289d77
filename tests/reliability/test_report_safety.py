"""What the backend writes and loads is safe: every string in diff.html is escaped (module names come from the
user's model), report folders stay inside the report root whatever the compile id holds, and nothing in the
package unpickles (pickle, torch.load without weights_only, eval / exec)."""

import ast
import html.parser
import json
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pqcompile import report, report_html

HOSTILE = '<script>alert(1)</script>"\'><img src=x onerror=alert(2)>'
ROOT = pathlib.Path(__file__).resolve().parents[2]
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "table", "tr", "th", "td", "a",
                "colgroup", "col", "details", "summary", "span"}


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = set(), set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)


def assert_inert(page: str) -> None:
    """The page has only the renderer's own tags and attributes: no script, no event handler, no image."""
    parser = _Tags()
    parser.feed(page)
    assert parser.tags <= ALLOWED_TAGS, parser.tags - ALLOWED_TAGS
    assert not any(a.startswith("on") for a in parser.attrs), parser.attrs
    assert "<script" not in page.lower() and "<img" not in page.lower()


class _Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class _Hostile(nn.Module):
    """An attention submodule whose name is an HTML payload (nn.Module accepts any name without a '.')."""

    def __init__(self):
        super().__init__()
        self.add_module(HOSTILE, _Attention())

    def forward(self, q, k, v):
        return getattr(self, HOSTILE)(q, k, v) * 2


@pytest.fixture
def hostile_report(tmp_path, fresh_dynamo):
    model = _Hostile()
    compiled = torch.compile(model, backend="polarquant", options={"backend": "eager", "report": str(tmp_path)})
    q = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(compiled(q, q, q), model(q, q, q))
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1
    return folders[0]


def test_a_hostile_module_name_renders_as_text(hostile_report):
    data = json.loads((hostile_report / "report.json").read_text())
    assert data["sites"] and "<script>alert(1)</script>" in data["sites"][0]["module"]  # the name reached the facts
    page = (hostile_report / "diff.html").read_text()
    assert_inert(page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


_FREE_INTS = ("index", "gqa", "call", "site", "step")  # ints the page prints as they are (not through a format)


def _poison(x, key=None):
    """Every string of a report dict replaced by the payload, and the ints printed unformatted too (a report.json
    on disk can hold anything); the enum-like fields the renderer branches on are kept."""
    if isinstance(x, dict):
        return {k: (_poison(v, k) if k not in ("status", "check", "ok") else v) for k, v in x.items()}
    if isinstance(x, list):
        return [_poison(v) for v in x]
    if isinstance(x, str) or (key in _FREE_INTS and isinstance(x, int) and not isinstance(x, bool)):
        return HOSTILE
    return x


def test_every_field_of_the_facts_is_escaped(hostile_report):
    data = json.loads((hostile_report / "report.json").read_text())
    event = {"call": 1, "check": "kernel", "ok": False, "action": "raised", "step": 2,
             "checks": [{"name": "n", "site": 0, "what": "w", "max_abs": 1.0, "rel_l2": 1.0, "sqnr_db": 1.0,
                         "cosine": 1.0, "kl": 1.0, "top1": 1.0, "ok": False}]}
    data["verify"] = {"mode": "first", "status": "failed", "skipped": None, "fallback": True, "calls": 1,
                      "checked": 1, "failed": 1, "events": [event]}
    data["graph"]["added"] = {HOSTILE: 0}
    data["graph"]["removed"] = {HOSTILE: None}
    poisoned = _poison(data)
    poisoned["graph"]["added"] = {HOSTILE: HOSTILE}
    poisoned["sites"][0]["radius_bits"] = HOSTILE  # bits() formats it
    code = f"    {HOSTILE} = torch.ops.x(y)\n    z = 1\n"
    page = report_html.render_html(poisoned, code, code + f"    {HOSTILE}_2 = 3\n")
    assert_inert(page)
    assert page.count("&lt;script&gt;") >= 10


@pytest.mark.parametrize("compile_id", ["../../escaped", "/tmp/absolute", "a\x00b", "..", "0/1", "C:\\win\\x",
                                        "a/../../../b", "~/home", "\n", "." * 300])
def test_report_folders_stay_inside_the_root(tmp_path, compile_id):
    root = tmp_path / "reports"
    data = {"compile_id": compile_id}
    rep = report.GraphReport(str(root), data, "", "")
    assert rep.folder.resolve().parent == root.resolve(), rep.folder
    assert rep.folder.name not in (".", "..") and "\x00" not in str(rep.folder)
    rep.folder.mkdir(parents=True)  # a legal name on this file system
    assert [p.name for p in root.iterdir()] == [rep.folder.name]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            base = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, base, name


def test_nothing_is_unpickled_or_evaluated():
    """The package, bench and examples: no pickle / marshal / shelve / dill, no torch.load without
    weights_only=True, no eval / exec (ast.literal_eval is fine), no yaml.load."""
    found = []
    files = [p for d in ("pqcompile", "bench", "examples") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 30
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{path}:{node.lineno} imports {m}" for m in mods
                          if m.split(".")[0] in ("pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib")]
        for node, base, name in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if name in ("eval", "exec") and (isinstance(node.func, ast.Name) or base == "builtins"):
                found.append(f"{where} calls {name}")
            if name == "load" and base == "torch":
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                if not weights_only or not (isinstance(weights_only[0].value, ast.Constant)
                                            and weights_only[0].value.value is True):
                    found.append(f"{where} torch.load without weights_only=True")
            if name in ("load", "unsafe_load") and base == "yaml":
                found.append(f"{where} yaml.{name}")
    assert not found, found
