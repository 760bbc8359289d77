"""Mixing and concurrency on the tiny embedded Llama (pqcompile.models.tiny_llama, peaked attention): two models
compiled with different options in one process, two threads decoding at once, fp32 / bf16 / fp16 models, beam
search and HF's prefix-cache reuse with compressed state. Greedy tokens are compared with the eager model's:
the codec's error at 4+4 bits leaves this model's argmax unchanged (docs/models.md: llama 64/64)."""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
import transformers

from pqcompile.cache import polar_keys_in
from pqcompile.hf_compat import cache_kw, cache_of
from pqcompile.models import tiny_llama
from pqcompile.values import polar_values_in

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py
PROMPT, NEW = 37, 12


def _model(dtype=torch.float32, seed=0):
    model = tiny_llama(layers=2, hidden=128, heads=4, kv_heads=2, qk_gain=3.0, dtype=dtype, seed=seed)
    model.generation_config.pad_token_id = 0
    return model


def _ids(n=PROMPT, seed=0, batch=1):
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              return_dict_in_generate=True, **kw)


def _compiled(options, dtype=torch.float32, seed=0):
    model = _model(dtype, seed)
    model.compile(backend="polarquant", options={"backend": "eager", **options})
    return model


OPTIONS_A = {"group_size": 16}
OPTIONS_B = {"group_size": 32, "radius_bits": 5, "angle_bits": 3, "value_bits": 8, "value_group": 16}


def test_two_models_with_different_options_in_one_process():
    """Each model gives the tokens it gives when compiled alone, and its own codec; both follow the eager model
    (the first tokens exactly: a later near-tie may flip under the codec's error)."""
    ids = _ids()
    solo = []
    for options in (OPTIONS_A, OPTIONS_B):
        torch._dynamo.reset()
        solo.append(_generate(_compiled(options), ids).sequences)
    torch._dynamo.reset()
    a, b = _compiled(OPTIONS_A), _compiled(OPTIONS_B)
    out_a, out_b = _generate(a, ids), _generate(b, ids)
    out_a2 = _generate(a, ids)  # after b compiled its graphs: a's guards still pick a's graphs
    ka, kb = polar_keys_in(cache_of(out_a)), polar_keys_in(cache_of(out_b))
    assert [k.codec.group_size for k in ka] == [16, 16] and [k.codec.group_size for k in kb] == [32, 32]
    assert kb[0].codec.radius_bits == 5 and len(polar_values_in(cache_of(out_b))) == 2
    assert not polar_values_in(cache_of(out_a2))  # b's options did not leak into a
    assert torch.equal(out_a.sequences, solo[0]) and torch.equal(out_a2.sequences, solo[0])
    assert torch.equal(out_b.sequences, solo[1])
    eager = _generate(_model(), ids).sequences
    for out in (out_a, out_b):
        assert torch.equal(out.sequences[:, : PROMPT + 6], eager[:, : PROMPT + 6])


