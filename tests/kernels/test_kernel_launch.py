"""pqcompile.kernels.common.launch: a JIT kernel's launch with Triton's argument specialization done once per key
must launch exactly what Triton's own JITFunction.run launches (same compiled kernel, arguments, grid, stream).

Checked without a GPU: a tiny kernel is compiled for sm_90 with Triton's bundled ptxas, and Triton's driver is
replaced by a stub whose launcher records each launch (bench/host_overhead.py --cpu-stub does the same for the
product's kernels, with --check). Also the host arithmetic that replaced triton.cdiv / next_power_of_2, and the
attention wrapper's plan cache."""

import importlib
import os
import pathlib
import subprocess
import sys
import typing

import pytest
import torch
import triton
import triton.language as tl

from pqcompile import codec as ref
from pqcompile import kernels
from pqcompile.kernels import common

PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the kernels run in the Triton interpreter
# On a GPU machine the real launches are the test: the kernel tests with PQCOMPILE_FAST_LAUNCH=check assert on every
# fast launch that Triton's own lookup gives the same kernel and arguments; the stub driver stays off the real one.
needs_sm90 = pytest.mark.skipif(not PTXAS.exists() or common._JITFunction is None or torch.cuda.is_available(),
                                reason="needs Triton's bundled ptxas and no GPU (on a GPU: PQCOMPILE_FAST_LAUNCH=check)")


def test_host_arithmetic_is_tritons():
    for n in [*range(3000), 2**31 - 1, 2**31, 2**31 + 1, 2**40 + 3]:
        assert common.next_pow2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 64, 128, 1000):
            assert common.cdiv(n, d) == triton.cdiv(n, d), (n, d)


def test_frozen_kwargs_are_shared_and_immutable():
    a, b = common.frozen(X=1, num_warps=4), common.frozen(X=1, num_warps=4)
    assert a is b and dict(a) == {"X": 1, "num_warps": 4}
    assert common.frozen(X=2, num_warps=4) is not a
    with pytest.raises(TypeError):
        a["X"] = 3


# triton.language as it was at collection, before any kernel ran in this process: Triton 3.9's interpreter patches it
# for a device-function call and never restores it (InterpretedFunction.__call__ drops its patch scope), after which a
# real compile in the same process fails ("'value' object has no attribute 'dtype'"): the fixture below restores it.
_LANG = [(o, dict(vars(o))) for o in (tl, tl.core, tl.math, tl.core.tensor, tl.core.dtype,
                                       getattr(tl.core, "condition", None), getattr(tl.core, "tensor_descriptor_base", None))
         if o is not None]


def _unpatch_lang() -> None:
    for obj, saved in _LANG:
        for name in set(vars(obj)) - set(saved):
            delattr(obj, name)
        for name, value in saved.items():
            if vars(obj).get(name, _LANG) is not value:
                setattr(obj, name, value)


def _copy_kernel(X, Y, n, stride, f, off, BLOCK: tl.constexpr, FLAG: tl.constexpr = 0):
    i = tl.arange(0, BLOCK)
    x = tl.load(X + i * stride, mask=i < n, other=0.0)
    tl.store(Y + i, x * f + off + FLAG, mask=i < n)


class _Launcher:
    record: typing.ClassVar[list] = []

    def __init__(self, src, metadata):
        self.name = metadata.name

    def __call__(self, gx, gy, gz, stream, function, packed, launch_metadata, enter, leave, *args):
        _Launcher.record.append((function, (gx, gy, gz), stream, args))


class _Utils:
    def __init__(self):
        self.n = 0

    def load_binary(self, name, kernel, shared, device):
        self.n += 1
        return object(), self.n, 0, 0, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}

    def unload_module(self, module):
        pass


class _Driver:
    launcher_cls = _Launcher

    def __init__(self):
        self.utils, self.stream = _Utils(), 7

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return self.stream


@pytest.fixture
def stub_driver(monkeypatch):
    """Triton's driver replaced by a stub (an H200's target, stream 7); a real JITFunction of _copy_kernel."""
    from triton.runtime.driver import driver

    _unpatch_lang()
    saved = driver._active
    stub = _Driver()
    driver.set_active(stub)
    monkeypatch.setattr(common, "FAST_LAUNCH", "1")
    _Launcher.record = []
    try:
        yield stub, common._JITFunction(_copy_kernel, do_not_specialize=["off"])
    finally:
        driver._active = saved


_BUFS = torch.zeros(64), torch.zeros(64, dtype=torch.float16), torch.zeros(64)


def _calls():
    """Launches that differ in everything Triton specializes on, each twice (the second a hit)."""
    x32, x16, y = _BUFS
    k16, k32 = common.frozen(BLOCK=16, num_warps=1), common.frozen(BLOCK=32, num_warps=1)
    k16f = common.frozen(BLOCK=16, FLAG=1, num_warps=1)
    calls = [
        ((2,), (x32, y, 16, 1, 0.5, 3), k16),
        ((2,), (x32, y, 17, 1, 2.0, 4), k16),  # n % 16 != 0
        ((2, 3), (x32, y, 1, 1, 0.5, 3), k16),  # n == 1 is a constexpr
        ((2,), (x32[1:], y, 16, 1, 0.5, 3), k16),  # an unaligned pointer
        ((2,), (x32[4:], y, 16, 1, 0.5, 3), k16),  # aligned again (16 bytes)
        ((2,), (x32, y, 16, 2, 0.5, 3), k16),  # stride 2
        ((2,), (x32, y, 16, 1, 0.5, 2**31 + 5), k16),  # a do-not-specialize int past i32
        ((2,), (x16, y, 16, 1, 0.5, 3), k16),  # another dtype
        ((1, 1, 4), (x32, y, 16, 1, 0.5, 3), k32),  # other constexprs
        ((1,), (x32, y, 16, 1, 0.5, 3), k16f),
        ((2,), (x32, y, 16, 1, 0.25, 99), k16),  # float and do-not-specialize values do not matter
    ]
    return [c for c in calls for _ in range(2)]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and (a.data_ptr(), a.dtype, a.shape, a.stride()) == (
            b.data_ptr(), b.dtype, b.shape, b.stride())
    return type(a) is type(b) and a == b


