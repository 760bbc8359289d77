"""Host wrappers of the encode kernels: complete key groups into preallocated buffers, and codec.append; value
rows (value_codec.encode_groups) likewise, and value_codec.append."""

from __future__ import annotations

import torch

from .. import codec as ref
from .. import value_codec as vref
from ..codec import PARAM_DTYPE, TAIL_PAD, Codec, PolarData
from ..config import PairingMode
from ..value_codec import ValueCodec, ValueData
from . import common
from .jit.encode import polar_encode_kernel, value_encode_kernel
from .settings import settings


def encode_groups_into(keys: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, group_offset: int,
                       codec: Codec) -> None:
    """Encode complete groups keys [B, H, n*G, D] into codes[:, :, off*G:(off+n)*G], params[:, :, off:off+n].

    codes: uint8 [B, H, >= (off+n)*G, NB] and params: bf16 [B, H, >= off+n, 4, D/2], both with unit
    stride in the last dim (preallocated: a static cache passes its own buffers).
    """
    ref.check_keys("keys", keys, finite=False)
    common.check_codec(codec)
    B, H, T, D = keys.shape
    G, P, NB = codec.group_size, D // 2, codec.code_bytes(D)
    n = T // G
    if T % G:
        raise ValueError(f"keys shape {tuple(keys.shape)}: T must be a multiple of group_size {G}")
    if codes.dtype != torch.uint8 or params.dtype != PARAM_DTYPE:
        raise TypeError(f"codes must be uint8 and params bfloat16, got {codes.dtype} and {params.dtype}")
    if (codes.dim() != 4 or tuple(codes.shape[:2]) != (B, H) or codes.shape[3] != NB
            or codes.shape[2] < (group_offset + n) * G or codes.stride(3) != 1):
        raise ValueError(f"codes shape {tuple(codes.shape)} cannot take {n} groups at group {group_offset} of "
                         f"keys {tuple(keys.shape)} ({NB} bytes per token, unit last stride)")
    if (params.dim() != 5 or tuple(params.shape[:2]) != (B, H) or tuple(params.shape[3:]) != (4, P)
            or params.shape[2] < group_offset + n or params.stride(4) != 1):
        raise ValueError(f"params shape {tuple(params.shape)} cannot take {n} groups at group {group_offset} of "
                         f"keys {tuple(keys.shape)} (unit last stride)")
    for name, t in (("keys", keys), ("codes", codes), ("params", params)):
        common.check_device(name, t, keys.device)
    if n == 0 or B * H == 0:
        return
    xi, yi = common.pair_index(codec.pairing, D, keys.device)
    tile = settings.encode_tile
    block_p = common.pair_tile(tile.block_p, G, P)
    pairs = 0
    if codec.pairing.rotary_dim in (None, D):
        pairs = 1 if codec.pairing.layout is PairingMode.HALF else 2
    grid = (B * H * n, common.cdiv(P, block_p))
    common.launch(polar_encode_kernel, grid, (
        keys, *keys.stride(), xi, yi, codes, *codes.stride()[:3], params, *params.stride()[:4],
        H, n, group_offset,
    ), common.frozen(
        P=P, NB=NB, G=G, RB=codec.radius_bits, AB=codec.angle_bits, BLOCK_P=block_p, PAIRS=pairs,
        ON_GPU=common.on_gpu(keys), KIND=common.kind_index(codec), num_warps=tile.num_warps,
    ))


