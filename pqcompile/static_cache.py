"""The compressed key cache in preallocated buffers: PolarStaticCache (a transformers StaticCache) and
StaticPolarKeys, the tensor its layers hold instead of the dense [B, H, max_cache_len, D] key buffer.

Nothing changes shape from step to step, so one compiled decode graph serves every step (CUDA-graph
friendly). Inner tensors, allocated once (Tcap = max_cache_len rounded up to the group size G):
  codes  uint8 [B, H, Tcap, NB]          packed codes of complete groups (codec.py layout)
  params bf16  [B, H, (Tcap/G)*4, P]     group parameters of complete groups
  ring   dtype [B, H, G, D]              the open group's tokens in full precision, slot = t % G
  length int64 [1]                       tokens written so far, read on the device
HF's own `index_copy_(2, positions, keys)` dispatches to an in-place write that fills the ring and encodes
a group when it completes; the attention pass routes SDPA over it to a polar op that reads `length`.

Recipe (two lines):
    cache = PolarStaticCache(config=model.config, max_cache_len=4096)
    model.generate(ids, cache=cache, ...)   # with model.compile(backend="polarquant")
(transformers before the 5.2x rename of the keyword: past_key_values=cache)
"""

from __future__ import annotations

import torch
import transformers

from . import cache, ops
from .cache import _dense_fallback
from .codec import Codec, Pairing
from .config import PairingMode, PolarQuantConfig

aten = torch.ops.aten


