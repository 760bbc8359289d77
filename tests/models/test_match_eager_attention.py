"""match_eager_attention at the pass level, on real dynamo graphs of HF eager attention: a matched site
becomes an SDPA node that the later passes rewrite; a declined site leaves the graph exactly as it was."""

import torch
import transformers as T

from pqcompile import coverage
from pqcompile.config import PolarQuantConfig
from pqcompile.passes import run_all

CFG = PolarQuantConfig(group_size=16)


def _graph(model, **kw) -> torch.fx.GraphModule:
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture)(torch.randint(3, 256, (1, 20)), **kw)
    return graphs[0]


def _ops(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")}


def test_matched_eager_attention_becomes_polar_prefill():
    gm = _graph(coverage.BY_NAME["llama"].build(attn="eager"), use_cache=True)
    assert torch.nn.functional.softmax in _ops(gm)
    results, sites = run_all(gm, CFG)
    match = results[0]
    assert match.name == "match_eager_attention" and match.matched == match.rewritten == 2 and not match.skipped
    assert [s.status for s in sites] == ["rewritten", "rewritten"]
    ops = _ops(gm)
    assert torch._C._nn.scaled_dot_product_attention in ops  # the prompt's attention stays dense (exact)
    assert torch.nn.functional.softmax not in ops and torch.matmul not in ops  # the eager chain is gone
    assert any(getattr(t, "__name__", "") == "compress_keys" for t in ops)  # the cache write is compressed


def test_softcapping_site_stays_exactly_as_it_was():
    fam = coverage.Family("gemma2", lambda: (T.Gemma2Config(**coverage._common(
        num_key_value_heads=2, head_dim=16, attn_logit_softcapping=50.0, layer_types=["full_attention"] * 2)),
        T.Gemma2ForCausalLM), "half", "")
    gm = _graph(fam.build(attn="eager"), use_cache=True)
    before = gm.code  # nothing is removed either: DCE starts only from rewritten nodes
    results, sites = run_all(gm, CFG)
    assert gm.code == before
    match = results[0]
    assert match.matched == 2 and match.rewritten == 0
    assert all("logit softcapping" in reason for _, reason in match.skipped)
    assert [s.status for s in sites] == ["declined", "declined"]


def test_eager_attention_without_cache_stays_exactly_as_it_was():
    gm = _graph(coverage.BY_NAME["gptj"].build(attn="eager"), use_cache=False)
    before = gm.code  # nothing is removed either: DCE starts only from rewritten nodes
    results, sites = run_all(gm, CFG)
    assert gm.code == before
    assert results[0].rewritten == 0
    assert all(s.status == "declined" and "not a KV-append" in s.reason for s in sites) and len(sites) == 2
