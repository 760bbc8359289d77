"""Where the checks look: each rewritten attention site's nodes, by name, in the original and rewritten graphs."""

from __future__ import annotations

import re
from typing import NamedTuple

from torch import fx
from torch.utils._pytree import tree_leaves


class SiteNodes(NamedTuple):
    """A rewritten attention site (passes.common.Site) as node names the interpreter runs can capture."""

    index: int  # position in the passes' site list: the report's site number
    module: str  # e.g. "model.layers.0.self_attn"
    kind: str  # "prefill" | "decode" | "static"
    original: str  # the original-graph node whose value the rewritten attention stands for
    rewritten: str  # the rewritten attention node
    append: str | None  # the KV-append (its value: the keys the cache holds after the call)
    value_append: str | None = None  # the values' KV-append when they are compressed (passes' Site.value_append)


def site_map(sites: list, original: fx.GraphModule) -> list[SiteNodes]:
    """The rewritten sites that have a counterpart in the original graph (the others cannot be compared)."""
    by_name = {n.name: n for n in original.graph.nodes}
    found = []
    for i, s in enumerate(sites):
        orig = counterpart(s.sdpa, by_name)
        if s.status == "rewritten" and orig is not None:
            found.append(SiteNodes(i, s.module, s.kind, orig, s.sdpa.name, s.append.name if s.append else None,
                                   s.value_append.name if s.value_append is not None else None))
    return found


def captured(sites: list[SiteNodes], graph: str) -> set[str]:
    """The nodes a run of the "original" or "rewritten" graph keeps: the attention sites and the KV-appends
    (keys, and values where they are compressed)."""
    attention = {s.original if graph == "original" else s.rewritten for s in sites}
    return attention | {s.append for s in sites if s.append} | {s.value_append for s in sites if s.value_append}


def output_names(gm: fx.GraphModule) -> list[str]:
    """A name per leaf of the graph's output: its node's name (a constant's repr), in tree_leaves order."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    return [a.name if isinstance(a, fx.Node) else repr(a) for a in tree_leaves(out_node.args)]


def counterpart(node: fx.Node, original: dict[str, fx.Node]) -> str | None:
    """The original-graph node whose value a rewritten attention node stands for: the node a user of `node`
    (users keep their names) read in the original graph at the same argument position. Covers SDPA replaced
    by the polar op and eager matmul-softmax-matmul replaced by SDPA; an SDPA left in place is itself."""
    for user in node.users:
        before = original.get(user.name)
        if before is None or before.op != user.op or before.target != user.target:
            continue
        now, then = [], []
        fx.node.map_aggregate((user.args, user.kwargs), now.append)
        fx.node.map_aggregate((before.args, before.kwargs), then.append)
        for a, b in zip(now, then):
            if a is node and isinstance(b, fx.Node):
                return b.name
    return node.name if node.name in original else None


_CACHE_INPUT = re.compile(r"layers_(\d+)_(keys|values)$")  # dynamo's name of L[..].cache.layers[i].keys (values)


def cache_label(placeholder: str, modules: list[tuple[int, str]]) -> tuple[str, int | None]:
    """('<module> keys' or '<module> values', its site index) for a graph input that holds a layer's cache tensor,
    from dynamo's placeholder name and the sites' (index, module path); the placeholder name when it names no
    layer. What verify's state check and the backend's refused-append errors call a cache tensor."""
    m = _CACHE_INPUT.search(placeholder)
    if m is None:
        return placeholder, None
    layer, kind = m.groups()
    for index, module in modules:
        if f".layers.{layer}." in f".{module}.":
            return f"{module} {kind}", index
    return f"layers.{layer} {kind}", None


def appended_input(gm: fx.GraphModule, output: str) -> int | None:
    """The input position of the cache tensor that graph output `output` (a node name) appends to: the output is
    torch.cat([placeholder, new], ...) in the original graph. None for anything else (a prefill's new state)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    node = next((n for n in gm.graph.nodes if n.name == output), None)
    if node is None or node.op != "call_function" or not node.args or not isinstance(node.args[0], (list, tuple)):
        return None
    past = node.args[0][0] if node.args[0] else None
    return placeholders.index(past) if isinstance(past, fx.Node) and past.op == "placeholder" else None
