"""Peak memory of a compiled decode step on the dynamic path (CPU allocator events through the profiler): the
step appends in place, so its extra memory does not grow with the history; a dense compiled step's does."""

import pytest
import torch
import transformers

from pqcompile.cache import PolarKeys
from pqcompile.dense_values import DenseValues
from pqcompile.hf_compat import cache_kw
from pqcompile.models import tiny_llama
from pqcompile.values import PolarValues

G = 64


def _peak_bytes(fn) -> int:
    """Largest number of bytes allocated at once during fn(), above what was allocated before it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0  # each event's own allocations and frees (ops' self usage, and the bare [memory] events)
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def _decode_peaks(forward, contexts, vocab):
    """Prefill `max(contexts)` tokens' worth in pieces; the peak of one decode step at each context."""
    cache = transformers.DynamicCache()
    ids = torch.randint(0, vocab, (1, max(contexts) + 4), generator=torch.Generator().manual_seed(0))
    peaks, at = {}, 0
    with torch.no_grad():
        forward(ids[:, :contexts[0]], **cache_kw(cache), use_cache=True)
        at = contexts[0]
        for ctx in contexts:
            if ctx > at:  # teacher-forced chunk: the same compiled graph serves any length
                forward(ids[:, at:ctx], **cache_kw(cache), use_cache=True)
                at = ctx
            forward(ids[:, at: at + 1], **cache_kw(cache), use_cache=True)  # warm: compiled, reserved
            at += 1
            peaks[ctx] = _peak_bytes(lambda a=at: forward(ids[:, a: a + 1], **cache_kw(cache), use_cache=True))
            at += 1
    return peaks, cache


@pytest.mark.parametrize("value_bits", [None, 4])
def test_decode_step_peak_does_not_grow_with_the_history(value_bits):
    model = tiny_llama(layers=2, hidden=128, heads=4, kv_heads=2)
    kv_per_token = 2 * model.config.num_hidden_layers * 2 * 32 * 4  # K and V, fp32, Hkv 2, D 32
    short, long = 300, 2300
    polar = torch.compile(model, backend="polarquant", options={"group_size": G, "value_bits": value_bits,
                                                                 "value_group": 16})
    peaks, cache = _decode_peaks(polar, [short, long], model.config.vocab_size)
    values = cache.layers[0].values
    assert isinstance(values, DenseValues if value_bits is None else PolarValues)
    dense = torch.compile(model)  # inductor with HF's own cache: every layer's K and V rebuilt per step
    torch._dynamo.reset()
    dense_peaks, _ = _decode_peaks(dense, [short, long], model.config.vocab_size)
    history = (long - short) * kv_per_token
    dense_growth = dense_peaks[long] - dense_peaks[short]
    growth = peaks[long] - peaks[short]
    assert dense_growth > 0.9 * history, (dense_peaks, history)  # the measurement sees a history copy
    assert growth < 0.02 * history, (peaks, history)  # O(one token + one group per layer), not O(history)



@pytest.mark.parametrize("value_bits", [None, 4])
def test_growth_between_steps_frees_each_buffer_before_the_next(monkeypatch, value_bits):
    """The growth after a step (dynamic.reserve_all) replaces one buffer at a time, and by the time it hands the
    freed memory back (release_freed: empty_cache on CUDA) no tensor holds the old buffer's storage any more: not
    the step's input or output wrapper (distinct tensors that share it), not dynamo's tracing garbage from the
    graph's compile (the first decode step's state); so the step that grows peaks one buffer above the others."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from pqcompile import dynamic

    model = tiny_llama(layers=4, hidden=128, heads=4, kv_heads=2)
    polar = torch.compile(model, backend="polarquant", options={"group_size": G, "value_bits": value_bits,
                                                                 "value_group": 16})
    cache = transformers.DynamicCache()
    ids = torch.randint(0, model.config.vocab_size, (1, 1100), generator=torch.Generator().manual_seed(1))
    old, releases = [], []

    def watch(cls):  # every buffer a growth replaces, by its storage
        reserve = cls.reserve

        def spy(self, tokens=None):
            old.append(StorageWeakRef(self.held_buffers()[0].untyped_storage()))
            return reserve(self, tokens)
        monkeypatch.setattr(cls, "reserve", spy)

    watch(DenseValues if value_bits is None else PolarValues)
    watch(PolarKeys)
    monkeypatch.setattr(dynamic, "release_freed", lambda nbytes, device: releases.append(
        (nbytes, [not w.expired() for w in old[-1:]])))
    with torch.no_grad():
        polar(ids[:, :1000], **cache_kw(cache), use_cache=True)
        for t in range(1000, 1100):  # capacity 1024 from the prompt: the buffers grow at the flush of 1024
            old.clear()
            polar(ids[:, t: t + 1], **cache_kw(cache), use_cache=True)
    layers = len(cache.layers)
    assert len(releases) >= 2 * layers, releases  # keys and values of every layer grew at least once
    assert all(nbytes > 0 for nbytes, _ in releases)
    assert not any(alive for _, still in releases for alive in still), releases
