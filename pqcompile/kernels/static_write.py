"""Host wrappers of the static cache's writes: new keys (or new values) into a preallocated state, CUDA-graph safe."""

from __future__ import annotations

import torch

from .. import codec as ref
from .. import value_codec as vref
from ..codec import PARAM_DTYPE, Codec
from ..value_codec import ValueCodec
from . import common
from .encode import check_value_buffers
from .jit.static_write import polar_static_write_kernel, value_static_write_kernel
from .settings import settings


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
        _check_positions(positions, length, S, Tcap)
    xi, yi = common.pair_index(codec.pairing, D, new_keys.device)
    tile = settings.write_tile
    block_p = common.pair_tile(tile.block_p, G, P)
    on_gpu = common.on_gpu(new_keys)
    args = (new_keys, *new_keys.stride(), positions, length, ring, *ring.stride(), xi, yi,
            codes, *codes.stride()[:3], params, *params.stride()[:4], H, S, Tcap // G)
    for first, n_groups in ((True, 1), (False, max(1, common.cdiv(S - 1, G)))):  # the second stores the length
        common.launch(polar_static_write_kernel, (B * H, n_groups, common.cdiv(P, block_p)), args, common.frozen(
            P=P, NB=NB, G=G, RB=codec.radius_bits, AB=codec.angle_bits, BLOCK_P=block_p, FIRST=first,
            ON_GPU=on_gpu, KIND=common.kind_index(codec), num_warps=tile.num_warps,
        ))


def _check_positions(positions: torch.Tensor, length: torch.Tensor, S: int, Tcap: int) -> None:
    """The host check of a write (one copy to the host, one sync): HF's IndexError past the capacity, contiguity
    from the length."""
    L, *pos = torch.cat([length, positions.to(torch.int64)]).tolist()
    start = pos[0]
    if start + S > Tcap:
        raise IndexError(f"index {start + S - 1} is out of bounds for dimension 2 with size {Tcap}: the static "
                         "cache is too small for the requested tokens")
    if start > L or pos != list(range(start, start + S)):
        raise ValueError(f"static cache writes must be contiguous from the current length {L}; got positions "
                         f"[{start}, ..] of {S}")


def static_write_values(codes: torch.Tensor, params: torch.Tensor, ring: torch.Tensor, length: torch.Tensor,
                        new_values: torch.Tensor, positions: torch.Tensor, vcodec: ValueCodec, *,
                        check: bool = True) -> None:
    """static_write for values, in place: codes uint8 [B, H, Tcap, NBv], params bf16 [B, H, Tcap, Dv/cg, 2], ring
    [B, H, G, Dv], length int64 [1]; write new_values [B, H, S, Dv] at positions [S] (contiguous, from at most
    `length`): tokens of the still-open group go to the ring (slot t % G), the tokens of every group that completes
    are encoded (value_codec's quantizer, bit for bit); a rewind into an encoded group decodes its kept tokens back
    into the ring as the keys' does. Then length = positions[0] + S.

    Positions and length are read on the device only (CUDA-graph capture); check=True first validates them on the
    host (a sync). The keys and values of a layer share `length`: write the keys with kernels.static_write and
    the values with a copy of the old length, or the values first (each write stores the new length).
    """
    common.check_value_codec(vcodec, ring=True)
    vref.check_values("new_values", new_values, vcodec, finite=False)
    B, H, S, Dv = new_values.shape
    G = vcodec.group_size
    Tcap = codes.shape[2] if codes.dim() == 4 else 0
    if length.dtype != torch.int64 or positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"length and positions must be int64 and int64|int32, got {length.dtype}, {positions.dtype}")
    check_value_buffers(codes, params, B, H, Tcap, Dv, vcodec, f"new values {tuple(new_values.shape)}")
    if (Tcap % G or params.shape[2] != Tcap or ring.shape != (B, H, G, Dv) or length.shape != (1,)
            or positions.shape != (S,)):
        raise ValueError(f"static value state codes {tuple(codes.shape)}, params {tuple(params.shape)}, ring "
                         f"{tuple(ring.shape)}, length {tuple(length.shape)} cannot take new values "
                         f"{tuple(new_values.shape)} at positions {tuple(positions.shape)} (group {G})")
    if ring.dtype not in vref.VALUE_DTYPES:
        raise TypeError(f"ring must be float16, bfloat16 or float32, got {ring.dtype}")
    for name, t in (("value codes", codes), ("value params", params), ("ring", ring), ("length", length)):
        common.check_device(name, t, new_values.device)
    positions = positions.to(new_values.device)
    new_values = new_values.to(ring.dtype)  # (rounded here: the interpreter's in-kernel casts truncate)
    if S == 0:
        return
    if check:
        _check_positions(positions, length, S, Tcap)
    block_dv = common.next_pow2(Dv)
    tile = settings.value_tile
    block_t = common.row_tile(tile.block_t, block_dv, G)
    meta = {"DV": Dv, "NBV": vcodec.code_bytes(Dv), "G": G, "VB": vcodec.bits, "VCG": vcodec.channel_group,
            "BLOCK_T": block_t, "BLOCK_DV": block_dv, "VMAX": float(torch.finfo(ring.dtype).max),
            "ON_GPU": common.on_gpu(new_values)}
    args = (new_values, *new_values.stride(), positions, length, ring, *ring.stride(), codes, *codes.stride()[:3],
            params, *params.stride()[:3], H, S, Tcap)
    for first, n in ((True, G // block_t), (False, max(1, common.cdiv(S - 1, block_t)))):  # the second: length
        common.launch(value_static_write_kernel, (B * H, n), args,
                      common.frozen(FIRST=first, num_warps=tile.num_warps, **meta))
