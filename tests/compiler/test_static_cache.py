"""The static path: PolarStaticCache keeps compressed buffers; one compiled graph serves every decode step.

CI runs transformers 5.x (StaticLayer counts with a `cumulative_length` tensor); transformers 4.57 (no counter, the
model takes `cache_position` and passes it to index_copy_) is covered by the same tests, run in a 4.57 venv."""

import inspect

import pytest
import torch
import torch.nn.functional as F
import transformers

from pqcompile import counters, static_cache
from pqcompile.hf_compat import cache_kw
from pqcompile.models import tiny_llama
from pqcompile.static_cache import PolarStaticCache, StaticPolarKeys

G, MAX_LEN, PROMPT, STEPS = 16, 128, 40, 64


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2, hidden=256, heads=8, kv_heads=2, qk_gain=3.0)


# transformers 4.57: without cache_position the model computes it from get_seq_length(), a tensor -> a graph break
# in torch.arange (HF's dense StaticCache too); generate passes it, so does a decode loop. 5.x has no such argument.
TAKES_CACHE_POSITION = "cache_position" in inspect.signature(transformers.LlamaModel.forward).parameters


def _positions(start: int, stop: int) -> dict:
    return {"cache_position": torch.arange(start, stop)} if TAKES_CACHE_POSITION else {}


def _decode(forward, cache, ids):
    out = forward(ids[:, :PROMPT], **cache_kw(cache), use_cache=True, **_positions(0, PROMPT))
    logits = [out.logits[0, -1]]
    for t in range(PROMPT, PROMPT + STEPS):
        step = forward(ids[:, t:t + 1], **cache_kw(cache), use_cache=True, **_positions(t, t + 1))
        logits.append(step.logits[0, -1])
    return torch.stack(logits)


@torch.no_grad()
def test_one_graph_for_all_decode_steps_and_matches_eager(model):
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + STEPS))
    compiled = torch.compile(model, backend="polarquant")
    polar_cache = PolarStaticCache(config=model.config, max_cache_len=MAX_LEN, group_size=G)
    polar = _decode(compiled, polar_cache, ids)
    assert counters.totals["graphs"] == 2  # prefill + one decode graph for all 64 steps
    assert counters.totals["rewritten_static"] == 2 * model.config.num_hidden_layers
    assert counters.totals["sites_declined"] == 0
    # the same compressed cache run eagerly (dispatch-level ops) gives the same numbers
    eager_polar = _decode(model, PolarStaticCache(config=model.config, max_cache_len=MAX_LEN, group_size=G), ids)
    torch.testing.assert_close(polar, eager_polar, rtol=1e-4, atol=1e-4)
    # and stays close to the dense model
    dense = _decode(model, transformers.StaticCache(config=model.config, max_cache_len=MAX_LEN), ids)
    cos = F.cosine_similarity(polar, dense, dim=-1).mean().item()
    top1 = (polar.argmax(-1) == dense.argmax(-1)).float().mean().item()
    assert cos >= 0.99 and top1 >= 0.85, (cos, top1)


@torch.no_grad()
def test_holds_no_dense_key_buffer(model):
    cache = PolarStaticCache(config=model.config, max_cache_len=1024, group_size=128)
    model(torch.randint(0, 256, (1, 8)), **cache_kw(cache), use_cache=True)
    for layer in cache.layers:
        keys = layer.keys
        assert isinstance(keys, StaticPolarKeys) and keys.shape == (1, 2, 1024, 32)
        dense = keys.numel() * keys.element_size()  # the fp32 buffer a StaticCache would allocate
        inner = keys.nbytes_held()
        # codes 1 B/pair + bf16 params 4 per group-pair + one group of fp32 ring: 0.27x + ring
        expected = 1 * 2 * (1024 * 16 + 8 * 4 * 16 * 2 + 128 * 32 * 4) + 8  # + the int64 length
        assert inner == expected and inner < 0.30 * dense


