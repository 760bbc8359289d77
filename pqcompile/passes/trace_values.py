"""Decide, per found site, whether its values are compressed too (Site.values), and find their KV-append.

  prefill  options value_bits set: the value operand (GQA repeat stripped) is cat([past, new], -2) written back
           to the cache like the key -> rewrite_attention caches compress_values(value) (a PolarValues)
  decode   the cached values are PolarValues (the prefill compressed them): HF's own cat already appended,
           and the polar attention reads both code streams
  static   the PolarStaticCache holds StaticPolarValues (built with value_bits): its values.index_copy_
           becomes static_write_values
A prefill site whose values stay dense (value_bits None, or a reason above) but are such a KV-append gets
Site.values_held: rewrite_attention caches hold_values(value) (a dense_values.DenseValues, appended to in place).
A site whose keys are compressed but whose values cannot be keeps its values dense (half-compressed) and says
why in Site.values: the value is not a KV-append written back to the cache, it also feeds other ops (it would be
dequantized), its head count or dtype does not fit, value_group does not divide its head dim
(value_codec.check_fits), or the cache (filled by an earlier graph, or a PolarStaticCache built without
value_bits) holds dense values. With value_bits None and dense caches nothing is matched and Site.values stays
"": today's graphs, unchanged.
"""

from __future__ import annotations

from torch import fx

from ..config import PolarQuantConfig
from ..static_cache import StaticPolarValues
from ..value_codec import VALUE_DTYPES, check_fits
from ..values import PolarValues
from .common import VALUES_COMPRESSED, PassResult, Site, SiteKind, SiteStatus, arg, graph_outputs, sites, val
from .trace_kv_append import kv_append, other_users
from .trace_static_cache import static_append

# A static site's value buffer is known once trace_static_cache found the site.
REQUIRES = frozenset({"sites", "append", "static_append"})
PROVIDES = frozenset({"values"})

_NOT_APPENDED = "the value is not a KV-append torch.cat([past, new], dim=-2)"


def _cached_value(site: Site, outputs: set[fx.Node]) -> str:
    """"" if the site's value is a KV-append written back to the cache and read only by the attention, else why not."""
    value = site.value
    if kv_append(value) is None:
        return _NOT_APPENDED
    if value not in outputs:
        return "the concatenated value is not written back to the cache (not a graph output)"
    extra = other_users(value, arg(site.sdpa, 2, "value"), site.sdpa)
    if extra:
        return f"the cached value also feeds {sorted(u.name for u in extra)} (it would be dequantized)"
    v, k = val(value), val(site.append)
    if v is None or v.dim() != 4:
        return "value shape unknown or not 4-D"
    if v.shape[1] != k.shape[1]:
        return f"value heads {v.shape[1]} differ from the key heads {k.shape[1]}"
    return ""


def _prefill(site: Site, outputs: set[fx.Node], cfg: PolarQuantConfig) -> str:
    value = site.value
    reason = _cached_value(site, outputs)
    if reason:
        return reason
    v = val(value)
    if v.dtype not in VALUE_DTYPES:
        return f"value dtype {v.dtype} (the value codec takes float16, bfloat16, float32)"
    misfit = check_fits(cfg, v.shape[-1])
    if misfit:
        return misfit
    site.value_append = value
    return VALUES_COMPRESSED


def _decode(site: Site) -> str:
    append = kv_append(site.value)
    if append is None:
        return _NOT_APPENDED
    if isinstance(val(append[0]), PolarValues):
        site.value_append = site.value
        return VALUES_COMPRESSED
    return ("the cache holds dense values (the graph that filled it kept them dense: see its report or "
            "counters for why)")


def _static(site: Site, cfg: PolarQuantConfig) -> str:
    v = val(site.value)
    if not isinstance(v, StaticPolarValues):
        misfit = check_fits(cfg, v.shape[-1]) if v is not None else None
        return (f"{misfit}: the PolarStaticCache keeps them dense" if misfit else
                "the PolarStaticCache holds dense values (build it with value_bits=2, 4 or 8 to compress them)")
    write = static_append(site.value)
    if write is None:  # attention still reads the compressed buffers: only the write is not where HF puts it
        return "no values.index_copy_(2, positions, new) writes the PolarStaticCache's values in this graph"
    site.value_append, site.value_write = site.value, write
    return VALUES_COMPRESSED


def run(gm: fx.GraphModule, cfg: PolarQuantConfig) -> PassResult:
    result = PassResult("trace_values")
    outputs = graph_outputs(gm)
    for site in sites(gm):
        if site.status is SiteStatus.DECLINED or site.value is None:
            continue
        if site.kind is SiteKind.PREFILL:
            if cfg.value_bits is not None:
                site.values = _prefill(site, outputs, cfg)
            if site.values != VALUES_COMPRESSED and not _cached_value(site, outputs):
                site.value_append, site.values_held = site.value, True  # dense, but kept in place (DenseValues)
            if cfg.value_bits is None:
                continue
        elif site.kind is SiteKind.DECODE:
            site.values = _decode(site)
            if site.values != VALUES_COMPRESSED and cfg.value_bits is None:
                site.values = ""  # dense values nobody asked to compress
                continue
        else:
            site.values = _static(site, cfg)
            if site.values != VALUES_COMPRESSED and cfg.value_bits is None and not isinstance(
                    val(site.value), StaticPolarValues):
                site.values = ""
                continue
        result.matched += 1  # rewrite_attention compresses the values of those not skipped
        if site.values != VALUES_COMPRESSED:
            result.skipped.append((site.sdpa.name, f"values stay dense: {site.values}"))
    return result
