"""Host cost of one eager call of the polar ops against dense SDPA, and where it goes (cProfile).

    PYTHONPATH=. python bench/host_overhead.py [--shape 1x4k] [--profile] [--ab] [--out DIR]       # on the GPU
    python bench/host_overhead.py --cpu-stub [--label NAME] [--calls N] [--repeats R] [--processes P] [--profile]
                                  [--check]

Host time = CPU time to enqueue one call, averaged over many calls with no sync inside the loop (the GPU is never
the bottleneck at 1x4k: its kernels take ~10 us). Contenders: SDPA flash and cuDNN (enable_gqa, GPU mode only),
and for each polar op the custom op (torch.ops.pqcompile.*: dispatcher + glue + wrapper), the Python function
under it (`_fn`: the op without the dispatcher), and the kernel host wrapper (pqcompile.kernels.*). The dynamic
state is held as a DynamicCache holds it (codes / params with spare capacity, a ring of one group, the value
buffer passed whole); `append_op` is a decode step's append (one token into the ring), `append_op_flush` the step
that completes a group (the encode kernel). --profile prints the top functions of the attention op by own time.
--ab (GPU) times every polar contender with Triton's own launch path (`PQCOMPILE_FAST_LAUNCH=0`) and with
pqcompile's (kernels/common.py `launch`), alternately in one process.

--cpu-stub needs no GPU: the wrappers run on CPU tensors of the same shapes believing they are on a GPU (as
bench/compile_kernels.py's recorder: fast-math constexprs, 132 SMs, the tuner's pick stubbed to the default
config), and Triton's driver is replaced by a stub whose launcher does nothing, so each launch goes through
Triton's JITFunction.run (argument specialization, cache key, launch metadata) or pqcompile's launch path as on
the GPU, with the kernels compiled for sm_90 by Triton's bundled ptxas (cached in ~/.triton). It cannot see the
C launcher (argument packing, cuLaunchKernelEx), the CUDA caching allocator (torch.empty on CPU here) or the real
device/stream getters; CPU tensor ops do their data work here (the flush's torch.cat), where a GPU only enqueues.
Per contender: min and median over R repeats of the mean of N calls, of this thread's CPU time (robust to a
shared machine) and of wall time, with allocations and launches per call; the attention wrapper also without
its launches (common.launch, or the kernels' [grid] call in a tree without it, stubbed) and without everything
after its checks; then components by difference (a few us of process-to-process noise: --processes P keeps each
row's best of P fresh processes). The `libop` rows are the same op bodies under a plain torch.library.Library op
(no custom_op layers), `attention_proposed_*` the attention body that hands the state's buffers to
kernels.attention.attention_state (no views): the ops.py proposals. --check runs every launching contender
through both launch paths and compares the recorded launches (kernel, grid, arguments; fresh buffers by shape,
stride and aliasing), then repeats them under PQCOMPILE_FAST_LAUNCH=check. The JSON goes to
bench/results/host_overhead-2026-12-02-cpu-stub-NAME.json. The script also runs in a tree without common.launch
(copy it there for a before/after of the host code).
"""

from __future__ import annotations

import os
import sys

