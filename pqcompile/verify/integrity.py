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

Static states (StaticPolarKeys / StaticPolarValues of a PolarStaticCache) hold their length on the device and are
rewritten below it by a rewind (HF's crop, then a write) or reset(), so the host learns their length at checked
calls only, in the same transfer as the flags. Their record (`_StaticRecord`, on the ring) is taken at a checked
call, before the step writes: digests of the complete groups below the length and of the ring's rows below the
fill point. The next checked call compares the groups still below `bound` = min(length now, lowest write start
since), and the ring rows if their group is still the open one and they are below `bound`; the records above
`bound` are dropped (rewound or reset), and the groups completed since are digested as found. The lowest write
start comes from `static_writes` (Checked, on every call of a graph that writes a tracked static state, before it
runs): one fused device minimum of the write positions' source (HF 5.x: the layer's cumulative_length; 4.57: the
cache_position input), no sync. Rows written since: per ring slot, the digest and position of the row the last
tracked write left there (`slots`), on the device: static_writes drops the slot records at or above where the
call may change rows (the start, or its group's start for a rewind into an encoded group), static_track digests
the rows the call left in the ring at slots (end - m + i) % G and index_copy_s them (a position in a group the call
completed: none). A check compares the slots recorded among the last G positions below the length (the open
group's rows, and the previous group's rows its encode read, still above the fill point). Not covered: a row
encoded inside the call that wrote it, groups completed since the last check (digested as found), slots
rewritten before the check (over G tokens since it), and writes outside the compiled graphs (eager calls on the
same cache) that rewind: they read as a corruption.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import dynamic
from ..dense_values import DenseValues
from ..static_cache import StaticCompressed, static_write, static_write_values

_BUDGET = 1 << 22  # bytes digested per launch on a checked call: its int64 temporaries stay under 64 MB
_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _weights(n: int, device: torch.device) -> torch.Tensor:
    """Position weights in [1, 2^31), int64: a multiplicative hash of the position, odd."""
    w = _WEIGHTS.get(device)
    if w is None or w.numel() < n:
        i = torch.arange(1 << max(n - 1, 1).bit_length(), dtype=torch.int64, device=device)
        w = _WEIGHTS[device] = (i * 2654435761 + 40503) % 2147483647 | 1
    return w[:n]


def digest(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [B, H, k * rows, ...] (last dim contiguous) -> int64 [B, H, k]: each group of `rows` rows' bytes, weighted
    by position."""
    B, H = x.shape[:2]
    b = (x if x.dtype == torch.uint8 else x.view(torch.uint8)).reshape(B, H, x.shape[2] // rows, -1)
    return (b.to(torch.int64) * _weights(b.shape[-1], b.device)).sum(-1)


def _parts(s) -> list[tuple[str, torch.Tensor, int]]:
    """(name, buffer, rows per group) of a state's complete groups."""
    G = s.codec.group_size if isinstance(s, StaticCompressed) else s.group_size
    if isinstance(s, StaticCompressed):  # keys: 4 params rows per group; values: one per token
        return [("codes", s.codes, G), ("params", s.params, s.params.shape[2] * G // s.codes.shape[2])]
    return [("rows", s.buf, G)] if isinstance(s, DenseValues) else [("codes", s.codes, G),
                                                                      ("params", s.params, s.param_rows(G))]


def _open_rows(s, group: int, rows: int) -> torch.Tensor:
    """The first `rows` tokens of group `group` where the state keeps them in full precision."""
    if isinstance(s, DenseValues):
        return s.buf[:, :, group * s.group_size: group * s.group_size + rows]
    return s.ring[:, :, :rows] if isinstance(s, StaticCompressed) else s.tail[:, :, :rows]


def _group_sums(s, g0: int, g1: int) -> torch.Tensor:
    """int64 [B, H, g1 - g0, parts]: the digests of groups [g0, g1), a few groups per launch."""
    parts = _parts(s)
    step = max(1, _BUDGET // max(t[:, :, :r].numel() * t.element_size() for _, t, r in parts))
    chunks = [torch.stack([digest(t[:, :, a * r: min(a + step, g1) * r], r) for _, t, r in parts], dim=-1)
              for a in range(g0, g1, step)]
    return torch.cat(chunks, dim=2)


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


_ATTR = "_pq_digests"  # the _Record of a state, on its ring tensor (a tensor attribute: read in ~0.1 us)


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


_FAR = 1 << 62  # a static record's lowest write start when nothing was written since the check


class _StaticRecord:
    """Digests of a static state, taken at a checked call before the step: its first `groups` groups (`sums`
    [B, H, groups, parts], None when 0), rows [0, ring_rows) of group `ring_group` (`ring`, None when 0 rows), and
    `low`, on the device: the lowest position a compiled call wrote at since then (static_writes). And per ring
    slot, kept on the device after every compiled call (static_track): `slots` int64 [B * H + 1, G], rows 0..B*H-1
    the digest of the row the last tracked write left there, the last row its position (`pos`, -1: none)."""

    def __init__(self, s):
        self.groups, self.sums, self.ring, self.ring_group, self.ring_rows = 0, None, None, 0, 0
        self.low = torch.full((), _FAR, dtype=torch.int64, device=s.ring.device)
        B, H, G = s.ring.shape[:3]
        self.slots = torch.zeros(B * H + 1, G, dtype=torch.int64, device=s.ring.device)
        self.pos = self.slots[-1]
        self.pos.fill_(-1)

    def flags(self, s) -> torch.Tensor:
        """int64 [4 + G + groups * parts]: length, low, ring changed, slot rows compared, per ring slot: the position
        of its changed row (-1: unchanged or not compared), then per group and part: changed."""
        dev = s.ring.device
        ring = torch.zeros(1, dtype=torch.bool, device=dev) if self.ring is None else \
            (digest(_open_rows(s, self.ring_group, self.ring_rows), self.ring_rows) != self.ring).any().view(1)
        groups = (_group_sums(s, 0, self.groups) != self.sums).flatten(0, 1).any(0).flatten() if self.groups else \
            torch.zeros(0, dtype=torch.bool, device=dev)
        # the slots whose recorded row is one of the last G below the length: the open group's, and the rows of the
        # group before it still above the fill point (what its encode read, unless rewritten since: then recorded)
        L, G = s.length.to(torch.int64), s.ring.shape[2]
        seen = (self.pos >= 0) & (self.pos < L) & (self.pos >= L - G)
        changed = (digest(s.ring, 1).flatten(0, 1) != self.slots[:-1]).any(0)
        slots = torch.where(seen & changed, self.pos, -1)
        return torch.cat([L.view(1), self.low.view(1), ring.to(torch.int64), seen.sum().view(1), slots,
                          groups.to(torch.int64)])

    def rebase(self, s, kept: int, length: int) -> None:
        """Keep the first `kept` groups' digests, digest the groups completed up to `length` and the open rows."""
        G = s.codec.group_size
        n, sums = length // G, (self.sums[:, :, :kept] if kept else None)
        if n > kept:
            new = _group_sums(s, kept, n)
            sums = new if sums is None else torch.cat([sums, new], dim=2)
        self.sums, self.groups = sums, n
        self.ring_group, self.ring_rows = n, length - n * G
        self.ring = digest(_open_rows(s, n, self.ring_rows), self.ring_rows) if self.ring_rows else None
        self.low.fill_(_FAR)


def static_writes(writes):
    """Before a compiled call, on (static state it writes, where its writes start: a 0-d int64 tensor on the
    state's device, or None when unknown, tokens written: an int or None when unknown): for each tracked state,
    the rows the call may change start at e = the start, or the start of its group when the start is below the
    group the length is in (a rewind into an encoded group re-decodes that group's kept rows into the ring).
    Lower `low` to e and drop the slot records at or above e; return what static_track needs after the call (the
    starts copied: the graph may advance the counter they are read from). Fused per state shape (a stack of the
    starts and lengths, a few element-wise ops, one _foreach_minimum_, one stack / masked_fill_ / _foreach_copy_
    of the slot positions), no sync; an unknown start counts as 0 (the next check drops the state's records)."""
    by: dict[tuple, list] = {}
    for s, start, S in writes:
        record = getattr(s.ring, _ATTR, None)
        if record is None:
            continue
        if start is None:
            record.low.zero_()
            record.pos.fill_(-1)
        else:
            by.setdefault((s.ring.shape, s.ring.device, S), []).append((s, record, start))
    pending = []
    for (shape, _, S), items in by.items():
        G = shape[2]
        starts = torch.stack([start.reshape(()).to(torch.int64) for _, _, start in items])  # a copy: [n]
        lengths = torch.cat([s.length for s, _, _ in items]) if len(items) > 1 else items[0][0].length.clone()
        e = torch.where(starts < lengths // G * G, starts // G * G, starts)
        records = [record for _, record, _ in items]
        torch._foreach_minimum_([r.low for r in records], list(e.unbind(0)))
        pos = torch.stack([r.pos for r in records])
        pos.masked_fill_(pos >= e.unsqueeze(1), -1)
        torch._foreach_copy_([r.pos for r in records], list(pos.unbind(0)))
        pending.append((G, S, items, starts))
    return pending


def static_track(pending) -> None:
    """After the compiled call, on static_writes' answer: digest the rows the call left in the ring, into each
    state's slot records. The last m = min(S, G) positions written (S unknown: the last G below the new length,
    those at or above the start) end at the new length; their ring slots (p % G) are distinct. A position in the
    group the call leaves open is recorded with its row's digest; one in a group the call completed is recorded as
    none (-1: its row went to the encode, not necessarily through the ring). Fused per state shape: a stack of the
    new lengths, one index_select of the slots per state, one stack and digest, one index_copy_ per state. No sync."""
    for G, S, items, starts in pending or ():
        m = G if S is None else min(S, G)
        if m == 0:
            continue
        ends = torch.cat([s.length for s, _, _ in items]) if len(items) > 1 else items[0][0].length
        p = ends.unsqueeze(1) - m + torch.arange(m, device=ends.device)  # [n, m]
        valid = (p >= starts.unsqueeze(1)) & (p >= (ends // G * G).unsqueeze(1)) & (p >= 0)
        at = p % G
        rows = torch.stack([s.ring.index_select(2, at[i]) for i, (s, _, _) in enumerate(items)])  # [n, B, H, m, D]
        d = digest(rows.flatten(0, 1), 1).view(len(items), -1, m)  # [n, B * H, m]
        vals = torch.cat([d, torch.where(valid, p, -1).unsqueeze(1)], dim=1)
        for i, (_, record, _) in enumerate(items):
            record.slots.index_copy_(1, at[i], vals[i])


def write_sources(gm, placeholders: list[str]) -> list[tuple[int, int | None, bool, int | None]]:
    """(input position of a static state, input position of its write positions' source or None, whether that
    input is the positions [S] itself, S: the tokens written, from the new rows' shape, or None when not a plain
    int) for each static write the rewritten graph `gm` makes to one of its inputs.
    The source: the positions if they are an input (transformers 4.57's cache_position), else the one 0-d integer
    input they derive from (5.x: arange(S) + the layer's cumulative_length, read before the graph adds S)."""
    index = {name: i for i, name in enumerate(placeholders)}
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (static_write, static_write_values):
            continue
        state, pos = node.args[0], node.args[1]
        if getattr(state, "op", None) != "placeholder" or state.name not in index:
            continue  # a state the graph creates (a prefill's lazy init): adopted at a later check
        new = node.args[2] if len(node.args) > 2 else None
        val = getattr(new, "meta", {}).get("val", getattr(new, "meta", {}).get("example_value"))
        S = val.shape[2] if isinstance(val, torch.Tensor) and val.dim() == 4 and isinstance(val.shape[2], int) \
            else None
        if getattr(pos, "op", None) == "placeholder":
            found.append((index[state.name], index.get(pos.name), True, S))
            continue
        seen, todo, scalars = set(), [pos] if hasattr(pos, "all_input_nodes") else [], set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder":
                v = n.meta.get("val", n.meta.get("example_value"))
                if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point() and n.name in index:
                    scalars.add(n.name)
            todo += n.all_input_nodes
        found.append((index[state.name], index[scalars.pop()] if len(scalars) == 1 else None, False, S))
    return found


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
