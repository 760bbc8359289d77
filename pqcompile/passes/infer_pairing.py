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
import torch.fx as fx

from ..codec import Pairing
from ..config import PairingMode, PolarQuantConfig
from .common import CAT, GETITEM, PassResult, arg, is_call, sites, val

_PASSTHROUGH = ("to", "contiguous", "transpose", "permute", "view", "reshape", "type_as", "float", "half",
                "bfloat16", torch.transpose, torch.permute)
_NEG = (operator.neg, torch.neg, "neg")
_STACK = (torch.stack,)


def _slice_of(node) -> tuple[int | None, int | None, int | None] | None:
    """x[..., a:b:c] on the last dim -> (a, b, c)."""
    if not is_call(node, *GETITEM):
        return None
    index = node.args[1]
    if isinstance(index, tuple) and index and index[0] is Ellipsis and len(index) == 2 and isinstance(index[1], slice):
        s = index[1]
        return s.start, s.stop, s.step
    return None


def _rotate_layout(node: fx.Node) -> tuple[PairingMode, int] | None:
    """Recognize rotate_half / rotate_every_two output; returns (layout, rotated dims)."""
    if is_call(node, "flatten"):
        node = node.args[0]
    if is_call(node, *CAT, *_STACK):
        parts = node.args[0]
        if len(parts) == 2 and is_call(parts[0], *_NEG):
            hi, lo = _slice_of(parts[0].args[0]), _slice_of(parts[1])
            width = val(parts[0].args[0].args[0])
            if hi and lo and width is not None:
                layout = PairingMode.INTERLEAVED if hi[2] == 2 else PairingMode.HALF
                return layout, int(width.shape[-1])
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
    # partial rotary: cat([rope(k_rot), k_pass], -1)
    if is_call(node, *CAT) and len(arg(node, 0, "tensors")) == 2 and arg(node, 1, "dim", 0) in (-1, 3):
        rot = _find_rope(arg(node, 0, "tensors")[0])
        if rot:
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
        if site.status == "declined":
            continue
        result.matched += 1
        past = val(site.append.args[0][0])
        if site.kind == "decode":  # the codec was fixed when the prefill compressed this cache
            site.pairing, site.pairing_source = str(past.codec.pairing), "from the cached PolarKeys"
            continue
        pairing, source = infer(site.new_key)
        if cfg.pairing is not PairingMode.AUTO:
            pairing, source = Pairing(cfg.pairing, pairing.rotary_dim), f"configured ({cfg.pairing.value})"
        site.pairing, site.pairing_source = str(pairing), source
    return result
