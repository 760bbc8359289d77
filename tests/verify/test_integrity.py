"""verify/integrity.py: the state check of verify="every:N" on eager states (the compiled wiring is in
tests/reliability/test_faults.py). A loop stands in for verify.Checked and the backend: on a checked step the
states are verified before the append and tracked with checked=True after it, other steps only tracked, and
dynamic.reserve_all grows the buffers between steps."""

import random

import pytest
import torch

from pqcompile.cache import PolarKeys
from pqcompile.codec import Codec, Pairing
from pqcompile.dense_values import DenseValues
from pqcompile.dynamic import reserve_all
from pqcompile.value_codec import ValueCodec
from pqcompile.values import PolarValues
from pqcompile.verify import digests, integrity

G, D, N = 16, 16, 3
KINDS = {
    "keys 4+4": lambda x: PolarKeys.from_dense(x, Codec(4, 4, G, Pairing("half"))),
    "keys 3+3": lambda x: PolarKeys.from_dense(x, Codec(3, 3, G, Pairing("interleaved"))),
    "values 4": lambda x: PolarValues.from_dense(x, ValueCodec(4, 8, G)),
    "values 2": lambda x: PolarValues.from_dense(x, ValueCodec(2, 16, G)),
    "dense values": lambda x: DenseValues.from_dense(x, G),
}


