"""pqcompile.verify: the kernel check catches a planted wrong kernel, on_mismatch raise / warn / fallback,
every:N, and the drift check against a full-precision shadow. Tiny GQA Llama, group size 16 so short prompts
hold codes."""

import copy
import math
import operator

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import fx

from pqcompile import codec, counters, metrics, verify
from pqcompile.cache import PolarKeys
from pqcompile.config import PolarQuantConfig, VerifyMode
from pqcompile.hf_compat import cache_kw
from pqcompile.models import tiny_llama

PROMPT, G = 40, 16


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2, hidden=128, heads=4, kv_heads=2, qk_gain=3.0)


@pytest.fixture(scope="module")
def ids(model):
    return torch.randint(0, model.config.vocab_size, (1, PROMPT + 8), generator=torch.Generator().manual_seed(0))


def _compile(model, **options):
    # the polar cell: the planted kernel bugs below shift angle codes
    options = {"backend": "eager", "group_size": G, "codec": "polar", **options}
    return torch.compile(model, backend="polarquant", options=options)


def _step(fwd, ids, t, cache):
    return fwd(ids[:, t:t + 1], **cache_kw(cache), use_cache=True).logits


def _prefill(compiled, model, ids, steps: int = 0):
    """A fresh DynamicCache, the prompt through `compiled`, then `steps` decode steps; returns the cache."""
    cache = transformers.DynamicCache(config=model.config)
    compiled(ids[:, :PROMPT], **cache_kw(cache), use_cache=True)
    for t in range(PROMPT, PROMPT + steps):
        _step(compiled, ids, t, cache)
    return cache


