"""Pass-level tests: PassResult counts, the ops present after rewriting, and sites that must be declined."""

import copy
import json
import logging
import types

import pytest
import torch
import torch.nn.functional as F
import transformers

from pqcompile import cache as pq_cache
from pqcompile import passes
from pqcompile.config import PolarQuantConfig
from pqcompile.dense_values import hold_values
from pqcompile.hf_compat import cache_kw
from pqcompile.models import tiny_llama
from pqcompile.passes import (
    infer_pairing,
    match_eager_attention,
    rewrite_attention,
    run_all,
    trace_kv_append,
    trace_static_cache,
)
from pqcompile.passes.common import FACTS, SDPA_TARGETS, PassResult, SiteKind, SiteStatus, sites
from pqcompile.values import PolarValues, compress_values

CFG = PolarQuantConfig(group_size=16)


def _capture(fn, *args, **kwargs):
    """The FX graphs dynamo hands a backend, one per compile."""
    graphs = []

    def backend(gm, example_inputs, **_):
        graphs.append(copy.deepcopy(gm))
        return gm.forward

    torch.compile(fn, backend=backend, dynamic=False)(*args, **kwargs)
    return graphs


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.fixture(scope="module")
def llama_graphs():
    model = tiny_llama(layers=2)
    cache = transformers.DynamicCache(config=model.config)
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        prefill = _capture(model, ids, **cache_kw(cache), use_cache=True)[0]
        for layer in cache.layers:  # what the compiled prefill leaves in the cache
            layer.keys = pq_cache.PolarKeys.from_dense(layer.keys, pq_cache.ops._codec(4, 4, 16, "half"))
        decode = _capture(model, ids[:, :1], **cache_kw(cache), use_cache=True)[0]
    return prefill, decode


def test_prefill_compresses_the_cached_key_and_keeps_dense_attention(llama_graphs):
    gm = copy.deepcopy(llama_graphs[0])
    results, found = run_all(gm, CFG)
    by_name = {r.name: r for r in results}
    assert by_name["trace_kv_append"].matched == 2 and not by_name["trace_kv_append"].skipped
    assert by_name["rewrite_attention"].rewritten == 2
    assert [s.kind for s in found] == ["prefill", "prefill"]
    assert [s.pairing for s in found] == ["half", "half"]
    targets = _targets(gm)
    assert targets.count(pq_cache.compress_keys) == 2
    assert sum(t in SDPA_TARGETS for t in targets) == 2  # prompt attention stays dense SDPA
    out = next(n for n in gm.graph.nodes if n.op == "output")
    returned = [a for a in out.args[0] if hasattr(a, "target")]
    assert sum(a.target is pq_cache.compress_keys for a in returned) == 2  # the cache receives PolarKeys


def test_decode_reads_the_codes(llama_graphs):
    gm = copy.deepcopy(llama_graphs[1])
    _results, found = run_all(gm, CFG)
    assert [s.kind for s in found] == ["decode", "decode"]
    assert all(s.status == "rewritten" for s in found)
    targets = _targets(gm)
    assert targets.count(pq_cache.polar_sdpa) == 2
    assert not any(t in SDPA_TARGETS for t in targets)
    for node in gm.graph.nodes:  # meta['val'] kept correct on new nodes
        if node.target is pq_cache.polar_sdpa:
            assert node.meta["val"].shape == node.args[0].meta["example_value"].shape


def test_declines_dropout_and_no_cache_and_foreign_key_use():
    def attn_dropout(q, k_new, past, v):
        k = torch.cat([past, k_new], dim=-2)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1), k

    def attn_no_cache(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def attn_key_reused(q, k_new, past, v):
        k = torch.cat([past, k_new], dim=-2)
        return F.scaled_dot_product_attention(q, k, v), k, k.sum()

    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)
    past = torch.randn(1, 2, 4, 8)
    cases = [(attn_dropout, (q, k, past, v), "dropout_p"), (attn_no_cache, (q, torch.randn(1, 2, 5, 8), v), "KV-append"),
             (attn_key_reused, (q, k, past, v), "also feeds")]
    for fn, args, reason in cases:
        gm = _capture(fn, *args)[0]
        before = _targets(gm)
        result = trace_kv_append.run(gm, CFG)
        assert result.matched == 1 and len(result.skipped) == 1 and reason in result.skipped[0][1], result
        infer_pairing.run(gm, CFG)
        rewritten = rewrite_attention.run(gm, CFG)
        assert rewritten.rewritten == 0 and _targets(gm) == before  # a declined site stays exactly as it was


