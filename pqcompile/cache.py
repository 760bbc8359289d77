"""PolarKeys: the compressed key cache as a tensor, standing where Hugging Face keeps its key tensor.

A traceable wrapper subclass (torchao style): inner tensors codes / params / tail (see codec.py for the
layout), metadata = the Codec, logical shape [B, Hkv, T, D] (HF reads keys.shape[-2] as the length).
It lives in an unmodified DynamicCache between compiled calls. The ops HF's cache code applies have
compressed implementations (one small function each, registered in _IMPLS); any other op dequantizes
correctly, with a one-time warning. Inside compiled graphs dynamo/AOTAutograd flatten it, so the custom
ops in ops.py receive the inner tensors.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch

from . import codec as ref
from . import ops
from .codec import Codec, PolarData

log = logging.getLogger(__name__)
aten = torch.ops.aten
_IMPLS: dict = {}
_warned: set = set()


def _impl(*funcs):
    def register(fn: Callable):
        for f in funcs:
            _IMPLS[f] = fn
        return fn

    return register


class PolarKeys(torch.Tensor):
    codes: torch.Tensor  # uint8 [B, H, (T//G)*G, NB]
    params: torch.Tensor  # bf16 [B, H, (T//G)*4, P]  (ops.unflat views it as [B, H, T//G, 4, P])
    tail: torch.Tensor  # dtype [B, H, T%G + TAIL_PAD, D]
    codec: Codec

    @staticmethod
    def __new__(cls, codes, params, tail, codec, shape):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=tail.dtype, device=tail.device,
                                                   requires_grad=False)

    def __init__(self, codes, params, tail, codec, shape):
        self.codes, self.params, self.tail, self.codec = codes, params, tail, codec
        if not torch.compiler.is_compiling():
            # Every length grows between decode steps: say so up front, so that dynamo compiles one dynamic
            # decode graph instead of a static one first and a dynamic one on the next step.
            for t in (self, codes, params, tail):
                torch._dynamo.maybe_mark_dynamic(t, 2)

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:  # never print inner tensors
        return f"PolarKeys(shape={tuple(self.shape)}, dtype={self.dtype}, codec={self.codec!s})"

    def __tensor_flatten__(self):
        return ["codes", "params", "tail"], self.codec

    @staticmethod
    def __tensor_unflatten__(inner, codec, outer_size, outer_stride):
        # outer_size comes from dynamo; deriving T from the inner sizes breaks symbolic binding.
        return PolarKeys(inner["codes"], inner["params"], inner["tail"], codec, outer_size)

    # ------------------------------------------------------------------ construction / views

    @property
    def data_(self) -> PolarData:
        """The state in codec.py's layout."""
        return PolarData(self.codes, ops.unflat(self.params), self.tail)

    @property
    def seq_len(self):
        return self.shape[2]

    @classmethod
    def from_dense(cls, keys: torch.Tensor, codec: Codec) -> PolarKeys:
        """keys [B, H, T, D] (post-RoPE) -> compressed. Traceable: this is what the prefill rewrite calls."""
        B, H, _T, D = keys.shape
        codes, params, tail = ref.empty(codec, B, H, D, keys.dtype, keys.device)
        inner = ops.append(codes, ops.flat(params), tail, keys, 0, *ops.codec_args(codec))
        return cls(*inner, codec, keys.shape)

    def dequantize(self) -> torch.Tensor:
        """Dense keys [B, H, T, D] reconstructed from the codes (lossy) and the tail (exact)."""
        return ops.decode(self.codes, self.params, self.tail, self.seq_len, *ops.codec_args(self.codec))

    def with_data(self, codes, params, tail, seq_len) -> PolarKeys:
        B, H, _, D = tail.shape
        return PolarKeys(codes, params, tail, self.codec, (B, H, seq_len, D))

    def nbytes_held(self) -> int:
        return ref.nbytes(self.data_)

    # ------------------------------------------------------------------ dispatch

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = _IMPLS.get(func)
        if impl is not None:
            out = impl(func, *args, **kwargs)
            if out is not NotImplemented:
                return out
        return _dense_fallback(func, args, kwargs)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _dense_fallback(func, args, kwargs):
    """Any op without a compressed implementation: run it on the dequantized keys (correct, lossy, slow)."""
    def unwrap(x):
        if isinstance(x, COMPRESSED_TYPES):
            if func not in _warned and not _is_fake(x.codes):
                _warned.add(func)
                warnings.warn(f"pqcompile: {func} has no compressed implementation; it runs on dequantized keys "
                              "(correct, but the dense keys are materialized)", stacklevel=4)
            return x.dequantize()
        return x

    args = torch.utils._pytree.tree_map(unwrap, args)
    kwargs = torch.utils._pytree.tree_map(unwrap, kwargs)
    return func(*args, **kwargs)


COMPRESSED_TYPES: tuple = (PolarKeys,)  # static_cache.py adds StaticPolarKeys