def test_two_threads_decode_at_once():
    ids = [_ids(seed=1), _ids(PROMPT + 20, seed=2)]
    models = [_compiled(OPTIONS_A), _compiled(OPTIONS_B)]
    single = [_generate(m, i).sequences for m, i in zip(models, ids)]
    results, errors = [None, None], []
    barrier = threading.Barrier(2)

    def run(k):
        try:
            barrier.wait()
            for _ in range(2):
                results[k] = _generate(models[k], ids[k]).sequences
        except Exception as e:  # noqa: BLE001 (reported below, with the thread)
            errors.append((k, e))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(2):
        assert torch.equal(results[k], single[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dtypes_follow_the_eager_model(dtype):
    """Teacher-forced over the eager model's own tokens: logits cosine and top-1 agreement per step."""
    model = _model(dtype)
    ids = _generate(model, _ids(seed=3)).sequences
    compiled = torch.compile(model, backend="polarquant", options={"backend": "eager", "group_size": 16})
    logits = {}
    for name, fwd in (("eager", model), ("polar", compiled)):
        cache = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            fwd(ids[:, :PROMPT], **cache_kw(cache), use_cache=True)
            logits[name] = torch.stack([fwd(ids[:, t:t + 1], **cache_kw(cache), use_cache=True).logits[0, -1]
                                        for t in range(PROMPT, ids.shape[1])]).float()
        if name == "polar":
            keys = polar_keys_in(cache)
            assert len(keys) == 2 and keys[0].dtype == dtype
    cos = F.cosine_similarity(logits["polar"], logits["eager"], dim=-1)
    top1 = (logits["polar"].argmax(-1) == logits["eager"].argmax(-1)).float().mean()
    assert cos.min() > 0.99 and top1 >= 0.9, (cos.min().item(), top1.item())


def test_beam_search_with_compressed_state():
    ids = _ids(seed=4)
    compiled = _compiled({"group_size": 16})
    out = _generate(compiled, ids, num_beams=2)
    keys = polar_keys_in(cache_of(out))
    assert keys and keys[0].shape[0] == 2  # the beams' reorders kept the cache compressed
    assert torch.equal(out.sequences, _generate(_model(), ids, num_beams=2).sequences)


def test_prefix_cache_reused_for_two_continuations():
    """HF's documented pattern: prefill a shared prompt once, deep-copy the cache per continuation."""
    model = _compiled({"group_size": 16})
    prefix = _ids(PROMPT, seed=5)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(prefix, **cache_kw(cache), use_cache=True)
    assert len(polar_keys_in(cache)) == 2
    eager = _model()
    for seed in (6, 7):
        full = torch.cat([prefix, _ids(5, seed=seed)], dim=1)
        out = _generate(model, full, **cache_kw(copy.deepcopy(cache)))
        assert cache.get_seq_length() == PROMPT  # the shared prefix is untouched
        assert torch.equal(out.sequences, _generate(eager, full).sequences), seed


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the cache moves to the CPU and back")


def _decode(model, ids, cache, steps, between=None):
    """Greedy steps through `model` (compiled) on `cache`; `between(step, cache)` runs before each step."""
    tokens = []
    with torch.no_grad():
        logits = model(ids, **cache_kw(cache), use_cache=True).logits[:, -1]
        for step in range(steps):
            if between is not None:
                between(step, cache)
            tokens.append(logits.argmax(-1, keepdim=True))
            logits = model(tokens[-1], **cache_kw(cache), use_cache=True).logits[:, -1]
    return torch.cat(tokens, 1), logits


@CUDA
@pytest.mark.parametrize("options", [{"group_size": 16}, {"group_size": 16, "value_bits": 4, "value_group": 16}],
                         ids=["keys", "keys-values"])
def test_cache_offloaded_to_cpu_and_back_mid_generation(options):
    """HF's layer offload() / prefetch() (what DynamicCache(offloading=True) calls) on every layer between two steps,
    after the prompt's groups were encoded and before the next group boundary is crossed: the compressed state
    stays compressed on the CPU and the generation continues bit for bit as if it had never moved."""
    model = _model().cuda()
    compiled = torch.compile(model, backend="polarquant", options={"backend": "eager", **options})
    ids = _ids(seed=8).cuda()
    steps, move_at = 2 * NEW, 5  # 37 + 24 tokens cross the group boundaries at 48

    def move(step, cache):
        if step != move_at:
            return
        for layer in cache.layers:
            layer.offload()
        torch.cuda.synchronize()
        keys = polar_keys_in(cache)
        assert len(keys) == 2 and all(k.device.type == "cpu" for k in keys)
        if "value_bits" in options:
            assert all(v.device.type == "cpu" for v in polar_values_in(cache))
        for layer in cache.layers:
            layer.prefetch()

    ref_tokens, ref_logits = _decode(compiled, ids, transformers.DynamicCache(config=model.config), steps)
    cache = transformers.DynamicCache(config=model.config)
    tokens, logits = _decode(compiled, ids, cache, steps, between=move)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(logits, ref_logits)
    keys = polar_keys_in(cache)
    assert len(keys) == 2 and all(k.device.type == "cuda" for k in keys)
    assert cache.get_seq_length() == PROMPT + steps


OFFLOADED_GENERATE = """
import torch
from pqcompile.backend import polarquant
from pqcompile.cache import polar_keys_in
from pqcompile.hf_compat import cache_of
from pqcompile.models import tiny_llama
model = tiny_llama(layers=2, hidden=128, heads=4, kv_heads=2, qk_gain=3.0).cuda()
model.generation_config.pad_token_id = 0
ids = torch.randint(0, 256, (1, 37), generator=torch.Generator().manual_seed(9)).cuda()
kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, cache_implementation="offloaded",
          return_dict_in_generate=True)
eager = model.generate(ids, **kw).sequences
model.compile(backend=polarquant, options={"backend": "eager", "group_size": 16})
out = model.generate(ids, **kw)
print("compressed", bool(polar_keys_in(cache_of(out))), "same", torch.equal(out.sequences[:, :43], eager[:, :43]))
"""


@CUDA
def test_offloaded_dynamic_cache_generates_the_eager_tokens():
    """generate(cache_implementation="offloaded"): HF moves each layer to the CPU after its update and prefetches
    the next one on a side stream, inside the compiled forward. In a subprocess: on the H200 (torch 2.11) the
    process died with SIGSEGV inside dynamo (graph_bytecode_inputs.store_user_object_weakrefs, resuming in HF's
    offloading update), which would take the test worker down with it (docs/reliability.md)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", OFFLOADED_GENERATE], capture_output=True, text=True, env=env,
                         timeout=600, check=False)
    if run.returncode == -11:
        pytest.xfail("SIGSEGV inside dynamo under HF's offloaded cache (torch 2.11, H200, 2026-12-02)")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "compressed True same True" in run.stdout, run.stdout
