"""Fault injection on a live compressed cache (tiny GQA Llama, group 16): a corrupted state between decode steps,
a wrong attention op caught by verify="every:N" with on_mismatch="fallback", and an op that raises at launch."""

import copy
import warnings

import pytest
import torch
import transformers

from pqcompile import codec, verify
from pqcompile.cache import polar_keys_in
from pqcompile.dense_values import DenseValues
from pqcompile.hf_compat import cache_kw
from pqcompile.models import tiny_llama

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py
PROMPT, G, N = 40, 16, 2


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2, hidden=128, heads=4, kv_heads=2, qk_gain=3.0)


@pytest.fixture(scope="module")
def ids(model):
    return torch.randint(0, model.config.vocab_size, (1, PROMPT + 12), generator=torch.Generator().manual_seed(0))


def _compile(model, **options):
    return torch.compile(model, backend="polarquant", options={"backend": "eager", "group_size": G, **options})


def _step(fwd, ids, t, cache):
    with torch.no_grad():
        return fwd(ids[:, t:t + 1], **cache_kw(cache), use_cache=True).logits


def _prefill(compiled, model, ids, steps):
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        compiled(ids[:, :PROMPT], **cache_kw(cache), use_cache=True)
    for t in range(PROMPT, PROMPT + steps):
        _step(compiled, ids, t, cache)
    return cache


