"""The key codecs' cells: how one group of G post-RoPE pairs (x, y) becomes two codes per pair and four bf16
params per (group, pair), and back. Pure PyTorch, the ground truth of the encode and attention kernels.

Every kind stores, per (group, pair), params (first min, first scale, second min, second scale) and per token a
code `c1 | c2 << bits1`; the kinds differ in what `first` and `second` are:
  polar         radius r = hypot(x, y) and angle phi = atan2(y, x) in [-pi, pi], bins over [min, max] (the paper)
  polar-circ    r and phi, the angle bins over the shortest arc holding the group's angles (a cluster that
                straddles +-pi is not given the whole circle); phi_hat may exceed pi (cos/sin do not mind)
  polar-hybrid  per (group, pair) the polar-circ cell or the Cartesian one, whichever has the smaller predicted
                error; the choice is the sign bit of the first scale (1 = polar), a bit a scale never uses
  channel       x and y, uniform per channel over the group's tokens (KIVI's keys); no trig to decode
Every decision is a function of maxima, minima and bf16 params (no sums), so a kernel that reduces in another
order still makes the same one: encode is bit-identical across implementations wherever atan2/hypot are.
"""

from __future__ import annotations

import math

import torch

from .config import KEY_CODECS as KINDS
from .quantizer import PARAM_DTYPE, bin_center, bin_index, group_params, round_bf16

POLAR_KINDS = ("polar", "polar-circ")  # a polar cell everywhere
TWO_PI = 2 * math.pi


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"codec={kind!r} is invalid; allowed: {', '.join(map(repr, KINDS))}")


def arc_start(phi: torch.Tensor) -> torch.Tensor:
    """phi [..., G, P] -> [..., P]: where the shortest arc holding the angles begins: right after the largest gap
    between circularly consecutive angles. The wrap-around gap (start = the smallest angle, the plain range) wins
    ties, then the smallest start."""
    s, _ = phi.sort(dim=-2)
    gaps = s[..., 1:, :] - s[..., :-1, :]
    inner = gaps.amax(dim=-2)
    wrap = (s[..., 0, :] + TWO_PI) - s[..., -1, :]
    after = torch.where(gaps == inner.unsqueeze(-2), s[..., 1:, :], torch.inf).amin(dim=-2)
    return torch.where(wrap >= inner, s[..., 0, :], after)


def arc_offsets(phi: torch.Tensor, a_min: torch.Tensor) -> torch.Tensor:
    """Each angle's position along the arc from a_min ([..., P], broadcast over G): phi - a_min, or (phi + 2pi) -
    a_min for angles below it. Always congruent to phi - a_min, so a_min + offset reconstructs the angle."""
    a = a_min.unsqueeze(-2)
    rel = phi - a
    return torch.where(rel < 0, (phi + TWO_PI) - a, rel)


def _cell(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform bins over the group: (codes [..., G, P], min, scale [..., P] bf16)."""
    vmin, scale = group_params(v, bits)
    return bin_index(v, vmin.float().unsqueeze(-2), scale.float().unsqueeze(-2), bits), vmin, scale


def _circ_cell(phi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a_min = round_bf16(arc_start(phi), up=False)
    rel = arc_offsets(phi, a_min.float())
    scale = round_bf16(rel.amax(dim=-2) * (1.0 / (1 << bits)), up=True)
    return bin_index(rel, torch.zeros_like(rel[..., :1, :]), scale.float().unsqueeze(-2), bits), a_min, scale


def prefer_polar(r_min, r_s, a_s, x_s, y_s, radius_bits: int) -> torch.Tensor:
    """The hybrid's choice per (group, pair), from bf16 params: the uniform quantizer's error is scale^2 / 12 per
    coordinate, so Cartesian costs x_s^2 + y_s^2 and polar r_s^2 + (r_mid a_s)^2 (the tangential error at the
    middle radius, rounded to bf16). In fp64 every product of these bf16 numbers is exact: a fused multiply-add
    rounds the same, so a kernel decides the same. Ties go Cartesian."""
    r_mid = (r_min.float() + r_s.float() * (1 << (radius_bits - 1))).to(PARAM_DTYPE).double()
    t = r_mid * a_s.double()
    polar = r_s.double() * r_s.double() + t * t
    return polar < x_s.double() * x_s.double() + y_s.double() * y_s.double()


def encode_cells(x: torch.Tensor, y: torch.Tensor, kind: str, bits1: int, bits2: int):
    """x, y fp32 [..., G, P] -> codes c1, c2 uint8 [..., G, P] and params bf16 [..., 4, P]."""
    check_kind(kind)
    if kind == "channel":
        c1, m1, s1 = _cell(x, bits1)
        c2, m2, s2 = _cell(y, bits2)
        return c1, c2, torch.stack([m1, s1, m2, s2], dim=-2)
    r, phi = torch.hypot(x, y), torch.atan2(y, x)
    cr, r_min, r_s = _cell(r, bits1)
    ca, a_min, a_s = (_cell if kind == "polar" else _circ_cell)(phi, bits2)
    if kind != "polar-hybrid":
        return cr, ca, torch.stack([r_min, r_s, a_min, a_s], dim=-2)
    cx, x_min, x_s = _cell(x, bits1)
    cy, y_min, y_s = _cell(y, bits2)
    pick = prefer_polar(r_min, r_s, a_s, x_s, y_s, bits1).unsqueeze(-2)  # [..., 1, P]
    params = torch.where(pick, torch.stack([r_min, -r_s, a_min, a_s], dim=-2),
                         torch.stack([x_min, x_s, y_min, y_s], dim=-2))
    return torch.where(pick, cr, cx), torch.where(pick, ca, cy), params


def is_polar(params: torch.Tensor, kind: str) -> torch.Tensor | bool:
    """Which (group, pair) cells are polar: params [..., 4, P] -> bool [..., P] (or a constant)."""
    if kind == "polar-hybrid":
        return torch.signbit(params[..., 1, :])
    return kind in POLAR_KINDS


def decode_cells(c1: torch.Tensor, c2: torch.Tensor, params: torch.Tensor, kind: str):
    """Inverse of encode_cells up to the bins: codes [..., G, P], params [..., 4, P] -> x_hat, y_hat fp32."""
    p = params.float().unsqueeze(-3)  # [..., 1, 4, P]
    u = bin_center(c1, p[..., 0, :], p[..., 1, :].abs())
    v = bin_center(c2, p[..., 2, :], p[..., 3, :])
    polar = is_polar(params, kind)
    if polar is False:
        return u, v
    x, y = u * torch.cos(v), u * torch.sin(v)
    if polar is True:
        return x, y
    polar = polar.unsqueeze(-2)
    return torch.where(polar, x, u), torch.where(polar, y, v)
