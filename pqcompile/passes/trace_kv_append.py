"""Find SDPA sites and trace each key operand back, through the GQA repeat, to its KV-append.

Shapes matched (written once, variants listed):
  key   = cat([past, new], dim=-2)                          DynamicCache.update (transformers 4.57-5.x)
  key'  = key                                               SDPA(enable_gqa=True) or no GQA
        | key[:, :, None].expand(B, Hkv, n, T, D).reshape(B, Hkv*n, T, D)   HF repeat_kv (masked decode)
The value operand is stripped of the same repeat, so the polar op reads Hkv value heads.

A site is declined (and stays exactly as it was) when:
  - its key is not a KV-append written back to the cache (use_cache=False, cross-attention, StaticCache
    index_copy_, which this release keeps dense),
  - the cache keeps only a window of the appended key (sliding-window layers: cat(...)[:, :, -w:]),
  - the appended key is not computed from the query's hidden states (encoder-decoder cross-attention: its
    cache is filled once from the encoder output, and decode steps read it without a KV-append),
  - the appended key feeds other ops than this attention (the compressed key would be dequantized),
  - dropout_p is not 0, or is_causal is used with several queries over a cache (SDPA aligns that mask
    top-left, a shape no decoder uses; refusing is safer than guessing).
"""

from __future__ import annotations

import torch
from torch import fx

from ..cache import PolarKeys
from ..config import PolarQuantConfig
from .common import (
    CAT,
    GETITEM,
    SDPA_TARGETS,
    PassResult,
    Site,
    SiteKind,
    SiteStatus,
    arg,
    graph_outputs,
    is_call,
    module_path,
    sites,
    val,
)

REQUIRES = frozenset({"sdpa"})  # eager attention already turned into SDPA: it is traced like any other site
PROVIDES = frozenset({"sites", "append"})


def strip_gqa_repeat(node: fx.Node) -> tuple[fx.Node, int]:
    """x[:, :, None].expand(B, H, n, T, D).reshape(B, H*n, T, D) -> (x, n); anything else -> (node, 1)."""
    if not is_call(node, "reshape", "view", torch.reshape):
        return node, 1
    expand = node.args[0]
    if not is_call(expand, "expand") or not is_call(expand.args[0], *GETITEM):
        return node, 1
    base, index = expand.args[0].args
    if not (isinstance(index, tuple) and len(index) >= 3 and index[2] is None
            and all(i == slice(None) or i is Ellipsis for i in index[:2])):
        return node, 1
    base_val, out_val = val(base), val(node)
    if base_val is None or out_val is None or base_val.dim() != 4 or out_val.shape[1] % base_val.shape[1]:
        return node, 1
    return base, out_val.shape[1] // base_val.shape[1]


