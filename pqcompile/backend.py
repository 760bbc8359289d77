"""The "polarquant" torch.compile backend: capture -> passes -> verify -> report -> inductor."""

from __future__ import annotations

import copy
import functools
import gc
import hashlib
import logging
import pathlib
from typing import Any

import torch

from . import counters, report, verify
from .config import InnerBackend, PolarQuantConfig, VerifyMode
from .dynamic import appends_in_place, refusal, refused_by, reserve_all
from .passes import run_all
from .verify.sites import cache_label

log = logging.getLogger(__name__)


def _inner_compile(gm: torch.fx.GraphModule, example_inputs: list, cfg: PolarQuantConfig, mode: str | None):
    if cfg.backend is InnerBackend.EAGER:
        return gm.forward
    if cfg.backend is InnerBackend.AOT_EAGER:
        from functorch.compile import nop
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=nop)(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    config_patches = {"triton.cudagraphs": True} if mode in ("reduce-overhead", "max-autotune") else {}
    marked = getattr(torch._inductor.config, "unsafe_marked_cacheable_functions", None)
    marks = cache_marks(gm, example_inputs, cfg) if marked is not None else {}
    if marks:
        config_patches["unsafe_marked_cacheable_functions"] = {**marked, **marks}
    return compile_fx(gm, example_inputs, config_patches=config_patches or None)


@functools.cache
def _source_digest() -> str:
    from . import __version__

    root = pathlib.Path(__file__).parent
    h = hashlib.sha256(__version__.encode())  # the version too: an install without sources hashes no files
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def cache_marks(gm: torch.fx.GraphModule, example_inputs: list, cfg: PolarQuantConfig) -> dict[str, str]:
    """AOTAutograd's disk cache refuses a graph that calls Python functions it does not know, which the rewritten
    graphs do (static_write, the attention rewrites): every warm start then traced the whole graph through
    AOTAutograd again (docs/design.md §8.22). Those functions are marked cacheable under a key that covers what
    they trace to: pqcompile's source, this config, and each compressed input's type, codec and inner layout (the
    cache's own key sees a subclass input by its outer metadata in some torch versions)."""
    from .compressed import CompressedTensor

    names = sorted({f"{n.target.__module__}.{n.target.__name__}" for n in gm.graph.nodes
                    if n.op == "call_function" and getattr(n.target, "__module__", "").startswith("pqcompile.")})
    if not names:
        return {}
    h = hashlib.sha256(f"{_source_digest()}|{cfg!r}".encode())
    for t in example_inputs:
        if isinstance(t, CompressedTensor):
            h.update(t._stable_hash_for_caching().encode())
    key = h.hexdigest()
    return dict.fromkeys(names, key)


class _Lazy:
    """Formats on demand: logging calls str() only when the record is emitted."""

    def __init__(self, fn):
        self.fn = fn

    def __str__(self) -> str:
        return self.fn()


def polarquant(gm: torch.fx.GraphModule, example_inputs: list, *, mode: str | None = None,
               options: dict[str, Any] | None = None):
    """torch.compile backend entry point (registered as "polarquant" through an entry point). torch.compile takes
    `mode=` or `options=`, not both: with options, the mode goes in them (options={"mode": "reduce-overhead", ...})."""
    options = dict(options or {})
    mode = options.pop("mode", mode)
    cfg = PolarQuantConfig.from_options(options)
    checking, report_dir = cfg.verify is not VerifyMode.OFF, report.target_dir(cfg)
    original = copy.deepcopy(gm) if checking or report_dir else None  # untouched, for verify and the diff
    results, sites = run_all(gm, cfg)
    counters.record(results, sites)
    rep = report.GraphReport.create(report_dir, original, gm, sites, results, cfg) if report_dir else None
    facts = rep.data if rep else None
    log.info("%s", _Lazy(lambda: report.one_line(facts or report.build(gm, gm, sites, results, cfg, "?"))))
    checked = verify.Checked(original, gm, sites, cfg, on_event=rep.update if rep else None) if checking else None
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]  # before inductor may change gm
    _prepare_constants(gm)
    compiled = _inner_compile(gm, example_inputs, cfg, mode)
    if checked is not None:
        checked.compiled, compiled = compiled, checked
    in_place = [i for i, t in enumerate(example_inputs) if appends_in_place(t)]
    if not in_place:
        return compiled
    modules = [(k, s.module) for k, s in enumerate(sites)]
    return _reserving(compiled, in_place, [cache_label(placeholders[i], modules)[0] for i in in_place])


def _prepare_constants(gm: torch.fx.GraphModule) -> None:
    """The kernels' device constants of every compressed key state the graph reads or builds, created now: made
    lazily at the first launch instead, they would land in a CUDA-graph tree's warm-up pool, which then refuses
    the run (docs/reliability.md, finding 16)."""
    from .codec import Codec
    from .compressed import CompressedTensor

    states = [v for v in (n.meta.get("val", n.meta.get("example_value")) for n in gm.graph.nodes)
              if isinstance(v, CompressedTensor) and isinstance(v.codec, Codec) and v.device.type == "cuda"]
    if states:
        from .kernels import common  # Triton: only where a GPU kernel will run

        for v in states:
            common.prepare_constants(v.codec.pairing, int(v.shape[-1]), v.device)


def _reserving(fn, in_place: list[int], labels: list[str]):
    """A decode graph appends in place into the compressed caches it reads (inputs at `in_place`, found once at
    compile time: the per-step cost does not scan the weights): check them before the call; after it, make room
    for the next step's group flush, outside the graph and one layer at a time (dynamic.reserve_all). A refused
    append (a ValueError: non-finite keys on the reference path) is raised again naming the layer (`labels`) and
    the token position; the cache keeps its earlier state, which a refused step leaves whole (§2.1)."""

    collected = False

    def call(*args):
        nonlocal collected
        caches = [args[i] for i in in_place]
        for t in caches:
            t.check_current()
        try:
            out = fn(*args)
        except ValueError as e:
            found = refused_by(e, caches)
            if found is None:  # raised where no cache buffer is at hand: not an append's refusal
                raise
            cause = getattr(e, "refused", e)  # dynamic.refusal's (eager appended): replace its context
            i, count = found
            raise refusal(cause, labels[i], caches[i].seq_len, count) from cause
        if not collected:  # dynamo's tracing of this graph left cyclic garbage that still holds the cache state it
            collected = True  # was traced on: a growth would not free those buffers until a full collection
            gc.collect()
        reserve_all(caches, out if isinstance(out, (list, tuple)) else (out,))
        return out

    return call
