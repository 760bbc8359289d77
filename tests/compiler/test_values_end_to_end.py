"""Compressed values end to end (options value_bits): PolarKeys and PolarValues live in HF's DynamicCache between
compiled calls, PolarStaticCache(value_bits=...) holds StaticPolarValues, and a site whose values cannot be
compressed keeps them dense, says why and still compresses its keys.

The reference for the numbers is eager HF decoding over the *same* compressed cache (the prefill's keys and values
encoded by the reference codecs; each decode step's cat appends through the same ops, and HF's SDPA reads the
dequantized keys and values through the dense fallback): the compiled logits must equal it to fp32 reassociation.
Against the dense model the bounds are cosine / top-1, as in test_end_to_end.py."""

import contextlib
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers

from pqcompile import counters, coverage, report
from pqcompile.cache import PolarKeys
from pqcompile.codec import Codec, Pairing
from pqcompile.compressed import CompressedTensor, quiet_fallbacks
from pqcompile.config import PolarQuantConfig
from pqcompile.dense_values import DenseValues
from pqcompile.hf_compat import cache_kw, cache_of
from pqcompile.models import tiny_llama
from pqcompile.static_cache import PolarStaticCache, StaticPolarKeys, StaticPolarValues
from pqcompile.value_codec import ValueCodec, state_bits
from pqcompile.values import PolarValues, polar_values_in

G, PROMPT, STEPS = 16, 40, 24  # the prompt leaves 2 groups + an 8-token tail; decode flushes at 48 and 64
KIND = PolarQuantConfig().codec  # the default key codec, which the compiled runs use


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2, hidden=128, heads=4, kv_heads=2, qk_gain=3.0)  # GQA 2, head_dim 32


def _options(**kw):
    return {"group_size": G, "value_group": 16, **kw}


def _teacher_forced(forward, ids, cache, prompt=PROMPT):
    """Prefill ids[:, :prompt], then one token at a time; per-step logits of the last position [steps + 1, V]."""
    out = forward(ids[:, :prompt], **cache_kw(cache), use_cache=True)
    logits = [out.logits[0, -1]]
    for t in range(prompt, ids.shape[1]):
        logits.append(forward(ids[:, t:t + 1], **cache_kw(cache), use_cache=True).logits[0, -1])
    return torch.stack(logits)


def _on_compressed_cache(model, ids, kcodec, vcodec, prompt=PROMPT):
    """Eager HF over a cache compressed after an eager prefill: the reference of the module docstring."""
    cache = transformers.DynamicCache(config=model.config)
    with quiet_fallbacks():
        out = model(ids[:, :prompt], **cache_kw(cache), use_cache=True)
        for layer in cache.layers:
            layer.keys = PolarKeys.from_dense(layer.keys, kcodec)
            layer.values = PolarValues.from_dense(layer.values, vcodec) if vcodec else layer.values
        logits = [out.logits[0, -1]]
        for t in range(prompt, ids.shape[1]):
            logits.append(model(ids[:, t:t + 1], **cache_kw(cache), use_cache=True).logits[0, -1])
    return torch.stack(logits)


