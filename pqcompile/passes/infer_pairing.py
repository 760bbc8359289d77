"""Infer each site's RoPE pairing from the graph that computes its post-RoPE key.

Patterns read (walking back from the appended key through casts, views and transposes):
  half-split   k*cos + cat([-k[..., h:], k[..., :h]], -1)*sin          HF rotate_half (Llama, Qwen, ...)
  interleaved  k*cos + stack([-k[..., 1::2], k[..., ::2]], -1).flatten(-2)*sin     GPT-J rotate_every_two
  partial      cat([rope(k[..., :r]), k[..., r:]], -1)                  GPT-NeoX, Phi, StableLM
  none         no rotation found (GPT-2, OPT): half-split, the codec stays valid
An explicit PolarQuantConfig.pairing other than "auto" overrides the layout (rotary_dim still inferred).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..codec import Pairing
from ..config import PairingMode, PolarQuantConfig
from .common import CAT, GETITEM, PassResult, SiteKind, SiteStatus, arg, is_call, sites, val

# Static sites take their pairing from the PolarStaticCache (trace_static_cache): either order works.
REQUIRES = frozenset({"sites", "append"})
PROVIDES = frozenset({"pairing"})

_PASSTHROUGH = ("to", "contiguous", "transpose", "permute", "view", "reshape", "type_as", "float", "half",
                "bfloat16", torch.transpose, torch.permute)
_NEG = (operator.neg, torch.neg, "neg")
_STACK = (torch.stack,)


def _slice_of(node) -> tuple[int | None, int | None, int | None] | None:
    """x[..., a:b:c] or x[:, :, :, a:b:c] (GPT-J indexes every dim) on the last dim -> (a, b, c)."""
    if not is_call(node, *GETITEM) or not isinstance(node.args[0], fx.Node):
        return None
    index, base = node.args[1], val(node.args[0])
    if not (isinstance(index, tuple) and index and isinstance(index[-1], slice)):
        return None
    lead = index[:-1]
    if not all(i is Ellipsis or i == slice(None) for i in lead):
        return None
    if Ellipsis not in lead and (base is None or len(index) != base.dim()):
        return None
    s = index[-1]
    return s.start, s.stop, s.step


def _rotate_layout(node: fx.Node) -> tuple[PairingMode, int] | None:
    """Recognize rotate_half / rotate_every_two output; returns (layout, rotated dims).

    half-split   cat([-x[..., h:], x[..., :h]], -1)                 HF rotate_half (Llama, NeoX, Phi, ...)
    interleaved  stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)  GPT-J / Cohere rotate_every_two
    Both slices must cut the same tensor, with the bounds of that layout.
    """
    flat = is_call(node, "flatten")
    if flat:
        node = node.args[0]
    if not is_call(node, *CAT, *_STACK):
        return None
    parts = arg(node, 0, "tensors")
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and is_call(parts[0], *_NEG)):
        return None
    hi_node, lo_node = parts[0].args[0], parts[1]
    hi, lo = _slice_of(hi_node), _slice_of(lo_node)
    if not (hi and lo) or hi_node.args[0] is not lo_node.args[0] or val(hi_node.args[0]) is None:
        return None
    width = int(val(hi_node.args[0]).shape[-1])
    h = width // 2
    if flat and hi[:3] == (1, None, 2) and lo[0] in (None, 0) and lo[1:] == (None, 2):
        return PairingMode.INTERLEAVED, width
    if not flat and hi[0] == h and hi[1] in (None, width) and lo[0] in (None, 0) and lo[1] == h \
            and hi[2] in (None, 1) and lo[2] in (None, 1):
        return PairingMode.HALF, width
    return None


def _find_rope(node: fx.Node, depth: int = 0) -> tuple[PairingMode, int] | None:
    if depth > 6 or not isinstance(node, fx.Node):
        return None
    found = _rotate_layout(node)
    if found:
        return found
    for a in node.all_input_nodes:
        found = _find_rope(a, depth + 1)
        if found:
            return found
    return None


def infer(new_key: fx.Node) -> tuple[Pairing, str]:
    node = new_key
    while is_call(node, *_PASSTHROUGH):
        node = node.args[0]
    head_dim = int(val(new_key).shape[-1])
    # partial rotary: cat([rope(k[..., :r]), k[..., r:]], -1)     GPT-NeoX, Phi, StableLM, GPT-J
    if is_call(node, *CAT) and len(arg(node, 0, "tensors")) == 2 and arg(node, 1, "dim", 0) in (-1, 3):
        rot_part, pass_part = arg(node, 0, "tensors")
        rot = _find_rope(rot_part)
        cut = _slice_of(pass_part)
        if rot and cut and cut[0] == rot[1] and cut[1] is None and cut[2] in (None, 1):
            layout, r = rot
            return Pairing(layout, r if r < head_dim else None), f"partial rotary ({layout.value}, {r} of {head_dim})"
    rot = _find_rope(node)
    if rot:
        layout, r = rot
        return Pairing(layout, r if r < head_dim else None), f"rotary ({layout.value})"
    return Pairing(PairingMode.HALF), "no RoPE found: half-split"


def run(gm: fx.GraphModule, cfg: PolarQuantConfig) -> PassResult:
    result = PassResult("infer_pairing")
    for site in sites(gm):
        if site.status is SiteStatus.DECLINED or site.kind is SiteKind.STATIC:  # static: fixed when the cache was allocated
            continue
        result.matched += 1
        past = val(site.append.args[0][0])
        if site.kind is SiteKind.DECODE:  # the codec was fixed when the prefill compressed this cache
            site.pairing, site.pairing_source = str(past.codec.pairing), "from the cached PolarKeys"
            continue
        pairing, source = infer(site.new_key)
        if cfg.pairing is not PairingMode.AUTO:
            pairing, source = Pairing(cfg.pairing, pairing.rotary_dim), f"configured ({cfg.pairing.value})"
        site.pairing, site.pairing_source = str(pairing), source
    return result
