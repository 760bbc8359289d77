"""What the passes share: the attention Site record, PassResult, the facts passes provide each other, and
small FX matching helpers."""

from __future__ import annotations

import dataclasses
import enum
import operator
from typing import Any

import torch
from torch import fx

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
SITES_KEY = "pqcompile_sites"


class SiteKind(str, enum.Enum):
    """What the cache holds when the graph runs; it picks the rewrite (rewrite_attention)."""

    PREFILL = "prefill"  # dense past: the appended key gets compressed, attention stays dense
    DECODE = "decode"  # the past is PolarKeys: attention reads the codes
    STATIC = "static"  # a PolarStaticCache: attention reads its preallocated compressed buffers

    # The value, not "SiteKind.PREFILL", in f-strings, tabulate and counter keys: Python 3.11 changed
    # format() of (str, Enum) members to the member name.
    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class SiteStatus(str, enum.Enum):
    """Where a site stands; report.json and the counters carry the value."""

    FOUND = "found"  # traced, waiting for rewrite_attention
    REWRITTEN = "rewritten"
    DECLINED = "declined"  # left exactly as it was; Site.reason says why

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


@dataclasses.dataclass
class Site:
    """One scaled-dot-product-attention call and what the passes learned about it."""

    sdpa: fx.Node
    module: str  # e.g. "model.layers.0.self_attn", from the node's nn_module_stack
    append: fx.Node | None = None  # the KV-append producing the key (torch.cat([past, new], -2))
    new_key: fx.Node | None = None  # the post-RoPE key fed to the append
    value: fx.Node | None = None  # the value operand with any GQA repeat stripped
    gqa: int = 1  # query heads per kv head
    write: fx.Node | None = None  # static caches: the in-place KV-append (keys.index_copy_(2, pos, new))
    causal: bool = False  # SDPA is_causal over a static cache sliced to the written length (HF prefill)
    kind: SiteKind | None = None  # None until traced (declined sites may stay None)
    pairing: str = ""  # codec.Pairing spec inferred from the graph
    pairing_source: str = ""  # the RoPE pattern the pairing was read from
    status: SiteStatus = SiteStatus.FOUND
    reason: str = ""
    # Values (trace_values): "" when they stay dense because nobody asked (value_bits None and a dense cache),
    # VALUES_COMPRESSED, or the reason they stay dense at a site whose keys are compressed (half-compressed).
    values: str = ""
    value_append: fx.Node | None = None  # the cached value: its KV-append (DynamicCache) or the static buffer
    value_write: fx.Node | None = None  # static caches: values.index_copy_(2, pos, new)
    values_held: bool = False  # dense values the backend keeps in place (dense_values.DenseValues): prefill sites

    def decline(self, reason: str) -> None:
        self.status, self.reason = SiteStatus.DECLINED, reason


VALUES_COMPRESSED = "compressed"  # Site.values of a site whose values the cache keeps compressed


@dataclasses.dataclass
class PassResult:
    name: str
    matched: int = 0
    rewritten: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (node name, reason)


def sites(gm: fx.GraphModule) -> list[Site]:
    return gm.meta.setdefault(SITES_KEY, [])


# What a pass can rely on once the passes before it ran. Each pass module declares REQUIRES (facts an
# earlier pass must provide) and PROVIDES; passes.check_order refuses an order that breaks them.
FACTS = {
    "sdpa": "every attention the passes can rewrite is an SDPA node (eager matmul-softmax-matmul matched)",
    "sites": "sites(gm) lists every attention site, each found (traced) or declined with a reason",
    "append": "found dynamic-cache sites know their KV-append, new key, value, GQA ratio and kind",
    "static_append": "sites reading a PolarStaticCache are found, with their in-place write",
    "pairing": "found sites carry the codec pairing their keys are compressed with",
    "values": "found sites say whether their values are compressed (Site.values) and know the value's KV-append",
    "rewritten": "found sites are rewritten to the polar ops; their status says so",
}


def val(node: Any):
    """The fake value dynamo recorded for a node (meta['val'] after AOT, meta['example_value'] from dynamo)."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("val", node.meta.get("example_value"))


def is_call(node: Any, *targets) -> bool:
    """call_function with one of `targets`, or call_method whose name is one of the string targets."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in targets
    return False


def arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "?"
    path = list(stack.values())[-1][0]
    for prefix in ("L['self'].", "L['args'][0].", "L['fn']."):
        path = path.replace(prefix, "")
    return path.replace("._modules['", ".").replace("['", ".").replace("']", "")


def graph_outputs(gm: fx.GraphModule) -> set[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    found: set[fx.Node] = set()
    torch.utils._pytree.tree_map(lambda x: found.add(x) if isinstance(x, fx.Node) else None, out.args)
    return found


GETITEM = (operator.getitem,)
CAT = (torch.cat, torch.concat, torch.concatenate)


def normalized_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _is_impure(node: fx.Node) -> bool:
    """Keep in-place methods (add_, index_copy_, copy_) alive: fx's DCE would drop them (docs/design.md §8.7)."""
    if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_"):
        return True
    if getattr(node.target, "mutates_inputs", False):  # e.g. static_cache.static_write
        return True
    return node.is_impure()


def eliminate_dead_code(gm: fx.GraphModule, roots: list[fx.Node]) -> None:
    """Remove the nodes a rewrite left without users: `roots` (the operands of what was erased or replaced),
    then their operands in turn. Nothing else is touched: dynamo graphs hold calls whose result is unused but
    whose effect is needed (transformers 4.57 builds masks under vmap: `_vmap_increment_nesting`, ...), which a
    whole-graph DCE (fx's eliminate_dead_code) would drop."""
    stack, erased = [n for n in roots if isinstance(n, fx.Node)], set()
    while stack:
        node = stack.pop()
        if node in erased or node.users or _is_impure(node):
            continue
        stack.extend(node.all_input_nodes)
        gm.graph.erase_node(node)
        erased.add(node)
    gm.graph.lint()
    gm.recompile()