@torch.no_grad()
def test_seq_length_reads_the_written_length_without_dequantizing(model, monkeypatch):
    """get_seq_length: 5.x reads StaticLayer's cumulative_length; 4.57 counts non-zero key rows, which on a
    StaticPolarKeys would dequantize the whole cache, so PolarStaticLayer reads the length buffer instead."""
    cache = PolarStaticCache(config=model.config, max_cache_len=MAX_LEN, group_size=G)
    assert cache.get_seq_length() == 0
    ids = torch.randint(0, 256, (1, PROMPT + 1))

    def no_dequantize(keys):
        raise AssertionError("get_seq_length dequantized the keys")

    for start, stop in ((0, PROMPT), (PROMPT, PROMPT + 1)):
        model(ids[:, start:stop], **cache_kw(cache), use_cache=True, **_positions(start, stop))
        with monkeypatch.context() as patch:
            patch.setattr(StaticPolarKeys, "dequantize", no_dequantize)
            assert int(cache.get_seq_length()) == stop


@torch.no_grad()
def test_generate_with_compiled_model_and_capacity_error(model):
    compiled = tiny_llama(layers=2, hidden=256, heads=8, kv_heads=2, qk_gain=3.0)
    compiled.compile(backend="polarquant")
    ids = torch.randint(0, 256, (1, PROMPT))
    cache = PolarStaticCache(config=model.config, max_cache_len=MAX_LEN, group_size=G)
    out = compiled.generate(ids, **cache_kw(cache), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert out.shape[1] == PROMPT + 32
    assert int(cache.layers[0].keys.length) == PROMPT + 31
    assert counters.totals["rewritten_static"] >= 2
    full = PolarStaticCache(config=model.config, max_cache_len=PROMPT, group_size=G)
    model(ids, **cache_kw(full), use_cache=True)
    with pytest.raises(IndexError, match="out of bounds"):
        model(ids[:, :1], **cache_kw(full), use_cache=True)


@torch.no_grad()
def test_dense_static_cache_is_declined_with_a_reason(model):
    compiled = torch.compile(model, backend="polarquant")
    cache = transformers.StaticCache(config=model.config, max_cache_len=MAX_LEN)
    ids = torch.randint(0, 256, (1, 12))
    out = compiled(ids, **cache_kw(cache), use_cache=True)
    torch.testing.assert_close(out.logits, model(ids, **cache_kw(transformers.StaticCache(
        config=model.config, max_cache_len=MAX_LEN)), use_cache=True).logits, rtol=1e-4, atol=1e-4)
    assert counters.totals["sites_rewritten"] == 0
    assert all("PolarStaticCache" in reason for _, _, _, reason, _ in counters.graphs[0]["sites"])


@torch.no_grad()
def test_left_padded_batch_matches_eager(model):
    """generate on a left-padded batch: the padding rows of the prompt see no key at all. The compiled static path
    must give them SDPA's zeros, not NaN (NaN reached the real rows through the padded values in layer 2)."""
    compiled = tiny_llama(layers=2, hidden=256, heads=8, kv_heads=2, qk_gain=3.0)
    compiled.compile(backend="polarquant")
    ids = torch.randint(1, model.config.vocab_size, (2, PROMPT))
    att = torch.ones_like(ids)
    att[1, :7] = 0
    kw = {"attention_mask": att, "max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False, "pad_token_id": 0,
          "output_logits": True, "return_dict_in_generate": True}
    outs = [m.generate(ids, **cache_kw(PolarStaticCache(config=model.config, max_cache_len=MAX_LEN, group_size=G)),
                       **kw) for m in (compiled, model)]
    assert counters.totals["rewritten_static"] >= 2
    got, want = (torch.stack(o.logits, 1) for o in outs)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_beam_search_keeps_the_cache_compressed(model):
    """HF's reorder_cache index_selects the keys along the batch: StaticPolarKeys picks rows of every buffer
    (before, the dense fallback silently replaced the compressed cache by dense keys)."""
    compiled = tiny_llama(layers=2, hidden=256, heads=8, kv_heads=2, qk_gain=3.0)
    compiled.compile(backend="polarquant")
    ids = torch.randint(1, model.config.vocab_size, (1, PROMPT))
    kw = {"num_beams": 3, "max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False, "output_scores": True,
          "return_dict_in_generate": True}
    caches = [PolarStaticCache(config=model.config, max_cache_len=MAX_LEN, group_size=G) for _ in range(2)]
    outs = [m.generate(ids, **cache_kw(c), **kw) for m, c in zip((compiled, model), caches)]
    assert all(isinstance(layer.keys, StaticPolarKeys) for c in caches for layer in c.layers)
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for got, want in zip(outs[0].scores, outs[1].scores):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)


