"""The "polarquant" torch.compile backend: capture -> passes -> verify -> report -> inductor."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from . import counters
from .config import InnerBackend, PolarQuantConfig
from .passes import run_all

log = logging.getLogger(__name__)


def _inner_compile(gm: torch.fx.GraphModule, example_inputs: list, cfg: PolarQuantConfig, mode: str | None):
    if cfg.backend is InnerBackend.EAGER:
        return gm.forward
    if cfg.backend is InnerBackend.AOT_EAGER:
        from functorch.compile import nop
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=nop)(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    config_patches = {"triton.cudagraphs": True} if mode in ("reduce-overhead", "max-autotune") else None
    return compile_fx(gm, example_inputs, config_patches=config_patches)


def polarquant(gm: torch.fx.GraphModule, example_inputs: list, *, mode: str | None = None,
               options: dict[str, Any] | None = None):
    """torch.compile backend entry point (registered as "polarquant" through an entry point)."""
    cfg = PolarQuantConfig.from_options(options)
    original = copy.deepcopy(gm) if cfg.verify.value != "off" or cfg.report else None  # noqa: F841 (verify/report)
    results, sites = run_all(gm, cfg)
    counters.record(results, sites)
    rewritten = sum(s.status == "rewritten" for s in sites)
    log.info("polarquant: %d/%d attention sites rewritten", rewritten, len(sites))
    return _inner_compile(gm, example_inputs, cfg, mode)
