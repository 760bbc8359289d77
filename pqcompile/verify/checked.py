"""Checked: what the backend returns when verify is on. It calls the compiled graph and, on the selected
calls, runs the kernel check (kernel.py) or the drift check (drift.py), recording events in its state."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

from torch import fx
from torch.utils._pytree import tree_leaves

from ..config import OnMismatch, PolarQuantConfig, VerifyMode
from ..dynamic import appends_in_place
from ..static_cache import StaticCompressed
from . import drift, graphs, integrity, kernel, state
from .kernel import VerifyMismatch
from .sites import appended_input, cache_label, captured, output_names, site_map

log = logging.getLogger(__name__)


class Checked:
    """Calls the compiled graph and checks the selected calls.

    `state` is the verify part of the report (report.json "verify"); `on_event(state)` runs after each check.
    """

    def __init__(self, original: fx.GraphModule, rewritten: fx.GraphModule, sites: list, cfg: PolarQuantConfig,
                 on_event: Callable[[dict], None] | None = None):
        """Call before the inner compiler runs (it may change `rewritten` in place); set `.compiled` after."""
        self.compiled: Callable | None = None
        self.original, self.rewritten, self.cfg, self.on_event = original, graphs.snapshot(rewritten), cfg, on_event
        self.sites = site_map(sites, original)
        self.out_names = output_names(original)
        mutated = graphs.mutated_inputs(original)
        placeholders = [n.name for n in original.graph.nodes if n.op == "placeholder"]
        self.mutated = [placeholders.index(name) for name in mutated]  # cloned for the checking runs
        self.placeholders = placeholders
        skipped = ("no rewritten attention site: the graph is unchanged" if not self.sites else
                   f"the drift check follows graph outputs; this graph mutates its inputs in place "
                   f"({', '.join(mutated)})" if mutated and cfg.verify is VerifyMode.SHADOW else None)
        self.state = state.initial(cfg, skipped)
        # every:N also checks the cache states against digests of what was written (integrity.py)
        self.state_check, self.state_outputs = cfg.verify is VerifyMode.EVERY and not skipped, None
        # and the static states it writes: where each write starts, lowering their records' bound (integrity.py)
        self.static_writes = []
        if self.state_check:
            try:
                self.static_writes = integrity.write_sources(self.rewritten, placeholders)
            except Exception as e:  # noqa: BLE001
                self._state_check_off(e)
        state.track(self)
        if skipped and on_event is not None:
            on_event(self.state)

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
        pending = self._note_writes(args) if self.static_writes and self.state_check else None
        out = self._compiled(args)
        if pending:
            self._static_track(pending)
        if self.state_check:
            self._track(args, out, checked=False)
        return out

    def _compiled(self, args):
        return self.compiled(*args)  # dynamo calls backends' results unboxed

    def _run_both(self, ref_args, rew_args):
        """(output, captured values) of the original graph on ref_args and of the rewritten one on rew_args
        (None: not run)."""
        with graphs.checking():
            ref = graphs.run(self.original, ref_args, captured(self.sites, "original"))
            rew = graphs.run(self.rewritten, rew_args, captured(self.sites, "rewritten")) if rew_args is not None else (None, {})
        return ref, rew

    def _kernel_check(self, args):
        # In-place inputs (static caches; DynamicCache states, which cat appends to in place): each checking run
        # gets its own copy, taken before any run.
        in_place = _appended_in_place(args)
        cloned = self.mutated + in_place
        ref_args, rew_args = (graphs.with_clones(args, cloned) for _ in range(2)) if cloned else (args, args)
        checks = self._state_checks(args, in_place) if self.state_check else []  # before the step writes
        pending = self._note_writes(args) if self.static_writes and self.state_check else None
        out = self._compiled(args)
        if pending:
            self._static_track(pending)
        try:
            ref, rew = self._run_both(ref_args, rew_args)
        except Exception as e:  # noqa: BLE001 (the checker failed, not the model: say so, keep the result)
            return self._cannot_check(e, out)
        checks += kernel.checks(self.sites, self.out_names, self.cfg, out, ref, rew)
        ok = all(c["ok"] for c in checks)
        if self.state_check and (ok or self.cfg.on_mismatch is OnMismatch.WARN):  # the states the caller keeps
            self._track(args, out, checked=True)
        st = self.state
        st["checked"] += 1
        st["failed"] += not ok
        event = {"call": st["calls"], "check": "kernel", "ok": ok, "action": "none", "checks": checks}
        if ok:
            st["status"] = "passed" if st["status"] in ("pending", "passed") else st["status"]
            self._emit(event)
            return out
        st["status"] = "failed"
        msg = kernel.mismatch_message(st["calls"], checks)
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
            graphs.copy_into(args[i], ref_args[i])
        self._emit(event)
        log.warning("%s; falling back to the original graph from now on", msg)
        return ref[0]

    def _state_checks(self, args, in_place: list[int]) -> list[dict]:
        modules = [(s.index, s.module) for s in self.sites]
        try:
            static = [i for i, a in enumerate(args) if isinstance(a, StaticCompressed)]  # length read in the check
            return integrity.verify([(*cache_label(self.placeholders[i], modules), args[i])
                                     for i in in_place + static])
        except Exception as e:  # noqa: BLE001 (the state check failed, not the model)
            self._state_check_off(e)
            return []

    def _track(self, args, out, checked: bool) -> None:
        """integrity.track on the cache states this graph returns, each with the input it appended to (positions
        found on the first call: the output's cat in the original graph and its placeholder)."""
        try:
            flat = out if isinstance(out, (list, tuple)) else tree_leaves(out)
            if self.state_outputs is None:
                self.state_outputs = [(i, appended_input(self.original, self.out_names[i]))
                                      for i, o in enumerate(flat) if appends_in_place(o)]
            integrity.track([(flat[i], None if j is None else args[j]) for i, j in self.state_outputs], checked)
        except Exception as e:  # noqa: BLE001
            self._state_check_off(e)

    def _note_writes(self, args):
        """Before a compiled call: integrity.static_writes on the static states it writes, each with where the
        writes start (the positions' first element, or the 0-d counter they derive from; None: unknown) and how
        many tokens (None: unknown). Its answer goes to integrity.static_track after the call."""
        try:
            return integrity.static_writes([(args[i], None if j is None else args[j][0] if positions else args[j], S)
                                            for i, j, positions, S in self.static_writes])
        except Exception as e:  # noqa: BLE001
            self._state_check_off(e)
            return None

    def _static_track(self, pending) -> None:
        """After the compiled call: integrity.static_track (the rows it left in the static states' rings)."""
        try:
            integrity.static_track(pending)
        except Exception as e:  # noqa: BLE001
            self._state_check_off(e)

    def _state_check_off(self, error: Exception) -> None:
        self.state_check = False
        warnings.warn(f"polarquant verify: the cache state check could not run ({type(error).__name__}: {error}); "
                      "it is off for this graph, the kernel check goes on", stacklevel=4)

    def _drift(self, args):
        shadowed = drift.shadow_inputs(args, self.cfg.verify_n)
        rew_args = graphs.with_clones(args, _appended_in_place(args)) if shadowed and shadowed[0] else None
        out = self._compiled(args)
        if shadowed is None:
            return out
        step, shadow_args = shadowed
        try:  # a prefill (step 0) has no compressed keys yet: only the original graph runs
            ref, (_, rew_seen) = self._run_both(shadow_args, rew_args)
        except Exception as e:  # noqa: BLE001
            return self._cannot_check(e, out)
        drift.remember(out, ref[0], step, self.cfg.verify_n)
        checks = drift.checks(self.sites, self.out_names, step, out, ref, rew_seen)
        self.state["checked"] += 1
        self.state["status"] = "drift"
        self._emit({"call": self.state["calls"], "check": "drift", "step": step, "ok": True, "action": "none",
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
        state.add_event(self.state, event)
        if self.on_event is not None:
            self.on_event(self.state)


def _appended_in_place(args) -> list[int]:
    return [i for i, a in enumerate(args) if appends_in_place(a)]