CPU_STUB = "--cpu-stub" in sys.argv
if CPU_STUB:  # before triton or pqcompile are imported: real JIT functions, the kernels path for CPU tensors
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["PQCOMPILE_KERNELS"] = "triton"
    os.environ["PQCOMPILE_TUNER_CACHE"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse
import contextlib
import cProfile
import datetime
import importlib
import io
import itertools
import json
import platform
import pstats
import statistics
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pqcompile import codec as ref
from pqcompile import kernels, ops
from pqcompile.kernels import common, tuner

SCRIPT_VERSION = 2  # 2: --cpu-stub, the static ops, the op without its dispatcher, --ab
HOST = {name: importlib.import_module(f"pqcompile.kernels.{name}") for name in ("attention", "encode", "static_write")}
KERNELS = (("attention", "polar_attn_fwd_kernel"), ("attention", "polar_attn_reduce_kernel"),
           ("encode", "polar_encode_kernel"), ("static_write", "polar_static_write_kernel"))
H200_SDPA_US = {"sdpa_flash": "~70 (69.8-76.3)", "sdpa_cudnn": "~45-70 (45.7-70.3)"}  # bench/NOTES.md, session 5
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------------------- the contenders (GPU and stub alike)


def contenders(dev: str, B: int, T: int, codec: ref.Codec, Hq: int = 32, H: int = 8, D: int = 128) -> dict:
    """name -> a call, over states laid out as the product holds them (bf16, capacity for one more group)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dt, G = torch.bfloat16, codec.group_size
    NB, P, cap = codec.code_bytes(D), D // 2, T + 2 * G

    def rnd(*shape, dtype=dt):
        return torch.randn(*shape, generator=g).to(device=dev, dtype=dtype)

    q, new = rnd(B, Hq, 1, D), rnd(B, H, 1, D)
    codes = torch.randint(0, 256, (B, H, cap, NB), generator=g, dtype=torch.uint8).to(dev)
    params = rnd(B, H, cap // G * 4, P).abs()  # flat, as the ops take them
    ring, vbuf = rnd(B, H, G, D), rnd(B, H, cap, D)
    length, positions = torch.tensor([T], device=dev), torch.arange(T, T + 1, device=dev)
    scale, cargs = D ** -0.5, ops.codec_args(codec)
    data = ops._view(codes, params, ring, T, codec)  # what the op hands the wrapper
    v = vbuf[:, :, :T]
    grp = rnd(B, H, G, D)
    p5 = ops.unflat(params)
    attention_fn = getattr(ops.attention, "_init_fn", None)
    append_fn = getattr(ops.append_, "_init_fn", None)
    static_write_fn = getattr(ops.static_write_, "_init_fn", None)
    static_attention_fn = getattr(ops.static_attention, "_init_fn", None)
    out = {
        "attention_op": lambda: ops.attention(q, codes, params, ring, vbuf, T, None, scale, 0.0, False, *cargs),
        "attention_op_fn": attention_fn and (lambda: attention_fn(q, codes, params, ring, vbuf, T, None, scale, 0.0,
                                                                  False, *cargs)),
        "attention_wrapper": lambda: kernels.attention(q, data, T, v, codec),
        "append_op": lambda: ops.append_(codes, params, ring, new, T + 5, *cargs),
        "append_op_fn": append_fn and (lambda: append_fn(codes, params, ring, new, T + 5, *cargs)),
        "append_op_flush": lambda: ops.append_(codes, params, ring, new, T + G - 1, *cargs),
        "encode_wrapper": lambda: kernels.encode_groups_into(grp, codes, p5, T // G + 1, codec),
        "static_write_op": lambda: ops.static_write_(codes, params, ring, length, new, positions, *cargs),
        "static_write_op_fn": static_write_fn and (lambda: static_write_fn(codes, params, ring, length, new, positions,
                                                                           *cargs)),
        "static_write_wrapper": lambda: kernels.static_write(codes, p5, ring, length, new, positions, codec,
                                                             check=False),
        "static_attention_op": lambda: ops.static_attention(q, codes, params, ring, length, vbuf, None, scale, False,
                                                            *cargs),
        "static_attention_op_fn": static_attention_fn and (lambda: static_attention_fn(
            q, codes, params, ring, length, vbuf, None, scale, False, *cargs)),
        "static_attention_wrapper": lambda: kernels.static_attention(q, codes, p5, ring, length, vbuf, codec),
    }
    lib_attention, lib_append, lib_proposed = _library_ops()
    if lib_attention is not None:  # the same Python functions under a torch.library.Library op (ops.py proposal)
        out["attention_libop"] = lambda: lib_attention(q, codes, params, ring, vbuf, T, None, scale, 0.0, False, *cargs)
        out["append_libop"] = lambda: lib_append(codes, params, ring, new, T + 5, *cargs)
    if lib_proposed is not None:  # and with the proposed body (no views: kernels.attention.attention_state)
        out["attention_proposed_fn"] = lambda: proposed_attention(q, codes, params, ring, vbuf, T, None, scale, 0.0,
                                                                  False, *cargs)
        out["attention_proposed_libop"] = lambda: lib_proposed(q, codes, params, ring, vbuf, T, None, scale, 0.0,
                                                               False, *cargs)
    return {k: f for k, f in out.items() if f is not None}


def proposed_attention(q, codes, params, tail, v, seq_len, mask, scale, softcap, is_causal, radius_bits, angle_bits,
                       group_size, layout):
    """pqcompile::attention's body as proposed for ops.py: the state's buffers straight to the kernel wrapper."""
    c = ops._codec(radius_bits, angle_bits, group_size, layout)
    kwargs = {"mask": mask, "scale": scale, "softcap": softcap if softcap > 0 else None, "is_causal": is_causal}
    if ops._use_kernels(q):
        return HOST["attention"].attention_state(q, codes, params, tail, v, seq_len, c, **kwargs).contiguous()
    data = ops._view(codes, params, tail, seq_len, c)
    v = v[:, :, :seq_len] if v.shape[2] > seq_len else v
    return ref.attention(q, data, seq_len, v, c, **kwargs).contiguous()


_LIB = []


def _library_ops():
    """pqcompile::attention and ::append_'s own functions registered as plain torch.library.Library ops (namespace
    pqcompile_bench, CompositeExplicitAutograd, no Python autograd wrapper): what dropping custom_op would cost."""
    if _LIB:
        return _LIB[0]
    fns = getattr(ops.attention, "_init_fn", None), getattr(ops.append_, "_init_fn", None)
    if None in fns:
        _LIB.append((None, None, None))
        return _LIB[0]
    lib = torch.library.Library("pqcompile_bench", "DEF")
    lib.define("attention(Tensor q, Tensor codes, Tensor params, Tensor tail, Tensor v, int seq_len, Tensor? mask, "
               "float scale, float softcap, bool is_causal, int radius_bits, int angle_bits, int group_size, "
               "str layout) -> Tensor")
    lib.define("append_(Tensor(a!) codes, Tensor(b!) params, Tensor(c!) tail, Tensor new_keys, int seq_len, "
               "int radius_bits, int angle_bits, int group_size, str layout) -> ()")
    lib.impl("attention", fns[0], "CompositeExplicitAutograd")
    lib.impl("append_", fns[1], "CompositeExplicitAutograd")
    proposed = None
    if hasattr(HOST["attention"], "attention_state"):
        lib.define("attention_proposed(Tensor q, Tensor codes, Tensor params, Tensor tail, Tensor v, int seq_len, "
                   "Tensor? mask, float scale, float softcap, bool is_causal, int radius_bits, int angle_bits, "
                   "int group_size, str layout) -> Tensor")
        lib.impl("attention_proposed", proposed_attention, "CompositeExplicitAutograd")
        proposed = torch.ops.pqcompile_bench.attention_proposed.default
    _LIB.append((torch.ops.pqcompile_bench.attention.default, torch.ops.pqcompile_bench.append_.default, proposed,
                 lib))
    return _LIB[0][:3]


# --------------------------------------------------------------------------- the CPU stub


class StubLauncher:
    """Triton's per-kernel launcher, doing nothing; with `record` set it keeps each launch."""

    record: list | None = None

    def __init__(self, src, metadata):
        self.name = metadata.name

    def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, leave, *args):
        if StubLauncher.record is not None:
            StubLauncher.record.append((self.name, function, (gx, gy, gz), stream, args))


