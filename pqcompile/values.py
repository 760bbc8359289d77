"""PolarValues: the compressed value cache as a tensor, standing where Hugging Face keeps its value tensor.

The value counterpart of PolarKeys (cache.py): a DynamicCompressed (dynamic.py) whose inner tensors hold
value_codec.py's state, appended to in place, metadata = the ValueCodec, logical shape [B, Hkv, T, Dv]:
  codes  uint8 [B, H, cap, Dv*bits/8]   rows [0, (T//G)*G): packed per-token codes of the complete groups
  params bf16  [B, H, cap, (Dv/cg)*2]   per token and channel group (min, scale), flattened from value_codec's
                                        [.., Dv/cg, 2] (value_ops.vunflat views it back)
  tail   dtype [B, H, G, Dv]            the ring: the open group's tokens in full precision, token t at slot t % G
Keys and values share G, so they flush on the same step. The cache ops (cat -> value_ops.append_values_, detach,
clone, _to_copy, index_select / index / slice on the batch dim, repeat_interleave, crop) are DynamicCompressed's;
the prefill rewrite puts one into the cache (compress_values), after which HF's own cat appends to it, and
cache.polar_sdpa reads it through value_ops.attention_qv. No dense value tensor of the encoded groups is kept.
"""

from __future__ import annotations

import torch

from . import value_codec as vref
from . import value_ops
from .codec import PARAM_DTYPE, TAIL_PAD
from .dynamic import DynamicCompressed, capacity_for
from .value_codec import ValueCodec, ValueData

__all__ = ["PolarValues", "compress_values", "polar_values_in"]


class PolarValues(DynamicCompressed):
    codes: torch.Tensor  # uint8 [B, H, cap, NBv]: rows [0, (T//G)*G) hold the complete groups
    params: torch.Tensor  # bf16 [B, H, cap, (Dv/cg)*2]
    tail: torch.Tensor  # dtype [B, H, G, Dv]: the ring, token t at slot t % G
    codec: ValueCodec

    @property
    def data_(self) -> ValueData:
        """The state in value_codec.py's layout (views of the encoded rows; the open group copied, then TAIL_PAD
        zeros)."""
        Tc, L = self.encoded, self.seq_len
        tail = torch.cat([self.tail[:, :, : L - Tc], self.tail.new_zeros(*self.tail.shape[:2], TAIL_PAD,
                                                                           self.tail.shape[3])], dim=2)
        return ValueData(self.codes[:, :, :Tc], value_ops.vunflat(self.params[:, :, :Tc], self.shape[-1], self.codec), tail)

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, dtype, device, codec: ValueCodec,
              capacity: int) -> PolarValues:
        """No tokens, room for `capacity` (a multiple of G)."""
        codes = torch.empty(batch, heads, capacity, codec.code_bytes(head_dim), dtype=torch.uint8, device=device)
        params = torch.empty(batch, heads, capacity, codec.num_groups(head_dim) * 2, dtype=PARAM_DTYPE,
                             device=device)
        ring = torch.zeros(batch, heads, codec.group_size, head_dim, dtype=dtype, device=device)
        return cls(codes, params, ring, codec, (batch, heads, 0, head_dim))

    @classmethod
    def from_dense(cls, values: torch.Tensor, codec: ValueCodec) -> PolarValues:
        """values [B, H, T, Dv] -> compressed. Traceable: this is what the prefill rewrite calls."""
        B, H, T, Dv = values.shape
        vref.check_values("values", values, codec, finite=False)
        empty = cls.empty(B, H, Dv, values.dtype, values.device, codec, capacity_for(T, 0, codec.group_size))
        return empty.appended(values)

    def dequantize(self) -> torch.Tensor:
        """Dense values [B, H, T, Dv]: the encoded groups reconstructed (lossy), the ring exact."""
        return value_ops.decode_values(self.codes, self.params, self.tail, self.seq_len, *value_ops.vcodec_args(self.codec))

    def write_(self, new: torch.Tensor) -> None:
        value_ops.append_values_(self.codes, self.params, self.tail, new, self.seq_len, *value_ops.vcodec_args(self.codec))

    def param_rows(self, n_tokens: int) -> int:
        return n_tokens  # one (min, scale) row per token


def polar_values_in(obj) -> list[PolarValues]:
    """All PolarValues held by a HF cache (or any object with .layers[i].values)."""
    layers = getattr(obj, "layers", None) or []
    return [layer.values for layer in layers if isinstance(getattr(layer, "values", None), PolarValues)]


def compress_values(values: torch.Tensor, value_bits: int, value_group: int, group_size: int) -> PolarValues:
    """Prefill rewrite: the dense values HF is about to cache -> PolarValues (primitive args for FX)."""
    return PolarValues.from_dense(values, value_ops._vcodec(value_bits, value_group, group_size))