def test_explicit_pairing_overrides_inference(llama_graphs):
    gm = copy.deepcopy(llama_graphs[0])
    _, found = run_all(gm, PolarQuantConfig(group_size=16, pairing="interleaved"))
    assert [s.pairing for s in found] == ["interleaved", "interleaved"]
    assert all("configured" in s.pairing_source for s in found)
    assert sites(gm) is found


def test_rewrite_keeps_unused_calls_it_did_not_make_dead():
    """Dead-code elimination removes only what the rewrite left without users. transformers 4.57 builds the causal
    mask under nested torch.vmap: dynamo's graph holds `_vmap_increment_nesting` and an `_add_batch_dim` of the
    unused batch index, whose results are unused but whose effect is needed (a whole-graph DCE breaks the mask)."""
    def causal(b, q_idx, kv_idx):  # b unused, as in HF's causal mask function
        return kv_idx <= q_idx

    mask_fn = torch.vmap(torch.vmap(torch.vmap(causal, (None, None, 0)), (None, 0, None)), (0, None, None))

    def decode(x, w, past, v, position):
        h = F.layer_norm(x, (8,))
        q, k_new = h @ w[0], h @ w[1]  # self-attention: query and new key from one normed hidden state
        k = torch.cat([past, k_new], dim=-2)
        mask = mask_fn(torch.arange(1), position, torch.arange(k.shape[-2]))[:, None]  # [B, 1, 1, T]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), k

    dense = torch.randn(1, 2, 16, 8)
    past = pq_cache.PolarKeys.from_dense(dense, pq_cache.ops._codec(4, 4, 16, "half"))
    args = (torch.randn(1, 2, 1, 8), torch.randn(2, 8, 8), past, torch.randn(1, 2, 17, 8), torch.tensor([16]))
    gm = _capture(decode, *args)[0]
    nesting = [n.name for n in gm.graph.nodes if "vmap_increment_nesting" in str(n.target)]
    assert nesting
    _results, found = run_all(gm, CFG)
    assert [s.status for s in found] == ["rewritten"] and _targets(gm).count(pq_cache.polar_sdpa) == 1
    assert [n.name for n in gm.graph.nodes if "vmap_increment_nesting" in str(n.target)] == nesting
    compiled = torch.compile(decode, backend="polarquant", options={"group_size": 16, "backend": "aot_eager"})
    out, _ = compiled(*args)  # AOTAutograd runs the mask's vmap: it raised with the bookkeeping calls removed
    h, w = F.layer_norm(args[0], (8,)), args[1]
    keys = torch.cat([past.dequantize(), h @ w[1]], dim=-2)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(h @ w[0], keys, args[3]), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- values (value_bits)

VCFG = PolarQuantConfig(group_size=16, value_bits=4, value_group=16)


def test_value_bits_none_leaves_the_keys_only_graph(llama_graphs):
    """value_bits=None: trace_values matches nothing and the graphs are the keys-only ones; a site whose values
    cannot be compressed (value_group 64 does not divide head_dim 32) gets exactly the same graph, and says why."""
    for graph in llama_graphs:
        keys_only, misfit = copy.deepcopy(graph), copy.deepcopy(graph)
        results, found = run_all(keys_only, CFG)
        assert next(r for r in results if r.name == "trace_values").matched == 0
        assert [s.values for s in found] == ["", ""]
        prefill = found[0].kind == "prefill"  # its dense values are held in place (DenseValues)
        assert [s.values_held for s in found] == [prefill] * 2
        assert _targets(keys_only).count(hold_values) == 2 * prefill
        results, found = run_all(misfit, PolarQuantConfig(group_size=16, value_bits=4, value_group=64))
        assert misfit.code == keys_only.code
        assert all(s.status == "rewritten" for s in found)
        reasons = [s.values for s in found]
        assert reasons == [reasons[0]] * 2 and reasons[0] != "compressed"
        expected = "not divisible by value_group=64" if found[0].kind == "prefill" else "cache holds dense values"
        assert expected in reasons[0], reasons
        assert len(next(r for r in results if r.name == "trace_values").skipped) == 2


