"""FX passes, one per file, each `run(gm, cfg) -> PassResult`. Their order lives here only."""

from __future__ import annotations

from torch import fx

from ..config import PolarQuantConfig
from . import infer_pairing, match_eager_attention, rewrite_attention, trace_kv_append, trace_static_cache
from .common import PassResult, Site, sites

PASSES = (match_eager_attention, trace_kv_append, trace_static_cache, infer_pairing, rewrite_attention)


def run_all(gm: fx.GraphModule, cfg: PolarQuantConfig) -> tuple[list[PassResult], list[Site]]:
    results = [p.run(gm, cfg) for p in PASSES]
    return results, sites(gm)


__all__ = ["PASSES", "PassResult", "Site", "run_all"]
