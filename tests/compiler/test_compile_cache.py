"""A warm start reuses AOTAutograd's disk cache for the rewritten graphs (they call pqcompile's Python functions,
which that cache refuses unless marked, and their compressed inputs have symbolic inner sizes, which torch's default
key for a subclass input cannot pickle), under keys that tell codecs apart: a different codec must miss."""

import pytest
import torch
import transformers
from torch._dynamo.utils import counters as dynamo_counters
from torch._inductor import utils as inductor_utils

from pqcompile import PolarStaticCache
from pqcompile.backend import cache_marks
from pqcompile.hf_compat import cache_kw
from pqcompile.models import tiny_llama

pytestmark = pytest.mark.skipif(not getattr(torch._functorch.config, "enable_autograd_cache", False),
                                reason="this torch has no AOTAutograd disk cache")
PROMPT = 300  # two whole groups of 128 tokens are quantized; the rest is the full-precision tail


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=1, hidden=128, heads=4, kv_heads=2, qk_gain=3.0)


def _fresh_cache():
    return (getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache)()


@torch.no_grad()
def _prefill_and_decode(model, options, make_cache):
    """A fresh dynamo; prefill + one decode step. Returns (decode logits, AOTAutograd cache hits, bypasses)."""
    torch._dynamo.reset()
    dynamo_counters.clear()
    torch.manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + 1))
    cache = make_cache(model.config)
    compiled = torch.compile(model, backend="polarquant", options=options)
    positions = torch.arange(PROMPT + 1)[None]
    compiled(ids[:, :PROMPT], **cache_kw(cache), use_cache=True, position_ids=positions[:, :PROMPT])
    logits = compiled(ids[:, PROMPT:], **cache_kw(cache), use_cache=True, position_ids=positions[:, PROMPT:]).logits
    aot = dynamo_counters["aot_autograd"]
    return logits, aot["autograd_cache_hit"], aot["autograd_cache_bypass"]


def _dynamic(config):
    return transformers.DynamicCache(config=config)


def _static(bits):
    def make(config):
        cache = PolarStaticCache(config=config, max_cache_len=PROMPT + 8, radius_bits=bits, angle_bits=bits)
        cache.early_initialization(1, config.num_key_value_heads, config.hidden_size // config.num_attention_heads,
                                   torch.float32, torch.device("cpu"))
        return cache

    return make


def test_dynamic_cache_graphs_are_reused_and_codecs_miss(model):
    with _fresh_cache():
        cold, hits, bypassed = _prefill_and_decode(model, {"radius_bits": 4, "angle_bits": 4}, _dynamic)
        assert (hits, bypassed) == (0, 0)
        warm, hits, bypassed = _prefill_and_decode(model, {"radius_bits": 4, "angle_bits": 4}, _dynamic)
        assert (hits, bypassed) == (2, 0)  # the prefill graph and the decode graph
        assert torch.equal(warm, cold)
        other, hits, _ = _prefill_and_decode(model, {"radius_bits": 3, "angle_bits": 3}, _dynamic)
        assert hits == 0
        assert not torch.allclose(other, cold)


def test_static_cache_codec_is_part_of_the_key(model):
    """The backend's options are the same; only the cache's codec differs (it reaches the graph as the compressed
    inputs' metadata, not as graph code)."""
    with _fresh_cache():
        four, hits, bypassed = _prefill_and_decode(model, {}, _static(4))
        assert bypassed == 0
        again, hits, _ = _prefill_and_decode(model, {}, _static(4))
        assert hits >= 1 and torch.equal(again, four)
        three, hits, _ = _prefill_and_decode(model, {}, _static(3))
        assert hits == 0
        assert not torch.allclose(three, four)


def test_cache_marks_cover_the_rewritten_functions_and_the_inputs():
    """The marks name the rewrite's functions found in the graph, and their key changes with a compressed input's
    codec."""
    from pqcompile import static_cache
    from pqcompile.config import PolarQuantConfig

    graph = torch.fx.Graph()
    k, pos, new = (graph.placeholder(n) for n in ("k", "pos", "new"))
    graph.call_function(static_cache.static_write, (k, pos, new))
    graph.output(None)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    cfg = PolarQuantConfig()

    def keys(bits):
        cache = _static(bits)(tiny_llama(layers=1, hidden=64, heads=2, kv_heads=1).config)
        return cache.layers[0].keys

    marks4, marks3 = cache_marks(gm, [keys(4)], cfg), cache_marks(gm, [keys(3)], cfg)
    assert list(marks4) == ["pqcompile.static_cache.static_write"]
    assert marks4 != marks3 and marks4 == cache_marks(gm, [keys(4)], cfg)
    plain = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    assert cache_marks(plain, [], cfg) == {}
