"""pqcompile.kernels.tuner: the fastest config per shape class, kept in memory and in a JSON file on disk, so a
second process launches without timing. The timing itself needs a GPU; here it is replaced by a fixed cost."""

import json

import pytest

from pqcompile.kernels import LaunchConfig, tuner

SPACE = (LaunchConfig(64, True, 2, 4, 3), LaunchConfig(32, True, 4, 4, 3), LaunchConfig(64, True, 6, 4, 3, maxnreg=168))
COST = {SPACE[0]: 3.0, SPACE[1]: 1.0, SPACE[2]: 2.0}  # ms: SPACE[1] is the fastest
KEY = (True, 16, 7, 64, 64, 4, 128)


@pytest.fixture
def timed(monkeypatch, tmp_path):
    """An empty memory cache, a private cache folder, and a stand-in for the GPU timing that records each config."""
    monkeypatch.setattr(tuner, "_TUNED", {})
    monkeypatch.setenv("PQCOMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PQCOMPILE_TUNER_CACHE", raising=False)
    calls = []

    def fake_time(fn):
        fn()
        return COST[calls[-1]]

    monkeypatch.setattr(tuner, "_gpu_time", fake_time)
    return calls


def test_second_process_reads_the_pick_from_disk(timed):
    launch = timed.append
    assert tuner.pick(KEY, launch, SPACE) == SPACE[1]
    assert sorted(timed) == sorted(SPACE)  # every config timed once
    path = tuner.cache_file(SPACE)
    assert json.loads(path.read_text()) == {repr(KEY): list(SPACE[1])}
    tuner._TUNED.clear()  # a new process: nothing in memory
    timed.clear()
    assert tuner.pick(KEY, launch, SPACE) == SPACE[1] and timed == []  # no timing
    assert tuner.last_config() == SPACE[1]


def test_cache_is_per_space_and_ignores_entries_outside_the_space(timed):
    tuner.pick(KEY, timed.append, SPACE)
    assert tuner.cache_file(SPACE[:2]) != tuner.cache_file(SPACE)  # another space, another file
    path = tuner.cache_file(SPACE)
    path.write_text(json.dumps({repr(KEY): list(LaunchConfig(128, True, 2, 4, 3))}))  # not in SPACE
    tuner._TUNED.clear()
    timed.clear()
    assert tuner.pick(KEY, timed.append, SPACE) == SPACE[1] and len(timed) == len(SPACE)  # timed again


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({repr(KEY): ["x"] * 20})])
def test_a_corrupt_file_means_tuning_again(timed, content):
    path = tuner.cache_file(SPACE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    assert tuner.pick(KEY, timed.append, SPACE) == SPACE[1] and len(timed) == len(SPACE)
    assert json.loads(path.read_text())[repr(KEY)] == list(SPACE[1])  # rewritten whole


def test_disk_cache_can_be_turned_off(timed, monkeypatch):
    monkeypatch.setenv("PQCOMPILE_TUNER_CACHE", "0")
    assert tuner.cache_file(SPACE) is None
    assert tuner.pick(KEY, timed.append, SPACE) == SPACE[1]
    tuner._TUNED.clear()
    timed.clear()
    tuner.pick(KEY, timed.append, SPACE)
    assert len(timed) == len(SPACE)


@pytest.mark.parametrize("Hq, S, tuned", [(32, 1, True), (32, 16, True), (32, 17, False), (8, 130048, False)])
def test_only_decode_sized_launches_are_timed(Hq, S, tuned):
    """Query rows per KV head (Hq / Hkv x S) above settings.tune_max_rows launch the fixed config: timing the
    space on a long prefill's launch would replay seconds-long kernels ~15 times per config."""
    import torch

    from pqcompile import codec as ref
    from pqcompile.kernels import attention_launch as attention

    q = torch.empty(1, Hq, S, 128, device="meta")
    tail = v = torch.empty(1, 8, 16, 128, device="meta")
    with attention.settings.override(autotune=True):  # (tests/kernels/conftest.py turns it off)
        plan = attention._Plan(q, tail, v, ref.Codec(4, 4, 128, ref.Pairing()), None, static=True, softcap=None,
                               is_causal=S > 1, num_splits=None, packed=None, on_gpu=True)
    assert plan.tuned is tuned


def test_parallel_compile_compiles_every_config_before_timing_any(timed, monkeypatch):
    """PQCOMPILE_PARALLEL_COMPILE=N: every config's kernels are compiled ahead (here a stand-in records the calls;
    on the GPU they go to Triton's AsyncCompileMode), one that fails to compile is left to the timing, and the
    pick is the same."""
    pytest.importorskip("triton.runtime._async_compile")
    events = []

    class Launch:
        def __call__(self, c):
            events.append(("time", c))
            timed.append(c)

        def compile_only(self, c):
            events.append(("compile", c))
            if c == SPACE[2]:
                raise RuntimeError("no such kernel")

    monkeypatch.setattr(tuner, "PARALLEL_COMPILE", "4")
    assert tuner.pick(KEY, Launch(), SPACE) == SPACE[1]
    kinds = [kind for kind, _ in events]
    assert kinds == ["compile"] * 3 + ["time"] * 3
    assert [c for _, c in events[:3]] == list(SPACE)
    assert tuner.precompile(Launch(), SPACE, threads=0) == 0 and tuner.precompile(object(), SPACE, threads=4) == 0
