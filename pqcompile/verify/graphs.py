"""Running graphs for the checks: an interpreter that keeps chosen node values, snapshots of graphs, and
copies of the inputs a graph writes in place."""

from __future__ import annotations

import contextlib
import copy
import operator
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..compressed import quiet_fallbacks
from ..passes.common import SITES_KEY, is_call

# ops whose result may share memory with their first argument (`.to` to the same device/dtype is the tensor)
_VIEWS = ("view", "reshape", "transpose", "permute", "expand", "narrow", "select", "unsqueeze", "squeeze",
          "flatten", "t", "as_strided", "contiguous", "detach", "to", "type_as", "view_as", "reshape_as",
          "expand_as", "__getitem__", operator.getitem)


class _Capture(fx.Interpreter):
    """Runs a GraphModule node by node and keeps the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names, self.seen = names, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.seen[n.name] = out
        return out


def run(gm: fx.GraphModule, args, names: set[str]) -> tuple[Any, dict[str, Any]]:
    """gm(*args) in Python, eagerly -> (its output, {name: value} of the named nodes)."""
    interp = _Capture(gm, names)
    return interp.run(*args), interp.seen


@contextlib.contextmanager
def checking() -> Iterator[None]:
    """Around the checking runs: no autograd, no warnings. The original graph runs HF's ops on compressed keys by design: their one-time
    dense-fallback warnings stay for the user's own code. Nothing else the checks trigger is the user's to see."""
    with quiet_fallbacks(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        yield


def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a (rewritten) graph for checking: the inner compiler may transform `gm` in place."""
    sites = gm.meta.pop(SITES_KEY, None)  # the passes' Site records (nodes of `gm`): the copy needs none
    try:
        return copy.deepcopy(gm)
    finally:
        if sites is not None:
            gm.meta[SITES_KEY] = sites


def clone(t: torch.Tensor) -> torch.Tensor:
    """A deep copy of a tensor, or of a wrapper subclass (PolarKeys, StaticPolarKeys) through its inner tensors."""
    if is_traceable_wrapper_subclass(t):
        names, ctx = t.__tensor_flatten__()
        return type(t).__tensor_unflatten__({n: clone(getattr(t, n)) for n in names}, ctx, t.shape, t.stride())
    return t.detach().clone()


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    if is_traceable_wrapper_subclass(dst):
        for n in dst.__tensor_flatten__()[0]:
            copy_into(getattr(dst, n), getattr(src, n))
    else:
        with torch.no_grad():
            dst.copy_(src)


def with_clones(args, indices: list[int]) -> list:
    return [clone(a) if i in indices else a for i, a in enumerate(args)]


def mutated_inputs(gm: fx.GraphModule) -> list[str]:
    """Placeholders written in place (through views), e.g. StaticCache's index_copy_ and add_."""
    found = []
    for n in gm.graph.nodes:
        target = n.target
        mutates = (n.op == "call_method" and target.endswith("_") and not target.startswith("_")) or (
            n.op == "call_function" and (target is operator.setitem or getattr(
                getattr(target, "_schema", None), "is_mutable", False)))
        base = n.args[0] if mutates and n.args else None
        while isinstance(base, fx.Node) and base.op != "placeholder" and is_call(base, *_VIEWS):
            base = base.args[0]
        if isinstance(base, fx.Node) and base.op == "placeholder" and base.name not in found:
            found.append(base.name)
    return found
