"""torch.library custom ops over the compressed value state (value_codec.py), and attention over compressed keys
and values together; the key ops and the shared helpers are ops.py's (same dispatch: CUDA -> kernels, else the
reference; PQCOMPILE_KERNELS overrides).

Values take their codec as (value_bits, value_group, group_size) and their params flattened to [B, H, N,
(Dv/cg)*2] (value_codec's [B, H, N, Dv/cg, 2]: one channel group would be a size-1 dim). The ops over both
states (attention_qv, static_attention_qv) take the keys' arguments, then the values'.
"""

from __future__ import annotations

import functools

import torch

from . import value_codec as vref
from .codec import TAIL_PAD
from .ops import (
    _LIB,
    _append_into,
    _codec,
    _flat_second,
    _static_view,
    _static_write_reference,
    _use_kernels,
    _view,
    unflat,
)
from .value_codec import ValueCodec, ValueData

# Dynamic: codes [B, H, (T//G)*G, NBv], params [B, H, (T//G)*G, ng*2], tail [B, H, T%G + TAIL_PAD, Dv].
# Static: codes [B, H, Tcap, NBv], params [B, H, Tcap, ng*2], ring [B, H, G, Dv], length int64 [1].


@functools.cache
def _vcodec(value_bits: int, value_group: int, group_size: int) -> ValueCodec:
    return ValueCodec(value_bits, value_group, group_size)


def vcodec_args(c: ValueCodec) -> tuple[int, int, int]:
    return c.bits, c.channel_group, c.group_size


def vunflat(params: torch.Tensor, head_dim: int, c: ValueCodec) -> torch.Tensor:
    """[B, H, N, ng*2] -> value_codec's [B, H, N, ng, 2] (a view)."""
    return params.view(*params.shape[:3], c.num_groups(head_dim), 2)


def vflat(params: torch.Tensor) -> torch.Tensor:
    """[B, H, N, ng, 2] -> [B, H, N, ng*2] (a view)."""
    return params.flatten(-2)


def _vview(codes, params, tail, seq_len: int, c: ValueCodec) -> ValueData:
    """A DynamicCache value state of seq_len tokens in value_codec.py's layout (views; the ring as the tail)."""
    Tc = seq_len // c.group_size * c.group_size
    return ValueData(codes[:, :, :Tc], vunflat(params[:, :, :Tc], tail.shape[-1], c), tail)


@torch.library.custom_op(f"{_LIB}::append_values_", mutates_args=("codes", "params", "tail"))
def append_values_(codes: torch.Tensor, params: torch.Tensor, tail: torch.Tensor, new_values: torch.Tensor,
                   seq_len: int, value_bits: int, value_group: int, group_size: int) -> None:
    """In place: append new_values [B, H, S, Dv] to a DynamicCache value state of seq_len tokens (codes [B, H,
    cap, NBv], params [B, H, cap, (Dv/cg)*2], tail the ring [B, H, G, Dv])."""
    c = _vcodec(value_bits, value_group, group_size)
    on_gpu = _use_kernels(new_values)
    vref.check_values("new_values", new_values, c, finite=not on_gpu)
    if on_gpu:
        from . import kernels

        def encode_into(x, g0):
            kernels.encode_value_groups_into(x, codes, vunflat(params, tail.shape[-1], c), g0 * group_size, c)
    else:
        def encode_into(x, g0):
            new_codes, new_params = vref.encode_groups(x, c)
            rows = slice(g0 * group_size, g0 * group_size + x.shape[2])
            codes[:, :, rows] = new_codes
            params[:, :, rows] = vflat(new_params)

    _append_into(codes, params, tail, seq_len, new_values, group_size, encode_into)


@append_values_.register_fake
def _(codes, params, tail, new_values, seq_len, value_bits, value_group, group_size):
    return None


@torch.library.custom_op(f"{_LIB}::decode_values", mutates_args=())
def decode_values(codes: torch.Tensor, params: torch.Tensor, tail: torch.Tensor, seq_len: int, value_bits: int,
                  value_group: int, group_size: int) -> torch.Tensor:
    """Compressed value state -> dense values [B, H, seq_len, Dv] in the tail's dtype (contiguous)."""
    c = _vcodec(value_bits, value_group, group_size)
    return vref.decode(_vview(codes, params, tail, seq_len, c), seq_len, c).contiguous()


@decode_values.register_fake
def _(codes, params, tail, seq_len, value_bits, value_group, group_size):
    B, H, _, Dv = tail.shape
    return tail.new_empty(B, H, seq_len, Dv)


@torch.library.custom_op(f"{_LIB}::attention_qv", mutates_args=())
def attention_qv(q: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, tail: torch.Tensor,
                 v_codes: torch.Tensor, v_params: torch.Tensor, v_tail: torch.Tensor, seq_len: int,
                 mask: torch.Tensor | None, scale: float, softcap: float, is_causal: bool, radius_bits: int,
                 angle_bits: int, group_size: int, layout: str, value_bits: int, value_group: int,
                 value_group_size: int) -> torch.Tensor:
    """`attention` with compressed values: q [B, Hq, S, D] over compressed keys and values of seq_len tokens
    -> [B, Hq, S, Dv]."""
    c = _codec(radius_bits, angle_bits, group_size, layout)
    vc = _vcodec(value_bits, value_group, value_group_size)
    data, vdata = _view(codes, params, tail, seq_len, c), _vview(v_codes, v_params, v_tail, seq_len, vc)
    kwargs = {"mask": mask, "scale": scale, "softcap": softcap if softcap > 0 else None, "is_causal": is_causal}
    if _use_kernels(q):
        from . import kernels

        return kernels.attention(q, data, seq_len, vdata, c, vcodec=vc, **kwargs).contiguous()
    return vref.attention(q, data, seq_len, vdata, c, vc, **kwargs).contiguous()


