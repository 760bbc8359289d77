"""FX passes, one per file, each `run(gm, cfg) -> PassResult`. Their order lives here only.

Each pass module declares REQUIRES and PROVIDES, sets of the facts listed in common.FACTS; check_order
refuses an order in which a pass runs before the pass providing a fact it requires (at import, and again
in run_all for the order it is given).

Debugging: the logger "pqcompile.graphs" at DEBUG logs the graph before the passes and after each one as
runnable Python (print_readable), e.g. logging.basicConfig() and
logging.getLogger("pqcompile.graphs").setLevel(logging.DEBUG). Under TORCH_TRACE the same dumps are
tlparse artifacts: pqcompile_graph_captured, then pqcompile_graph_after_<pass>.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import fx

from ..config import PolarQuantConfig
from . import (
    infer_pairing,
    match_eager_attention,
    rewrite_attention,
    trace_kv_append,
    trace_static_cache,
    trace_values,
)
from .common import FACTS, PassResult, Site, SiteKind, SiteStatus, sites

PASSES = (match_eager_attention, trace_kv_append, trace_static_cache, trace_values, infer_pairing, rewrite_attention)

# A channel of its own (not __name__): graph dumps are long, so they stay off when the rest of pqcompile
# logs at DEBUG unless asked for, like TORCH_LOGS artifacts.
graphs_log = logging.getLogger("pqcompile.graphs")
if graphs_log.level == logging.NOTSET:  # opt-in: DEBUG on pqcompile or the root logger does not inherit into it
    graphs_log.setLevel(logging.INFO)


class PassOrderError(RuntimeError):
    """PASSES (or the order given to run_all) breaks a pass's REQUIRES."""


def _name(p: ModuleType) -> str:
    return p.__name__.rpartition(".")[2]


def check_order(passes: Sequence[ModuleType]) -> None:
    """Raise PassOrderError unless every fact a pass requires is provided by a pass before it."""
    order = ", ".join(_name(p) for p in passes)
    provided: dict[str, str] = {}
    for p in passes:
        missing = [a for a in ("run", "REQUIRES", "PROVIDES") if not hasattr(p, a)]
        if missing:
            raise PassOrderError(f"pass {_name(p)} does not declare {', '.join(missing)}")
        unknown = sorted((set(p.REQUIRES) | set(p.PROVIDES)) - set(FACTS))
        if unknown:
            raise PassOrderError(f"pass {_name(p)} names unknown facts {unknown}; known: {sorted(FACTS)}")
        for fact in sorted(set(p.REQUIRES) - set(provided)):
            later = [_name(q) for q in passes if fact in q.PROVIDES]
            where = f"provided by {later[0]}, which runs after it" if later else "provided by no pass"
            raise PassOrderError(f"pass {_name(p)} requires {fact!r} ({FACTS[fact]}), {where}; order: {order}")
        provided.update(dict.fromkeys(p.PROVIDES, _name(p)))


check_order(PASSES)


def run_all(gm: fx.GraphModule, cfg: PolarQuantConfig,
            passes: Sequence[ModuleType] | None = None) -> tuple[list[PassResult], list[Site]]:
    """Run `passes` (default PASSES) in order on `gm`, in place; returns their results and the sites."""
    passes = PASSES if passes is None else passes
    check_order(passes)
    _dump(gm, "captured")
    results = []
    for p in passes:
        results.append(p.run(gm, cfg))
        _dump(gm, f"after_{_name(p)}")
    return results, sites(gm)


def _dump(gm: fx.GraphModule, stage: str) -> None:
    """The graph at `stage` to "pqcompile.graphs" and tlparse; formatted only when someone listens."""
    if graphs_log.isEnabledFor(logging.DEBUG):
        graphs_log.debug("polarquant graph %s, %s:\n%s", _compile_id(), stage.replace("_", " ", 1),
                         gm.print_readable(print_output=False))
    torch._logging.trace_structured(
        "artifact", metadata_fn=lambda: {"name": f"pqcompile_graph_{stage}", "encoding": "string"},
        payload_fn=lambda: gm.print_readable(print_output=False))


def _compile_id() -> str:
    from torch._guards import CompileContext

    cid = CompileContext.current_compile_id()
    return "?" if cid is None else str(cid)


__all__ = ["PASSES", "PassOrderError", "PassResult", "Site", "SiteKind", "SiteStatus", "check_order", "run_all"]
