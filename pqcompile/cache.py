"""PolarKeys: the compressed key cache as a tensor, standing where Hugging Face keeps its key tensor.

A DynamicCompressed (dynamic.py): inner tensors codes / params with spare capacity and the ring `tail`
(docs/design.md §2.1), appended to in place, metadata = the Codec, logical shape [B, Hkv, T, D] (HF reads
keys.shape[-2] as the length). It lives in an unmodified DynamicCache between compiled calls. The ops HF's cache
code applies have compressed implementations, shared with PolarValues (values.py) through their base;
any other op dequantizes correctly, with a one-time warning. Inside compiled graphs dynamo/AOTAutograd
flatten it, so the custom ops in ops.py receive the inner tensors.
"""

from __future__ import annotations

import torch

from . import codec as ref
from . import ops, value_ops
from .codec import Codec, PolarData
from .compressed import CompressedTensor, quiet_fallbacks, reset_fallback_warnings
from .dense_values import DenseValues
from .dynamic import DynamicCompressed, capacity_for
from .values import PolarValues

__all__ = ["CompressedTensor", "PolarKeys", "compress_keys", "polar_keys_in", "polar_sdpa", "quiet_fallbacks",
           "reset_fallback_warnings"]


class PolarKeys(DynamicCompressed):
    """Codes, params and a ring of codec.py's state, appended to in place; the cache ops are DynamicCompressed's
    (compressed.py)."""

    codes: torch.Tensor  # uint8 [B, H, cap, NB]: rows [0, (T//G)*G) hold the complete groups
    params: torch.Tensor  # bf16 [B, H, cap/G*4, P]  (ops.unflat views it as [B, H, cap/G, 4, P])
    tail: torch.Tensor  # dtype [B, H, G, D]: the ring, token t at slot t % G
    codec: Codec

    @property
    def data_(self) -> PolarData:
        """The state in codec.py's layout (views of the encoded rows; the open group copied, then TAIL_PAD zeros)."""
        Tc, L = self.encoded, self.seq_len
        tail = torch.cat([self.tail[:, :, : L - Tc], self.tail.new_zeros(*self.tail.shape[:2], ref.TAIL_PAD,
                                                                           self.tail.shape[3])], dim=2)
        return PolarData(self.codes[:, :, :Tc], ops.unflat(self.params[:, :, : self.param_rows(Tc)]), tail)

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, dtype, device, codec: Codec, capacity: int) -> PolarKeys:
        """No tokens, room for `capacity` (a multiple of G)."""
        G = codec.group_size
        codes = torch.empty(batch, heads, capacity, codec.code_bytes(head_dim), dtype=torch.uint8, device=device)
        params = torch.empty(batch, heads, capacity // G * 4, head_dim // 2, dtype=ref.PARAM_DTYPE, device=device)
        ring = torch.zeros(batch, heads, G, head_dim, dtype=dtype, device=device)
        return cls(codes, params, ring, codec, (batch, heads, 0, head_dim))

    @classmethod
    def from_dense(cls, keys: torch.Tensor, codec: Codec) -> PolarKeys:
        """keys [B, H, T, D] (post-RoPE) -> compressed. Traceable: this is what the prefill rewrite calls."""
        B, H, T, D = keys.shape
        empty = cls.empty(B, H, D, keys.dtype, keys.device, codec, capacity_for(T, 0, codec.group_size))
        return empty.appended(keys)

    def dequantize(self) -> torch.Tensor:
        """Dense keys [B, H, T, D] reconstructed from the codes (lossy) and the ring (exact)."""
        return ops.decode(self.codes, self.params, self.tail, self.seq_len, *ops.codec_args(self.codec))

    def write_(self, new: torch.Tensor) -> None:
        ops.append_(self.codes, self.params, self.tail, new, self.seq_len, *ops.codec_args(self.codec))

    def param_rows(self, n_tokens: int) -> int:
        return n_tokens // self.codec.group_size * 4  # 4 rows (r_min, r_scale, phi_min, phi_scale) per group


def polar_keys_in(obj) -> list[PolarKeys]:
    """All PolarKeys held by a HF cache (or any object with .layers[i].keys)."""
    layers = getattr(obj, "layers", None) or []
    return [layer.keys for layer in layers if isinstance(getattr(layer, "keys", None), PolarKeys)]


# --------------------------------------------------------------------------- what the rewritten graphs call


def compress_keys(keys: torch.Tensor, radius_bits: int, angle_bits: int, group_size: int, layout: str) -> PolarKeys:
    """Prefill rewrite: the dense post-RoPE keys HF is about to cache -> PolarKeys (primitive args for FX)."""
    return PolarKeys.from_dense(keys, ops._codec(radius_bits, angle_bits, group_size, layout))


def polar_sdpa(q: torch.Tensor, keys: PolarKeys, v: torch.Tensor, attn_mask=None, scale=None) -> torch.Tensor:
    """Decode rewrite of scaled_dot_product_attention(q, keys, v): attention reads the codes.

    q [B, Hq, S, D]; keys PolarKeys [B, Hkv, T, D]; v [B, Hkv|Hq, T, Dv], or PolarValues [B, Hkv, T, Dv]
    (values compressed too: value_ops.attention_qv reads both code streams) -> [B, Hq, S, Dv].
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if isinstance(v, DenseValues):
        v = v.buf  # whole: the op reads its first T rows (a view [:T] would make dynamo guard on cap == T)
    if isinstance(v, PolarValues):
        return value_ops.attention_qv(q, keys.codes, keys.params, keys.tail, v.codes, v.params, v.tail, keys.seq_len,
                                attn_mask, scale, 0.0, False, *ops.codec_args(keys.codec),
                                *value_ops.vcodec_args(v.codec))
    return ops.attention(q, keys.codes, keys.params, keys.tail, v, keys.seq_len, attn_mask, scale, 0.0, False,
                         *ops.codec_args(keys.codec))
