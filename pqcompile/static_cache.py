"""The compressed key cache in preallocated buffers: PolarStaticCache (a transformers StaticCache) and
StaticPolarKeys, the tensor its layers hold instead of the dense [B, H, max_cache_len, D] key buffer, and, with
value_bits, StaticPolarValues instead of the value buffer (value_codec.py's state in the same four buffers).

Nothing changes shape from step to step, so one compiled decode graph serves every step (CUDA-graph
friendly). Inner tensors, allocated once (Tcap = max_cache_len rounded up to the group size G):
  codes  uint8 [B, H, Tcap, NB]          packed codes of complete groups (codec.py layout)
  params bf16  [B, H, (Tcap/G)*4, P]     group parameters of complete groups
  ring   dtype [B, H, G, D]              the open group's tokens in full precision, slot = t % G
  length int64 [1]                       tokens written so far, read on the device
HF's own `index_copy_(2, positions, keys)` dispatches to an in-place write that fills the ring and encodes
a group when it completes; the attention pass routes SDPA over it to a polar op that reads `length`.
The values' buffers are codes [B, H, Tcap, Dv*bits/8], params [B, H, Tcap, (Dv/cg)*2] (per token), ring
[B, H, G, Dv], length [1]; values.index_copy_ dispatches to static_write_values, and SDPA over both to
value_ops.static_attention_qv (which reads the values up to the keys' length).

Recipe (two lines):
    cache = PolarStaticCache(config=model.config, max_cache_len=4096)   # value_bits=4: values compressed too
    model.generate(ids, cache=cache, ...)   # with model.compile(backend="polarquant")
(transformers before the 5.2x rename of the keyword: past_key_values=cache)
"""

from __future__ import annotations

import warnings

import torch
import transformers

from . import ops, value_ops
from .codec import Codec, Pairing
from .compressed import CompressedTensor
from .config import PairingMode, PolarQuantConfig
from .value_codec import ValueCodec

aten = torch.ops.aten


class StaticCompressed(CompressedTensor):
    """Preallocated compressed buffers of logical shape [B, H, max_cache_len, D]: codes / params of complete groups,
    the open group in `ring` (token t at slot t % G), the tokens written in `length` (on the device). A subclass
    gives `write(positions, new)` (HF's index_copy_) and `dequantize()`; the ops below serve both."""

    inner_names = ("codes", "params", "ring", "length")
    dtype_from = "ring"
    codes: torch.Tensor
    params: torch.Tensor
    ring: torch.Tensor
    length: torch.Tensor

    def write(self, positions: torch.Tensor, new: torch.Tensor) -> None:
        raise NotImplementedError


class StaticPolarKeys(StaticCompressed):
    codec: Codec

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

    def write(self, positions: torch.Tensor, new: torch.Tensor) -> None:
        static_write(self, positions, new)


