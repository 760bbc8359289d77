"""Numerics checks of a rewritten graph against the untouched original graph the backend kept.

kernel check (verify="first" | "every:N"): on the selected calls the original graph also runs (eager, in
  Python, through an fx.Interpreter) on the same inputs. A decode graph's key-cache inputs are the same
  PolarKeys, so the original's own cat/SDPA run on them through PolarKeys' dense fallback, i.e. on the dense
  keys the codes stand for. Compared on every graph output and at every rewritten attention site (the polar
  op's output vs the original SDPA's): max-abs error, relative L2, SQNR (dB), cosine. Both sides use the same
  codes, so they must agree to kernel rounding; a check passes when max|a - b| <= atol + rtol * max|b| and
  SQNR >= min_sqnr_db. A prefill graph returns PolarKeys where the original returns dense keys: those are
  compared with the reference codec's encode+decode of the dense keys (this checks the encode kernel).
  A failed check is handled per on_mismatch: "raise" (VerifyMismatch), "warn" (the compiled result is
  returned), "fallback" (the original graph's result is returned, and the original graph runs, in eager,
  for every later call: exactly what the graph computes without the rewrite).
drift check (verify="shadow:N"): quantization-induced drift, not a bug check. The prefill's original graph
  yields the dense keys; each graph output gets a full-precision shadow (a side table keyed by the output
  tensor's identity, held weakly). For the first N decode steps the original graph runs again on the shadow
  inputs (dense keys, and values computed from the dense keys), so the shadow is a complete full-precision
  run of the model fed the same tokens. Reported per layer (keys and attention output vs the shadow) and on
  the logits (cosine, KL(shadow || compressed), top-1 agreement). Shadows stop after step N.
Graphs that mutate an input in place (StaticCache, PolarStaticCache): the checking runs get copies of those
inputs (wrapper subclasses copied through their inner tensors), so the mutation is applied once; after a
fallback the original run's state is copied into them. The drift check skips such graphs (it follows graph
outputs), and graphs without a rewritten site are not checked (nothing changed); the report says why.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import operator
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from . import cache, codec
from .cache import PolarKeys
from .config import InnerBackend, OnMismatch, PolarQuantConfig, VerifyMode
from .metrics import db, kl_top1, metrics, passes
from .passes.common import SITES_KEY, is_call

log = logging.getLogger(__name__)
MAX_EVENTS = 64  # events kept per graph (counters keep counting)
_SHADOW: WeakIdKeyDictionary = WeakIdKeyDictionary()  # output tensor -> (full-precision shadow, decode step)
# ops whose result may share memory with their first argument (`.to` to the same device/dtype is the tensor)
_VIEWS = ("view", "reshape", "transpose", "permute", "expand", "narrow", "select", "unsqueeze", "squeeze",
          "flatten", "t", "as_strided", "contiguous", "detach", "to", "type_as", "view_as", "reshape_as",
          "expand_as", "__getitem__", operator.getitem)


_live: list[weakref.ref] = []  # the Checked callables alive (held by dynamo's cache entries)


def states() -> list[dict[str, Any]]:
    """The verify state (report.json "verify") of every live checked graph, in compile order."""
    return [c.state for c in (r() for r in _live) if c is not None]


class VerifyMismatch(RuntimeError):
    """The rewritten graph disagrees with the original graph beyond kernel rounding: a bug."""


# --------------------------------------------------------------------------- comparing (metrics.py has the numbers)


def reference_roundtrip(dense: torch.Tensor, keys: PolarKeys) -> torch.Tensor:
    """dense keys [B, H, T, D] -> encode + decode with the pure-PyTorch codec and `keys`' codec."""
    return codec.decode(codec.encode(dense, keys.codec), dense.shape[2], keys.codec)


def _as_dense(x: torch.Tensor) -> torch.Tensor:
    return x.dequantize() if isinstance(x, PolarKeys) else x


# --------------------------------------------------------------------------- running graphs


class _Capture(fx.Interpreter):
    """Runs a GraphModule node by node and keeps the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names, self.seen = names, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.seen[n.name] = out
        return out


def _run(gm: fx.GraphModule, args, names: set[str]) -> tuple[Any, dict[str, Any]]:
    interp = _Capture(gm, names)
    return interp.run(*args), interp.seen


@contextlib.contextmanager
def _quiet_dense_fallback():
    """The original graph runs HF's ops on PolarKeys by design here: keep PolarKeys' one-time warnings for
    the user's own code (restore the set of already-warned ops afterwards)."""
    saved = set(cache._warned)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        cache._warned.clear()
        cache._warned.update(saved)


