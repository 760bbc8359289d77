"""verify/integrity.py on the static cache: a PolarStaticCache (keys, and values with value_bits) decoded by a
compiled tiny Llama with verify="every:N"; corruptions injected into the live cache between compiled decode steps
are reported at the next checked call, and a clean run with group boundaries, crops (rewinds) and reset() is not.

The decode graph is checked on its calls 1, N+1, 2N+1, ...; a check reads the state before the step writes, so
the length it sees is the one before that call."""

import copy
import random
import warnings

import pytest
import torch

from pqcompile import verify
from pqcompile.hf_compat import cache_kw
from pqcompile.models import tiny_llama
from pqcompile.static_cache import PolarStaticCache
from pqcompile.verify import integrity

G, N, PROMPT, MAX_LEN = 16, 3, 36, 112
V4 = {"value_bits": 4, "value_group": 16}


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, qk_gain=3.0)  # head dim 16


@pytest.fixture(scope="module")
def ids(model):
    return torch.randint(0, model.config.vocab_size, (1, 4 * MAX_LEN), generator=torch.Generator().manual_seed(0))


class Run:
    """A compiled model decoding into a PolarStaticCache, one token a step."""

    def __init__(self, model, ids, every=N, on_mismatch="warn", value_bits=None, prompt=PROMPT):
        options = {"backend": "eager", "group_size": G, "verify": f"every:{every}", "on_mismatch": on_mismatch}
        self.earlier = {id(st) for st in verify.states()}  # graphs of an earlier Run in the same test
        self.fwd = torch.compile(model, backend="polarquant", options=options)
        self.model, self.ids, self.every = model, ids, every
        self.cache = PolarStaticCache(config=model.config, max_cache_len=MAX_LEN, group_size=G,
                                      **(V4 if value_bits else {}))
        self.prefill(prompt)

    @property
    def length(self) -> int:
        return int(self.cache.layers[0].keys.length[0])

    def prefill(self, prompt: int, offset: int = 0) -> None:
        with torch.no_grad():
            self.fwd(self.ids[:, offset: offset + prompt], **cache_kw(self.cache), use_cache=True)
        self.t = offset + prompt

    def step(self, fwd=None):
        with torch.no_grad():
            t = self.t % (self.ids.shape[1] - 1)  # which tokens does not matter; after a crop, new ones
            out = (fwd or self.fwd)(self.ids[:, t: t + 1], **cache_kw(self.cache), use_cache=True).logits
        self.t += 1
        return out

    def states(self) -> list[dict]:
        return [st for st in verify.states() if id(st) not in self.earlier]

    @property
    def decode(self) -> dict:
        states = self.states()  # the graph called most, the later one on a tie (a decode graph's first call)
        return max(states, key=lambda st: (st["calls"], states.index(st)))

    def keep_room(self, rng) -> None:
        """Near the capacity: crop 16-47 tokens; the next write rewinds (taken here, so the records' bound moves)."""
        if self.length > MAX_LEN - 3 * N:
            self.cache.crop(-rng.randrange(G, 3 * G))
            self.step()

    def steps_to_check(self) -> int:
        """Unchecked decode calls before the next checked one (whose check sees length + this)."""
        calls = self.decode["calls"]
        return (-calls) % self.every

    def until_checked(self) -> list[dict]:
        """Decode steps up to and including the next checked call (of any graph): that check's failed entries."""
        before = {id(st): st["checked"] for st in self.states()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            while True:
                self.step()
                for st in self.states():
                    if st["checked"] != before.get(id(st), 0):
                        return [c for c in st["events"][-1]["checks"] if not c["ok"]]

    def failed(self) -> list[dict]:
        return [c for st in self.states() for e in st["events"] for c in e["checks"] if not c["ok"]]


def _row(state, part: str) -> int:
    """The row corrupted: group 1's fourth code row or second params row (keys: 4 params rows per group, values:
    one per token), or ring row 0 (below the fill point, digested at the last check)."""
    return {"codes": G + 3, "params": state.params.shape[2] * G // state.codes.shape[2] + 1, "ring": 0}[part]


def _inject(state, part: str) -> None:
    with torch.no_grad():
        rows = getattr(state, part)[:, :, _row(state, part)]
        if part == "codes":
            rows ^= 0x10
        elif part == "params":
            rows *= 4
        else:
            rows += 1.0


@pytest.mark.parametrize("value_bits", [None, 4], ids=["dense-values", "v4"])
def test_static_corruption_is_detected_at_the_next_check(model, ids, value_bits):
    """Each part of each static state kind corrupted in turn (keys; with value_bits the values too), injected after
    a check whose open group is still open at the next one; reported there, naming the layer, the tensor and the
    part, and again at every later check until repaired."""
    run = Run(model, ids, value_bits=value_bits)
    tensors = ["keys", "values"] if value_bits else ["keys"]
    cases = [(layer, t, part) for layer, (t, part) in enumerate((t, p) for t in tensors for p in ("codes", "params",
                                                                                                  "ring"))]
    for layer, tensor, part in cases:
        layer %= 2
        while True:  # a passing check with ring rows, and the same group open at the next one
            assert not run.until_checked()
            before = run.length - 1  # what the check saw
            if 0 < before % G and before % G + N + 1 < G:  # the group stays open past the detecting call
                break
        state = getattr(run.cache.layers[layer], tensor)
        row = _row(state, part)
        saved = getattr(state, part)[:, :, row].clone()
        _inject(state, part)
        failed = run.until_checked()
        assert [c["name"] for c in failed] == [f"model.layers.{layer}.self_attn {tensor}"], (tensor, part, failed)
        want = "open-group rows" if part == "ring" else f"{part} of group(s) 1 changed"
        assert want in failed[0]["what"] and failed[0]["sqnr_db"] == float("-inf"), failed
        if part != "ring":
            assert run.until_checked() == failed  # not rebased: it keeps failing
        with torch.no_grad():  # repaired: the next check passes
            getattr(state, part)[:, :, row] = saved
        run.keep_room(random.Random(0))
    assert not run.until_checked()


def test_a_static_corruption_raises_naming_the_layer_and_the_tensor(model, ids):
    run = Run(model, ids, on_mismatch="raise", value_bits=4)
    for _ in range(N + 1):
        run.step()
    with torch.no_grad():
        run.cache.layers[0].values.codes[:, :, 0] ^= 0x01
    with pytest.raises(verify.VerifyMismatch, match=r"model\.layers\.0\.self_attn values: state vs its digests: "
                                                    r"codes of group\(s\) 0 changed since written"):
        for _ in range(N):
            run.step()


def test_a_static_corruption_falls_back_to_the_original_graph(model, ids):
    run = Run(model, ids, on_mismatch="fallback")
    for _ in range(N + 1):
        run.step()
    decode = run.decode
    with torch.no_grad():
        run.cache.layers[1].keys.params[:, :, 1] *= 4  # group 0's radius scale
    for _ in range(N):
        reference = copy.deepcopy(run.cache)  # the same corrupted state for HF's eager model
        out = run.step()
        if decode["fallback"]:
            run.t -= 1
            eager = run.step(lambda x, ref=reference, **k: run.model(x, **{**k, **cache_kw(ref)}))
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)  # the original graph's answer (HF's
            break  # eager attention reads the dequantized cache through another SDPA path: not bit-equal)
    assert decode["fallback"] and decode["events"][-1]["action"] == "fallback", decode
    assert "params of group(s) 0" in decode["events"][-1]["checks"][0]["what"]


@pytest.mark.parametrize("value_bits", [None, 4])
def test_no_false_alarm_across_groups_crops_and_reset(model, ids, value_bits):
    """Group boundaries, a crop and rewrite within one check interval (the regrown groups are different bytes),
    a crop below the checked length, reset() and a new prompt: every check passes, and still covers the state."""
    run = Run(model, ids, every=5, value_bits=value_bits)
    for _ in range(20):  # 36 -> 56: groups 2 complete
        run.step()
    run.until_checked()
    for crop, steps in ((7, 12), (20, 3), (3, 1), (18, 20)):
        run.cache.crop(-crop)  # the next writes rewind (other tokens): into the open group, or into encoded groups
        for _ in range(steps):
            run.step()
        run.until_checked()
    run.cache.reset()
    run.prefill(50, offset=200)  # another prompt through the prefill graph
    for _ in range(25):
        run.step()
    checks = [c for e in run.decode["events"] for c in e["checks"] if c["name"] == "cache state"]
    assert not run.failed() and run.decode["checked"] >= 16, run.failed()
    assert checks and f"{4 if value_bits else 2} cache tensors" in checks[-1]["what"], checks
    record = integrity.record_of(run.cache.layers[1].keys)
    assert record.groups >= 4, record.groups  # the check covers the regrown state
    with torch.no_grad():
        run.cache.layers[1].keys.codes[:, :, 5] ^= 0x80
    assert [c["name"] for c in run.until_checked()] == ["model.layers.1.self_attn keys"]


def test_a_rewind_within_one_interval_needs_the_write_tracking(model, ids, monkeypatch):
    """What static_writes is for: a crop into encoded groups and a regrowth past them between two checks
    re-encodes those groups (the kept rows come back decoded); without the lowest write start the check would
    read that as a corruption."""
    for tracked in (True, False):
        if not tracked:
            monkeypatch.setattr(integrity, "static_writes", lambda writes: None)
        run = Run(model, ids, every=8)
        run.until_checked()  # decode call 1: length 36, groups 0-1 recorded
        for _ in range(5):
            run.step()
        run.cache.crop(-12)  # 41 -> 29: the next write (another token) rewinds into group 1
        failed = run.until_checked()  # length 29 -> 31 -> ... -> back above 32 before the check
        assert run.length > 2 * G
        assert bool(failed) is not tracked, failed
        if not tracked:
            assert "of group(s) 1" in failed[0]["what"], failed
        torch._dynamo.reset()


def _slots_compared(state, record, L: int, L_next: int) -> list[int]:
    """Ring slots whose recorded row the next check (at length L_next, no rewind before it) compares and no write
    before it replaces: a recorded position among the last G below L_next, and below L (written already)."""
    pos = record.pos.tolist()
    return [k for k, p in enumerate(pos) if 0 <= p < L and p >= L_next - G]


def test_random_single_bit_flips_in_static_state_are_detected(model, ids):
    """The measurement in docs/reliability.md: one flipped bit at a random byte the next check compares (a complete
    group's codes or params below the checked length, a ring row digested at the last check whose group is still
    open at the next one, or a ring row a slot record covers), keys and values (V4), then decode steps up to the
    next check: always reported there. Flips repaired after each trial."""
    rng = random.Random(0)
    run = Run(model, ids, value_bits=4)
    injected, detected, nonfinite, per_part = 0, 0, 0, {}
    while injected < 120:
        run.keep_room(rng)  # rewinds keep the cache in range
        for _ in range(rng.randrange(0, N)):
            run.step()
        layer, tensor = rng.randrange(2), rng.choice(["keys", "values"])
        state = getattr(run.cache.layers[layer], tensor)
        record = integrity.record_of(state)
        L, low = run.length, int(record.low)
        bound, L_next = min(L, low), L + run.steps_to_check()
        regions = [(name, t[:, :, : min(record.groups, bound // G) * rows])
                   for name, t, rows in integrity._parts(state)]
        if record.ring is not None and L_next // G == record.ring_group == L // G and \
                record.ring_group * G + record.ring_rows <= bound:
            regions.append(("ring", state.ring[:, :, : record.ring_rows]))
        slots = _slots_compared(state, record, L, L_next)
        if slots:
            k = rng.choice(slots)
            regions.append(("slot", state.ring[:, :, k: k + 1]))
        regions = [(name, r.view(torch.uint8)) for name, r in regions if r.numel()]
        if not regions:
            run.step()
            continue
        name, region = rng.choice(regions)
        b, h, row, col = (rng.randrange(n) for n in region.shape)
        bit = 1 << rng.randrange(8)
        region[b, h, row, col] ^= bit
        injected += 1
        per_part[name] = per_part.get(name, 0) + 1
        try:
            failed = run.until_checked()
        except ValueError as e:  # a flip the model turned into inf/NaN keys or values before the check:
            assert "inf or NaN" in str(e)  # the encode refuses them (docs/reliability.md, non-finite policy)
            nonfinite += 1
            run.cache.reset()
            run.prefill(PROMPT)
            continue
        detected += [c["name"] for c in failed] == [f"model.layers.{layer}.self_attn {tensor}"]
        region[b, h, row, col] ^= bit  # repaired: the next check passes again
    print(f"static flips: {injected} injected, {detected} reported by the state check, {nonfinite} refused as "
          f"non-finite before it, per part {per_part}")
    assert detected + nonfinite == injected == 120 and nonfinite <= 12, (detected, nonfinite, per_part)
    assert set(per_part) == {"codes", "params", "ring", "slot"}, per_part


def _flip_recent_rows(run, rng, trials: int, tensors) -> tuple[int, dict]:
    """Trials of: an unchecked call writes a row (sometimes the last of its group: the group is encoded before the
    check); one bit of it flipped; decode steps up to the next check. (detected, per tensor and group-flushed)."""
    detected, kinds = 0, {}
    for trial in range(trials):
        want_flushed = trial % 4 >= 2  # half of them: the row's group is encoded by the steps up to the check
        while True:  # the next call unchecked, its row not the last of its group (that one goes to the encode)
            run.keep_room(rng)
            L, steps = run.length, run.steps_to_check()
            if steps and (L + 1) % G and (L // G < (L + steps) // G) == want_flushed:
                break
            run.step()
        run.step()  # an unchecked call writes position length - 1
        tensor, layer = tensors[trial % len(tensors)], rng.randrange(2)
        state = getattr(run.cache.layers[layer], tensor)
        p = run.length - 1
        flushed = (p // G) < (run.length + run.steps_to_check()) // G
        row = state.ring[:, :, p % G].view(torch.uint8)
        saved = row.clone()
        row[rng.randrange(row.shape[0]), rng.randrange(row.shape[1]), rng.randrange(row.shape[2])] ^= \
            1 << rng.randrange(8)
        try:
            failed = run.until_checked()
        except ValueError as e:
            assert "inf or NaN" in str(e)
            run.cache.reset()
            run.prefill(PROMPT)
            continue
        key = f"{tensor}{' (group encoded before the check)' if flushed else ''}"
        kinds[key] = kinds.get(key, 0) + 1
        if [c["name"] for c in failed] == [f"model.layers.{layer}.self_attn {tensor}"]:
            detected += 1
            row.copy_(saved)
            assert not run.until_checked()  # repaired: the next check passes
        # (missed: the check took the flipped row as found; left as it is)
    return detected, kinds


def test_static_rows_written_since_the_last_check_are_detected(model, ids, monkeypatch):
    """What the slot records (static_track) are for: a flip in a ring row an unchecked call wrote since the last
    check, keys and V4 values, some in a group the decode steps up to the check encode; all reported at the next
    check. Control: with static_track patched out, none are (the rows are only digested as found)."""
    rng = random.Random(1)
    run = Run(model, ids, value_bits=4)
    detected, kinds = _flip_recent_rows(run, rng, 24, ["keys", "values"])
    print(f"static rows written since the last check: {sum(kinds.values())} flipped {kinds}, {detected} detected")
    assert detected == sum(kinds.values()) >= 22 and len(kinds) == 4, (detected, kinds)
    monkeypatch.setattr(integrity, "static_track", lambda pending: None)
    torch._dynamo.reset()
    run = Run(model, ids, value_bits=4)
    detected, kinds = _flip_recent_rows(run, rng, 8, ["keys", "values"])
    print(f"control (static_track off): {sum(kinds.values())} flipped, {detected} detected")
    assert detected == 0 and sum(kinds.values()) >= 6, (detected, kinds)