def _angle_off_by_one_bin(monkeypatch):
    """Plant a wrong kernel: the reference attention reads every angle code one bin higher (clamped)."""
    right = codec.polar_scores

    def wrong(q, data, c):
        code = codec.unpack_codes(data.codes, c.code_bits, q.shape[-1] // 2)
        c_r, c_a = code & ((1 << c.radius_bits) - 1), code >> c.radius_bits
        c_a = (c_a + 1).clamp(max=(1 << c.angle_bits) - 1)
        return right(q, data._replace(codes=codec.pack_codes(c_r | (c_a << c.radius_bits), c.code_bits)), c)

    monkeypatch.setattr(codec, "polar_scores", wrong)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("spec, mode, n", [("off", VerifyMode.OFF, 0), ("first", VerifyMode.FIRST, 0),
                                           ("every:3", VerifyMode.EVERY, 3), ("shadow:8", VerifyMode.SHADOW, 8)])
def test_verify_spec_parses(spec, mode, n):
    cfg = PolarQuantConfig(verify=spec)
    assert (cfg.verify, cfg.verify_n, cfg.verify_spec) == (mode, n, spec)


@pytest.mark.parametrize("spec", ["every", "every:0", "shadow:-1", "shadow:x", "first:2", "sometimes", 3])
def test_verify_spec_rejects(spec):
    with pytest.raises(ValueError, match=r"verify=.*'off', 'first', 'every:N', 'shadow:N'"):
        PolarQuantConfig(verify=spec)


# --------------------------------------------------------------------------- metrics


def test_metrics_against_known_noise():
    ref = torch.randn(4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = 1e-3 * torch.randn(4096, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    m = metrics.metrics(ref + noise, ref)
    assert m["max_abs"] == pytest.approx(noise.abs().max().item())
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(ref.pow(2).sum() / noise.pow(2).sum()))
    assert m["rel_l2"] == pytest.approx((noise.norm() / ref.norm()).item())
    assert 0.999999 < m["cosine"] < 1
    exact = metrics.metrics(ref, ref)
    assert exact["sqnr_db"] is None and exact["max_abs"] == 0 and exact["cosine"] == 1
    cfg = PolarQuantConfig(atol=1e-2, rtol=0.0, min_sqnr_db=30)
    assert metrics.passes(m, cfg) and metrics.passes(exact, cfg)
    assert not metrics.passes(metrics.metrics(ref + 0.1 * noise / noise.abs().max(), ref), PolarQuantConfig(
        atol=1e-2, rtol=0.0, min_sqnr_db=0))  # one-off error of 0.1 > atol
    assert not metrics.passes(metrics.metrics(ref + 100 * noise, ref), cfg)  # SQNR ~20 dB < 30


def test_mutated_inputs_found_through_views():
    def f(cache, pos, new, counter, x):
        cache.view(-1, 4).index_copy_(0, pos, new)
        counter.add_(1)
        y = x + 1
        y.mul_(2)  # a fresh tensor: not an input mutation
        return y

    gm = fx.symbolic_trace(f)
    assert verify.mutated_inputs(gm) == ["cache", "counter"]
    gm2 = fx.symbolic_trace(lambda x: operator.add(x, 1))
    assert verify.mutated_inputs(gm2) == []


# --------------------------------------------------------------------------- kernel check


@torch.no_grad()
def test_kernel_check_passes_on_correct_kernels(model, ids):
    compiled = _compile(model, verify="first")
    _prefill(compiled, model, ids, 3)
    states = verify.states()
    assert len(states) == counters.totals["graphs"] >= 2
    for st in states:
        assert st["status"] == "passed" and st["checked"] == 1 and not st["fallback"], st
        checks = st["events"][0]["checks"]
        sites = [c for c in checks if c["site"] is not None and c["name"].startswith("model.layers")]
        assert len(sites) == model.config.num_hidden_layers
        assert all(c["ok"] and (c["sqnr_db"] is None or c["sqnr_db"] > 80) for c in checks), checks
    decode = states[-1]["events"][0]["checks"]
    assert any("polar attention vs SDPA" in c["what"] for c in decode)
    prefill = states[0]["events"][0]["checks"]
    assert sum(c["what"] == "keys vs reference encode+decode" for c in prefill) == model.config.num_hidden_layers


@torch.no_grad()
def test_planted_wrong_kernel_is_caught(model, ids, monkeypatch):
    _angle_off_by_one_bin(monkeypatch)
    compiled = _compile(model, verify="first", on_mismatch="raise")
    cache = _prefill(compiled, model, ids)  # prefill attention stays dense: passes
    assert verify.states()[0]["status"] == "passed"
    with pytest.raises(verify.VerifyMismatch, match=r"model\.layers\.\d\.self_attn \(polar_sdpa"):
        _step(compiled, ids, PROMPT, cache)
    with pytest.raises(verify.VerifyMismatch, match="call 2"):  # caught once: the graph keeps being checked
        _step(compiled, ids, PROMPT, cache)
    st = verify.states()[-1]
    assert st["status"] == "failed" and st["events"][-1]["action"] == "raised"
    bad = [c for c in st["events"][-1]["checks"] if not c["ok"]]
    assert any(c["what"].startswith("polar attention") and c["sqnr_db"] < 25 for c in bad), bad


@torch.no_grad()
def test_warn_returns_the_compiled_result(model, ids, monkeypatch):
    _angle_off_by_one_bin(monkeypatch)
    compiled = _compile(model, verify="first", on_mismatch="warn")
    cache = _prefill(compiled, model, ids)
    reference = copy.deepcopy(cache)
    with pytest.warns(UserWarning, match="polarquant verify: call 1"):
        wrong = _step(compiled, ids, PROMPT, cache)
    right = _step(model, ids, PROMPT, reference)
    assert not torch.allclose(wrong, right, atol=1e-3)  # the planted bug is real and reached the output
    assert verify.states()[-1]["events"][-1]["action"] == "warned"


@torch.no_grad()
def test_fallback_gives_the_original_graph_output_exactly(model, ids, monkeypatch, tmp_path):
    _angle_off_by_one_bin(monkeypatch)
    compiled = _compile(model, verify="first", on_mismatch="fallback", report=str(tmp_path))
    cache = _prefill(compiled, model, ids)
    for t in range(PROMPT, PROMPT + 5):
        reference = copy.deepcopy(cache)  # the same compressed state, for the dense model run eagerly
        out = _step(compiled, ids, t, cache)
        ref = _step(model, ids, t, reference)  # HF eager: its SDPA reads the keys the codes stand for
        assert torch.equal(out, ref), (t, (out - ref).abs().max())
        assert isinstance(cache.layers[0].keys, PolarKeys)  # the cache stays compressed
    decode = [st for st in verify.states() if st["events"] and st["events"][0]["action"] == "fallback"]
    assert decode and all(st["fallback"] and st["checked"] == 1 for st in decode)
    assert sum(st["calls"] for st in decode) == 5
    summaries = "".join(p.read_text() for p in tmp_path.glob("*/summary.txt"))
    assert "FALLBACK: the original graph runs from now on" in summaries


@torch.no_grad()
def test_every_n_checks_calls_1_n_plus_1(model, ids):
    compiled = _compile(model, verify="every:3")
    _prefill(compiled, model, ids, 8)
    busiest = max(verify.states(), key=lambda st: st["calls"])
    assert busiest["calls"] >= 5
    assert [e["call"] for e in busiest["events"]] == list(range(1, busiest["calls"] + 1, 3))
    assert all(e["ok"] for e in busiest["events"])


# --------------------------------------------------------------------------- drift check


def _drift(model, ids, bits, n=3, steps=5):
    compiled = _compile(model, verify=f"shadow:{n}", radius_bits=bits, angle_bits=bits)
    cache = transformers.DynamicCache(config=model.config)
    dense = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        compiled(ids[:, :PROMPT], **cache_kw(cache), use_cache=True)
        model(ids[:, :PROMPT], **cache_kw(dense), use_cache=True)
        pairs = [(_step(compiled, ids, t, cache), _step(model, ids, t, dense)) for t in range(PROMPT, PROMPT + steps)]
    # (graphs of earlier tests in this process may still be alive: their kernel checks have no step)
    events = sorted((e for st in verify.states() for e in st["events"] if e["check"] == "drift"), key=lambda e: e["step"])
    return events, pairs


def test_drift_check_follows_a_full_precision_shadow(model, ids):
    events, pairs = _drift(model, ids, bits=4, n=3, steps=5)
    assert [e["step"] for e in events] == [0, 1, 2, 3]  # prefill, then the first 3 decode steps only
    layers = model.config.num_hidden_layers
    for e in events[1:]:
        names = [c["name"] for c in e["checks"]]
        assert sum(n.endswith(" keys") for n in names) == layers and sum(n.endswith(" attention") for n in names) \
            == layers
        logits = next(c for c in e["checks"] if c["name"] == "logits")
        compressed, dense = pairs[e["step"] - 1]
        # the shadow IS the dense model: its drift numbers are those of compressed vs eager dense logits
        assert logits["cosine"] == pytest.approx(F.cosine_similarity(compressed.flatten(), dense.flatten(), 0)
                                                 .item(), abs=1e-5)
        assert logits["kl"] >= 0 and logits["top1"] == float(compressed.argmax(-1) == dense.argmax(-1))
    keys0 = [c for c in events[0]["checks"] if c["name"].endswith(" keys")]
    assert len(keys0) == layers and all(0 < c["rel_l2"] < 0.5 for c in keys0)


def test_drift_grows_when_bits_drop(model, ids):
    mean_err = {}
    for bits in (4, 2):
        torch._dynamo.reset()
        events, _ = _drift(model, ids, bits=bits, n=1, steps=0)  # the prefill's keys vs the dense keys
        mean_err[bits] = sum(c["rel_l2"] for e in events for c in e["checks"] if c["name"].endswith(" keys")) / \
            sum(c["name"].endswith(" keys") for e in events for c in e["checks"])
    assert mean_err[2] > 2 * mean_err[4] > 0, mean_err


@torch.no_grad()
def test_static_cache_graphs_are_checked_and_fall_back_exactly(model, ids, monkeypatch):
    """PolarStaticCache graphs write their inputs in place: the checking runs get copies, and after a fallback
    the cache holds the state the original graph left (the compiled run's writes are replaced)."""
    from pqcompile.static_cache import PolarStaticCache

    _angle_off_by_one_bin(monkeypatch)
    compiled = _compile(model, verify="first", on_mismatch="fallback")
    # the original graphs, run by dynamo without the passes (HF's traced code differs from its eager code in
    # mask construction, by rounding only)
    original = torch.compile(model, backend="eager")
    cache, reference = (PolarStaticCache(config=model.config, max_cache_len=64, group_size=G) for _ in range(2))
    outs = [compiled(ids[:, :PROMPT], **cache_kw(cache), use_cache=True).logits]
    refs = [original(ids[:, :PROMPT], **cache_kw(reference), use_cache=True).logits]
    for t in range(PROMPT, PROMPT + 4):
        outs.append(_step(compiled, ids, t, cache))
        refs.append(_step(original, ids, t, reference))
    assert all(torch.equal(o, r) for o, r in zip(outs, refs)), [(o - r).abs().max() for o, r in zip(outs, refs)]
    states = verify.states()
    assert any(st["fallback"] for st in states) and all(st["skipped"] is None for st in states)
    assert int(cache.layers[0].keys.length) == PROMPT + 4  # each write applied once


@torch.no_grad()
def test_eager_attention_sites_are_checked_against_their_matmul_softmax_chain(ids):
    """attn_implementation="eager": the passes turn matmul-softmax-matmul into SDPA; verify finds the original
    chain's output through the users of the rewritten node and compares per site."""
    model = tiny_llama(layers=2, hidden=128, heads=4, kv_heads=2, qk_gain=3.0)
    model.set_attn_implementation("eager")
    compiled = _compile(model, verify="first")
    _prefill(compiled, model, ids)
    prefill = verify.states()[0]["events"][0]["checks"]
    sites = [c for c in prefill if c["what"] == "SDPA vs the original attention ops"]
    assert [c["site"] for c in sites] == [0, 1]
    assert all(c["ok"] and c["sqnr_db"] > 80 for c in sites), sites  # SDPA vs eager softmax chain, fp32


@torch.no_grad()
def test_a_checker_that_cannot_run_warns_and_keeps_the_result(model, ids, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(verify.graphs, "run", broken)
    compiled = _compile(model, verify="first")
    with pytest.warns(UserWarning, match="verify could not run the graphs: RuntimeError: boom"):
        out = compiled(ids[:, :PROMPT], use_cache=True).logits
    torch.testing.assert_close(out, model(ids[:, :PROMPT], use_cache=True).logits)  # prefill attention is dense
    st = verify.states()[0]
    assert st["status"] == "error" and "boom" in st["skipped"] and st["checked"] == 0
