"""The kernel check: what the rewritten graph computed against what the original graph computes, both run
eagerly on the same inputs. Both read the same codes (the original's SDPA through the dense fallback), so
they must agree to kernel rounding; metrics.py has the numbers and the pass rule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from .. import codec, value_codec
from ..cache import PolarKeys
from ..compressed import CompressedTensor
from ..config import InnerBackend, PolarQuantConfig
from ..metrics import db, metrics, passes
from ..values import PolarValues
from .sites import SiteNodes


class VerifyMismatch(RuntimeError):
    """The rewritten graph disagrees with the original graph beyond kernel rounding: a bug."""


def reference_roundtrip(dense: torch.Tensor, keys: PolarKeys | PolarValues) -> torch.Tensor:
    """dense keys (values) [B, H, T, D] -> encode + decode with the pure-PyTorch codec (value codec) and the
    codec of `keys` (a PolarKeys or a PolarValues)."""
    if isinstance(keys, PolarValues):
        return value_codec.decode(value_codec.encode(dense, keys.codec), dense.shape[2], keys.codec)
    return codec.decode(codec.encode(dense, keys.codec), dense.shape[2], keys.codec)


def as_dense(x: torch.Tensor) -> torch.Tensor:
    return x.dequantize() if isinstance(x, CompressedTensor) else x


def compare(name: str, site: int | None, what: str, o: torch.Tensor, r: torch.Tensor, cfg: PolarQuantConfig,
            sqnr_only: bool = False) -> dict[str, Any]:
    """One comparison (a "checks" entry of an event): o from the rewritten side, r from the original."""
    for cls, cached in ((PolarKeys, "keys"), (PolarValues, "values")):
        if isinstance(o, cls) and not isinstance(r, cls):  # prefill: the dense tensor became compressed
            o, r, what = o.dequantize(), reference_roundtrip(r, o), f"{cached} vs reference encode+decode"
        elif isinstance(o, cls):
            what = f"{cached} (dequantized)"
    # Keys and values: a number at a bin edge may round to the next code when its inputs differ in the last bit,
    # one code in millions, so they are judged on SQNR (noise power), not on the largest single error.
    sqnr_only = sqnr_only or what.startswith(("keys", "values"))
    o, r = as_dense(o), as_dense(r)
    m = metrics(o, r) if o.is_floating_point() else metrics(o.double(), r.double())
    return {"name": name, "site": site, "what": what, **m, "ok": passes(m, cfg, sqnr_only)}


def checks(sites: list[SiteNodes], out_names: list[str], cfg: PolarQuantConfig, compiled_out,
           ref: tuple[Any, dict], rew: tuple[Any, dict]) -> list[dict[str, Any]]:
    """Every comparison of one checked call. ref / rew: (output, captured node values) of the original and
    the rewritten graph run eagerly; compiled_out: what the inner compiler's code returned."""
    (ref_out, ref_seen), (rew_out, rew_seen) = ref, rew
    key_site = {s.append: s.index for s in sites if s.append}
    key_site |= {s.value_append: s.index for s in sites if s.value_append}  # values: the same site's error
    found = []  # rewritten graph vs original graph, both eager: only the rewritten sites differ
    for s in sites:
        dequantized = "dequantized keys and values" if s.value_append else "dequantized keys"
        what = (f"polar attention vs SDPA on {dequantized}" if s.kind != "prefill" else "SDPA (unchanged)"
                if s.original == s.rewritten else "SDPA vs the original attention ops")
        found.append(compare(f"{s.module} ({s.rewritten})", s.index, what, rew_seen[s.rewritten],
                             ref_seen[s.original], cfg))
    for name, o, r in zip(out_names, tree_leaves(rew_out), tree_leaves(ref_out)):
        if isinstance(o, torch.Tensor) and isinstance(r, torch.Tensor):
            found.append(compare(name, key_site.get(name), "output", o, r, cfg))
    if cfg.backend is not InnerBackend.EAGER:  # what the inner compiler made of it: SQNR only
        for name, o, r in zip(out_names, tree_leaves(compiled_out), tree_leaves(ref_out)):
            if "logits" in name and isinstance(o, torch.Tensor) and o.is_floating_point():
                found.append(compare(f"{name} (compiled)", None, f"{cfg.backend.value} output", o, r, cfg,
                                     sqnr_only=True))
    return found


def mismatch_message(call: int, checks: list[dict[str, Any]]) -> str:
    bad = sorted((c for c in checks if not c["ok"]),  # worst first: the site that is wrong, not its effects
                 key=lambda c: math.inf if c["sqnr_db"] is None else c["sqnr_db"])
    return (f"polarquant verify: call {call}: {len(bad)}/{len(checks)} comparisons disagree with the original "
            "graph beyond kernel rounding: " + "; ".join(
                f"{c['name']}: {c['what']}" if c["max_abs"] is None  # a state check (integrity.py): no metric
                else f"{c['name']} max_abs={c['max_abs']:.3g} sqnr={db(c['sqnr_db'])}" for c in bad[:4]))