def test_prefill_compresses_the_cached_value(llama_graphs):
    gm = copy.deepcopy(llama_graphs[0])
    _results, found = run_all(gm, VCFG)
    assert [s.values for s in found] == ["compressed", "compressed"]
    assert _targets(gm).count(compress_values) == 2 and _targets(gm).count(pq_cache.compress_keys) == 2
    assert sum(t in SDPA_TARGETS for t in _targets(gm)) == 2  # prompt attention stays dense SDPA
    out = next(n for n in gm.graph.nodes if n.op == "output")
    returned = [a for a in out.args[0] if hasattr(a, "target")]
    assert sum(a.target is compress_values for a in returned) == 2  # the cache receives PolarValues
    assert all(isinstance(n.meta["val"], PolarValues) for n in gm.graph.nodes if n.target is compress_values)


def test_decode_over_compressed_values_reads_both_code_streams():
    model = tiny_llama(layers=2)
    cache = transformers.DynamicCache(config=model.config)
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        model(ids, **cache_kw(cache), use_cache=True)
        for layer in cache.layers:  # what a compiled prefill with value_bits=4 leaves in the cache
            layer.keys = pq_cache.PolarKeys.from_dense(layer.keys, pq_cache.ops._codec(4, 4, 16, "half"))
            layer.values = PolarValues.from_dense(layer.values, pq_cache.value_ops._vcodec(4, 16, 16))
        gm = _capture(model, ids[:, :1], **cache_kw(cache), use_cache=True)[0]
    for cfg in (VCFG, CFG):  # the cache decides: its PolarValues are read compressed whatever value_bits says
        g = copy.deepcopy(gm)
        _results, found = run_all(g, cfg)
        assert [(s.kind, s.status, s.values) for s in found] == [("decode", "rewritten", "compressed")] * 2
        polar = [n for n in g.graph.nodes if n.target is pq_cache.polar_sdpa]
        assert len(polar) == 2 and all(isinstance(n.args[2].meta["example_value"], PolarValues) for n in polar)
        assert not any(t in SDPA_TARGETS for t in _targets(g))
        assert not [n for n in g.graph.nodes if n.op == "call_method" and n.target == "expand"]  # repeats gone


def test_values_that_feed_other_ops_or_are_not_cached_stay_dense():
    def values_reused(x, w, past_k, past_v):
        h = F.layer_norm(x, (8,))
        k, v = torch.cat([past_k, h @ w[1]], dim=-2), torch.cat([past_v, h @ w[2]], dim=-2)
        return F.scaled_dot_product_attention(h @ w[0], k, v), k, v, v.sum()

    def values_not_cached(x, w, past_k, past_v):
        h = F.layer_norm(x, (8,))
        k, v = torch.cat([past_k, h @ w[1]], dim=-2), torch.cat([past_v, h @ w[2]], dim=-2)
        return F.scaled_dot_product_attention(h @ w[0], k, v), k

    args = (torch.randn(1, 2, 5, 8), torch.randn(3, 8, 8), torch.zeros(1, 2, 0, 8), torch.zeros(1, 2, 0, 8))
    cfg = PolarQuantConfig(group_size=16, value_bits=4, value_group=8)
    for fn, reason in ((values_reused, "also feeds"), (values_not_cached, "not written back")):
        gm = _capture(fn, *args)[0]
        _results, found = run_all(gm, cfg)
        assert [s.status for s in found] == ["rewritten"] and reason in found[0].values, found[0].values
        assert compress_values not in _targets(gm) and pq_cache.compress_keys in _targets(gm)


# --------------------------------------------------------------------------- contracts and the graph dump


def _small_decline_graph():
    """One SDPA without a cache: every pass runs and declines it, the graph stays as captured."""
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    return _capture(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v)[0]


def test_every_pass_declares_known_facts_and_passes_are_in_order():
    for p in passes.PASSES:
        assert callable(p.run) and set(p.REQUIRES) | set(p.PROVIDES) <= set(FACTS), p.__name__
    passes.check_order(passes.PASSES)  # also ran at import
    provided = set().union(*(p.PROVIDES for p in passes.PASSES))
    assert set(FACTS) == provided  # no fact is declared that nothing provides