def _corrupt(state, part: str) -> None:
    """In place, inside the tokens the cache holds: flip bits of the first group's codes, scale its radius step
    (keys) or its second token's scales (values), or shift the open group's full-precision tokens (the ring;
    DenseValues: the rows after the last complete group, or, for "codes", its first group's rows)."""
    T = state.shape[2]
    with torch.no_grad():
        if isinstance(state, DenseValues):
            rows = state.buf[:, :, :G] if part == "codes" else state.buf[:, :, T // G * G: T]
            rows += 10.0
        elif part == "codes":
            state.codes[:, :, :G] ^= 0x55
        elif part == "params":  # keys: row 1 is r_scale of group 0 (rows r_min, r_scale, phi_min, phi_scale)
            state.params[:, :, 1] *= 4  # values: token 1's (min, scale) per channel group
        else:
            state.tail[:, :, : T % G] += 10.0


# (cache tensor, part, options): keys; values compressed (value_group 16 fits head dim 32); values held dense
CORRUPTIONS = [("keys", part, {}) for part in ("codes", "params", "tail")] + [
    ("values", part, {"value_bits": 4, "value_group": 16}) for part in ("codes", "params", "tail")] + [
    ("values", part, {}) for part in ("codes", "tail")]


@pytest.mark.parametrize("tensor, part, options", CORRUPTIONS,
                         ids=[f"{t}-{p}-{'v4' if o else 'dense'}" for t, p, o in CORRUPTIONS])
def test_state_corruption_is_detected_within_n_steps(model, ids, tensor, part, options):
    """verify="every:N" checks the cache states against digests taken when they were written (verify/integrity.py):
    a corruption between steps is reported within N steps, naming the layer and the tensor."""
    compiled = _compile(model, verify=f"every:{N}", on_mismatch="warn", **options)
    cache = _prefill(compiled, model, ids, 3)
    _corrupt(getattr(cache.layers[1], tensor), part)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(PROMPT + 3, PROMPT + 3 + N):
            _step(compiled, ids, t, cache)
    failed = [c for st in verify.states() for e in st["events"] for c in e["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == [f"model.layers.1.self_attn {tensor}"], failed
    assert any(f"model.layers.1.self_attn {tensor}: state vs its digests" in str(w.message) for w in caught)


def test_a_corrupted_state_raises_naming_the_layer_and_the_tensor(model, ids):
    compiled = _compile(model, verify=f"every:{N}")  # on_mismatch="raise"
    cache = _prefill(compiled, model, ids, 3)
    _corrupt(cache.layers[0].keys, "codes")
    with pytest.raises(verify.VerifyMismatch, match=r"model\.layers\.0\.self_attn keys: state vs its digests: "
                                                    r"codes of group\(s\) 0 changed since written"):
        for t in range(PROMPT + 3, PROMPT + 3 + N):
            _step(compiled, ids, t, cache)


def test_a_corrupted_state_falls_back_to_the_original_graph(model, ids):
    compiled = _compile(model, verify=f"every:{N}", on_mismatch="fallback")
    cache = _prefill(compiled, model, ids, 3)
    decode = max(verify.states(), key=lambda st: st["calls"])
    _corrupt(cache.layers[1].values, "tail")
    for t in range(PROMPT + 3, PROMPT + 3 + N):
        reference = copy.deepcopy(cache)  # the same (corrupted) state for HF's eager model
        out = _step(compiled, ids, t, cache)
        if decode["fallback"]:
            assert torch.equal(out, _step(model, ids, t, reference))  # the original graph's answer
            break
    assert decode["fallback"] and decode["events"][-1]["action"] == "fallback", decode


def _noisy_scores(monkeypatch):
    """A wrong attention op (the CPU reference path the op runs): scores off by a large random offset."""
    right = codec.polar_scores

    def wrong(q, data, c):
        s = right(q, data, c)
        return s + 5.0 * torch.randn(s.shape, generator=torch.Generator().manual_seed(1))

    monkeypatch.setattr(codec, "polar_scores", wrong)


def test_a_fault_mid_run_is_caught_within_n_steps_and_falls_back(model, ids, monkeypatch):
    """verify="every:N": each graph is checked on its calls 1, N+1, ...; a fault that appears after a passed
    check is caught within N more calls, whose result (and every later one) is the original graph's."""
    compiled = _compile(model, verify=f"every:{N}", on_mismatch="fallback")
    cache = _prefill(compiled, model, ids, 3)  # prefill, first decode graph, then the dynamic decode graph
    decode = max(verify.states(), key=lambda st: st["calls"])
    assert decode["status"] == "passed" and decode["checked"] >= 1 and not decode["fallback"], decode
    _noisy_scores(monkeypatch)
    caught_at = None
    for t in range(PROMPT + 3, PROMPT + 3 + N):
        reference = copy.deepcopy(cache)  # the same compressed state for HF's eager model (dense fallback)
        out = _step(compiled, ids, t, cache)
        if decode["fallback"] and caught_at is None:
            caught_at = t - (PROMPT + 3) + 1
            assert torch.equal(out, _step(model, ids, t, reference))  # the original graph's answer
    assert caught_at is not None and caught_at <= N, decode
    assert decode["events"][-1]["action"] == "fallback"
    reference = copy.deepcopy(cache)
    t = PROMPT + 3 + N
    assert torch.equal(_step(compiled, ids, t, cache), _step(model, ids, t, reference))  # stays on the original


@pytest.mark.parametrize("where", ["attention", "encode"])
def test_an_op_that_raises_at_launch_leaves_the_cache_unchanged(model, ids, monkeypatch, where):
    compiled = _compile(model)
    steps = G - (PROMPT % G) - 1  # the next step completes a group: the append encodes it
    cache = _prefill(compiled, model, ids, steps)
    keys = polar_keys_in(cache)
    before = [(k, k.dequantize()) for k in keys]
    length = cache.get_seq_length()

    def launch_failure(*args, **kwargs):
        raise RuntimeError("injected launch failure")

    with monkeypatch.context() as mp:
        mp.setattr(codec, "attention" if where == "attention" else "encode_groups", launch_failure)
        with pytest.raises(RuntimeError, match="injected launch failure"):
            _step(compiled, ids, PROMPT + steps, cache)
    assert cache.get_seq_length() == length
    for layer, (k, dense) in zip(cache.layers, before):
        assert layer.keys is k and torch.equal(layer.keys.dequantize(), dense)
    reference = copy.deepcopy(cache)
    assert torch.equal(_step(compiled, ids, PROMPT + steps, cache), _step(compiled, ids, PROMPT + steps, reference))