def _counterpart(node: fx.Node, original: dict[str, fx.Node]) -> str | None:
    """The original-graph node whose value a rewritten attention node stands for: the node a user of `node`
    (users keep their names) read in the original graph at the same argument position. Covers SDPA replaced
    by the polar op and eager matmul-softmax-matmul replaced by SDPA; an SDPA left in place is itself."""
    for user in node.users:
        before = original.get(user.name)
        if before is None or before.op != user.op or before.target != user.target:
            continue
        now, then = [], []
        fx.node.map_aggregate((user.args, user.kwargs), now.append)
        fx.node.map_aggregate((before.args, before.kwargs), then.append)
        for a, b in zip(now, then):
            if a is node and isinstance(b, fx.Node):
                return b.name
    return node.name if node.name in original else None


def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a (rewritten) graph for checking: the inner compiler may transform `gm` in place."""
    sites = gm.meta.pop(SITES_KEY, None)
    try:
        return copy.deepcopy(gm)
    finally:
        if sites is not None:
            gm.meta[SITES_KEY] = sites


def _clone(t: torch.Tensor) -> torch.Tensor:
    """A deep copy of a tensor, or of a wrapper subclass (PolarKeys, StaticPolarKeys) through its inner tensors."""
    if is_traceable_wrapper_subclass(t):
        names, ctx = t.__tensor_flatten__()
        return type(t).__tensor_unflatten__({n: _clone(getattr(t, n)) for n in names}, ctx, t.shape, t.stride())
    return t.detach().clone()


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    if is_traceable_wrapper_subclass(dst):
        for n in dst.__tensor_flatten__()[0]:
            _copy_into(getattr(dst, n), getattr(src, n))
    else:
        with torch.no_grad():
            dst.copy_(src)


def _with_clones(args, indices: list[int]) -> list:
    return [_clone(a) if i in indices else a for i, a in enumerate(args)]


def mutated_inputs(gm: fx.GraphModule) -> list[str]:
    """Placeholders written in place (through views), e.g. StaticCache's index_copy_ and add_."""
    found = []
    for n in gm.graph.nodes:
        target = n.target
        mutates = (n.op == "call_method" and target.endswith("_") and not target.startswith("_")) or (
            n.op == "call_function" and (target is operator.setitem or getattr(
                getattr(target, "_schema", None), "is_mutable", False)))
        base = n.args[0] if mutates and n.args else None
        while isinstance(base, fx.Node) and base.op != "placeholder" and is_call(base, *_VIEWS):
            base = base.args[0]
        if isinstance(base, fx.Node) and base.op == "placeholder" and base.name not in found:
            found.append(base.name)
    return found


# --------------------------------------------------------------------------- the checked callable