@contextlib.contextmanager
def _no_fallback():
    """No dense fallback may run on a compressed cache tensor in the compiled loop (it would warn)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="pqcompile: .* has no compressed implementation")
        yield


def _rel_err(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def _agreement(a, b):
    return F.cosine_similarity(a, b, dim=-1).mean().item(), (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def _keys_only_graphs(model, ids):
    """Graphs one keys-only compiled run of the same loop takes (the inner compiler does not change the count)."""
    torch._dynamo.reset()
    counters.clear()
    _teacher_forced(torch.compile(model, backend="polarquant", options={"group_size": G, "backend": "eager"}), ids,
                    transformers.DynamicCache(config=model.config))
    graphs = counters.totals["graphs"]
    torch._dynamo.reset()
    counters.clear()
    return graphs


@torch.no_grad()
@pytest.mark.parametrize("bits, inner, bound", [(4, "inductor", (0.99, 0.85)), (2, "aot_eager", (0.98, 0.8))])
def test_decode_loop_with_compressed_values(model, bits, inner, bound):
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))
    keys_only = _keys_only_graphs(model, ids)
    cache = transformers.DynamicCache(config=model.config)
    compiled = torch.compile(model, backend="polarquant", options=_options(value_bits=bits, backend=inner))
    with _no_fallback():
        polar = _teacher_forced(compiled, ids, cache)

    layers = model.config.num_hidden_layers
    assert [(type(layer.keys), type(layer.values)) for layer in cache.layers] == [(PolarKeys, PolarValues)] * layers
    assert len(polar_values_in(cache)) == layers
    assert counters.totals["graphs"] <= keys_only
    assert counters.totals["values_compressed"] == counters.totals["sites_rewritten"] == layers * counters.totals[
        "graphs"]
    assert counters.totals["values_dense"] == 0 and counters.totals["sites_declined"] == 0

    kcodec, vcodec = Codec(4, 4, G, Pairing("half"), KIND), ValueCodec(bits, 16, G)
    reference = _on_compressed_cache(model, ids, kcodec, vcodec)
    assert _rel_err(polar, reference) <= 1e-4, _rel_err(polar, reference)
    dense = _teacher_forced(model, ids, transformers.DynamicCache(config=model.config))
    cos, top1 = _agreement(polar, dense)
    assert cos >= bound[0] and top1 >= bound[1], (cos, top1)
    # the check can fail: values truly compressed change the logits beyond the keys-only run's
    keys_only_ref = _on_compressed_cache(model, ids, kcodec, None)
    assert _rel_err(reference, keys_only_ref) > 100 * _rel_err(polar, reference)


def _tensors_reachable(root, limit=20000):
    seen, stack, found = set(), [root], {}
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, CompressedTensor):
            for t in obj.inner_tensors():
                found[id(t)] = t
            continue
        if isinstance(obj, torch.Tensor):
            found[id(obj)] = obj
            continue
        if isinstance(obj, (type, type(gc))):
            continue
        stack.extend(gc.get_referents(obj))
    return list(found.values())


@torch.no_grad()
def test_generate_holds_compressed_keys_and_values_only():
    model = tiny_llama(layers=2, hidden=128, heads=4, kv_heads=2, qk_gain=3.0, dtype=torch.bfloat16)
    model.compile(backend="polarquant", options=_options(value_bits=4, backend="aot_eager"))
    prompt, new = 100, 6  # N = 105 tokens: 6 complete groups and a 9-token tail
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    with _no_fallback():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             return_dict_in_generate=True)
    cache = cache_of(out)
    assert counters.totals["graphs"] <= 4 and counters.totals["values_compressed"] == counters.totals[
        "sites_rewritten"] > 0
    values = polar_values_in(cache)
    assert len(values) == model.config.num_hidden_layers
    B, H, T, D = values[0].shape
    assert T == prompt + new - 1
    for v in values:
        assert v.nbytes_held() * 8 == B * H * state_bits(v.codec, T, D, tail_bits=16, capacity=v.capacity)
        ring = v.tail.numel() * v.tail.element_size()  # one group (16 rows) in bf16, whatever T
        assert v.capacity <= T + 2 * v.group_size
        assert v.nbytes_held() - ring <= 0.5 * B * H * v.capacity * D * 2  # 6 of 16 bits per element (cg 16)
    # no dense tensor of the full length is reachable from the cache: neither keys nor values
    assert not [t for t in _tensors_reachable(cache) if t.numel() >= B * H * T * D]


@torch.no_grad()
def test_static_cache_with_compressed_values(model):
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(2))

    def make():
        return PolarStaticCache(config=model.config, max_cache_len=80, group_size=G, value_bits=4, value_group=16)

    cache = make()
    compiled = torch.compile(model, backend="polarquant", options={"backend": "aot_eager"})
    with _no_fallback():
        polar = _teacher_forced(compiled, ids, cache)
    assert all(isinstance(layer.keys, StaticPolarKeys) and isinstance(layer.values, StaticPolarValues)
               for layer in cache.layers)
    assert counters.totals["graphs"] == 2  # prefill + one decode graph for every step
    layers = model.config.num_hidden_layers
    assert counters.totals["rewritten_static"] == counters.totals["values_compressed"] == 2 * layers
    with quiet_fallbacks():
        eager_polar = _teacher_forced(model, ids, make())  # the same buffers through the dispatch-level ops
    torch.testing.assert_close(polar, eager_polar, rtol=1e-4, atol=1e-4)
    dense = _teacher_forced(model, ids, transformers.StaticCache(config=model.config, max_cache_len=80))
    cos, top1 = _agreement(polar, dense)
    assert cos >= 0.99 and top1 >= 0.85, (cos, top1)


def test_static_cache_allocates_compressed_values_as_static_addresses(model):
    """No dense value buffer; every buffer marked static (CUDA graphs, as for the keys: test_static_cache.py). A
    value head dim that value_group does not divide keeps that layer's values dense, with a warning."""
    cfg = model.config
    H, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    cache = PolarStaticCache(config=cfg, max_cache_len=100, group_size=G, value_bits=2, value_group=16)
    cache.early_initialization(1, H, D, torch.float32, torch.device("cpu"))
    for layer in cache.layers:
        values = layer.values
        assert isinstance(values, StaticPolarValues) and values.shape == (1, H, 100, D)
        assert values.codes.shape == (1, H, 112, D * 2 // 8) and values.params.shape == (1, H, 112, D // 16 * 2)
        for t in (values, *values.inner_tensors()):
            assert getattr(t, "_dynamo_static_input_type", None) is not None
    assert isinstance(PolarStaticCache(config=cfg, max_cache_len=100).layers[0], type(cache.layers[0]))
    dense = PolarStaticCache(config=cfg, max_cache_len=100, group_size=G, value_bits=4, value_group=64)
    with pytest.warns(UserWarning, match="keeps this layer's values dense: head_dim=32 is not divisible"):
        dense.early_initialization(1, H, D, torch.float32, torch.device("cpu"))
    assert type(dense.layers[0].values) is torch.Tensor and isinstance(dense.layers[0].keys, StaticPolarKeys)


@torch.no_grad()
@pytest.mark.parametrize("name, attn", [("gpt_neox", "sdpa"), ("phi3", "sdpa"), ("llama", "eager")])
def test_families_with_compressed_values(name, attn):
    """gpt_neox: partial rotary (half@4) and fused qkv (chunk); phi3: fused qkv (slices) and GQA; llama with
    attn_implementation="eager" (match_eager_attention). head_dim 16, value_group 16."""
    family = coverage.BY_NAME[name]
    model = family.build(attn=attn)
    ids = torch.randint(3, coverage.VOCAB, (1, coverage.PROMPT + 16), generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(model, backend="polarquant", options=_options(value_bits=4, backend="eager"))
    cache = transformers.DynamicCache(config=model.config)
    with _no_fallback():
        polar = _teacher_forced(compiled, ids, cache, prompt=coverage.PROMPT)
    assert all(isinstance(layer.values, PolarValues) for layer in cache.layers)
    assert counters.totals["values_compressed"] == counters.totals["sites_rewritten"] == coverage.LAYERS * \
        counters.totals["graphs"]
    assert {p for _, _, status, _, p in counters.graphs[0]["sites"] if status == "rewritten"} == {family.rope}
    reference = _on_compressed_cache(model, ids, Codec(4, 4, G, Pairing.parse(family.rope), KIND), ValueCodec(4, 16, G),
                                     prompt=coverage.PROMPT)
    assert _rel_err(polar, reference) <= 1e-4, _rel_err(polar, reference)


@torch.no_grad()
def test_values_that_do_not_fit_stay_dense_with_a_reason(model, tmp_path):
    """value_group 64 does not divide head_dim 32: the keys are compressed, the values stay dense, the prefill
    says why, the decode graphs say the cache holds dense values, and the logits are the keys-only run's."""
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + 4), generator=torch.Generator().manual_seed(4))
    options = {"group_size": G, "backend": "eager"}
    keys_only = _teacher_forced(torch.compile(model, backend="polarquant", options=options), ids,
                                transformers.DynamicCache(config=model.config))
    torch._dynamo.reset()
    counters.clear()
    cache = transformers.DynamicCache(config=model.config)
    compiled = torch.compile(model, backend="polarquant",
                             options={**options, "value_bits": 4, "value_group": 64, "report": str(tmp_path)})
    half = _teacher_forced(compiled, ids, cache)
    assert torch.equal(half, keys_only)
    # dense, but held in place (DenseValues: no history copied per step)
    assert all(type(layer.keys) is PolarKeys and type(layer.values) is DenseValues for layer in cache.layers)
    assert counters.totals["values_dense"] == counters.totals["sites_rewritten"] > 0
    assert counters.totals["values_compressed"] == 0
    prefill, decode = counters.graphs[0]["values"], counters.graphs[-1]["values"]
    assert all("head_dim=32 is not divisible by value_group=64" in r for r in prefill), prefill
    assert all("cache holds dense values" in r for r in decode), decode
    first = report.load(tmp_path)[0]
    assert [s["values"] for s in first["sites"]] == prefill
    assert first["totals"]["value_ratio"] == 1.0 and first["totals"]["values_compressed"] == 0
    assert "values dense: head_dim=32 is not divisible" in report.render_summary(first)


