"""Pass-level tests: PassResult counts, the ops present after rewriting, and sites that must be declined."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

from pqcompile import cache as pq_cache
from pqcompile.config import PolarQuantConfig
from pqcompile.hf_compat import cache_kw
from pqcompile.models import tiny_llama
from pqcompile.passes import infer_pairing, rewrite_attention, run_all, trace_kv_append
from pqcompile.passes.common import SDPA_TARGETS, sites

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