def kv_append(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """cat([past, new], dim=-2) -> (past, new), else None."""
    if not is_call(node, *CAT):
        return None
    tensors, dim = arg(node, 0, "tensors"), arg(node, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or dim not in (-2, 2):
        return None
    return tensors[0], tensors[1]


def _window_kept(key: fx.Node, outputs: set[fx.Node]) -> int | None:
    """cat(...)[:, :, -w:] written back to the cache (HF DynamicSlidingWindowLayer: Mistral v0.1, Gemma2/3
    sliding layers) -> w."""
    for user in key.users:
        if user in outputs and is_call(user, *GETITEM) and isinstance(user.args[1], tuple):
            index = user.args[1]
            if len(index) >= 3 and isinstance(index[2], slice) and isinstance(index[2].start, int) \
                    and index[2].start < 0 and index[2].stop is None:
                return -index[2].start
    return None


def _ancestors(node: fx.Node, depth: int) -> set[fx.Node]:
    seen, frontier = set(), [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen and a.op != "get_attr"]
        seen.update(frontier)
    return {n for n in seen if n.op == "call_function" or n.op == "call_method"}


def _same_source(q: fx.Node, new_key: fx.Node, depth: int = 16) -> bool:
    """Self-attention: q and the appended key are computed from one hidden-state tensor (through their
    projections, fused or not, norms and RoPE). Cross-attention (BART/T5/Whisper decoders) projects the
    key from the encoder output, a graph input the query never reads."""
    return bool(_ancestors(q, depth) & _ancestors(new_key, depth))


def other_users(cached: fx.Node, operand: fx.Node, sdpa: fx.Node, ignore: frozenset | set = frozenset()
                ) -> set[fx.Node]:
    """Users of a cached key or value besides the graph output, shape reads (eager mask slicing), the attention
    node and the GQA repeat between them (`operand` is what the attention reads)."""
    users = set(cached.users) - {next(iter(n for n in cached.graph.nodes if n.op == "output"))} - set(ignore)
    users = {u for u in users if not is_call(u, "size", "dim")}
    allowed = {sdpa} | ({operand, operand.args[0], operand.args[0].args[0]} if operand is not cached else set())
    return users - allowed


def run(gm: fx.GraphModule, cfg: PolarQuantConfig) -> PassResult:
    result = PassResult("trace_kv_append")
    outputs = graph_outputs(gm)
    for node in gm.graph.nodes:
        if not is_call(node, *SDPA_TARGETS):
            continue
        site = Site(sdpa=node, module=module_path(node))
        sites(gm).append(site)
        result.matched += 1
        trace(site, outputs)
        if site.status is SiteStatus.DECLINED:
            result.skipped.append((node.name, site.reason))
    return result


def trace(site: Site, outputs: set[fx.Node], ignore: frozenset | set = frozenset()) -> None:
    """Fill `site` from its SDPA node, or decline it. Users of the key in `ignore` are not counted (nodes
    a caller is about to remove: match_eager_attention probes a new SDPA node next to the eager chain)."""
    node = site.sdpa
    q, k, v = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    if arg(node, 4, "dropout_p", 0.0) not in (0, 0.0):
        return site.decline("dropout_p > 0 (training-mode dropout)")
    key, n_rep = strip_gqa_repeat(k)
    value, v_rep = strip_gqa_repeat(v)
    append = kv_append(key)
    if append is None:
        return site.decline("key is not a KV-append torch.cat([past, new], dim=-2) (no cache, cross-attention, "
                            "or a StaticCache index_copy_, kept dense in this release)")
    if key not in outputs:
        window = _window_kept(key, outputs)
        if window:
            return site.decline(f"sliding-window layer: the cache keeps only the newest {window} keys "
                                f"(cat(...)[:, :, -{window}:]); compressed groups cannot drop single tokens")
        return site.decline("the concatenated key is not written back to the cache (not a graph output)")
    extra = other_users(key, k, node, ignore)
    if extra:
        return site.decline(f"the cached key also feeds {sorted(u.name for u in extra)}")
    q_val, key_val = val(q), val(key)
    if q_val is None or key_val is None or q_val.dim() != 4 or key_val.dim() != 4:
        return site.decline("query/key shapes unknown or not 4-D")
    if q_val.shape[1] % key_val.shape[1]:
        return site.decline(f"query heads {q_val.shape[1]} not a multiple of key heads {key_val.shape[1]}")
    past, new = append
    if not _same_source(q, new):
        return site.decline("cross-attention: the cached key is not computed from the query's hidden states "
                            "(encoder-decoder); compressing it would only make every decode step dequantize it")
    site.kind = SiteKind.DECODE if isinstance(val(past), PolarKeys) else SiteKind.PREFILL
    if site.kind is SiteKind.DECODE and arg(node, 6, "is_causal", False) and q_val.shape[2] != 1:
        return site.decline("is_causal with several queries over a cache (top-left aligned mask)")
    if n_rep != v_rep and v_rep != 1:
        value = v
    site.append, site.new_key, site.value, site.gqa = key, new, value, q_val.shape[1] // key_val.shape[1]