class StubUtils:
    _functions = itertools.count(1)

    def load_binary(self, name, kernel, shared, device):
        return object(), next(self._functions), 0, 0, 1024  # module, function (an id per kernel), regs, spills, threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def unload_module(self, module):
        pass


class StubDriver:
    """Enough of a CUDA driver for JITFunction.run and CompiledKernel: an H200's target, device 0, stream 0."""

    launcher_cls = StubLauncher

    def __init__(self):
        self.utils = StubUtils()

    @staticmethod
    def is_active():
        return True

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class Recorder:
    """Stands in for a JIT kernel: `rec[grid](*args, **kwargs)` does nothing (our host code without the launch)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def patched(pairs):
    """(module, name, value) patches for the duration of a block."""
    saved = [(m, n, getattr(m, n)) for m, n, _ in pairs]
    for m, n, v in pairs:
        setattr(m, n, v)
    try:
        yield
    finally:
        for m, n, v in saved:
            setattr(m, n, v)


def install_stub() -> None:
    from triton.runtime.driver import driver

    driver.set_active(StubDriver())
    common.on_gpu = lambda t: True  # fast math, tensor-core dtypes: the GPU's constexprs
    common.interpret = lambda: True  # check_device accepts CPU tensors
    common.sm_count = lambda device: 132
    times = itertools.count(1.0)  # the tuner's first timing (the space's first config, the default) wins
    tuner._gpu_time = lambda fn: next(times)


ALLOCS = [0]


def count_allocs() -> None:
    real = common.alloc

    def alloc(shape, dtype, device):
        ALLOCS[0] += 1
        return real(shape, dtype, device)

    common.alloc = alloc


def launch_count(fn) -> tuple[float, float]:
    """(launches, allocations) per call of fn."""
    StubLauncher.record, a0 = [], ALLOCS[0]
    for _ in range(10):
        fn()
    n, StubLauncher.record = len(StubLauncher.record), None
    return n / 10, (ALLOCS[0] - a0) / 10


def time_all(fns: dict, calls: int, repeats: int) -> dict:
    """name -> (min, median) over repeats of the mean us per call, of this thread's CPU time (what the host path
    costs, not counting time this process was descheduled: the machine may be shared) and of wall time; the
    contenders interleaved in every repeat."""
    for f in fns.values():
        for _ in range(max(20, calls // 20)):
            f()
    cpu: dict = {k: [] for k in fns}
    wall: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t, c = time.perf_counter_ns(), time.thread_time_ns()
            for _ in range(calls):
                f()
            cpu[name].append((time.thread_time_ns() - c) / calls / 1e3)
            wall[name].append((time.perf_counter_ns() - t) / calls / 1e3)
    return {k: (min(cpu[k]), statistics.median(cpu[k]), min(wall[k]), statistics.median(wall[k])) for k in fns}


def stubbed_variants(fns: dict) -> dict:
    """The attention wrapper with parts of it stubbed out: without the launches (our Python up to the launch call:
    common.launch where it exists, else the kernels' [grid](...) call) and without everything after the checks
    (`attention_launch.attend`; `attention._attend` in trees before the module split)."""
    A, wrapper = HOST["attention"], fns["attention_wrapper"]
    L = getattr(A, "attention_launch", A)
    no_launch = ([(common, "launch", lambda *a: None)] if hasattr(common, "launch")
                 else [(A, n, Recorder()) for _, n in KERNELS[:2]])
    return {"attention_wrapper_nolaunch": (wrapper, no_launch),
            "attention_wrapper_checks": (wrapper, [(L, "attend" if L is not A else "_attend",
                                                    lambda *a, **k: None)])}


def canon(launches: list) -> list:
    """Launches with tensors as (dtype, shape, stride, storage offset, order of first appearance of their storage)."""
    seen: dict = {}
    out = []
    for name, function, grid, stream, args in launches:
        row = []
        for a in args:
            if isinstance(a, torch.Tensor):
                sid = seen.setdefault(a.untyped_storage().data_ptr(), len(seen))
                row.append(("T", a.dtype, tuple(a.shape), a.stride(), a.storage_offset(), sid))
            else:
                row.append(a)
        out.append((name, function, grid, stream, row))
    return out


def check_launch_paths(fns: dict) -> list[str]:
    """Every launching contender: the same launches through pqcompile's launch path as through Triton's."""
    if not hasattr(common, "launch"):
        return ["this tree has no common.launch: nothing to compare"]
    report = []
    for name, f in fns.items():
        got = {}
        for mode in ("0", "1", "1"):  # Triton's path, then ours twice (the first call of a key goes through Triton)
            common.FAST_LAUNCH = mode
            StubLauncher.record = []
            f()
            got[mode] = canon(StubLauncher.record)
        StubLauncher.record = None
        if not got["0"]:
            continue
        ok = got["0"] == got["1"]
        common.FAST_LAUNCH = "check"  # Triton's own lookup on every hit must give the same kernel and arguments
        try:
            for _ in range(3):
                f()
        except RuntimeError as e:
            ok, name = False, f"{name} ({e})"
        common.FAST_LAUNCH = "1"
        report.append(f"{'ok  ' if ok else 'FAIL'} {name}: {len(got['1'])} launches identical through both paths")
    return report


def profile_top(fn, calls: int = 500, top: int = 25) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


SLOW = ("append_op_flush",)  # on CPU its torch.cat of the ring's 127 bf16 rows is data work (ms), async on a GPU
COMPONENTS = (  # (component, minuend, subtrahend): per call, by difference of two rows
    ("attention: custom-op dispatch", "attention_op", "attention_op_fn"),
    ("attention: op glue (views, .contiguous)", "attention_op_fn", "attention_wrapper"),
    ("attention: wrapper checks", "attention_wrapper_checks", None),
    ("attention: launch prep (plan, tuner, allocs, args)", "attention_wrapper_nolaunch", "attention_wrapper_checks"),
    ("attention: 2 launches (Triton's or ours, launcher stubbed)", "attention_wrapper", "attention_wrapper_nolaunch"),
    ("append (ring step): custom-op dispatch", "append_op", "append_op_fn"),
    ("append (ring step): op body (check, slice, copy_)", "append_op_fn", None),
    ("static write: custom-op dispatch", "static_write_op", "static_write_op_fn"),
    ("static write: op body over the unchecked wrapper (host check)", "static_write_op_fn", "static_write_wrapper"),
    ("static attention: custom-op dispatch", "static_attention_op", "static_attention_op_fn"),
    ("static attention: op glue", "static_attention_op_fn", "static_attention_wrapper"),
    ("attention: Library op instead of custom_op (saves)", "attention_op", "attention_libop"),
    ("append: Library op instead of custom_op (saves)", "append_op", "append_libop"),
    ("attention: op body without the views (saves)", "attention_op_fn", "attention_proposed_fn"),
    ("attention: both proposals (saves)", "attention_op", "attention_proposed_libop"),
)


def cpu_stub(args) -> None:
    install_stub()
    count_allocs()
    B, T = parse_shape(args.shape)
    codec = ref.Codec(4, 4, 128, ref.Pairing(), args.codec)
    fns = contenders("cpu", B, T, codec)
    t0 = time.time()
    for f in fns.values():  # the first calls compile for sm_90 (or read ~/.triton)
        f()
    print(f"first calls (compile / cache) {time.time() - t0:.1f} s", flush=True)
    meta = {"script_version": SCRIPT_VERSION, "mode": "cpu-stub", "label": args.label,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "cpu": _cpu_name(),
            "shape": args.shape, "B": B, "T": T, "Hq": 32, "Hkv": 8, "D": 128, "codec": str(codec),
            "calls": args.calls, "repeats": args.repeats,
            "fast_launch": getattr(common, "FAST_LAUNCH", "absent (Triton's launch path only)"),
            "threads": torch.get_num_threads()}
    if args.check:
        lines = check_launch_paths(fns)
        print("\n".join(lines), flush=True)
        meta["check"] = lines
        if any(line.startswith("FAIL") for line in lines):
            sys.exit(1)
    rows = {}
    counts = {name: launch_count(f) for name, f in fns.items()}
    slow = {k: fns.pop(k) for k in SLOW if k in fns}  # CPU data work dominates: fewer calls
    timed = time_all(fns, args.calls, args.repeats)
    timed.update(time_all(slow, max(10, args.calls // 50), args.repeats))
    for name, (fn, pairs) in stubbed_variants(fns).items():
        with patched(pairs):
            timed.update(time_all({name: fn}, args.calls, args.repeats))
    for name, t in timed.items():
        rows[name] = dict(zip(("min_us", "median_us", "wall_min_us", "wall_median_us"), (round(x, 2) for x in t)))
        if name in counts:
            rows[name].update(launches=counts[name][0], allocs=counts[name][1])
    out = summarize(rows, meta, args, str(codec))
    if args.profile:
        out["profile_attention_op"] = profile_top(fns["attention_op"])
        print(out["profile_attention_op"])
    write(out, args)


def summarize(rows: dict, meta: dict, args, codec: str) -> dict:
    """Print the table and the components; the JSON's content."""
    comps = {}
    for label, a, b in COMPONENTS:
        if a in rows and (b is None or b in rows):
            comps[label] = round(rows[a]["min_us"] - (rows[b]["min_us"] if b else 0.0), 2)
    print(f"\nper-call host us, {args.shape} Hq32/Hkv8/D128 bf16, {codec}, launcher stubbed ({args.label}); "
          f"thread CPU time and wall time, min / median of {args.repeats} x {args.calls} calls"
          + (f", best of {args.processes} processes" if args.processes > 1 else ""))
    print(f"{'contender':28s} {'cpu min':>8s} {'median':>8s} {'wall min':>8s} {'median':>8s} {'launch':>7s} "
          f"{'alloc':>6s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['min_us']:8.1f} {r['median_us']:8.1f} {r['wall_min_us']:8.1f} {r['wall_median_us']:8.1f} "
              f"{r.get('launches', ''):>7} {r.get('allocs', ''):>6}")
    print("\ncomponents (us per call, by difference of the CPU-time min column; a few us of process-to-process noise)")
    for label, us in comps.items():
        print(f"  {label:62s} {us:7.1f}")
    print(f"\nfor scale, dense SDPA eager on the H200's host (not measurable here): {H200_SDPA_US}")
    return {"meta": meta, "rows": rows, "components": comps, "h200_sdpa_us": H200_SDPA_US}


def write(out: dict, args) -> None:
    os.makedirs(args.out or RESULTS, exist_ok=True)
    path = os.path.join(args.out or RESULTS, f"host_overhead-2026-12-02-cpu-stub-{args.label}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"wrote {path}")


def cpu_stub_processes(args) -> None:
    """--processes N: N runs of --cpu-stub in fresh processes (a process's timings can sit a few us apart from
    another's: code and data placement), the best of each row kept; the first run also checks and profiles."""
    import subprocess
    import tempfile

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            cmd = [sys.executable, os.path.abspath(__file__), "--cpu-stub", "--processes", "1", "--out", tmp,
                   "--label", f"p{i}", "--shape", args.shape, "--codec", args.codec, "--calls", str(args.calls),
                   "--repeats", str(args.repeats)] + (["--check", "--profile"] if i == 0 else [])
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if i else None)
            with open(os.path.join(tmp, f"host_overhead-2026-12-02-cpu-stub-p{i}.json")) as f:
                runs.append(json.load(f))
    rows = {}
    for name, first in runs[0]["rows"].items():
        got = [r["rows"][name] for r in runs if name in r["rows"]]
        rows[name] = {**first, "min_us": min(g["min_us"] for g in got),
                      "median_us": round(statistics.median(g["median_us"] for g in got), 2),
                      "wall_min_us": min(g["wall_min_us"] for g in got),
                      "wall_median_us": round(statistics.median(g["wall_median_us"] for g in got), 2),
                      "min_us_per_process": [g["min_us"] for g in got]}
    meta = {**runs[0]["meta"], "label": args.label, "processes": args.processes}
    out = summarize(rows, meta, args, meta["codec"])
    out["profile_attention_op"] = runs[0].get("profile_attention_op")
    write(out, args)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def parse_shape(shape: str) -> tuple[int, int]:
    b, t = shape.lower().split("x")
    return int(b), int(t.rstrip("k")) * 1024


# --------------------------------------------------------------------------- GPU


def host_us(fn, n=500) -> float:
    """CPU time to enqueue one call (no sync inside the loop)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    t = time.perf_counter() - t
    sync()
    return t / n * 1e6


def gpu(args) -> None:
    B, T = parse_shape(args.shape)
    Hq, H, D = 32, 8, 128
    torch.manual_seed(0)
    dev, dt = args.device, torch.bfloat16
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt)
    k = torch.randn(B, H, T, D, device=dev, dtype=dt)
    v = torch.randn(B, H, T, D, device=dev, dtype=dt)
    c = ref.Codec(4, 4, 128, ref.Pairing(), args.codec)
    data = ref.encode(k, c)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(be):
        def fn():
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return fn

    polar = {"polar_wrapper": lambda: kernels.attention(q, data, T, v, c), **contenders(dev, B, T, c)}
    row = {"shape": args.shape, "B": B, "T": T, "codec": str(c)}
    dense = {"sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    for name, fn in {**(dense if dev == "cuda" else {}), **polar}.items():  # (--device cpu: a smoke test)
        row[f"{name}_host_us"] = round(host_us(fn), 1)
        print(f"{name:26s} {row[f'{name}_host_us']:8.1f} us/call", flush=True)
    if args.ab and hasattr(common, "launch"):  # the two launch paths alternately, one process
        for rep in range(3):
            for mode in ("0", "1"):
                common.FAST_LAUNCH = mode
                for name, fn in polar.items():
                    row.setdefault(f"{name}_host_us_launch{mode}", []).append(round(host_us(fn), 1))
        common.FAST_LAUNCH = "1"
        for name in polar:
            print(f"{name:26s} Triton's launch {row[f'{name}_host_us_launch0']} us, "
                  f"pqcompile's {row[f'{name}_host_us_launch1']} us", flush=True)
    if args.profile:
        row["profile_top"] = profile_top(polar["attention_op"], calls=200)
        host_us(lambda: None, n=1)  # (a sync on the GPU)
        print(row["profile_top"])
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = {"script_version": SCRIPT_VERSION, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "device": torch.cuda.get_device_name() if dev == "cuda" else dev, "torch": torch.__version__,
                "triton": triton.__version__,
                "fast_launch": getattr(common, "FAST_LAUNCH", "absent")}
        with open(os.path.join(args.out, f"host_overhead-{args.shape}.json"), "w") as f:
            json.dump({"meta": meta, "rows": [row]}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1x4k", help="BxTk")
    ap.add_argument("--codec", default="polar", help="key codec kind (the H200 runs so far: polar)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--ab", action="store_true", help="GPU: Triton's launch path against pqcompile's, one process")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke test of the GPU mode
    ap.add_argument("--cpu-stub", action="store_true", help="no GPU: the host path with the launcher stubbed")
    ap.add_argument("--label", default="run", help="--cpu-stub: the JSON's name (e.g. before, after)")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--check", action="store_true", help="--cpu-stub: both launch paths launch the same")
    ap.add_argument("--processes", type=int, default=1, help="--cpu-stub: best of this many fresh processes")
    args = ap.parse_args()
    if args.cpu_stub and args.processes > 1:
        cpu_stub_processes(args)
    elif args.cpu_stub:
        cpu_stub(args)
    else:
        gpu(args)


if __name__ == "__main__":
    main()