def _map(x: PolarKeys, fn, seq_len=None) -> PolarKeys:
    return x.with_data(fn(x.codes), fn(x.params), fn(x.tail), x.seq_len if seq_len is None else seq_len)


@_impl(aten.cat.default)
def _cat(func, tensors, dim=0):
    """HF DynamicCache append: cat([past, new], dim=-2) -> encode new tokens, flush completed groups."""
    if len(tensors) != 2 or dim not in (-2, 2):
        return NotImplemented
    past, new = tensors
    if not isinstance(past, PolarKeys) or isinstance(new, PolarKeys) or new.dim() != 4:
        return NotImplemented
    codes, params, tail = ops.append(past.codes, past.params, past.tail, new, past.seq_len,
                                     *ops.codec_args(past.codec))
    return past.with_data(codes, params, tail, past.seq_len + new.shape[2])


@_impl(aten.detach.default, aten.alias.default)
def _alias(func, x):
    return _map(x, func)


@_impl(aten.clone.default)
def _clone(func, x, memory_format=None):
    return _map(x, torch.clone)


@_impl(aten._to_copy.default)
def _to_copy(func, x, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
             memory_format=None):
    moved = _map(x, lambda t: t.to(device=device or t.device, non_blocking=non_blocking))
    if dtype is not None and dtype != x.dtype:
        moved = moved.with_data(moved.codes, moved.params, moved.tail.to(dtype), moved.seq_len)
    return moved


@_impl(aten.index_select.default)
def _index_select(func, x, dim, index):
    """Beam search reorder (index_select on the batch dim)."""
    if dim != 0:
        return NotImplemented
    return _map(x, lambda t: t.index_select(0, index))


@_impl(aten.index.Tensor)
def _index(func, x, indices):
    if len(indices) != 1 or indices[0] is None:
        return NotImplemented
    return _map(x, lambda t: t[indices[0]])


@_impl(aten.repeat_interleave.self_int)
def _repeat_interleave(func, x, repeats, dim=None, output_size=None):
    if dim != 0:
        return NotImplemented
    return _map(x, lambda t: t.repeat_interleave(repeats, dim=0))


@_impl(aten.slice.Tensor)
def _slice(func, x, dim=0, start=None, end=None, step=1):
    size = x.shape[dim]
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else min(end + size if end < 0 else end, size)
    if step != 1:
        return NotImplemented
    if dim == 0:
        return _map(x, lambda t: t[start:end])
    if dim in (1, -3):
        return NotImplemented if (start, end) != (0, size) else _map(x, lambda t: t)
    if dim in (3, -1):
        return NotImplemented if (start, end) != (0, size) else _map(x, lambda t: t)
    if start != 0:
        return NotImplemented
    return _crop(x, end)


def _crop(x: PolarKeys, length: int) -> PolarKeys:
    """Keep the first `length` tokens (HF crop, assisted decoding). Tokens of a cut group move to the tail
    as their reconstruction (they were already quantized; they are encoded again when the group refills)."""
    G = x.codec.group_size
    if length == x.seq_len:
        return _map(x, lambda t: t)
    keep = (length // G) * G
    if keep == x.codes.shape[2]:
        tail = torch.cat([x.tail[:, :, : length - keep], x.tail[:, :, -ref.TAIL_PAD:]], dim=2)
        return x.with_data(x.codes, x.params, tail, length)
    dense = x.dequantize()[:, :, keep:length]
    tail = torch.cat([dense, x.tail.new_zeros(*dense.shape[:2], ref.TAIL_PAD, dense.shape[3])], dim=2)
    return x.with_data(x.codes[:, :, :keep], x.params[:, :, : keep // G * 4], tail, length)


def polar_keys_in(obj) -> list[PolarKeys]:
    """All PolarKeys held by a HF cache (or any object with .layers[i].keys)."""
    layers = getattr(obj, "layers", None) or []
    return [layer.keys for layer in layers if isinstance(getattr(layer, "keys", None), PolarKeys)]


# --------------------------------------------------------------------------- what the rewritten graphs call


def compress_keys(keys: torch.Tensor, radius_bits: int, angle_bits: int, group_size: int, pairing: str) -> PolarKeys:
    """Prefill rewrite: the dense post-RoPE keys HF is about to cache -> PolarKeys (primitive args for FX)."""
    return PolarKeys.from_dense(keys, ops._codec(radius_bits, angle_bits, group_size, pairing))


def polar_sdpa(q: torch.Tensor, keys: PolarKeys, v: torch.Tensor, attn_mask=None, scale=None) -> torch.Tensor:
    """Decode rewrite of scaled_dot_product_attention(q, keys, v): attention reads the codes.

    q [B, Hq, S, D]; keys PolarKeys [B, Hkv, T, D]; v [B, Hkv|Hq, T, Dv] -> [B, Hq, S, Dv].
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return ops.attention(q, keys.codes, keys.params, keys.tail, v, keys.seq_len, attn_mask, scale, 0.0, False,
                         *ops.codec_args(keys.codec))