@pytest.mark.parametrize("order, message", [
    ((trace_kv_append, match_eager_attention, trace_static_cache, infer_pairing, rewrite_attention),
     ("pass trace_kv_append requires 'sdpa' (every attention the passes can rewrite is an SDPA node (eager "
      "matmul-softmax-matmul matched)), provided by match_eager_attention, which runs after it")),
    ((match_eager_attention, trace_kv_append, trace_static_cache, rewrite_attention, infer_pairing),
     ("pass rewrite_attention requires 'pairing' (found sites carry the codec pairing their keys are compressed "
      "with), provided by infer_pairing, which runs after it; order: match_eager_attention, trace_kv_append, "
      "trace_static_cache, rewrite_attention, infer_pairing")),
    ((match_eager_attention, trace_kv_append, infer_pairing, rewrite_attention),  # trace_static_cache left out
     ("pass rewrite_attention requires 'static_append' (sites reading a PolarStaticCache are found, with their "
      "in-place write), provided by no pass")),
])
def test_misordered_passes_raise_before_touching_the_graph(order, message):
    gm = _small_decline_graph()
    before = gm.code
    with pytest.raises(passes.PassOrderError) as caught:
        run_all(gm, CFG, passes=order)
    assert message in str(caught.value)
    assert gm.code == before and not sites(gm)


def test_a_pass_without_a_contract_or_with_an_unknown_fact_is_refused():
    anonymous = types.ModuleType("pqcompile.passes.anonymous")  # a pass module with run() only
    anonymous.run = lambda gm, cfg: PassResult("anonymous")
    with pytest.raises(passes.PassOrderError, match="pass anonymous does not declare REQUIRES, PROVIDES"):
        passes.check_order([anonymous])
    anonymous.REQUIRES, anonymous.PROVIDES = frozenset(), frozenset({"pairng"})
    with pytest.raises(passes.PassOrderError, match=r"pass anonymous names unknown facts \['pairng'\]"):
        passes.check_order([anonymous])


def test_site_kind_and_status_are_strings_in_comparisons_text_and_json(llama_graphs):
    gm = copy.deepcopy(llama_graphs[1])
    _, found = run_all(gm, CFG)
    site = found[0]
    assert site.kind is SiteKind.DECODE and site.status is SiteStatus.REWRITTEN
    assert site.kind == "decode" and site.status == "rewritten"  # older callers compare with strings
    assert f"{site.kind}/{site.status}" == str(site.kind) + "/" + str(site.status) == "decode/rewritten"
    assert json.dumps({"kind": site.kind, "status": site.status}) == '{"kind": "decode", "status": "rewritten"}'


def test_graph_dump_after_each_pass_only_when_enabled(caplog, monkeypatch):
    quiet, package, verbose = (_small_decline_graph() for _ in range(3))  # captured before print_readable is counted
    printed, artifacts = [], []
    readable = torch.fx.GraphModule.print_readable
    monkeypatch.setattr(torch.fx.GraphModule, "print_readable",
                        lambda self, *a, **kw: printed.append(1) or readable(self, *a, **kw))
    # tlparse's channel, recorded without formatting (under pytest torch's trace log always has handlers)
    monkeypatch.setattr(torch._logging, "trace_structured",
                        lambda kind, metadata_fn, payload_fn: artifacts.append((kind, metadata_fn(), payload_fn)))
    with caplog.at_level(logging.INFO, logger="pqcompile.graphs"):
        run_all(quiet, CFG)
    assert not [r for r in caplog.records if r.name == "pqcompile.graphs"]
    assert not printed  # nothing formatted when nobody listens
    with caplog.at_level(logging.DEBUG, logger="pqcompile"):
        run_all(package, CFG)
    assert not printed  # opt-in: DEBUG on the package does not turn the long dumps on
    with caplog.at_level(logging.DEBUG, logger="pqcompile.graphs"):
        run_all(verbose, CFG)
    dumps = [r.getMessage() for r in caplog.records if r.name == "pqcompile.graphs"]
    stages = ["captured"] + [f"after {p.__name__.rpartition('.')[2]}" for p in passes.PASSES]
    assert len(dumps) == len(stages) == len(printed)
    for text, stage in zip(dumps, stages):
        head, _, code = text.partition("\n")
        assert head.startswith("polarquant graph ") and head.endswith(f", {stage}:")
        assert "def forward" in code and "scaled_dot_product_attention" in code
    names = [meta["name"] for kind, meta, _ in artifacts if kind == "artifact"]
    assert names == 3 * ["pqcompile_graph_" + stage.replace(" ", "_", 1) for stage in stages]
    assert "def forward" in artifacts[-1][2]()