@attention_qv.register_fake
def _(q, codes, params, tail, v_codes, v_params, v_tail, seq_len, mask, scale, softcap, is_causal, radius_bits,
      angle_bits, group_size, layout, value_bits, value_group, value_group_size):
    B, Hq, S, _ = q.shape
    return q.new_empty(B, Hq, S, v_tail.shape[-1])


def _static_value_view(codes, params, ring, L: int, c: ValueCodec) -> ValueData:
    """The first L tokens of a static value state, in value_codec.py's layout (views, plus a padded tail)."""
    G, n = c.group_size, L // c.group_size
    tail = torch.cat([ring[:, :, : L % G], ring.new_zeros(*ring.shape[:2], TAIL_PAD, ring.shape[3])], dim=2)
    return ValueData(codes[:, :, : n * G], vunflat(params[:, :, : n * G], ring.shape[-1], c), tail)


@torch.library.custom_op(f"{_LIB}::static_write_values_", mutates_args=("codes", "params", "ring", "length"))
def static_write_values_(codes: torch.Tensor, params: torch.Tensor, ring: torch.Tensor, length: torch.Tensor,
                         new_values: torch.Tensor, positions: torch.Tensor, value_bits: int, value_group: int,
                         group_size: int) -> None:
    """static_write_ for a static value state: write new_values [B, H, S, Dv] at positions [S] (contiguous,
    from at or before `length`), encoding each group of G tokens that completes; earlier positions rewind."""
    c = _vcodec(value_bits, value_group, group_size)
    if _use_kernels(new_values):
        from . import kernels

        capturing = new_values.is_cuda and torch.cuda.is_current_stream_capturing()
        kernels.static_write_values(codes, vunflat(params, ring.shape[-1], c), ring, length, new_values, positions,
                                    c, check=not capturing)
        return
    vref.check_values("new_values", new_values, c)
    _static_write_reference(codes, params, ring, length, new_values, positions, G=c.group_size, rows=c.group_size,
                            encode=lambda x: _flat_second(vref.encode_groups(x, c), vflat),
                            decode=lambda L: vref.decode(_static_value_view(codes, params, ring, L, c), L, c))


@static_write_values_.register_fake
def _(codes, params, ring, length, new_values, positions, value_bits, value_group, group_size):
    return None


@torch.library.custom_op(f"{_LIB}::static_attention_qv", mutates_args=())
def static_attention_qv(q: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, ring: torch.Tensor,
                        length: torch.Tensor, v_codes: torch.Tensor, v_params: torch.Tensor, v_ring: torch.Tensor,
                        mask: torch.Tensor | None, scale: float, is_causal: bool, radius_bits: int, angle_bits: int,
                        group_size: int, layout: str, value_bits: int, value_group: int, value_group_size: int
                        ) -> torch.Tensor:
    """static_attention with compressed values: the first `length` (the keys') tokens of both static states."""
    c = _codec(radius_bits, angle_bits, group_size, layout)
    vc = _vcodec(value_bits, value_group, value_group_size)
    if _use_kernels(q):
        from . import kernels

        vdata = ValueData(v_codes, vunflat(v_params, v_ring.shape[-1], vc), v_ring)
        return kernels.static_attention(q, codes, unflat(params), ring, length, vdata, c, vcodec=vc, mask=mask,
                                        scale=scale, is_causal=is_causal)
    L = int(length[0])
    data, vdata = _static_view(codes, params, ring, L, c), _static_value_view(v_codes, v_params, v_ring, L, vc)
    mask = None if mask is None else mask[..., :L]
    return vref.attention(q, data, L, vdata, c, vc, mask=mask, scale=scale, is_causal=is_causal).contiguous()


@static_attention_qv.register_fake
def _(q, codes, params, ring, length, v_codes, v_params, v_ring, mask, scale, is_causal, radius_bits, angle_bits,
      group_size, layout, value_bits, value_group, value_group_size):
    B, Hq, S, _ = q.shape
    return q.new_empty(B, Hq, S, v_ring.shape[-1])


@torch.library.custom_op(f"{_LIB}::static_decode_values", mutates_args=())
def static_decode_values(codes: torch.Tensor, params: torch.Tensor, ring: torch.Tensor, length: torch.Tensor,
                         value_bits: int, value_group: int, group_size: int, max_len: int) -> torch.Tensor:
    """Dense values [B, H, max_len, Dv]: the first min(length, max_len) tokens reconstructed, zeros after."""
    c = _vcodec(value_bits, value_group, group_size)
    L = int(length[0])
    out = ring.new_zeros(*ring.shape[:2], max_len, ring.shape[3])
    n = min(L, max_len)
    out[:, :, :n] = vref.decode(_static_value_view(codes, params, ring, L, c), L, c)[:, :, :n]
    return out


@static_decode_values.register_fake
def _(codes, params, ring, length, value_bits, value_group, group_size, max_len):
    return ring.new_empty(*ring.shape[:2], max_len, ring.shape[3])
