"""The numbers a verify check compares with: error metrics of a tensor against a reference, the pass rule,
and KL / top-1 agreement of logits."""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import PolarQuantConfig


def metrics(test: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """max_abs, rel_l2, sqnr_db (None = exact), cosine, ref_absmax of `test` against `ref` (same shape)."""
    a, b = test.detach().double(), ref.detach().double()
    if a.shape != b.shape:
        return {"max_abs": math.inf, "rel_l2": math.inf, "sqnr_db": -math.inf, "cosine": 0.0, "ref_absmax": 0.0,
                "note": f"shape {tuple(a.shape)} vs {tuple(b.shape)}"}
    diff = torch.where(a == b, torch.zeros_like(a), a - b)  # equal infinities are no error
    finite_b = torch.where(torch.isfinite(b), b, torch.zeros_like(b))
    err2, sig2 = float(diff.pow(2).sum()), float(finite_b.pow(2).sum())
    norm = math.sqrt(float(a.nan_to_num(0, 0, 0).pow(2).sum()) * sig2)
    return {
        "max_abs": float(diff.abs().max()) if diff.numel() else 0.0,
        "rel_l2": math.sqrt(err2 / sig2) if sig2 > 0 else (0.0 if err2 == 0 else math.inf),
        "sqnr_db": None if err2 == 0 else (10 * math.log10(sig2 / err2) if sig2 > 0 else -math.inf),
        "cosine": float((a.nan_to_num(0, 0, 0) * finite_b).sum()) / norm if norm > 0 else float(err2 == 0),
        "ref_absmax": float(finite_b.abs().max()) if b.numel() else 0.0,
    }


def passes(m: dict[str, Any], cfg: PolarQuantConfig, sqnr_only: bool = False) -> bool:
    """A kernel-check comparison passes: max|a - b| <= atol + rtol * max|b| (unless sqnr_only) and
    SQNR >= min_sqnr_db."""
    if math.isnan(m["max_abs"]) or (m["sqnr_db"] is not None and m["sqnr_db"] < cfg.min_sqnr_db):
        return False
    return sqnr_only or m["max_abs"] <= cfg.atol + cfg.rtol * m["ref_absmax"]


def kl_top1(test: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Logits [..., V]: mean KL(softmax(ref) || softmax(test)) in nats and top-1 agreement."""
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(test.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    return {"kl": float(kl), "top1": float((ref.argmax(-1) == test.argmax(-1)).double().mean())}


def db(x) -> str:
    return "exact" if x is None else f"{x:.1f}dB"
