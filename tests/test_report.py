"""report.py and `pqcompile report DIR`: one folder per compiled graph with summary / before / after / diff.html /
report.json (schema), tlparse artifacts, the INFO line, an unwritable folder, corrupt or foreign folders."""

import ast
import html.parser
import json
import logging

import pytest
import torch
import transformers

from pqcompile import cli, codec, counters, report
from pqcompile.hf_compat import cache_kw
from pqcompile.models import tiny_llama

PROMPT, G = 40, 16
RATIO = codec.steady_bits_per_element(codec.Codec(4, 4, G), 32) / 32  # head_dim 32, fp32 keys
LINE = f"polarquant: 2/2 attention sites rewritten, keys {RATIO:.2f}x of float32"


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2, hidden=128, heads=4, kv_heads=2, qk_gain=3.0)


def _run(model, steps=2, **options):
    compiled = torch.compile(model, backend="polarquant", options={"backend": "eager", "group_size": G, **options})
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + steps), generator=torch.Generator().manual_seed(0))
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        compiled(ids[:, :PROMPT], **cache_kw(cache), use_cache=True)
        for t in range(PROMPT, PROMPT + steps):
            compiled(ids[:, t:t + 1], **cache_kw(cache), use_cache=True)


@pytest.fixture(scope="module")
def reports(model, tmp_path_factory):
    """Prefill + 2 decode steps with verify="first", written to one report folder (compiled once per module)."""
    torch._dynamo.reset()
    root = tmp_path_factory.mktemp("reports")
    trace = logging.getLogger("torch.__trace")
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    trace.addHandler(handler)
    try:
        _run(model, verify="first", report=str(root))
    finally:
        trace.removeHandler(handler)
        torch._dynamo.reset()
    return root, records


def _graphs(root):
    return {p.name: json.loads((p / "report.json").read_text()) for p in sorted(root.iterdir())}


def test_one_folder_per_compiled_graph_with_all_files(reports):
    root, _ = reports
    graphs = _graphs(root)
    assert len(graphs) >= 2 and all(name.startswith("compile-0_") for name in graphs)
    for name in graphs:
        assert sorted(p.name for p in (root / name).iterdir()) == sorted(report.FILES)
    kinds = [g["graph"]["kind"] for g in graphs.values()]
    assert kinds[0] == "prefill" and set(kinds[1:]) == {"decode"}


def test_report_json_schema_and_facts(reports, model):
    root, _ = reports
    cfg = model.config
    H, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    for data in _graphs(root).values():
        assert data["schema"] == report.SCHEMA
        assert set(data) >= {"compile_id", "run", "versions", "config", "graph", "sites", "totals", "passes", "verify"}
        assert data["config"]["verify"] == "first" and data["config"]["group_size"] == G
        assert len(data["sites"]) == cfg.num_hidden_layers
        for i, site in enumerate(data["sites"]):
            assert site["index"] == i and site["module"] == f"model.layers.{i}.self_attn"
            assert site["status"] == "rewritten" and site["reason"] is None
            assert site["kv_append"] and site["pairing"] == "half" and site["gqa"] == 2
            assert (site["kv_heads"], site["head_dim"], site["key_dtype"]) == (H, D, "float32")
            assert site["key_bytes_per_token_before"] == H * D * 4
            steady = codec.steady_bits_per_element(codec.Codec(4, 4, G), D)
            assert site["key_bytes_per_token_after"] == pytest.approx(steady * H * D / 8)
        t = data["totals"]
        assert (t["sites"], t["rewritten"], t["declined"]) == (2, 2, 0)
        assert t["key_ratio"] == pytest.approx(t["key_bytes_per_token_after"] / t["key_bytes_per_token_before"])
        assert "trace_kv_append" in [p["name"] for p in data["passes"]]
        v = data["verify"]
        assert v["status"] == "passed" and v["checked"] == 1 and v["events"][0]["check"] == "kernel"
        added = data["graph"]["added"]
        expected = "compress_keys" if data["graph"]["kind"] == "prefill" else "polar_sdpa"
        assert sorted(n for n in added if n.startswith(expected)) == [expected, f"{expected}_1"]
        assert sorted(i for n, i in added.items() if n.startswith(expected)) == [0, 1]  # linked to their sites


