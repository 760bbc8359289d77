"""Rewrite the traced sites: the KV-append produces compressed keys, decode attention reads the codes.

prefill (the cache held no PolarKeys yet): attention over the prompt stays dense SDPA (exact and fast);
  the key written back to the cache becomes compress_keys(key) -> PolarKeys, and, where trace_values said so
  (Site.values == "compressed"), the value compress_values(value) -> PolarValues; dense values it can hold
  (Site.values_held) become hold_values(value) -> DenseValues, appended to in place.
decode (the cache holds PolarKeys, so HF's own cat already appended into it): SDPA(q, repeat(key), v)
  becomes polar_sdpa(q, key, v_unrepeated): one code stream serves all query heads of a kv head. When the cache
  holds PolarValues, v_unrepeated is one too and polar_sdpa reads both code streams (value_ops.attention_qv).
static (the cache is a PolarStaticCache, whose index_copy_ already wrote into the compressed buffers):
  keys.index_copy_ becomes static_write (values.index_copy_ static_write_values when its values are
  compressed), SDPA becomes polar_static_sdpa(q, key, v_unrepeated, mask), reading the length on the device.
Rewritten nodes keep correct meta['val'] (computed under the graph's fake mode); dead repeat nodes are
removed (only what the rewrite left without users; in-place methods stay alive).
"""

from __future__ import annotations

from torch import fx

from .. import cache, dense_values, ops, static_cache, values
from ..codec import Codec, Pairing
from ..config import PolarQuantConfig
from .common import VALUES_COMPRESSED, PassResult, Site, SiteKind, SiteStatus, arg, eliminate_dead_code, sites, val

# static_append: a static site found after this pass would stay dense while reported as found.
REQUIRES = frozenset({"sites", "append", "static_append", "pairing", "values"})
PROVIDES = frozenset({"rewritten"})


def _fake_mode(*vals):
    for v in vals:
        inner = getattr(v, "codes", v)
        mode = getattr(inner, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def _set_meta(node: fx.Node, fn, args, kwargs=None) -> None:
    avals = [val(a) for a in args]
    kvals = {k: val(v) for k, v in (kwargs or {}).items()}
    mode = _fake_mode(*avals)
    if mode is None:
        return
    with mode:
        out = fn(*avals, **kvals)
    node.meta["val"] = node.meta["example_value"] = out


def _compress_cached(gm: fx.GraphModule, site: Site, cached: fx.Node, fn, args: tuple) -> None:
    """The tensor written back to the cache (a graph output) becomes fn(*args); other users keep the dense one."""
    with gm.graph.inserting_after(cached):
        packed = gm.graph.call_function(fn, args)
    packed.meta["nn_module_stack"] = site.sdpa.meta.get("nn_module_stack", {})
    _set_meta(packed, fn, args)
    cached.replace_all_uses_with(packed, delete_user_cb=lambda user: user.op == "output")


def _rewrite_prefill(gm: fx.GraphModule, site: Site, cfg: PolarQuantConfig) -> None:
    key = site.append
    codec = Codec.from_config(cfg, Pairing.parse(site.pairing))
    codec.pairing.indices(val(key).shape[-1])  # fits head_dim, or raises before rewriting
    _compress_cached(gm, site, key, cache.compress_keys, (key, *ops.codec_args(codec)))
    if site.values == VALUES_COMPRESSED:
        value = site.value_append
        _compress_cached(gm, site, value, values.compress_values,
                         (value, cfg.value_bits, cfg.value_group, cfg.group_size))
    elif site.values_held:
        _compress_cached(gm, site, site.value_append, dense_values.hold_values, (site.value_append, cfg.group_size))


def _rewrite_static_write(gm: fx.GraphModule, write: fx.Node, target, buffer: fx.Node) -> fx.Node:
    """x.index_copy_(2, pos, new) -> target(x, pos, new) (static_write / static_write_values): the custom op
    mutates the inner buffers directly (AOTAutograd functionalizes inner-tensor mutations; an in-place op on the
    wrapper itself would be functionalized into an out-of-place copy of the whole cache). Returns the new node."""
    if write.op != "call_method":  # already rewritten (another site reading the same cache)
        return write
    args = (buffer, arg(write, 2, "index"), arg(write, 3, "source"))
    with gm.graph.inserting_before(write):
        new = gm.graph.call_function(target, args)
    new.meta.update({k: v for k, v in write.meta.items() if k in ("nn_module_stack", "stack_trace")})
    write.replace_all_uses_with(new)
    gm.graph.erase_node(write)
    return new


def _rewrite_decode(gm: fx.GraphModule, site: Site) -> list[fx.Node]:
    """SDPA -> the polar op; returns the SDPA's operands (the GQA repeats may now be dead)."""
    node = site.sdpa
    target = static_cache.polar_static_sdpa if site.kind is SiteKind.STATIC else cache.polar_sdpa
    kwargs = {"attn_mask": arg(node, 3, "attn_mask"), "scale": arg(node, 7, "scale")}
    if site.causal:
        kwargs["is_causal"] = True
    args = (arg(node, 0, "query"), site.append, site.value)
    with gm.graph.inserting_before(node):
        polar = gm.graph.call_function(target, args, kwargs)
    polar.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    _set_meta(polar, target, args, kwargs)
    node.replace_all_uses_with(polar)
    operands = node.all_input_nodes
    gm.graph.erase_node(node)
    site.sdpa = polar
    return operands


def run(gm: fx.GraphModule, cfg: PolarQuantConfig) -> PassResult:
    result = PassResult("rewrite_attention")
    dead: list[fx.Node] = []  # operands of erased nodes: where dead-code elimination starts
    for site in sites(gm):
        if site.status is SiteStatus.DECLINED:
            result.skipped.append((site.sdpa.name, site.reason))
            continue
        result.matched += 1
        if site.kind is SiteKind.PREFILL:
            _rewrite_prefill(gm, site, cfg)
        else:
            if site.kind is SiteKind.STATIC:
                site.write = _rewrite_static_write(gm, site.write, static_cache.static_write, site.append)
                if site.value_write is not None:
                    site.value_write = _rewrite_static_write(gm, site.value_write, static_cache.static_write_values,
                                                             site.value_append)
            dead += _rewrite_decode(gm, site)
        site.status = SiteStatus.REWRITTEN
        result.rewritten += 1
    eliminate_dead_code(gm, dead)
    return result
