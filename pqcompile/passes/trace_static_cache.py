"""Pick up the SDPA sites that read a static cache (StaticCache's in-place `index_copy_` KV-append).

  keys.index_copy_(2, cache_position, k_new)                  StaticLayer.update: positions from the
                                                              cumulative_length counter (transformers 5.x)
                                                              or the model's cache_position input (4.57)
  SDPA(q, repeat_kv(keys), repeat_kv(values), attn_mask=...)  keys: the cache tensor itself (decode; 4.57
                                                              prefill too: its mask spans max_cache_len)
  SDPA(q, keys[:, :, :n], values[:, :, :n], is_causal=True)    5.x prefill: HF slices to the written length
If `keys` is a StaticPolarKeys (pqcompile.PolarStaticCache), HF's index_copy_ already writes into the
compressed buffers (in place, a custom op with mutates_args), and the site is routed to the static polar
attention. A dense StaticCache is declined with a reason saying how to compress it.
Runs after trace_kv_append, on the sites it declined.
"""

from __future__ import annotations

from torch import fx

from ..config import PolarQuantConfig
from ..static_cache import StaticPolarKeys
from .common import GETITEM, SDPA_TARGETS, PassResult, SiteKind, SiteStatus, arg, is_call, sites, val
from .trace_kv_append import strip_gqa_repeat

REQUIRES = frozenset({"sites"})  # it revisits the sites trace_kv_append declined
PROVIDES = frozenset({"static_append"})


def static_append(key: fx.Node) -> fx.Node | None:
    """The `key.index_copy_(2, positions, new)` node writing into `key`, if any."""
    for user in key.users:
        if is_call(user, "index_copy_") and user.args[0] is key and arg(user, 1, "dim") in (2, -2):
            return user
    return None


def _strip_length_slice(node: fx.Node) -> tuple[fx.Node, bool]:
    """keys[:, :, :n] (HF's sdpa slices a static cache to kv_length when the mask is skipped) -> keys."""
    if is_call(node, *GETITEM) and isinstance(node.args[1], tuple) and len(node.args[1]) >= 3:
        i = node.args[1]
        if i[0] == i[1] == slice(None) and isinstance(i[2], slice) and i[2].start in (None, 0) and i[2].step is None:
            return node.args[0], True
    return node, False


def run(gm: fx.GraphModule, cfg: PolarQuantConfig) -> PassResult:
    result = PassResult("trace_static_cache")
    for site in sites(gm):
        if site.status is not SiteStatus.DECLINED or not is_call(site.sdpa, *SDPA_TARGETS):  # eager attention sites
            continue
        q, k, v = (arg(site.sdpa, i, n) for i, n in enumerate(("query", "key", "value")))
        key, _ = strip_gqa_repeat(k)
        key, sliced = _strip_length_slice(key)
        write = static_append(key)
        if write is None:
            continue
        result.matched += 1
        if not isinstance(val(key), StaticPolarKeys):
            site.reason = ("dense StaticCache (index_copy_ KV-append): pass a "
                           "pqcompile.PolarStaticCache(...) as the cache to keep it compressed")
            result.skipped.append((site.sdpa.name, site.reason))
            continue
        value, _ = _strip_length_slice(strip_gqa_repeat(v)[0])
        causal = bool(arg(site.sdpa, 6, "is_causal", False))
        if causal and not sliced:
            site.reason = "is_causal over a whole static cache (top-left aligned mask)"
            result.skipped.append((site.sdpa.name, site.reason))
            continue
        site.causal = causal
        site.status, site.reason, site.kind = SiteStatus.FOUND, "", SiteKind.STATIC
        site.append, site.new_key, site.value, site.write = key, write.args[3], value, write
        site.gqa = val(q).shape[1] // val(key).shape[1]
        site.pairing, site.pairing_source = str(val(key).codec.pairing), "from the PolarStaticCache"
    return result