def encode_groups(keys: torch.Tensor, codec: Codec) -> tuple[torch.Tensor, torch.Tensor]:
    """Like codec.encode_groups: keys [B, H, n*G, D] -> codes [B, H, n*G, NB], params [B, H, n, 4, D/2]."""
    B, H, T, D = keys.shape
    codes = common.alloc((B, H, T, codec.code_bytes(D)), torch.uint8, keys.device)
    params = common.alloc((B, H, T // codec.group_size, 4, D // 2), PARAM_DTYPE, keys.device)
    encode_groups_into(keys, codes, params, 0, codec)
    return codes, params


def append(data: PolarData, seq_len: int, new_keys: torch.Tensor, codec: Codec) -> PolarData:
    """codec.append with the encode kernel: state of seq_len tokens + new_keys [B, H, S, D] -> fresh state."""
    ref.check_keys("new_keys", new_keys, finite=False)
    B, H, S, D = new_keys.shape
    G, NB = codec.group_size, codec.code_bytes(D)
    filled = seq_len % G
    codes, params, tail = data
    if tail.shape != (B, H, filled + TAIL_PAD, D):
        raise ValueError(f"new_keys shape {tuple(new_keys.shape)} does not fit a state of {seq_len} tokens "
                         f"with tail {tuple(tail.shape)}")
    Tc = seq_len - filled
    if codes.shape != (B, H, Tc, NB) or params.shape != (B, H, Tc // G, 4, D // 2):
        raise ValueError(f"codes {tuple(codes.shape)} / params {tuple(params.shape)} do not fit a state of "
                         f"{seq_len} tokens of keys [B={B}, H={H}, D={D}], group {G}")
    for name, t in (("codes", codes), ("params", params), ("tail", tail)):
        common.check_device(name, t, new_keys.device)
    done = (filled + S) // G * G
    rest = filled + S - done
    new_codes = common.alloc((B, H, Tc + done, NB), codes.dtype, codes.device)
    new_params = common.alloc((B, H, (Tc + done) // G, 4, D // 2), params.dtype, params.device)
    new_codes[:, :, :Tc].copy_(codes)
    new_params[:, :, : Tc // G].copy_(params)
    new_tail = common.alloc((B, H, rest + TAIL_PAD, D), tail.dtype, tail.device)
    new_tail[:, :, rest:].zero_()
    keys = new_keys.to(tail.dtype)
    if done:
        pending = keys if filled == 0 else torch.cat([tail[:, :, :filled], keys], dim=2)
        encode_groups_into(pending[:, :, :done], new_codes, new_params, Tc // G, codec)
        new_tail[:, :, :rest].copy_(pending[:, :, done:])
    else:
        new_tail[:, :, :filled].copy_(tail[:, :, :filled])
        new_tail[:, :, filled:rest].copy_(keys)
    return PolarData(new_codes, new_params, new_tail)


# --------------------------------------------------------------------------- values


def check_value_buffers(codes: torch.Tensor, params: torch.Tensor, B: int, H: int, rows: int, Dv: int,
                        vcodec: ValueCodec, what: str) -> None:
    """Value codes uint8 [B, H, >= rows, NBv] (unit byte stride) and params bf16 [B, H, >= rows, Dv/cg, 2]
    ((min, scale) contiguous: strides 2, 1)."""
    if codes.dtype != torch.uint8 or params.dtype != PARAM_DTYPE:
        raise TypeError(f"value codes must be uint8 and value params bfloat16, got {codes.dtype} and {params.dtype}")
    nb, ng = vcodec.code_bytes(Dv), vcodec.num_groups(Dv)
    if (codes.dim() != 4 or tuple(codes.shape[:2]) != (B, H) or codes.shape[3] != nb or codes.shape[2] < rows
            or codes.stride(3) != 1):
        raise ValueError(f"value codes shape {tuple(codes.shape)} cannot take {what} ({nb} bytes per token under "
                         f"ValueCodec {vcodec}, unit last stride)")
    if (params.dim() != 5 or tuple(params.shape[:2]) != (B, H) or tuple(params.shape[3:]) != (ng, 2)
            or params.shape[2] < rows or params.stride(4) != 1 or (ng > 1 and params.stride(3) != 2)):
        raise ValueError(f"value params shape {tuple(params.shape)} cannot take {what} ([.., {ng}, 2] per token "
                         f"under ValueCodec {vcodec}, (min, scale) contiguous)")


def encode_value_groups_into(values: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, token_offset: int,
                             vcodec: ValueCodec) -> None:
    """value_codec.encode_groups of values [B, H, N, Dv] into codes[:, :, off:off+N] and params[:, :, off:off+N]
    (preallocated, e.g. a static cache's own buffers; N need not be a whole number of groups: the quantizer is per
    token). Non-finite values are not scanned for: they poison their channel group's min with NaN."""
    common.check_value_codec(vcodec)
    vref.check_values("values", values, vcodec, finite=False)
    B, H, N, Dv = values.shape
    check_value_buffers(codes, params, B, H, token_offset + N, Dv, vcodec,
                        f"{N} tokens at row {token_offset} of values {tuple(values.shape)}")
    for name, t in (("values", values), ("value codes", codes), ("value params", params)):
        common.check_device(name, t, values.device)
    if N == 0 or B * H == 0:
        return
    block_dv = common.next_pow2(Dv)
    tile = settings.value_tile
    block_t = common.row_tile(tile.block_t, block_dv, N)
    common.launch(value_encode_kernel, (B * H, common.cdiv(N, block_t)), (
        values, *values.stride(), codes, *codes.stride()[:3], params, *params.stride()[:3], H, N, token_offset,
    ), common.frozen(
        DV=Dv, NBV=vcodec.code_bytes(Dv), VB=vcodec.bits, VCG=vcodec.channel_group, BLOCK_T=block_t,
        BLOCK_DV=block_dv, ON_GPU=common.on_gpu(values), num_warps=tile.num_warps,
    ))


def encode_value_groups(values: torch.Tensor, vcodec: ValueCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """Like value_codec.encode_groups: values [B, H, N, Dv] -> codes [B, H, N, NBv], params [B, H, N, Dv/cg, 2]."""
    vref.check_values("values", values, vcodec, finite=False)
    B, H, N, Dv = values.shape
    codes = common.alloc((B, H, N, vcodec.code_bytes(Dv)), torch.uint8, values.device)
    params = common.alloc((B, H, N, vcodec.num_groups(Dv), 2), PARAM_DTYPE, values.device)
    encode_value_groups_into(values, codes, params, 0, vcodec)
    return codes, params


def append_values(data: ValueData, seq_len: int, new_values: torch.Tensor, vcodec: ValueCodec) -> ValueData:
    """value_codec.append with the encode kernel: state of seq_len tokens + new_values [B, H, S, Dv] -> fresh
    state (the tokens of every group that completes are encoded; the codes are the reference's bit for bit)."""
    common.check_value_codec(vcodec)
    vref.check_values("new_values", new_values, vcodec, finite=False)
    B, H, S, Dv = new_values.shape
    G, NB, ng = vcodec.group_size, vcodec.code_bytes(Dv), vcodec.num_groups(Dv)
    filled = seq_len % G
    codes, params, tail = data
    if tail.shape != (B, H, filled + TAIL_PAD, Dv):
        raise ValueError(f"new_values shape {tuple(new_values.shape)} does not fit a state of {seq_len} tokens "
                         f"with tail {tuple(tail.shape)}")
    Tc = seq_len - filled
    if codes.shape != (B, H, Tc, NB) or params.shape != (B, H, Tc, ng, 2):
        raise ValueError(f"value codes {tuple(codes.shape)} / params {tuple(params.shape)} do not fit a state of "
                         f"{seq_len} tokens of values [B={B}, H={H}, Dv={Dv}] under ValueCodec {vcodec}")
    if codes.dtype != torch.uint8 or params.dtype != PARAM_DTYPE:
        raise TypeError(f"value codes must be uint8 and value params bfloat16, got {codes.dtype} and {params.dtype}")
    for name, t in (("value codes", codes), ("value params", params), ("value tail", tail)):
        common.check_device(name, t, new_values.device)
    done = (filled + S) // G * G
    rest = filled + S - done
    new_codes = common.alloc((B, H, Tc + done, NB), codes.dtype, codes.device)
    new_params = common.alloc((B, H, Tc + done, ng, 2), params.dtype, params.device)
    new_codes[:, :, :Tc].copy_(codes)
    new_params[:, :, :Tc].copy_(params)
    new_tail = common.alloc((B, H, rest + TAIL_PAD, Dv), tail.dtype, tail.device)
    new_tail[:, :, rest:].zero_()
    values = new_values.to(tail.dtype)
    if done:
        pending = values if filled == 0 else torch.cat([tail[:, :, :filled], values], dim=2)
        encode_value_groups_into(pending[:, :, :done], new_codes, new_params, Tc, vcodec)
        new_tail[:, :, :rest].copy_(pending[:, :, done:])
    else:
        new_tail[:, :, :filled].copy_(tail[:, :, :filled])
        new_tail[:, :, filled:rest].copy_(values)
    return ValueData(new_codes, new_params, new_tail)
