"""End to end on a tiny GQA Llama: the compressed key cache lives in HF's DynamicCache between compiled calls."""

import gc

import pytest
import torch
import torch.nn.functional as F
import transformers

from pqcompile import codec, counters
from pqcompile.cache import PolarKeys, polar_keys_in
from pqcompile.hf_compat import cache_kw, cache_of
from pqcompile.models import tiny_llama

PROMPT, STEPS = 160, 200


@pytest.fixture(scope="module")
def model():
    # qk_gain makes attention peaked: near-uniform attention (random init) would hide wrong keys
    return tiny_llama(layers=2, hidden=256, heads=8, kv_heads=2, qk_gain=3.0)


def _teacher_forced(forward, model, ids, cache, shuffle_keys=False):
    """Prefill the prompt, then feed the reference tokens one by one; returns per-step logits [STEPS, V]."""
    out = forward(ids[:, :PROMPT], **cache_kw(cache), use_cache=True)
    logits = []
    for t in range(PROMPT, PROMPT + STEPS):
        if shuffle_keys:
            for layer in cache.layers:
                layer.keys = layer.keys[:, :, torch.randperm(layer.keys.shape[2])]
        out = forward(ids[:, t:t + 1], **cache_kw(cache), use_cache=True)
        logits.append(out.logits[0, -1])
    return torch.stack(logits)


def _agreement(a, b):
    cos = F.cosine_similarity(a, b, dim=-1)
    return cos.mean().item(), (a.argmax(-1) == b.argmax(-1)).float().mean().item()


@torch.no_grad()
def test_manual_decode_loop_matches_eager(model):
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + STEPS))
    eager = _teacher_forced(model, model, ids, transformers.DynamicCache(config=model.config))
    counters.clear()
    compiled = torch.compile(model, backend="polarquant")
    cache = transformers.DynamicCache(config=model.config)
    polar = _teacher_forced(compiled, model, ids, cache)

    n_layers = model.config.num_hidden_layers
    assert all(isinstance(k, PolarKeys) for k in (layer.keys for layer in cache.layers))
    assert len(polar_keys_in(cache)) == n_layers
    assert counters.totals["graphs"] <= 4
    assert counters.totals["rewritten_prefill"] == n_layers
    assert counters.totals["rewritten_decode"] == n_layers * (counters.totals["graphs"] - 1)
    assert counters.totals["sites_declined"] == 0

    cos, top1 = _agreement(polar, eager)
    assert cos >= 0.99 and top1 >= 0.90, (cos, top1)
    # The check above can fail: the same model with its cached keys shuffled drifts far away.
    shuffled = _teacher_forced(model, model, ids, transformers.DynamicCache(config=model.config), shuffle_keys=True)
    cos_shuffled, _ = _agreement(shuffled, eager)
    assert cos_shuffled < cos - 0.05, (cos_shuffled, cos)


def _tensors_reachable(root, limit=10000):
    seen, stack, found = set(), [root], {}
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, PolarKeys):
            for t in (obj.codes, obj.params, obj.tail):
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
def test_generate_holds_compressed_keys_only():
    model = tiny_llama(layers=2, hidden=256, heads=8, kv_heads=2, qk_gain=3.0, dtype=torch.bfloat16)
    model.compile(backend="polarquant")
    counters.clear()
    prompt, new = 1020, 6  # N = 1026 tokens: 8 complete groups and a 2-token tail
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True)
    cache = cache_of(out)
    N = cache.get_seq_length()
    assert N == prompt + new - 1
    assert counters.totals["graphs"] <= 4
    keys = polar_keys_in(cache)
    assert len(keys) == model.config.num_hidden_layers
    B, H, T, D = keys[0].shape
    dense_fp16 = B * H * T * D * 2
    for k in keys:
        assert k.nbytes_held() * 8 == B * H * codec.state_bits(k.codec, T, D, capacity=k.capacity)  # held == accounting
        ring = k.tail.numel() * k.tail.element_size()  # one group in full precision, whatever T
        assert k.nbytes_held() - ring <= 0.30 * dense_fp16 * k.capacity / T and k.capacity <= T + 2 * k.group_size
    # No dense key tensor of the full length is reachable from the cache: only values are that large.
    big = [t for t in _tensors_reachable(cache) if t.numel() >= B * H * T * D]
    assert len(big) == model.config.num_hidden_layers  # the dense value tensors
    assert all(any(t is layer.values for layer in cache.layers) for t in big)


@torch.no_grad()
def test_generate_300_tokens_and_beam_search(model):
    compiled = tiny_llama(layers=2, hidden=256, heads=8, kv_heads=2, qk_gain=3.0)
    compiled.compile(backend="polarquant")
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT))
    counters.clear()
    out = compiled.generate(ids, max_new_tokens=300, min_new_tokens=300, do_sample=False,
                            return_dict_in_generate=True)
    assert out.sequences.shape[1] == PROMPT + 300
    assert counters.totals["graphs"] <= 4 and counters.totals["sites_declined"] == 0
    assert len(polar_keys_in(cache_of(out))) == 2
    # beam search reorders the cache (index_select on the batch dim) between compiled calls
    out = compiled.generate(ids[:, :40], max_new_tokens=8, num_beams=2, do_sample=False,
                            return_dict_in_generate=True)
    keys = polar_keys_in(cache_of(out))
    assert keys and keys[0].shape[0] == 2


@torch.no_grad()
def test_model_without_cache_runs_unchanged(model):
    counters.clear()
    compiled = torch.compile(model, backend="polarquant")
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    out = compiled(ids, use_cache=False)
    torch.testing.assert_close(out.logits, model(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)
    assert counters.totals["sites_rewritten"] == 0
    assert counters.totals["sites_declined"] == model.config.num_hidden_layers
    assert "not a KV-append" in counters.graphs[-1]["sites"][0][3]


@pytest.mark.parametrize("value_bits", [None, 4])
def test_one_decode_graph_across_capacity_growth(value_bits):
    """The buffers grow between steps (dynamic.reserve_all) and a group fills its capacity exactly now and then:
    neither may make a new graph (a view [:T] of a value buffer once made dynamo guard on capacity == T)."""
    model = tiny_llama(layers=2, hidden=128, heads=4, kv_heads=2)
    compiled = torch.compile(model, backend="polarquant",
                             options={"group_size": 16, "backend": "aot_eager", "value_bits": value_bits,
                                      "value_group": 16})
    cache = transformers.DynamicCache()
    ids = torch.randint(0, model.config.vocab_size, (1, 140), generator=torch.Generator().manual_seed(5))
    capacities = set()
    with torch.no_grad():
        compiled(ids[:, :40], **cache_kw(cache), use_cache=True)
        for t in range(40, 140):
            compiled(ids[:, t: t + 1], **cache_kw(cache), use_cache=True)
            capacities.add(cache.layers[0].keys.capacity)
    assert len(capacities) >= 4  # grown several times, filled exactly at each group boundary
    assert counters.totals["graphs"] == 2  # prefill, decode