def test_length_slice_is_a_compressed_view():
    """HF's eager sdpa reads keys[:, :, :n]: a StaticPolarKeys view of n tokens (only n are dequantized by the
    dense fallback after it), equal to slicing the dense reconstruction, also past the written length."""
    c = static_cache.Codec(4, 4, G, static_cache.Pairing())
    keys = StaticPolarKeys.zeros(1, 2, 64, 32, torch.float32, "cpu", c)
    keys.index_copy_(2, torch.arange(40), torch.randn(1, 2, 40, 32))
    full = keys.dequantize()
    for n in (20, 40, 50):
        view = keys[:, :, :n]
        assert isinstance(view, StaticPolarKeys) and view.shape == (1, 2, n, 32) and view.codes is keys.codes
        assert torch.equal(view.dequantize(), full[:, :, :n])


def test_deepcopy_of_a_static_cache_owns_its_buffers(model):
    """A prompt cache copied per continuation (copy.deepcopy, HF's pattern): the copy reads the same, writes apart."""
    import copy

    cache = PolarStaticCache(config=model.config, max_cache_len=64, group_size=G, value_bits=4, value_group=16)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(ids[:, :37], **cache_kw(cache), use_cache=True)
        twin = copy.deepcopy(cache)
        for a, b in ((cache.layers[0].keys, twin.layers[0].keys), (cache.layers[0].values, twin.layers[0].values)):
            assert type(a) is type(b) and a.codes.data_ptr() != b.codes.data_ptr()
            assert torch.equal(a.dequantize(), b.dequantize())
        model(ids[:, 37:40], **cache_kw(twin), use_cache=True)
    assert int(cache.layers[0].keys.length) == 37 and int(twin.layers[0].keys.length) == 40


def test_every_buffer_is_a_static_address(model):
    """CUDA graphs need the mutated cache buffers marked static: AOTAutograd reads that off the StaticPolarKeys
    wrapper itself (dynamo's input), not off its inner tensors; unmarked, inductor skips the graph."""
    cache = PolarStaticCache(config=model.config, max_cache_len=MAX_LEN, group_size=G)
    cfg = model.config
    cache.early_initialization(1, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, torch.float32,
                               torch.device("cpu"))
    for layer in cache.layers:
        keys = layer.keys
        for t in (keys, keys.codes, keys.params, keys.ring, keys.length, layer.values):
            assert getattr(t, "_dynamo_static_input_type", None) is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.no_grad()
def test_cuda_graphs_give_the_same_tokens_as_no_graphs():
    """mode="reduce-overhead": the static write and attention kernels read positions and length on the device, so
    the decode step is captured once and replayed; greedy tokens equal the run without graphs. Each mode starts
    with the kernels' device constants uncreated, as a fresh process does: created at the first launch, they
    landed in the graph tree's warm-up pool and inductor refused the run (reliability finding 16). The cache is
    initialized before the compiled prefill: HF's StaticCache initialized inside a reduce-overhead prefill crashes
    plain inductor too (SIGSEGV, H200, torch 2.11; finding 16)."""
    from torch._dynamo.utils import counters as dynamo_counters

    from pqcompile.kernels import common

    gpu = tiny_llama(layers=2, hidden=256, heads=8, kv_heads=2, qk_gain=3.0).cuda()
    ids = torch.randint(0, gpu.config.vocab_size, (1, PROMPT), device="cuda")
    tokens = {}
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        dynamo_counters.clear()
        common.pair_index.cache_clear()
        forward = torch.compile(gpu, backend="polarquant", mode=mode)
        for _ in range(3):  # CUDA-graph trees: warm-up, record, replay
            cache = PolarStaticCache(config=gpu.config, max_cache_len=MAX_LEN, group_size=G)
            cfg = gpu.config  # buffers allocated (and marked static) outside the compiled prefill
            cache.early_initialization(1, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                                       torch.float32, torch.device("cuda"))
            tok = forward(ids, **cache_kw(cache), use_cache=True).logits[:, -1:].argmax(-1)
            out = [tok]
            for t in range(PROMPT, PROMPT + 32):
                pos = torch.full((1, 1), t, device="cuda")
                tok = forward(tok, **cache_kw(cache), position_ids=pos, use_cache=True).logits[:, -1:].argmax(-1)
                out.append(tok)
        tokens[mode] = torch.cat(out, 1)
        if mode:
            assert dynamo_counters["inductor"]["cudagraph_skips"] == 0
    assert torch.equal(tokens[None], tokens["reduce-overhead"])
