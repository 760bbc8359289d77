"""Rewrite the traced sites: the KV-append produces compressed keys, decode attention reads the codes.

prefill (the cache held no PolarKeys yet): attention over the prompt stays dense SDPA (exact and fast);
  the key written back to the cache becomes compress_keys(key) -> PolarKeys.
decode (the cache holds PolarKeys, so HF's own cat already appended into it): SDPA(q, repeat(key), v)
  becomes polar_sdpa(q, key, v_unrepeated): one code stream serves all query heads of a kv head.
static (the cache is a PolarStaticCache, whose index_copy_ already wrote into the compressed buffers):
  SDPA becomes polar_static_sdpa(q, key, v_unrepeated, mask), reading the length on the device.
Rewritten nodes keep correct meta['val'] (computed under the graph's fake mode); dead repeat nodes are
removed (only what the rewrite left without users; in-place methods stay alive).
"""

from __future__ import annotations

from torch import fx

from .. import cache, static_cache
from ..codec import Pairing
from ..config import PolarQuantConfig
from .common import PassResult, Site, arg, eliminate_dead_code, sites, val


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


def _rewrite_prefill(gm: fx.GraphModule, site: Site, cfg: PolarQuantConfig) -> None:
    key = site.append
    Pairing.parse(site.pairing).indices(val(key).shape[-1])  # fits head_dim, or raises before rewriting
    args = (key, cfg.radius_bits, cfg.angle_bits, cfg.group_size, site.pairing)
    with gm.graph.inserting_after(key):
        packed = gm.graph.call_function(cache.compress_keys, args)
    packed.meta["nn_module_stack"] = site.sdpa.meta.get("nn_module_stack", {})
    _set_meta(packed, cache.compress_keys, args)
    key.replace_all_uses_with(packed, delete_user_cb=lambda user: user.op == "output")


def _rewrite_static_write(gm: fx.GraphModule, site: Site) -> None:
    """keys.index_copy_(2, pos, new) -> static_write(keys, pos, new): the custom op mutates the inner
    buffers directly (AOTAutograd functionalizes inner-tensor mutations; an in-place op on the wrapper
    itself would be functionalized into an out-of-place copy of the whole cache)."""
    write = site.write
    if write.op != "call_method":  # already rewritten (another site reading the same cache)
        return
    args = (site.append, arg(write, 2, "index"), site.new_key)
    with gm.graph.inserting_before(write):
        new = gm.graph.call_function(static_cache.static_write, args)
    new.meta.update({k: v for k, v in write.meta.items() if k in ("nn_module_stack", "stack_trace")})
    write.replace_all_uses_with(new)
    gm.graph.erase_node(write)
    site.write = new


def _rewrite_decode(gm: fx.GraphModule, site: Site) -> list[fx.Node]:
    """SDPA -> the polar op; returns the SDPA's operands (the GQA repeats may now be dead)."""
    node = site.sdpa
    target = static_cache.polar_static_sdpa if site.kind == "static" else cache.polar_sdpa
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
        if site.status == "declined":
            result.skipped.append((site.sdpa.name, site.reason))
            continue
        result.matched += 1
        if site.kind == "prefill":
            _rewrite_prefill(gm, site, cfg)
        else:
            if site.kind == "static":
                _rewrite_static_write(gm, site)
            dead += _rewrite_decode(gm, site)
        site.status = "rewritten"
        result.rewritten += 1
    eliminate_dead_code(gm, dead)
    return result