@needs_sm90
def test_fast_launch_is_tritons_launch(stub_driver):
    stub, fn = stub_driver
    got = {}
    for mode in ("0", "1", "check"):
        common.FAST_LAUNCH = mode
        _Launcher.record = []
        for grid, args, kw in _calls():
            common.launch(fn, grid, args, kw)
        got[mode] = _Launcher.record
    assert len(got["0"]) == len(_calls())
    for theirs, ours in zip(got["0"], got["1"]):
        assert theirs[:3] == ours[:3]  # the same compiled kernel (function handle), grid and stream
        assert len(theirs[3]) == len(ours[3]) and all(map(_same, theirs[3], ours[3]))
    assert [r[:3] for r in got["check"]] == [r[:3] for r in got["0"]]
    functions = {r[0] for r in got["0"]}
    assert len(functions) == len(common._FAST[id(fn)].entries) == 9  # one kernel and one key per specialization: the
    # aligned offset view and the other float / do-not-specialize values share the first call's
    stub.stream = 9  # the stream is read per launch (CUDA graph capture, the tuner's side stream)
    _Launcher.record = []
    common.FAST_LAUNCH = "1"
    common.launch(fn, *_calls()[0])
    assert _Launcher.record[0][2] == 9


@needs_sm90
def test_hooks_and_a_changed_kernel_go_through_triton(stub_driver, monkeypatch):
    _, fn = stub_driver
    runs = []
    real_run = fn.run
    monkeypatch.setattr(fn, "run", lambda *a, **k: (runs.append(1), real_run(*a, **k))[1])
    grid, args, kw = _calls()[0]
    common.launch(fn, grid, args, kw)
    common.launch(fn, grid, args, kw)
    assert len(runs) == 1  # the second launch is a hit
    fn.pre_run_hooks.append(lambda *a, **k: None)
    common.launch(fn, grid, args, kw)
    assert len(runs) == 2
    fn.pre_run_hooks.clear()
    from triton import knobs

    hook = knobs.runtime.launch_enter_hook
    if hasattr(hook, "add"):  # Triton 3.6+: a HookChain
        hook.add(print)
        try:
            common.launch(fn, grid, args, kw)
        finally:
            hook.remove(print)
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", print)
        common.launch(fn, grid, args, kw)
    assert len(runs) == 3  # a profiler's hook sees Triton's launch metadata


_TWO_THREADS = """
import threading
import torch, triton, triton.language as tl
from pqcompile.kernels import common

@triton.jit
def affine(X, Y, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < n) * 2 + 1, mask=i < n)

originals = {name: getattr(tl.tensor, name) for name in ("__mul__", "__add__", "__lt__")}
errors, barrier = [], threading.Barrier(2)

def run(seed):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(seed))
    try:
        barrier.wait()
        for _ in range(20):
            y = torch.full_like(x, float("nan"))
            common.launch(affine, (32,), (x, y, x.numel()), common.frozen(BLOCK=128))
            assert torch.equal(y, x * 2 + 1)
    except Exception as e:
        errors.append(repr(e)[:300])

threads = [threading.Thread(target=run, args=(s,)) for s in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
leaked = [name for name, f in originals.items() if getattr(tl.tensor, name) is not f]
print("errors", errors, "leaked", leaked)
"""


def test_interpreted_launches_from_two_threads():
    """Two threads launching at once under the interpreter (two models decoding in two threads on the CPU): every
    launch right and triton.language left as it was. In a fresh process (what ran before in this one changes the
    race's odds): without the launch lock one thread's launch failed with 'Did you forget to add @triton.jit', and
    the interpreter's patches of tl.tensor could outlive the launches and break a later compile in the process
    (reliability finding 17)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _TWO_THREADS], check=False, capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "errors [] leaked []", out.stdout[-2000:]


def test_launch_without_a_jit_function_is_a_plain_launch():
    launched = []

    class Rec:
        def __getitem__(self, grid):
            return lambda *a, **k: launched.append((grid, a, k))

    common.launch(Rec(), (3, 1), (1, 2), common.frozen(B=4))
    assert launched == [((3, 1), (1, 2), {"B": 4})]


def test_attention_plans_are_reused_and_follow_the_settings():
    """One plan per shape class, whatever the length; a settings change starts a new one."""
    A = importlib.import_module("pqcompile.kernels.attention_launch")
    c = ref.Codec(4, 4, 16, ref.Pairing())
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 32, generator=g).to(DEVICE)
    for T in (40, 41, 48):
        k, v = torch.randn(1, 2, T, 32, generator=g).to(DEVICE), torch.randn(1, 2, T, 32, generator=g).to(DEVICE)
        data = ref.encode(k, c)
        before = dict(A._PLANS)
        got, want = kernels.attention(q, data, T, v, c), ref.attention(q, data, T, v, c)
        assert ((got - want).norm() / want.norm()).item() < (1e-4 if DEVICE == "cpu" else 3e-3)
        if T != 40:
            assert A._PLANS == before  # the plan of the first length serves the others
    n = len(A._PLANS)
    with kernels.settings.override(attention=kernels.settings.attention._replace(block_n=16)):
        kernels.attention(q, data, 48, v, c)
        assert len(A._PLANS) == n + 1
        assert next(reversed(A._PLANS.values())).fixed_config().block_n == 16