class Checked:
    """What the backend returns when verify is on: calls the compiled graph and checks the selected calls.

    `state` is the verify part of the report (report.json "verify"); `on_event(state)` runs after each check.
    """

    def __init__(self, original: fx.GraphModule, rewritten: fx.GraphModule, sites: list, cfg: PolarQuantConfig,
                 on_event: Callable[[dict], None] | None = None):
        """Call before the inner compiler runs (it may change `rewritten` in place); set `.compiled` after."""
        self.compiled: Callable | None = None
        self.original, self.rewritten, self.cfg, self.on_event = original, snapshot(rewritten), cfg, on_event
        by_name = {n.name: n for n in original.graph.nodes}
        self.sites = []  # (index, module, kind, original node, rewritten node, KV-append node): node names
        for i, s in enumerate(sites):
            orig = _counterpart(s.sdpa, by_name)
            if s.status == "rewritten" and orig is not None:
                self.sites.append((i, s.module, s.kind, orig, s.sdpa.name, s.append.name if s.append else None))
        out_node = next(n for n in original.graph.nodes if n.op == "output")
        self.out_names = [a.name if isinstance(a, fx.Node) else repr(a) for a in tree_leaves(out_node.args)]
        self.key_site = {s[5]: s[0] for s in self.sites if s[5]}
        mutated = mutated_inputs(original)
        placeholders = [n.name for n in original.graph.nodes if n.op == "placeholder"]
        self.mutated = [placeholders.index(name) for name in mutated]  # cloned for the checking runs
        skipped = ("no rewritten attention site: the graph is unchanged" if not self.sites else
                   f"the drift check follows graph outputs; this graph mutates its inputs in place "
                   f"({', '.join(mutated)})" if mutated and cfg.verify is VerifyMode.SHADOW else None)
        self.state = {"mode": cfg.verify_spec, "on_mismatch": cfg.on_mismatch.value,
                      "tolerance": {"atol": cfg.atol, "rtol": cfg.rtol, "min_sqnr_db": cfg.min_sqnr_db},
                      "status": "skipped" if skipped else "pending", "skipped": skipped, "fallback": False,
                      "calls": 0, "checked": 0, "failed": 0, "events": []}
        _live[:] = [r for r in _live if r() is not None] + [weakref.ref(self)]
        if skipped and on_event is not None:
            on_event(self.state)

    # ------------------------------------------------------------------ call

    def __call__(self, *args):
        st = self.state
        st["calls"] += 1
        if st["fallback"]:
            return self.original(*args)
        if st["skipped"]:
            return self._compiled(args)
        if self.cfg.verify is VerifyMode.SHADOW:
            return self._drift(args)
        every = self.cfg.verify_n if self.cfg.verify is VerifyMode.EVERY else 0
        again = st["status"] == "failed" and self.cfg.on_mismatch is OnMismatch.RAISE  # a caught raise: keep raising
        if st["calls"] == 1 or (every and (st["calls"] - 1) % every == 0) or again:
            return self._kernel_check(args)
        return self._compiled(args)

    def _compiled(self, args):
        return self.compiled(*args)  # dynamo calls backends' results unboxed

    def _names(self, which: str) -> set[str]:
        col = 3 if which == "original" else 4
        return {s[col] for s in self.sites} | {s[5] for s in self.sites if s[5]}

    # ------------------------------------------------------------------ kernel check

    def _kernel_check(self, args):
        # In-place inputs (static caches): each checking run gets its own copy, taken before any run.
        ref_args, rew_args = (_with_clones(args, self.mutated) for _ in range(2)) if self.mutated else (args, args)
        out = self._compiled(args)
        try:
            with _quiet_dense_fallback(), torch.no_grad():
                ref_out, ref_seen = _run(self.original, ref_args, self._names("original"))
                rew_out, rew_seen = _run(self.rewritten, rew_args, self._names("rewritten"))
        except Exception as e:  # noqa: BLE001 (the checker failed, not the model: say so, keep the result)
            return self._cannot_check(e, out)
        checks = []  # rewritten graph vs original graph, both eager: only the rewritten sites differ
        for i, module, kind, orig, rew, _ in self.sites:
            what = ("polar attention vs SDPA on dequantized keys" if kind != "prefill" else "SDPA (unchanged)"
                    if orig == rew else "SDPA vs the original attention ops")
            checks.append(self._check(f"{module} ({rew})", i, what, rew_seen[rew], ref_seen[orig]))
        for name, o, r in zip(self.out_names, tree_leaves(rew_out), tree_leaves(ref_out)):
            if isinstance(o, torch.Tensor) and isinstance(r, torch.Tensor):
                checks.append(self._check(name, self.key_site.get(name), "output", o, r))
        if self.cfg.backend is not InnerBackend.EAGER:  # what the inner compiler made of it: SQNR only
            for name, o, r in zip(self.out_names, tree_leaves(out), tree_leaves(ref_out)):
                if "logits" in name and isinstance(o, torch.Tensor) and o.is_floating_point():
                    checks.append(self._check(f"{name} (compiled)", None, f"{self.cfg.backend.value} output", o, r,
                                              sqnr_only=True))
        ok = all(c["ok"] for c in checks)
        st = self.state
        st["checked"] += 1
        st["failed"] += not ok
        event = {"call": st["calls"], "check": "kernel", "ok": ok, "action": "none", "checks": checks}
        if ok:
            st["status"] = "passed" if st["status"] in ("pending", "passed") else st["status"]
            self._emit(event)
            return out
        st["status"] = "failed"
        bad = sorted((c for c in checks if not c["ok"]),  # worst first: the site that is wrong, not its effects
                     key=lambda c: math.inf if c["sqnr_db"] is None else c["sqnr_db"])
        msg = (f"polarquant verify: call {st['calls']}: {len(bad)}/{len(checks)} comparisons disagree with the "
               "original graph beyond kernel rounding: " + "; ".join(
                   f"{c['name']} max_abs={c['max_abs']:.3g} sqnr={db(c['sqnr_db'])}" for c in bad[:4]))
        if self.cfg.on_mismatch is OnMismatch.RAISE:
            event["action"] = "raised"
            self._emit(event)
            raise VerifyMismatch(msg)
        if self.cfg.on_mismatch is OnMismatch.WARN:
            event["action"] = "warned"
            self._emit(event)
            warnings.warn(msg, stacklevel=2)
            return out
        event["action"] = "fallback"
        st["fallback"] = True
        for i in self.mutated:  # the state the original graph left, as if only it had run
            _copy_into(args[i], ref_args[i])
        self._emit(event)
        log.warning("%s; falling back to the original graph from now on", msg)
        return ref_out

    def _check(self, name: str, site: int | None, what: str, o: torch.Tensor, r: torch.Tensor,
               sqnr_only: bool = False) -> dict[str, Any]:
        if isinstance(o, PolarKeys) and not isinstance(r, PolarKeys):  # prefill: dense keys became PolarKeys
            o, r, what = o.dequantize(), reference_roundtrip(r, o), "keys vs reference encode+decode"
        elif isinstance(o, PolarKeys):
            what = "keys (dequantized)"
        # Keys: a value at a bin edge may round to the next code when its inputs differ in the last bit, one
        # code in millions, so they are judged on SQNR (noise power), not on the largest single error.
        sqnr_only = sqnr_only or what.startswith("keys")
        o, r = _as_dense(o), _as_dense(r)
        m = metrics(o, r) if o.is_floating_point() else metrics(o.double(), r.double())
        return {"name": name, "site": site, "what": what, **m, "ok": passes(m, self.cfg, sqnr_only)}

    # ------------------------------------------------------------------ drift check

    def _drift(self, args):
        out = self._compiled(args)
        polar_in = [a for a in args if isinstance(a, PolarKeys)]
        shadows = [_SHADOW.get(a) for a in polar_in]
        if polar_in and (None in shadows or max(s[1] for s in shadows) >= self.cfg.verify_n):
            return out  # not shadowed (cache built before verify, or past step N)
        step = max((s[1] for s in shadows), default=-1) + 1
        shadow_args = [(_SHADOW[a][0] if isinstance(a, torch.Tensor) and a in _SHADOW else a) for a in args]
        try:
            with _quiet_dense_fallback(), torch.no_grad():
                ref_out, ref_seen = _run(self.original, shadow_args, self._names("original"))
                _, rew_seen = _run(self.rewritten, args, self._names("rewritten")) if step else (None, {})
        except Exception as e:  # noqa: BLE001
            return self._cannot_check(e, out)
        if step < self.cfg.verify_n:
            for o, r in zip(tree_leaves(out), tree_leaves(ref_out)):
                if isinstance(o, torch.Tensor) and isinstance(r, torch.Tensor):
                    _SHADOW[o] = (r, step)
        checks = []
        for i, module, kind, orig, rew, append in self.sites:
            if step == 0:  # prefill: the compressed keys against the dense keys they replace
                o = next((o for n, o in zip(self.out_names, tree_leaves(out)) if n == append), None)
                if isinstance(o, PolarKeys):
                    checks.append({"name": f"{module} keys", "site": i, **metrics(o.dequantize(), ref_seen[append])})
                continue
            checks.append({"name": f"{module} keys", "site": i,
                           **metrics(_as_dense(rew_seen[append]), _as_dense(ref_seen[append]))})
            checks.append({"name": f"{module} attention", "site": i, **metrics(rew_seen[rew], ref_seen[orig])})
        for name, o, r in zip(self.out_names, tree_leaves(out), tree_leaves(ref_out)):
            if "logits" in name and isinstance(o, torch.Tensor) and o.is_floating_point():
                checks.append({"name": name, "site": None, **metrics(o, r), **kl_top1(o, r)})
        st = self.state
        st["checked"] += 1
        st["status"] = "drift"
        self._emit({"call": st["calls"], "check": "drift", "step": step, "ok": True, "action": "none",
                    "checks": checks})
        return out

    def _cannot_check(self, error: Exception, out):
        st = self.state
        st["status"], st["skipped"] = "error", f"verify could not run the graphs: {type(error).__name__}: {error}"
        warnings.warn(f"polarquant {st['skipped']}; verify is off for this graph", stacklevel=3)
        if self.on_event is not None:
            self.on_event(st)
        return out

    def _emit(self, event: dict) -> None:
        events = self.state["events"]
        events.append(event)
        del events[:-MAX_EVENTS]
        log.debug("polarquant verify event: call %s %s ok=%s", event["call"], event["check"], event["ok"])
        if self.on_event is not None:
            self.on_event(self.state)
