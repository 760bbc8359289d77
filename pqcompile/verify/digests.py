"""Digests of cache state bytes for the state check (integrity.py, integrity_static.py): per group and (batch, head)
row, the sum of byte * weight(position) in int64 with weights in [1, 2^31), exact below 2^24 bytes per row, so any
change confined to one byte changes it; and where each state kind keeps its groups and its full-precision rows."""

from __future__ import annotations

import torch

from ..dense_values import DenseValues
from ..static_cache import StaticCompressed

_BUDGET = 1 << 22  # bytes digested per launch on a checked call: its int64 temporaries stay under 64 MB
_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _weights(n: int, device: torch.device) -> torch.Tensor:
    """Position weights in [1, 2^31), int64: a multiplicative hash of the position, odd."""
    w = _WEIGHTS.get(device)
    if w is None or w.numel() < n:
        i = torch.arange(1 << max(n - 1, 1).bit_length(), dtype=torch.int64, device=device)
        w = _WEIGHTS[device] = (i * 2654435761 + 40503) % 2147483647 | 1
    return w[:n]


def digest(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [B, H, k * rows, ...] (last dim contiguous) -> int64 [B, H, k]: each group of `rows` rows' bytes, weighted
    by position."""
    B, H = x.shape[:2]
    b = (x if x.dtype == torch.uint8 else x.view(torch.uint8)).reshape(B, H, x.shape[2] // rows, -1)
    return (b.to(torch.int64) * _weights(b.shape[-1], b.device)).sum(-1)


def _parts(s) -> list[tuple[str, torch.Tensor, int]]:
    """(name, buffer, rows per group) of a state's complete groups."""
    G = s.codec.group_size if isinstance(s, StaticCompressed) else s.group_size
    if isinstance(s, StaticCompressed):  # keys: 4 params rows per group; values: one per token
        return [("codes", s.codes, G), ("params", s.params, s.params.shape[2] * G // s.codes.shape[2])]
    return [("rows", s.buf, G)] if isinstance(s, DenseValues) else [("codes", s.codes, G),
                                                                      ("params", s.params, s.param_rows(G))]


def _open_rows(s, group: int, rows: int) -> torch.Tensor:
    """The first `rows` tokens of group `group` where the state keeps them in full precision."""
    if isinstance(s, DenseValues):
        return s.buf[:, :, group * s.group_size: group * s.group_size + rows]
    return s.ring[:, :, :rows] if isinstance(s, StaticCompressed) else s.tail[:, :, :rows]


def _group_sums(s, g0: int, g1: int) -> torch.Tensor:
    """int64 [B, H, g1 - g0, parts]: the digests of groups [g0, g1), a few groups per launch."""
    parts = _parts(s)
    step = max(1, _BUDGET // max(t[:, :, :r].numel() * t.element_size() for _, t, r in parts))
    chunks = [torch.stack([digest(t[:, :, a * r: min(a + step, g1) * r], r) for _, t, r in parts], dim=-1)
              for a in range(g0, g1, step)]
    return torch.cat(chunks, dim=2)


_ATTR = "_pq_digests"  # the _Record of a state, on its ring tensor (a tensor attribute: read in ~0.1 us)
