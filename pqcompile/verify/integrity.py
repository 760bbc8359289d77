"""The state check of verify="every:N": is each live cache state (DynamicCache's, and PolarStaticCache's: below)
still what was written into it?

The kernel check runs both graphs on the same state, so it cannot see a state that changed between steps (bytes
of codes, params or the ring flipped). But the states are append-only (docs/design.md §2.1): a complete group's
rows never change once written, and the ring's rows below the fill point never change until their group
flushes. So each state gets a record, an attribute of its ring tensor (the one buffer capacity growth keeps;
for DenseValues the buffer, moved along by dynamic.RING_MOVED; copy.deepcopy copies it with the rows):
  - a digest per complete group (of its codes and of its params; DenseValues: of its rows), taken right after
    the compiled step that completed it: O(one group) of device work per state at a group boundary, no sync;
  - a digest per row of the open group (`rows`, by ring slot), taken right after every compiled call (checked
    or not) for the rows it appended, fused over the call's states (one stack, one digest, one _foreach_copy_),
    no sync; when a call flushes the group, the recorded rows the ring (DenseValues: the buffer) still holds
    are recomputed and compared on the device into a sticky flag (the group was encoded from changed rows);
and a checked call, before the step writes, recomputes every digest and compares (one transfer to the host).
Digest: per group and (batch, head) row, the sum of byte * weight(position) in int64 with weights in [1, 2^31),
exact below 2^24 bytes per row: any change confined to one byte (any flipped bit) changes it; changes spread over
several bytes cancel only by accident.
Not covered: ring rows of a flushed group that a multi-token append overwrote in the same call (slots below both
the old and the new fill point: what the encode read is gone by the compare), rows a call appended between the
write and the digest right after it (inside that call), and states first seen between checked calls (a copy, a
crop, a beam reorder: adopted at the next checked call, digested as found; so are rows appended outside the
compiled calls). A state that failed keeps failing: its record is not rebased.
Static states: integrity_static.py.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import dynamic
from ..dense_values import DenseValues
from ..static_cache import StaticCompressed
from .digests import _ATTR, _group_sums, _open_rows, _parts, digest
from .integrity_static import _StaticRecord, static_track, static_writes, write_sources  # noqa: F401 (re-exported)


class _Record:
    """Digests of one dynamic state covering its first `length` tokens: its first `groups` groups (`sums`, room for
    more), and one digest per row of the open group (`rows` [B, H, G], slot t % G: taken right after the call that
    wrote the row, on the device), and `stale`, set on the device when a flushed group's recorded rows no longer
    matched the ring at the flush (the group was encoded from changed rows)."""

    def __init__(self, s):
        self.groups, self.sums, self.length = 0, None, 0
        B, H = s.tail.shape[:2]
        self.rows = torch.zeros(B, H, s.group_size, dtype=torch.int64, device=s.tail.device)
        self.stale = torch.zeros((), dtype=torch.bool, device=s.tail.device)
        # one-row views of `rows` per slot, made once (a decode step's destination is then a tuple lookup). Not of
        # the ring: views of it held here would keep it alive through its own attribute (a cycle gc cannot free)
        self.row_slots = self.rows.unbind(2)

    def cut(self, length: int) -> None:
        """An earlier state of the same buffers appended to again (a retried step): what lies past it is rewritten.
        Rows [0, length % G) of its open group are still recorded (an earlier state is only appended to while the
        ring still holds its group: DynamicCompressed.check_current)."""
        self.length = length
        self.groups = min(self.groups, length // _group(self))

    def grow(self, s, n: int) -> None:
        """Digest groups [groups, n): just completed (after a step), or all of them (a state adopted)."""
        new = _group_sums(s, self.groups, n)
        if self.sums is None or self.sums.shape[2] < n:  # doubling: O(1) groups copied per flush on average
            room = new.new_empty(*new.shape[:2], max(2 * n, 16), new.shape[3])
            if self.groups:
                room[:, :, : self.groups] = self.sums[:, :, : self.groups]
            self.sums = room
        self.sums[:, :, self.groups: n] = new
        self.groups = n


def _group(record: _Record) -> int:
    return record.rows.shape[2]


def record_of(s) -> _Record | _StaticRecord | None:
    return getattr(s.ring if isinstance(s, StaticCompressed) else s.tail, _ATTR, None)


def _moved(old: torch.Tensor, new: torch.Tensor) -> None:
    record = old.__dict__.pop(_ATTR, None)
    if record is not None:
        setattr(new, _ATTR, record)


dynamic.RING_MOVED.append(_moved)


def track(states, checked: bool) -> None:
    """After every compiled call, on the (state returned, input state it appended to or None): record what the call
    appended. Rows left in the open group: one digest per row into the record (`rows`, at their ring slots),
    fused over the states (a stack, the digest, one _foreach_copy_); groups the call completed: their codes /
    params (DenseValues: rows) digested, and the flushed group's recorded rows the ring still holds compared
    with it into the sticky `stale` flag. Device work only, no sync; nothing when nothing was appended. A
    returned state with new buffers (aot_eager copies the cache each step: functionalized, not in place) takes
    over its input's record. On a checked call, also adopt the states not yet tracked (digested as found)."""
    jobs: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch._C.DisableTorchFunctionSubclass():  # .shape of a DynamicCompressed costs ~4 us through it
        for s, source in states:
            record = getattr(s.tail, _ATTR, None)
            if record is None and source is not None:
                record = getattr(source.tail, _ATTR, None)
                if record is not None:
                    setattr(s.tail, _ATTR, record)
            if record is None:
                if not checked:
                    continue
                record = _Record(s)
                setattr(s.tail, _ATTR, record)
            T1, G = s.shape[2], s.group_size
            T0 = record.length if source is None else source.shape[2]
            if T0 < record.length:
                record.cut(T0)
            start = record.length  # rows [start, T1) are new to the record (rows an untracked call appended too)
            if start == T1:
                continue
            g0, g1 = start // G, T1 // G
            if g1 > g0:  # the call completed groups
                lo, hi = (0 if isinstance(s, DenseValues) else T1 % G), start % G
                if T0 == start and lo < hi:  # the flushed group's recorded rows the ring still holds
                    now = digest(_open_rows(s, g0, hi)[:, :, lo:], 1)
                    record.stale |= (now != record.rows[:, :, lo:hi]).any()
                record.grow(s, g1)
            a, b = max(start - g1 * G, 0), T1 - g1 * G
            if b == a + 1:  # a decode step
                jobs.append((s.tail.select(2, g1 * G + a if isinstance(s, DenseValues) else a),
                             record.row_slots[a]))
            elif b > a:
                jobs.append((_open_rows(s, g1, b)[:, :, a:], record.rows[:, :, a:b]))
            record.length = T1
        _record_rows(jobs)


