"""The "polarquant" torch.compile backend: capture -> passes -> verify -> report -> inductor."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from . import counters, report, verify
from .config import InnerBackend, PolarQuantConfig, VerifyMode
from .dynamic import appends_in_place, reserve_all
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


class _Lazy:
    """Formats on demand: logging calls str() only when the record is emitted."""

    def __init__(self, fn):
        self.fn = fn

    def __str__(self) -> str:
        return self.fn()


def polarquant(gm: torch.fx.GraphModule, example_inputs: list, *, mode: str | None = None,
               options: dict[str, Any] | None = None):
    """torch.compile backend entry point (registered as "polarquant" through an entry point)."""
    cfg = PolarQuantConfig.from_options(options)
    checking, report_dir = cfg.verify is not VerifyMode.OFF, report.target_dir(cfg)
    original = copy.deepcopy(gm) if checking or report_dir else None  # untouched, for verify and the diff
    results, sites = run_all(gm, cfg)
    counters.record(results, sites)
    rep = report.GraphReport.create(report_dir, original, gm, sites, results, cfg) if report_dir else None
    facts = rep.data if rep else None
    log.info("%s", _Lazy(lambda: report.one_line(facts or report.build(gm, gm, sites, results, cfg, "?"))))
    checked = verify.Checked(original, gm, sites, cfg, on_event=rep.update if rep else None) if checking else None
    compiled = _inner_compile(gm, example_inputs, cfg, mode)
    if checked is not None:
        checked.compiled, compiled = compiled, checked
    in_place = [i for i, t in enumerate(example_inputs) if appends_in_place(t)]
    return _reserving(compiled, in_place) if in_place else compiled


def _reserving(fn, in_place: list[int]):
    """A decode graph appends in place into the compressed caches it reads (inputs at `in_place`, found once at
    compile time: the per-step cost does not scan the weights): check them before the call; after it, make room
    for the next step's group flush, outside the graph and one layer at a time (dynamic.reserve_all)."""

    def call(*args):
        caches = [args[i] for i in in_place]
        for t in caches:
            t.check_current()
        out = fn(*args)
        reserve_all(caches, out if isinstance(out, (list, tuple)) else (out,))
        return out

    return call