def test_summary_and_graph_code(reports):
    root, _ = reports
    for folder in sorted(root.iterdir()):
        data = json.loads((folder / "report.json").read_text())
        summary = (folder / "summary.txt").read_text()
        assert summary == report.render_summary(data)
        assert LINE in summary
        assert "model.layers.1.self_attn" in summary and "Verify: first: passed" in summary
        before, after = (folder / "before.py").read_text(), (folder / "after.py").read_text()
        ast.parse(before)
        ast.parse(after)
        assert "scaled_dot_product_attention" in before
        assert ("polar_sdpa" in after) == (data["graph"]["kind"] == "decode")
        assert ("compress_keys" in after) == (data["graph"]["kind"] == "prefill")


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.links, self.tags, self.cells, self.external = set(), [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a":
            self.links.append(a["href"])
        for key in ("src", "href"):
            if a.get(key, "#").split(":")[0] in ("http", "https", "file", "//"):
                self.external.append(a[key])
        if tag == "td":
            self._cell = [a.get("class", ""), a.get("id"), ""]
            self.cells.append(self._cell)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[2] += data

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None


def test_diff_html_is_standalone_and_links_rewritten_nodes_to_sites(reports):
    root, _ = reports
    decode = next(p for p in sorted(root.iterdir()) if '"kind": "decode"' in (p / "report.json").read_text())
    page = _Page()
    page.feed((decode / "diff.html").read_text())
    page.close()
    assert not page.external and "script" not in page.tags and "link" not in page.tags and "img" not in page.tags
    assert {"site-0", "site-1", "after-polar_sdpa", "after-polar_sdpa_1"} <= page.ids
    assert all(href[1:] in page.ids for href in page.links if href.startswith("#"))  # no dangling link
    added = [c for c in page.cells if c[0] == "added"]
    assert {c[1] for c in added} >= {"after-polar_sdpa", "after-polar_sdpa_1"}
    assert all("polar_sdpa" in c[2] and c[2].startswith("site ") for c in added if c[1].startswith("after-polar"))
    removed = [c for c in page.cells if c[0] == "removed"]
    assert any("scaled_dot_product_attention" in c[2] for c in removed)
    assert any(c[0] == "ok" and c[2] == "ok" for c in page.cells)  # the numerics table


def test_structured_trace_artifacts(reports):
    _, records = reports
    names = [r.metadata["artifact"]["name"] for r in records if "artifact" in r.metadata]
    assert names.count("pqcompile_report") == names.count("pqcompile_summary") >= 2
    assert "pqcompile_verify" in names
    payload = next(r.payload for r in records if r.metadata.get("artifact", {}).get("name") == "pqcompile_report")
    assert json.loads(payload)["schema"] == report.SCHEMA


def test_info_line_per_graph_and_env_var(model, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PQCOMPILE_REPORT", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="pqcompile.backend"):
        _run(model, steps=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "pqcompile.backend"]
    assert lines and all(line == LINE for line in lines)
    assert len(list(tmp_path.glob("compile-*/report.json"))) == len(lines) == counters.totals["graphs"]


def test_unwritable_report_dir_warns_once_and_compiles(model, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="cannot write reports to") as caught:
        _run(model, steps=2, report=str(blocker / "reports"))
    assert len([w for w in caught if "cannot write reports" in str(w.message)]) == 1
    assert counters.totals["graphs"] >= 2 and counters.totals["sites_rewritten"] >= 4


def test_declined_sites_and_skipped_verify_are_reported(model, tmp_path):
    compiled = torch.compile(model, backend="polarquant", options={"backend": "eager", "verify": "first",
                                                                  "report": str(tmp_path)})
    with torch.no_grad():
        compiled(torch.randint(0, 256, (1, 12)), use_cache=False)
    (data,) = _graphs(tmp_path).values()
    assert data["totals"]["rewritten"] == 0 and data["graph"]["kind"] == "unchanged"
    assert all(s["status"] == "declined" and "KV-append" in s["reason"] for s in data["sites"])
    assert data["verify"]["status"] == "skipped" and "no rewritten attention site" in data["verify"]["skipped"]
    summary = report.render_summary(data)
    assert "#0 declined:" in summary and "0/2 attention sites rewritten" in summary


# --------------------------------------------------------------------------- CLI


def test_cli_report_prints_every_summary(reports, capsys):
    root, _ = reports
    assert cli.main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    folders = sorted(root.iterdir())
    assert out.count("polarquant report · graph") == len(folders)
    assert out.startswith((folders[0] / "summary.txt").read_text())
    assert cli.main(["report", str(folders[-1])]) == 0  # one graph's folder
    assert capsys.readouterr().out == (folders[-1] / "summary.txt").read_text()


def test_cli_report_shows_the_latest_run(reports, tmp_path, capsys):
    root, _ = reports
    old = json.loads(next(root.glob("*/report.json")).read_text())
    old["run"] = {"pid": 1, "started": "2000-01-01T00:00:00+0000"}
    old["compile_id"] = "9/9"
    (tmp_path / "compile-9_9").mkdir()
    (tmp_path / "compile-9_9" / "report.json").write_text(json.dumps(old))
    for p in root.iterdir():
        (tmp_path / p.name).mkdir()
        (tmp_path / p.name / "report.json").write_text((p / "report.json").read_text())
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "graph 9/9" not in out and "1 graph report(s) from earlier runs" in out
    assert cli.main(["report", "--all", str(tmp_path)]) == 0
    assert "graph 9/9" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (None, "is not a pqcompile report folder"),
    ("{not json", "is corrupt"),
    ('{"schema": "tlparse/1"}', "is not a pqcompile report (schema 'tlparse/1'"),
    ('[1, 2]', "is not a pqcompile report"),
    ('{"schema": "pqcompile.report/1", "compile_id": "0/0"}', "is corrupt: missing config"),
    (('{"schema": "pqcompile.report/1", "compile_id": "0/0", "config": {}, "graph": {}, "sites": [], "totals": {},'
     ' "verify": {}}'), "is corrupt: KeyError"),
])
def test_cli_report_rejects_foreign_or_corrupt_folders(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "compile-0_0").mkdir()
        (tmp_path / "compile-0_0" / "report.json").write_text(content)
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pqcompile report: error: ") and message in err


