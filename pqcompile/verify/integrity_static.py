"""The state check of PolarStaticCache states (integrity.py holds the DynamicCache part and the check itself).

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

import torch

from ..static_cache import static_write, static_write_values
from .digests import _ATTR, _group_sums, _open_rows, digest

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
