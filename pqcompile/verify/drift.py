"""The drift check (verify="shadow:N"): quantization-induced drift, not a bug check.

Each graph output gets a full-precision shadow: the same output of the original graph run on the shadows of
the inputs (a side table keyed by the output tensor's identity, held weakly). The prefill's original graph
yields the dense keys, so for the first N decode steps the shadow is a complete full-precision run of the
model fed the same tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from ..dynamic import DynamicCompressed
from ..metrics import kl_top1, metrics
from .kernel import as_dense
from .sites import SiteNodes

_SHADOW: WeakIdKeyDictionary = WeakIdKeyDictionary()  # output tensor -> (full-precision shadow, decode step)


def shadow_inputs(args, n: int) -> tuple[int, list] | None:
    """(the decode step of this call, 0 for a prefill; `args` with shadowed tensors replaced by their shadows),
    or None when the call is not followed (a cache built before verify, or past step n)."""
    polar_in = [a for a in args if isinstance(a, DynamicCompressed)]  # PolarKeys, PolarValues
    shadows = [_SHADOW.get(a) for a in polar_in]
    if polar_in and (None in shadows or max(s[1] for s in shadows) >= n):
        return None
    step = max((s[1] for s in shadows), default=-1) + 1
    return step, [(_SHADOW[a][0] if isinstance(a, torch.Tensor) and a in _SHADOW else a) for a in args]


def remember(out, ref_out, step: int, n: int) -> None:
    """The original graph's outputs become the shadows of the compiled outputs, up to step n."""
    if step < n:
        for o, r in zip(tree_leaves(out), tree_leaves(ref_out)):
            if isinstance(o, torch.Tensor) and isinstance(r, torch.Tensor):
                _SHADOW[o] = (r, step)


def checks(sites: list[SiteNodes], out_names: list[str], step: int, out, ref: tuple[Any, dict],
           rew_seen: dict) -> list[dict[str, Any]]:
    """Per layer, keys and attention output vs the shadow's; the logits with KL and top-1 agreement."""
    ref_out, ref_seen = ref
    found = []
    for s in sites:
        cached = [("keys", s.append)] + ([("values", s.value_append)] if s.value_append else [])
        if step == 0:  # prefill: the compressed keys (values) against the dense ones they replace
            for what, node in cached:
                o = next((o for name, o in zip(out_names, tree_leaves(out)) if name == node), None)
                if isinstance(o, DynamicCompressed):
                    found.append({"name": f"{s.module} {what}", "site": s.index,
                                  **metrics(o.dequantize(), ref_seen[node])})
            continue
        for what, node in cached:
            found.append({"name": f"{s.module} {what}", "site": s.index,
                          **metrics(as_dense(rew_seen[node]), as_dense(ref_seen[node]))})
        found.append({"name": f"{s.module} attention", "site": s.index,
                      **metrics(rew_seen[s.rewritten], ref_seen[s.original])})
    for name, o, r in zip(out_names, tree_leaves(out), tree_leaves(ref_out)):
        if "logits" in name and isinstance(o, torch.Tensor) and o.is_floating_point():
            found.append({"name": name, "site": None, **metrics(o, r), **kl_top1(o, r)})
    return found