def _record_rows(jobs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """dst[...] = digest(src, 1) for each (rows [B, H, S, D], their digests [B, H, S]; or one row [B, H, D], [B, H]):
    one stack, one digest and one _foreach_copy_ per shape."""
    by: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for src, dst in jobs:
        by.setdefault((src.shape, src.dtype, src.device), []).append((src, dst))
    for items in by.values():
        x = torch.stack([src for src, _ in items])
        x = x.unsqueeze(-2) if x.dim() == 4 else x  # [n, B, H, S, D]
        d = digest(x.flatten(0, 1), 1).view(len(items), *items[0][1].shape)
        if len(items) == 1:
            items[0][1].copy_(d[0])
        else:
            torch._foreach_copy_([dst for _, dst in items], list(d.unbind(0)))


def verify(states: list[tuple[str, int | None, Any]]) -> list[dict[str, Any]]:
    """On a checked call, before the step writes: each tracked state of (label, site, state) against its record.
    One comparison entry per state that changed (a kernel-check "checks" entry, sqnr_db -inf), or one entry for
    them all when none did. Static states not yet tracked are adopted (their length is read in the same
    transfer), the others checked below their bound and rebased."""
    found, static = [], []
    for label, site, s in states:
        if isinstance(s, StaticCompressed):
            record = record_of(s)
            if record is None:
                record = _StaticRecord(s)
                setattr(s.ring, _ATTR, record)
            static.append((label, site, s, record, record.flags(s)))
            continue
        record = record_of(s)
        if record is None:
            continue
        n, G = min(s.seq_len // s.group_size, record.groups), s.group_size
        groups = (_group_sums(s, 0, n) != record.sums[:, :, :n]).flatten(0, 1).any(0) if n else \
            torch.zeros(0, dtype=torch.bool, device=s.tail.device)
        g = s.seq_len // G  # the open group's rows recorded (all of them, unless the record is behind the state)
        rows = min(s.seq_len, record.length) - g * G if record.length // G == g else 0
        ring = (digest(_open_rows(s, g, rows), 1) != record.rows[:, :, :rows]).flatten(0, 1).any(0) if rows else \
            torch.zeros(0, dtype=torch.bool, device=s.tail.device)
        found.append((label, site, s, record, n, rows, torch.cat([groups.flatten(), ring, record.stale.view(1)])))
    if not found and not static:
        return []
    flags = torch.cat([f[-1].to(torch.int64) for f in found] + [f[-1] for f in static]).tolist()  # the one transfer
    checks, at, groups_seen, ring_rows = [], 0, 0, 0
    for label, site, s, record, n, rows, f in found:
        names, G = [name for name, _, _ in _parts(s)], s.group_size
        bad = flags[at: at + f.numel()]
        at += f.numel()
        groups_seen, ring_rows = groups_seen + n, ring_rows + rows
        what = [f"{name} of group(s) {_spans([g for g in range(n) if bad[g * len(names) + k]])}"
                for k, name in enumerate(names) if any(bad[k: n * len(names): len(names)])]
        changed = [s.seq_len // G * G + r for r in range(rows) if bad[n * len(names) + r]]
        if changed:
            what.append(f"open-group rows {_spans(changed)}")
        if bad[-1]:
            what.append("an open group's rows changed before the group was encoded")
        if what:
            checks.append(_entry(label, site, "state vs its digests: " + "; ".join(what) + " changed since written",
                                 ok=False))
    for label, site, s, record, f in static:
        vals = flags[at: at + f.numel()]
        at += f.numel()
        names, G, R = [name for name, _, _ in _parts(s)], s.codec.group_size, s.ring.shape[2]
        length, bound = vals[0], min(vals[0], vals[1])  # rewound or reset since: the records above are dropped
        kept, slots, bad = min(record.groups, bound // G), sorted(p for p in vals[4: 4 + R] if p >= 0), vals[4 + R:]
        ring = record.ring is not None and length // G == record.ring_group and \
            record.ring_group * G + record.ring_rows <= bound  # the digested rows are still the open group's
        groups_seen, ring_rows = groups_seen + kept, ring_rows + max(record.ring_rows if ring else 0, vals[3])
        what = [f"{name} of group(s) {_spans([g for g in range(kept) if bad[g * len(names) + k]])}"
                for k, name in enumerate(names) if any(bad[k: kept * len(names): len(names)])]
        if ring and vals[2]:
            what.append(f"open-group rows {record.ring_group * G}-{record.ring_group * G + record.ring_rows - 1}")
        if [p for p in slots if p >= length // G * G]:
            what.append(f"open-group rows {_spans([p for p in slots if p >= length // G * G])} (ring)")
        if [p for p in slots if p < length // G * G]:  # the group before the open one, encoded since written
            what.append(f"ring rows {_spans([p for p in slots if p < length // G * G])} (group {length // G - 1}, "
                        f"encoded since they were written: the encode read them changed, or they changed after)")
        if what:  # not rebased: it keeps failing
            checks.append(_entry(label, site, "state vs its digests: " + "; ".join(what) + " changed since written",
                                 ok=False))
        else:
            record.rebase(s, kept, length)
    return checks or [_entry("cache state", None, f"{len(found) + len(static)} cache tensors vs their digests: "
                                                  f"{groups_seen} groups, {ring_rows} open-group rows unchanged",
                             ok=True)]


def _entry(name: str, site: int | None, what: str, ok: bool) -> dict[str, Any]:
    """A checks entry shaped like kernel.compare's (the reports read these keys); no error metric applies."""
    return {"name": name, "site": site, "what": what, "max_abs": None, "rel_l2": None,
            "sqnr_db": None if ok else -math.inf, "cosine": None, "ref_absmax": None, "ok": ok}


def _spans(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, g in enumerate(indices):
        start = g if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != g + 1:
            out.append(str(g) if g == start else f"{start}-{g}")
            start = None
    return ", ".join(out)