def test_cli_report_missing_folder(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_a_reused_compile_id_gets_its_own_folder(reports, tmp_path):
    """torch._dynamo.reset() restarts compile ids: a second graph "0/0" in one process must not overwrite."""
    root, _ = reports
    data = json.loads(next(root.glob("*/report.json")).read_text())
    first, second = (report.GraphReport(str(tmp_path), dict(data), "before\n", "after\n") for _ in range(2))
    assert first.write() and second.write()
    name = "compile-" + data["compile_id"].replace("/", "_")
    assert (first.folder.name, second.folder.name) == (name, f"{name}-2")
    assert (second.folder / "before.py").read_text() == "before\n"


def test_reports_name_the_key_codec(model, tmp_path):
    """Every rewritten site's facts, the summary's config line and the HTML bits cell say which codec it uses."""
    torch._dynamo.reset()
    _run(model, steps=1, codec="channel", report=str(tmp_path))
    folders = sorted(tmp_path.iterdir())
    assert folders
    for folder in folders:
        data = json.loads((folder / "report.json").read_text())
        rewritten = [f for f in data["sites"] if f["status"] == "rewritten"]
        assert rewritten and all(f["codec"] == "channel" for f in rewritten)
        assert "config: channel 4+4 bits" in (folder / "summary.txt").read_text()
        assert "channel 4+4/g16" in (folder / "diff.html").read_text()
    torch._dynamo.reset()
