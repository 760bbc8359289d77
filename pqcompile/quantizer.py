"""The scalar quantizer every codec shares, and the little-endian code packing.

One (min, scale) pair per slice, both bf16: the min rounded toward -inf and the scale toward +inf, so every value
lies inside the stored range; code = floor((v - min) / scale) clamped to [0, 2^bits - 1]; reconstruction at the
bin midpoint. Kernels reproduce these bit for bit (round_bf16 through bit operations, IEEE division).
"""

from __future__ import annotations

import math

import torch

PARAM_DTYPE = torch.bfloat16


def round_bf16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """fp32 -> bf16, rounding toward +inf (up) or -inf: keeps every value inside the stored range."""
    bits = x.float().contiguous().view(torch.int32)
    trunc = bits & ~0xFFFF  # truncation = rounding toward zero
    inexact = (bits & 0xFFFF) != 0
    away = inexact & ((x > 0) if up else (x < 0))
    return (trunc + away.to(torch.int32) * 0x10000).view(torch.float32).to(PARAM_DTYPE)


def bin_index(v: torch.Tensor, vmin: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The one quantizer every path uses: floor((v - min) / scale) clamped to [0, 2^bits - 1], fp32."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    code = torch.floor((v - vmin) / safe)
    code = torch.where(scale > 0, code, torch.zeros_like(code))
    return code.clamp_(0, (1 << bits) - 1).to(torch.uint8)


def bin_center(code: torch.Tensor, vmin: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return vmin + (code.float() + 0.5) * scale


def group_params(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v [..., G, P] -> (min, scale) [..., P] in bf16, min rounded down and scale up."""
    vmin = round_bf16(v.amin(dim=-2), up=False)
    scale = round_bf16((v.amax(dim=-2) - vmin.float()) / (1 << bits), up=True)
    return vmin, scale


# --------------------------------------------------------------------------- packing


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [..., P] of `bits` each -> uint8 [..., ceil(P*bits/8)] little-endian bit stream."""
    if bits == 8:
        return codes.contiguous()
    P = codes.shape[-1]
    nb = math.ceil(P * bits / 8)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [..., P*bits]
    stream = torch.nn.functional.pad(stream, (0, nb * 8 - P * bits)).view(*codes.shape[:-1], nb, 8)
    weights = torch.tensor([1 << i for i in range(8)], device=codes.device, dtype=torch.int32)
    return (stream.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, num_pairs: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 [..., NB] -> uint8 [..., num_pairs]."""
    if bits == 8:
        return packed
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., : num_pairs * bits]
    stream = stream.view(*packed.shape[:-1], num_pairs, bits).to(torch.int32)
    weights = torch.tensor([1 << i for i in range(bits)], device=packed.device, dtype=torch.int32)
    return (stream * weights).sum(-1).to(torch.uint8)