class StaticPolarValues(StaticCompressed):
    """The values of a PolarStaticCache layer built with value_bits: value_codec.py's state in preallocated
    buffers (codes [B, H, Tcap, NBv], params [B, H, Tcap, (Dv/cg)*2], ring [B, H, G, Dv], length [1])."""

    codec: ValueCodec

    @classmethod
    def zeros(cls, batch: int, heads: int, max_len: int, head_dim: int, dtype, device, codec: ValueCodec):
        G = codec.group_size
        cap = -(-max_len // G) * G
        return cls(torch.zeros(batch, heads, cap, codec.code_bytes(head_dim), dtype=torch.uint8, device=device),
                   torch.zeros(batch, heads, cap, codec.num_groups(head_dim) * 2, dtype=torch.bfloat16,
                               device=device),
                   torch.zeros(batch, heads, G, head_dim, dtype=dtype, device=device),
                   torch.zeros(1, dtype=torch.int64, device=device),
                   codec, (batch, heads, max_len, head_dim))

    def inner(self) -> tuple:
        return self.codes, self.params, self.ring, self.length, *value_ops.vcodec_args(self.codec)

    def dequantize(self) -> torch.Tensor:
        """Dense [B, H, max_cache_len, Dv]: written tokens reconstructed, the rest zero."""
        return value_ops.static_decode_values(*self.inner(), self.shape[2])

    def write(self, positions: torch.Tensor, new: torch.Tensor) -> None:
        static_write_values(self, positions, new)


# The buffers are allocated once and marked static (PolarStaticLayer): the ops below write into them or wrap the
# same tensor objects again; only beam search's index_select makes new ones.


@StaticCompressed.implements(aten.index_copy_.default)
def _index_copy_(func, x, dim, positions, new):
    """HF's StaticLayer.update: x.index_copy_(2, positions, new) fills the ring, encodes completed groups."""
    if not isinstance(x, StaticCompressed) or dim not in (2, -2):
        return NotImplemented
    x.write(positions, new)
    return x


@StaticCompressed.implements(aten.detach.default, aten.alias.default)
def _alias(func, x):
    return x.rewrap()


@StaticCompressed.implements(aten.clone.default)
def _clone(func, x, memory_format=None):
    """A copy with its own buffers (copy.deepcopy of a PolarStaticCache, e.g. a prompt cache reused per request)."""
    return x.rewrap(**{name: t.clone() for name, t in zip(x.inner_names, x.inner_tensors())})


@StaticCompressed.implements(aten.slice.Tensor)
def _slice(func, x, dim=0, start=None, end=None, step=1):
    """x[:, :, :n] (HF's eager sdpa slices a static cache to the written length): a shorter logical view."""
    if not (dim in (2, -2) and start in (None, 0) and step == 1 and isinstance(end, int) and end > 0):
        return NotImplemented
    return x.rewrap(shape=(*x.shape[:2], min(end, x.shape[2]), x.shape[3]))


@StaticCompressed.implements(aten.index_select.default)
def _index_select(func, x, dim, idx):
    """Beam search (HF's reorder_cache): pick batch rows of every buffer; the length is shared by all rows."""
    if not isinstance(x, StaticCompressed) or dim != 0:
        return NotImplemented
    codes, params, ring = (t.index_select(0, idx) for t in (x.codes, x.params, x.ring))
    return x.rewrap(codes=codes, params=params, ring=ring, shape=(idx.shape[0], *x.shape[1:]))


@StaticCompressed.implements(aten.zero_.default)
def _zero_(func, x):
    """Cache.reset()."""
    for t in x.inner_tensors():
        t.zero_()
    return x


def static_write(keys: StaticPolarKeys, positions: torch.Tensor, new_keys: torch.Tensor) -> None:
    """What the rewritten graph calls for HF's keys.index_copy_(2, positions, new_keys)."""
    ops.static_write_(keys.codes, keys.params, keys.ring, keys.length, new_keys, positions,
                      *ops.codec_args(keys.codec))


static_write.mutates_inputs = True  # dead-code elimination must keep it (passes/common.py)


def static_write_values(values: StaticPolarValues, positions: torch.Tensor, new_values: torch.Tensor) -> None:
    """What the rewritten graph calls for HF's values.index_copy_(2, positions, new_values)."""
    value_ops.static_write_values_(values.codes, values.params, values.ring, values.length, new_values, positions,
                             *value_ops.vcodec_args(values.codec))


static_write_values.mutates_inputs = True


def polar_static_sdpa(q: torch.Tensor, keys: StaticPolarKeys, v: torch.Tensor, attn_mask=None, scale=None,
                      is_causal: bool = False):
    """Rewrite of SDPA over a StaticPolarKeys: q [B, Hq, S, D], v [B, Hkv|Hq, >= length, Dv] or a
    StaticPolarValues [B, Hkv, max_cache_len, Dv] -> [B, Hq, S, Dv]. is_causal aligns the S queries with the
    last S written tokens."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if isinstance(v, StaticPolarValues):
        return value_ops.static_attention_qv(q, *keys.inner()[:4], *v.inner()[:3], attn_mask, scale, is_causal,
                                       *ops.codec_args(keys.codec), *value_ops.vcodec_args(v.codec))
    return ops.static_attention(q, *keys.inner()[:4], v, attn_mask, scale, is_causal, *ops.codec_args(keys.codec))


class PolarStaticCache(transformers.StaticCache):
    """A transformers StaticCache whose full-attention layers keep their keys compressed from the start
    (the dense key buffer is never allocated), and their values too when `value_bits` is 2, 4 or 8 (a value
    head dim that `value_group` does not divide keeps that layer's values dense, with a warning). Sliding-window
    layers stay dense StaticSlidingWindowLayers."""

    def __init__(self, config, max_cache_len: int, *, radius_bits: int = 4, angle_bits: int = 4,
                 group_size: int = 128, pairing: str = "half", codec: str = "polar-hybrid", value_bits: int | None = None,
                 value_group: int = 64, **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        cfg = PolarQuantConfig(radius_bits=radius_bits, angle_bits=angle_bits, group_size=group_size,
                               pairing=pairing, codec=codec, value_bits=value_bits, value_group=value_group)
        if cfg.pairing is PairingMode.AUTO:
            raise ValueError("PolarStaticCache needs a concrete pairing ('half' or 'interleaved'): the buffers are "
                             "allocated before the compiler sees the graph")
        key_codec = Codec.from_config(cfg, Pairing(cfg.pairing))
        vcodec = ValueCodec.from_config(cfg)
        for i, layer in enumerate(self.layers):
            if type(layer) is transformers.cache_utils.StaticLayer:
                self.layers[i] = PolarStaticLayer(layer.max_cache_len, key_codec, vcodec)


class PolarStaticLayer(transformers.cache_utils.StaticLayer):
    def __init__(self, max_cache_len: int, codec: Codec, vcodec: ValueCodec | None = None):
        super().__init__(max_cache_len=max_cache_len)
        self.codec, self.vcodec = codec, vcodec

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """As StaticLayer's, but the keys are a StaticPolarKeys (and the values a StaticPolarValues when the cache
        has a value codec that fits): no dense buffer is allocated for them. The wrappers are marked static
        addresses too: AOTAutograd reads static inputs off the wrapper, not its inner tensors (unmarked, CUDA
        graphs skip the mutated cache). transformers 4.57 passes the keys only, 5.x keys and values."""
        value_states = key_states if value_states is None else value_states
        self.device = key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.v_head_dim, self.k_head_dim = value_states.shape[-1], key_states.shape[-1]
        # the names transformers 4.57 reads (Cache.max_batch_size in generate's cache reuse check)
        self.max_batch_size, self.head_dim, self.dtype = self.batch_size, self.k_head_dim, key_states.dtype
        self.keys = StaticPolarKeys.zeros(self.batch_size, self.num_heads, self.max_cache_len, self.k_head_dim,
                                          key_states.dtype, self.device, self.codec)
        misfit = self.vcodec.fit_error(self.v_head_dim) if self.vcodec is not None else None
        if misfit and not torch.compiler.is_compiling():  # compiled, the passes report it (Site.values)
            warnings.warn(f"pqcompile: PolarStaticCache keeps this layer's values dense: {misfit}", stacklevel=2)
        if self.vcodec is not None and not misfit:
            self.values = StaticPolarValues.zeros(self.batch_size, self.num_heads, self.max_cache_len, self.v_head_dim,
                                                  value_states.dtype, self.device, self.vcodec)
        else:
            self.values = torch.zeros(self.batch_size, self.num_heads, self.max_cache_len, self.v_head_dim,
                                      dtype=value_states.dtype, device=self.device)
        if hasattr(self, "cumulative_length"):
            self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            buffers = [self.keys, *self.keys.inner_tensors(), self.values]
            if isinstance(self.values, StaticPolarValues):
                buffers += self.values.inner_tensors()
            for t in buffers:
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