def _tokens(T, seed, dtype=torch.float32):
    return (torch.randn(2, 2, T, D, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)


class Loop:
    """A cache tensor appended to one decode step at a time, checked on steps 0, N, 2N, ... like every:N."""

    def __init__(self, kind: str, prompt: int, seed: int = 0):
        self.state, self.step, self.seed = KINDS[kind](_tokens(prompt, seed)), 0, seed
        integrity.track([(self.state, None)], checked=True)  # the prefill's checked call adopts it

    def run(self, tokens: int = 1) -> list[dict]:
        checked = self.step % N == 0
        found = integrity.verify([("layer", 0, self.state)]) if checked else []
        past = self.state
        self.state = torch.cat([past, _tokens(tokens, self.seed + 1000 + self.step)], dim=-2)
        integrity.track([(self.state, past)], checked)
        reserve_all([self.state])
        self.step += 1
        return [c for c in found if not c["ok"]]

    def until_checked(self) -> list[dict]:
        """Steps up to and including the next checked one (at most N): its failed entries."""
        while True:
            checked = self.step % N == 0
            failed = self.run()
            if checked:
                return failed


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32])
def test_every_single_bit_flip_changes_the_digest(dtype):
    x = _tokens(2 * G, 1).mul(40).to(dtype) if dtype is not torch.uint8 else \
        torch.randint(0, 256, (1, 2, 2 * G, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    want = integrity.digest(x, G)
    flat = x.view(torch.uint8).view(-1)
    for i in range(flat.numel()):
        for bit in range(8):
            flat[i] ^= 1 << bit
            assert not torch.equal(integrity.digest(x, G), want), (i, bit)
            flat[i] ^= 1 << bit
    assert torch.equal(integrity.digest(x, G), want)


def _covered(loop: Loop) -> list[tuple[str, torch.Tensor]]:
    """(part, byte view) of every region the record holds a digest of: complete groups' codes / params (rows),
    and every row of the open group (each digested right after the call that wrote it)."""
    s, record = loop.state, integrity.record_of(loop.state)
    assert record.length == s.seq_len
    regions = [(name, t[:, :, : record.groups * rows]) for name, t, rows in integrity._parts(s)]
    regions.append(("ring", integrity._open_rows(s, s.seq_len // G, s.seq_len % G)))
    return [(name, r.view(torch.uint8)) for name, r in regions if r.numel()]


def _flip(rng, region: torch.Tensor) -> None:
    b, h, row, col = (rng.randrange(n) for n in region.shape)
    region[b, h, row, col] ^= 1 << rng.randrange(8)


def test_random_single_bit_flips_are_all_detected_within_n_steps():
    """The measurement in docs/reliability.md: one flipped bit at a random covered byte of a random state kind,
    after a random number of steps (checked or not), then decode steps up to the next checked one (some flush a
    group between); always reported there."""
    rng, injected, detected = random.Random(0), 0, 0
    per_part: dict[str, int] = {}
    for trial in range(300):
        loop = Loop(rng.choice(list(KINDS)), rng.randrange(G, 5 * G), seed=trial)
        for _ in range(rng.randrange(0, 2 * N)):
            loop.run()
        name, region = rng.choice(_covered(loop))
        _flip(rng, region)
        injected += 1
        per_part[name] = per_part.get(name, 0) + 1
        failed = loop.until_checked()
        detected += [c["name"] for c in failed] == ["layer"]
    print(f"dynamic flips anywhere covered: {injected} injected, {detected} detected, per part {per_part}")
    assert detected == injected == 300, (detected, injected, per_part)
    assert set(per_part) == {"codes", "params", "rows", "ring"}


def _since_check(loop: Loop, since: int) -> list[tuple[str, torch.Tensor]]:
    """(part, byte view) of what was appended since token `since` (the length at the last checked call): rows of
    the open group, and the codes / params (rows) of the groups completed since."""
    s, G_ = loop.state, G
    g0, g1 = since // G_, s.seq_len // G_
    regions = [(name, t[:, :, g0 * rows: g1 * rows]) for name, t, rows in integrity._parts(s)]
    lo = max(since - g1 * G_, 0)
    regions.append(("ring", integrity._open_rows(s, g1, s.seq_len % G_)[:, :, lo:]))
    return [(name, r.view(torch.uint8)) for name, r in regions if r.numel()]


def _gap_flips(trials: int, seed: int = 2) -> tuple[int, int, dict]:
    """Flips in rows appended on unchecked steps since the last check (the gap before per-row records): after a
    checked step, 1 to N-1 unchecked ones (1 or 3 tokens each), one bit flipped in what they appended, then
    steps up to the next check (some flush the flipped row's group first)."""
    rng, detected, per_part = random.Random(seed), 0, {}
    for trial in range(trials):
        kind = list(KINDS)[trial % len(KINDS)]
        loop = Loop(kind, rng.randrange(G, 4 * G), seed=trial)
        while loop.step % N != 0:
            loop.run()
        loop.run()  # the checked step: what it appended is covered as of its check
        since = loop.state.seq_len
        for _ in range(rng.randrange(1, N)):
            loop.run(rng.choice([1, 1, 1, 3]))
        regions = _since_check(loop, since)
        name = "ring" if any(n == "ring" for n, _ in regions) and rng.random() < 0.7 else rng.choice(regions)[0]
        _flip(rng, dict(regions)[name])
        per_part[f"{kind} {name}"] = per_part.get(f"{kind} {name}", 0) + 1
        detected += [c["name"] for c in loop.until_checked()] == ["layer"]
    return trials, detected, per_part


def test_flips_in_rows_appended_since_the_last_check_are_detected():
    """The former gap: 100 flips (20 per kind: keys 4+4 / 3+3, values V4 / V2, dense values), each in a row (or a
    group) appended on an unchecked step since the last check: every one reported at the next checked call."""
    injected, detected, per_part = _gap_flips(100)
    print(f"dynamic flips in rows appended since the last check: {injected} injected, {detected} detected, "
          f"per kind and part {per_part}")
    assert detected == injected == 100, (detected, per_part)
    assert sum(v for k, v in per_part.items() if k.endswith("ring")) >= 50


def test_without_the_per_call_records_the_gap_is_back(monkeypatch):
    """What the per-call records are for: with track skipped on unchecked calls (the rows appended then are
    digested as found at the next check, as before), most of the same flips go unreported."""
    real = integrity.track
    monkeypatch.setattr(integrity, "track", lambda states, checked: real(states, checked) if checked else None)
    injected, detected, per_part = _gap_flips(40)
    assert detected < injected // 2, (detected, per_part)


@pytest.mark.parametrize("kind", ["keys 4+4", "values 4", "dense values"])
def test_a_multi_token_append_that_flushes_compares_the_rows_the_ring_keeps(kind):
    """T % G = 10, a flip in row 8 (written before the call); then 5 tokens: the group flushes and the ring's
    slots 0-2 take the next group's rows; slots 3-9 still hold the flushed group's rows, compared there."""
    loop = Loop(kind, 2 * G + 10)
    loop.step = 1
    with torch.no_grad():
        integrity._open_rows(loop.state, 2, 9)[:, :, 8] += 1.0
    loop.run(G - 10 + 3)
    assert loop.state.seq_len == 3 * G + 3
    failed = integrity.verify([("layer", 0, loop.state)])
    assert failed and "before the group was encoded" in failed[0]["what"], failed


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_ring_changed_before_its_group_flushes_is_reported_after_the_flush(kind):
    loop = Loop(kind, 2 * G + 3)  # checked at adoption: ring rows 0-2 of group 2 digested
    while loop.state.seq_len % G != G - 2:
        loop.run()
    with torch.no_grad():
        integrity._open_rows(loop.state, 2, 1).add_(1.0)  # a row the last check digested
    loop.step = 1  # two unchecked steps, the second completes group 2
    loop.run(), loop.run()
    assert loop.state.seq_len // G == 3 and integrity.record_of(loop.state).groups == 3
    failed = integrity.verify([("layer", 0, loop.state)])
    assert failed and not failed[0]["ok"] and "before the group was encoded" in failed[0]["what"], failed
    assert integrity.verify([("layer", 0, loop.state)]) == failed  # sticky: the state stays reported


@pytest.mark.parametrize("kind", list(KINDS))
def test_no_false_alarm_across_flushes_growth_and_multi_token_appends(kind):
    loop, rng = Loop(kind, 5), random.Random(1)
    for step in range(150):
        failed = loop.run(rng.choice([1, 1, 1, 1, 3, G + 5]))  # multi-token appends cross group boundaries
        assert not failed, (step, failed)
    assert not loop.until_checked()
    assert loop.state.capacity > 150 and integrity.record_of(loop.state).groups == loop.state.seq_len // G


def test_growth_between_steps_keeps_the_record():
    """reserve_all grows a DenseValues buffer (its "ring"): the record moves along; PolarKeys keep their ring."""
    for kind in ("dense values", "keys 4+4"):
        loop = Loop(kind, G - 1)
        buffers = set()
        while len(buffers) < 3 or loop.step % N:  # grown twice, and the next step is checked
            buffers.add(loop.state.codes.data_ptr())
            assert not loop.run()
        record = integrity.record_of(loop.state)
        assert record.groups == loop.state.seq_len // G >= 2
        with torch.no_grad():
            integrity._parts(loop.state)[0][1][:, :, 0, 0] += 1  # group 0, written before the growth
        assert [c["name"] for c in loop.until_checked()] == ["layer"]


def test_unchecked_steps_digest_only_what_they_appended(monkeypatch):
    loop = Loop("keys 4+4", G + 1)
    calls = []
    real = digests.digest
    counting = lambda x, rows: calls.append((tuple(x.shape), rows)) or real(x, rows)
    monkeypatch.setattr(integrity, "digest", counting)  # the rows it records
    monkeypatch.setattr(digests, "digest", counting)  # the groups (digests._group_sums)
    monkeypatch.setattr(integrity, "verify", lambda states: pytest.fail("a check on an unchecked step"))
    loop.step = 1
    for _ in range(2 * G):
        if loop.step % N == 0:
            loop.step += 1
        loop.run()
    row, flush = ((2, 2, 1, D), 1), [((2, 2, G - 1, D), 1), ((2, 2, G, 8), G), ((2, 2, 4, D // 2), 4)]
    # each step: the new row; each flush: the group's G - 1 recorded rows still in the ring, its codes and params
    assert calls == [row] * (G - 2) + flush + [row] * (G - 1) + flush + [row], calls


def test_a_retried_step_keeps_the_record():
    """An earlier state appended to again (a refused step retried): the record is cut back, no false alarm, and
    the rows recorded before still compare."""
    for kind in ("keys 4+4", "dense values"):
        loop = Loop(kind, G + 3)
        loop.step = 1
        past = loop.state
        loop.run(2)
        loop.state = past  # retried from the earlier state: other tokens
        loop.seed += 7
        loop.run(1)
        assert integrity.record_of(loop.state).length == G + 4
        assert all(c["ok"] for c in integrity.verify([("layer", 0, loop.state)]))
        with torch.no_grad():
            integrity._open_rows(loop.state, 1, 2)[:, :, 1] += 1.0
        assert "open-group rows 17" in integrity.verify([("layer", 0, loop.state)])[0]["what"]


def test_a_tracked_state_is_freed_with_its_cache():
    """The record lives on the ring's attribute: it must not hold views of the ring (a cycle gc cannot free)."""
    import gc
    import weakref

    refs = []
    for kind in ("keys 4+4", "dense values"):
        loop = Loop(kind, G + 3)
        for _ in range(4):
            loop.run()
        refs.append(weakref.ref(loop.state.tail))
        del loop
    gc.collect()
    assert all(r() is None for r in refs)