class StaticPolarKeys(torch.Tensor):
    codes: torch.Tensor
    params: torch.Tensor
    ring: torch.Tensor
    length: torch.Tensor
    codec: Codec

    @staticmethod
    def __new__(cls, codes, params, ring, length, codec, shape):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=ring.dtype, device=ring.device,
                                                   requires_grad=False)

    def __init__(self, codes, params, ring, length, codec, shape):
        self.codes, self.params, self.ring, self.length, self.codec = codes, params, ring, length, codec

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"StaticPolarKeys(shape={tuple(self.shape)}, dtype={self.dtype}, codec={self.codec!s})"

    def __tensor_flatten__(self):
        return ["codes", "params", "ring", "length"], self.codec

    @staticmethod
    def __tensor_unflatten__(inner, codec, outer_size, outer_stride):
        return StaticPolarKeys(inner["codes"], inner["params"], inner["ring"], inner["length"], codec, outer_size)

    @classmethod
    def zeros(cls, batch: int, heads: int, max_len: int, head_dim: int, dtype, device, codec: Codec):
        G = codec.group_size
        cap = -(-max_len // G) * G
        return cls(torch.zeros(batch, heads, cap, codec.code_bytes(head_dim), dtype=torch.uint8, device=device),
                   torch.zeros(batch, heads, cap // G * 4, head_dim // 2, dtype=torch.bfloat16, device=device),
                   torch.zeros(batch, heads, G, head_dim, dtype=dtype, device=device),
                   torch.zeros(1, dtype=torch.int64, device=device),
                   codec, (batch, heads, max_len, head_dim))

    def inner(self) -> tuple:
        return self.codes, self.params, self.ring, self.length, *ops.codec_args(self.codec)

    def dequantize(self) -> torch.Tensor:
        """Dense [B, H, max_cache_len, D]: written tokens reconstructed, the rest zero."""
        return ops.static_decode(*self.inner(), self.shape[2])

    def nbytes_held(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.params, self.ring, self.length))

    @staticmethod
    def _length_view(x, dim=0, start=None, end=None, step=1) -> int | None:
        """aten.slice arguments of keys[:, :, :n] -> n (at most the logical length); anything else -> None."""
        if (isinstance(x, StaticPolarKeys) and dim in (2, -2) and start in (None, 0) and step == 1
                and isinstance(end, int) and end > 0):
            return min(end, x.shape[2])
        return None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.index_copy_.default and isinstance(args[0], StaticPolarKeys) and args[1] in (2, -2):
            keys, _, positions, new = args
            ops.static_write_(keys.codes, keys.params, keys.ring, keys.length, new, positions,
                              *ops.codec_args(keys.codec))
            return keys
        if func in (aten.detach.default, aten.alias.default):
            k = args[0]
            return StaticPolarKeys(k.codes, k.params, k.ring, k.length, k.codec, k.shape)
        if func is aten.copy_.default and isinstance(args[1], StaticPolarKeys):
            # AOTAutograd writes a mutated input back with copy_ (compiled graphs mutate the inner buffers)
            for dst, src in zip(args[0].inner()[:4], args[1].inner()[:4]):
                if dst is not src:
                    dst.copy_(src)
            return args[0]
        if func is aten.slice.Tensor and (n := cls._length_view(*args, **kwargs)) is not None:
            # keys[:, :, :n] (HF's eager sdpa slices a static cache to the written length): a shorter logical view
            k = args[0]
            return StaticPolarKeys(k.codes, k.params, k.ring, k.length, k.codec, (*k.shape[:2], n, k.shape[3]))
        if func is aten.index_select.default and isinstance(args[0], StaticPolarKeys) and args[1] == 0:
            # beam search (HF's reorder_cache): pick batch rows of every buffer; the length is shared by all rows
            k, _, idx = args
            return StaticPolarKeys(*(t.index_select(0, idx) for t in (k.codes, k.params, k.ring)), k.length,
                                   k.codec, (idx.shape[0], *k.shape[1:]))
        if func is aten.zero_.default:  # Cache.reset()
            for t in (args[0].codes, args[0].params, args[0].ring, args[0].length):
                t.zero_()
            return args[0]
        return _dense_fallback(func, args, kwargs)


cache.COMPRESSED_TYPES += (StaticPolarKeys,)


def static_write(keys: StaticPolarKeys, positions: torch.Tensor, new_keys: torch.Tensor) -> None:
    """What the rewritten graph calls for HF's keys.index_copy_(2, positions, new_keys)."""
    ops.static_write_(keys.codes, keys.params, keys.ring, keys.length, new_keys, positions,
                      *ops.codec_args(keys.codec))


static_write.mutates_inputs = True  # dead-code elimination must keep it (passes/common.py)


def polar_static_sdpa(q: torch.Tensor, keys: StaticPolarKeys, v: torch.Tensor, attn_mask=None, scale=None,
                      is_causal: bool = False):
    """Rewrite of SDPA over a StaticPolarKeys: q [B, Hq, S, D], v [B, Hkv|Hq, >= length, Dv] -> [B, Hq, S, Dv].
    is_causal aligns the S queries with the last S written tokens."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return ops.static_attention(q, *keys.inner()[:4], v, attn_mask, scale, is_causal, *ops.codec_args(keys.codec))


class PolarStaticCache(transformers.StaticCache):
    """A transformers StaticCache whose full-attention layers keep their keys compressed from the start
    (the dense key buffer is never allocated). Sliding-window layers stay dense StaticSlidingWindowLayers."""

    def __init__(self, config, max_cache_len: int, *, radius_bits: int = 4, angle_bits: int = 4,
                 group_size: int = 128, pairing: str = "half", **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        cfg = PolarQuantConfig(radius_bits=radius_bits, angle_bits=angle_bits, group_size=group_size,
                               pairing=pairing)
        if cfg.pairing is PairingMode.AUTO:
            raise ValueError("PolarStaticCache needs a concrete pairing ('half' or 'interleaved'): the buffers are "
                             "allocated before the compiler sees the graph")
        codec = Codec.from_config(cfg, Pairing(cfg.pairing))
        for i, layer in enumerate(self.layers):
            if type(layer) is transformers.cache_utils.StaticLayer:
                self.layers[i] = PolarStaticLayer(layer.max_cache_len, codec)


class PolarStaticLayer(transformers.cache_utils.StaticLayer):
    def __init__(self, max_cache_len: int, codec: Codec):
        super().__init__(max_cache_len=max_cache_len)
        self.codec = codec

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """As StaticLayer's, but the keys are a StaticPolarKeys: no dense key buffer is allocated. The wrapper is
        marked a static address too: AOTAutograd reads static inputs off the wrapper, not its inner tensors
        (unmarked, CUDA graphs skip the mutated cache). transformers 4.57 passes the keys only, 5.x keys and values."""
        value_states = key_states if value_states is None else value_states
        self.device = key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.v_head_dim, self.k_head_dim = value_states.shape[-1], key_states.shape[-1]
        # the names transformers 4.57 reads (Cache.max_batch_size in generate's cache reuse check)
        self.max_batch_size, self.head_dim, self.dtype = self.batch_size, self.k_head_dim, key_states.dtype
        self.keys = StaticPolarKeys.zeros(self.batch_size, self.num_heads, self.max_cache_len, self.k_head_dim,
                                          key_states.dtype, self.device, self.codec)
        self.values = torch.zeros(self.batch_size, self.num_heads, self.max_cache_len, self.v_head_dim,
                                  dtype=value_states.dtype, device=self.device)
        if hasattr(self, "cumulative_length"):
            self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for t in (self.keys, self.keys.codes, self.keys.params, self.keys.ring, self.keys.length, self.values):
                torch._dynamo.mark_static_address(t)
            if hasattr(self, "cumulative_length"):
                torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def get_seq_length(self):
        """Tokens written. transformers 5.x counts them in `cumulative_length`; 4.57's StaticLayer has no counter and
        counts the non-zero key rows, which on a StaticPolarKeys would dequantize the whole cache: read `length`."""
        if hasattr(self, "cumulative_length") or not self.is_initialized:
            return super().get_seq_length()
        return self.keys.length.sum()  # a fresh 0-d tensor (HF returns one too), not a view that later writes move
