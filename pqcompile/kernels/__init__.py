"""Triton kernels for the PolarQuant key cache: host wrappers with input checks and launch configs.

`append` and `attention` have the semantics and shapes of pqcompile.codec.append / codec.attention (the
ground truth); pqcompile.ops calls them for CUDA tensors. They also run on CPU tensors under
TRITON_INTERPRET=1 (tests). Differences from the reference, by design:
  - atan2/sqrt/cos/sin may differ from torch by an ulp (cos/sin use the GPU's fast approximations), so a
    code can land one bin off at a bin edge, and q.k uses the tensor cores in q's dtype.
  - append does not scan new keys for inf/NaN (that would sync the GPU every decode step); a non-finite
    key instead poisons its pair's group params with NaN, so attention over it returns NaN, never a
    plausible wrong number.
Fallbacks to the reference (logged at debug level): head_dim or value dim > 256, seq_len == 0, q_len == 0.
Errors: wrong dtypes (TypeError), wrong shapes/devices/layouts (ValueError); messages show shapes only.
Here: encode, append and the static write; attend.py: attention and its tuner; common.py: shared checks;
polar_encode.py / polar_attention.py: the jit code.
"""

from __future__ import annotations

import torch
import triton

from .. import codec as ref
from ..codec import PARAM_DTYPE, TAIL_PAD, Codec, PolarData
from ..config import PairingMode
from . import common
from .attend import ATTN_CONFIG, ATTN_TUNE_SPACE, LAST_CONFIG, attention, static_attention
from .polar_encode import polar_encode_kernel, polar_static_write_kernel

# Encode and static-write launches: a program owns one group's tokens x a tile of at most block_p pairs (capped
# by P and by 8192 // G elements). Smaller tiles mean more, shorter programs. Picked on the H200 by
# `bench/attention.py --sweep-encode` (v6): encode 8 pairs x 2 warps (-36% at every size vs 64 x 8), a
# one-token static write 16 x 4 (3.1 vs 5.8 us).
ENCODE_CONFIG = {"block_p": 8, "num_warps": 2}
WRITE_CONFIG = {"block_p": 16, "num_warps": 4}


def _pair_tile(cfg: dict, G: int, P: int) -> int:
    return max(8, min(triton.next_power_of_2(cfg["block_p"]), 8192 // G, triton.next_power_of_2(P)))


# --------------------------------------------------------------------------- encode


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
    block_p = _pair_tile(ENCODE_CONFIG, G, P)
    pairs = 0
    if codec.pairing.rotary_dim in (None, D):
        pairs = 1 if codec.pairing.layout is PairingMode.HALF else 2
    grid = (B * H * n, triton.cdiv(P, block_p))
    polar_encode_kernel[grid](
        keys, *keys.stride(), xi, yi, codes, *codes.stride()[:3], params, *params.stride()[:4],
        H, n, group_offset,
        P=P, NB=NB, G=G, RB=codec.radius_bits, AB=codec.angle_bits, BLOCK_P=block_p, PAIRS=pairs,
        ON_GPU=common.on_gpu(keys), num_warps=ENCODE_CONFIG["num_warps"],
    )


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


# --------------------------------------------------------------------------- static write


def static_write(codes: torch.Tensor, params: torch.Tensor, ring: torch.Tensor, length: torch.Tensor,
                 new_keys: torch.Tensor, positions: torch.Tensor, codec: Codec, *, check: bool = True) -> None:
    """In place, like ops.static_write_ on the reference: write new_keys [B, H, S, D] at positions [S] (contiguous,
    from at most `length`), encoding every group that completes; then length = positions[0] + S.

    The positions and the length are read on the device only, so the write can be captured in a CUDA graph.
    check=True first validates them on the host (a sync): HF's IndexError past the capacity, ValueError for
    non-contiguous positions. Unchecked, a write past the capacity drops the groups beyond it and the length
    it leaves makes static_attention return NaN.
    """
    ref.check_keys("new_keys", new_keys, finite=False)
    common.check_codec(codec)
    B, H, S, D = new_keys.shape
    G, P, NB = codec.group_size, D // 2, codec.code_bytes(D)
    Tcap = codes.shape[2]
    if (codes.dtype != torch.uint8 or params.dtype != PARAM_DTYPE or length.dtype != torch.int64
            or positions.dtype not in (torch.int64, torch.int32)):
        raise TypeError(f"codes, params, length, positions must be uint8, bfloat16, int64, int64|int32, got "
                        f"{codes.dtype}, {params.dtype}, {length.dtype}, {positions.dtype}")
    if (codes.shape != (B, H, Tcap, NB) or Tcap % G or params.shape != (B, H, Tcap // G, 4, P)
            or ring.shape != (B, H, G, D) or length.shape != (1,) or positions.shape != (S,)
            or codes.stride(-1) != 1 or params.stride(-1) != 1):
        raise ValueError(f"static state codes {tuple(codes.shape)}, params {tuple(params.shape)}, ring "
                         f"{tuple(ring.shape)}, length {tuple(length.shape)} cannot take new keys "
                         f"{tuple(new_keys.shape)} at positions {tuple(positions.shape)} (group {G})")
    for name, t in (("codes", codes), ("params", params), ("ring", ring), ("length", length)):
        common.check_device(name, t, new_keys.device)
    positions = positions.to(new_keys.device)
    new_keys = new_keys.to(ring.dtype)  # (rounded here: the interpreter's in-kernel casts truncate)
    if S == 0:
        return
    if check:
        start, L = int(positions[0]), int(length[0])
        if start + S > Tcap:
            raise IndexError(f"index {start + S - 1} is out of bounds for dimension 2 with size {Tcap}: the static "
                             "cache is too small for the requested tokens")
        if start > L or not torch.equal(positions.cpu(), torch.arange(start, start + S)):
            raise ValueError(f"static cache writes must be contiguous from the current length {L}; got positions "
                             f"[{start}, ..] of {S}")
    xi, yi = common.pair_index(codec.pairing, D, new_keys.device)
    block_p = _pair_tile(WRITE_CONFIG, G, P)
    on_gpu = common.on_gpu(new_keys)
    for first, n_groups in ((True, 1), (False, max(1, triton.cdiv(S - 1, G)))):  # the second stores the length
        polar_static_write_kernel[(B * H, n_groups, triton.cdiv(P, block_p))](
            new_keys, *new_keys.stride(), positions, length, ring, *ring.stride(), xi, yi,
            codes, *codes.stride()[:3], params, *params.stride()[:4], H, S, Tcap // G,
            P=P, NB=NB, G=G, RB=codec.radius_bits, AB=codec.angle_bits, BLOCK_P=block_p, FIRST=first,
            ON_GPU=on_gpu, num_warps=WRITE_CONFIG["num_warps"],
        )


__all__ = [
    "ATTN_CONFIG",
    "ATTN_TUNE_SPACE",
    "ENCODE_CONFIG",
    "LAST_CONFIG",
    "WRITE_CONFIG",
    "append",
    "attention",
    "encode_groups",
    "encode_groups_into",
    "static_attention",
    "static_write",
]