@torch.no_grad()
def test_report_and_verify_with_compressed_values(model, tmp_path):
    """report.json: value bits and bytes per token per site; verify="first" checks the values (prefill: the
    PolarValues against the reference codec's encode + decode) and passes; the drift check follows the values."""
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + 3), generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(model, backend="polarquant", options=_options(
        value_bits=4, backend="eager", verify="first", report=str(tmp_path / "first")))
    _teacher_forced(compiled, ids, transformers.DynamicCache(config=model.config))
    reports = report.load(tmp_path / "first")
    H, D = model.config.num_key_value_heads, 32
    for data in reports:
        assert data["verify"]["status"] == "passed"
        for site in data["sites"]:
            assert site["values"] == "compressed" and (site["value_bits"], site["value_group"]) == (4, 16)
            assert site["value_bits_per_element"] == 4 + 32 / 16 and site["key_bits_per_element"] == 4 + 4 * 16 / (2 * G)
            assert site["value_bytes_per_token_before"] == H * D * 4
            assert site["value_bytes_per_token_after"] == pytest.approx(6 * H * D / 8)
        t = data["totals"]
        assert t["value_ratio"] == pytest.approx(6 / 32) and t["values_compressed"] == 2
        assert "values 0.19x" in report.render_summary(data)
        checks = data["verify"]["events"][0]["checks"]
        values = [c for c in checks if c["what"].startswith("values")]
        assert len(values) == 2 and {c["site"] for c in values} == {0, 1} and all(c["ok"] for c in values)
    assert any(c["what"] == "values vs reference encode+decode" for c in reports[0]["verify"]["events"][0]["checks"])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="polarquant", options=_options(
        value_bits=4, backend="eager", verify="shadow:2", report=str(tmp_path / "drift")))
    _teacher_forced(compiled, ids, transformers.DynamicCache(config=model.config))
    names = {c["name"] for d in report.load(tmp_path / "drift") for e in d["verify"]["events"] for c in e["checks"]}
    assert {"model.layers.0.self_attn values", "model.layers.1.self_attn values"} <= names
