"""The verify state of each checked graph (report.json "verify") and its event list."""

from __future__ import annotations

import logging
import weakref
from typing import Any

from ..config import PolarQuantConfig

log = logging.getLogger(__name__)
MAX_EVENTS = 64  # events kept per graph (counters keep counting)
_live: list[weakref.ref] = []  # the Checked callables alive (held by dynamo's cache entries)


def states() -> list[dict[str, Any]]:
    """The verify state (report.json "verify") of every live checked graph, in compile order."""
    return [c.state for c in (r() for r in _live) if c is not None]


def track(checked) -> None:
    """Make `checked.state` part of states() for as long as `checked` lives."""
    _live[:] = [r for r in _live if r() is not None] + [weakref.ref(checked)]


def initial(cfg: PolarQuantConfig, skipped: str | None) -> dict[str, Any]:
    """A graph's state before its first call; `skipped` says why it is never checked (None: it is)."""
    return {"mode": cfg.verify_spec, "on_mismatch": cfg.on_mismatch.value,
            "tolerance": {"atol": cfg.atol, "rtol": cfg.rtol, "min_sqnr_db": cfg.min_sqnr_db},
            "status": "skipped" if skipped else "pending", "skipped": skipped, "fallback": False,
            "calls": 0, "checked": 0, "failed": 0, "events": []}


def add_event(state: dict[str, Any], event: dict[str, Any]) -> None:
    events = state["events"]
    events.append(event)
    del events[:-MAX_EVENTS]
    log.debug("polarquant verify event: call %s %s ok=%s", event["call"], event["check"], event["ok"])
