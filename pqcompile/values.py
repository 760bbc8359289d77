"""PolarValues: the compressed value cache as a tensor, standing where Hugging Face keeps its value tensor.

The value counterpart of PolarKeys (cache.py): a DynamicCompressed (compressed.py) whose inner tensors are
value_codec.py's state, metadata = the ValueCodec, logical shape [B, Hkv, T, Dv]:
  codes  uint8 [B, H, (T//G)*G, Dv*bits/8]   packed per-token codes of the complete groups
  params bf16  [B, H, (T//G)*G, (Dv/cg)*2]   per token and channel group (min, scale), flattened from
                                             value_codec's [.., Dv/cg, 2] (ops.vunflat views it back)
  tail   dtype [B, H, T%G + TAIL_PAD, Dv]    the open group's tokens in full precision, then 2 zero rows
Keys and values share G, so they flush on the same step. The cache ops (cat -> ops.append_values, detach,
clone, _to_copy, index_select / index / slice on the batch dim, repeat_interleave, crop) are DynamicCompressed's;
the prefill rewrite puts one into the cache (compress_values), after which HF's own cat appends to it, and
cache.polar_sdpa reads it through ops.attention_qv. No dense value tensor of the encoded groups is kept.
"""

from __future__ import annotations

import torch

from . import ops
from . import value_codec as vref
from .compressed import DynamicCompressed
from .value_codec import ValueCodec, ValueData

__all__ = ["PolarValues", "compress_values", "polar_values_in"]


class PolarValues(DynamicCompressed):
    codes: torch.Tensor  # uint8 [B, H, (T//G)*G, NBv]
    params: torch.Tensor  # bf16 [B, H, (T//G)*G, (Dv/cg)*2]
    tail: torch.Tensor  # dtype [B, H, T%G + TAIL_PAD, Dv]
    codec: ValueCodec

    @property
    def data_(self) -> ValueData:
        """The state in value_codec.py's layout."""
        return ValueData(self.codes, ops.vunflat(self.params, self.shape[-1], self.codec), self.tail)

    @classmethod
    def from_dense(cls, values: torch.Tensor, codec: ValueCodec) -> PolarValues:
        """values [B, H, T, Dv] -> compressed. Traceable: this is what the prefill rewrite calls."""
        B, H, _T, Dv = values.shape
        codes, params, tail = vref.empty(codec, B, H, Dv, values.dtype, values.device)
        inner = ops.append_values(codes, ops.vflat(params), tail, values, 0, *ops.vcodec_args(codec))
        return cls(*inner, codec, values.shape)

    def dequantize(self) -> torch.Tensor:
        """Dense values [B, H, T, Dv]: the encoded groups reconstructed (lossy), the tail exact."""
        return ops.decode_values(self.codes, self.params, self.tail, self.seq_len, *ops.vcodec_args(self.codec))

    def appended(self, new: torch.Tensor) -> PolarValues:
        codes, params, tail = ops.append_values(self.codes, self.params, self.tail, new, self.seq_len,
                                                *ops.vcodec_args(self.codec))
        return self.with_data(codes, params, tail, self.seq_len + new.shape[2])

    def param_rows(self, n_tokens: int) -> int:
        return n_tokens  # one (min, scale) row per token


def polar_values_in(obj) -> list[PolarValues]:
    """All PolarValues held by a HF cache (or any object with .layers[i].values)."""
    layers = getattr(obj, "layers", None) or []
    return [layer.values for layer in layers if isinstance(getattr(layer, "values", None), PolarValues)]


def compress_values(values: torch.Tensor, value_bits: int, value_group: int, group_size: int) -> PolarValues:
    """Prefill rewrite: the dense values HF is about to cache -> PolarValues (primitive args for FX)."""
    return PolarValues.from_dense(values, ops._vcodec(value_bits, value_group, group_size))
