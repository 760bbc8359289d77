"""The attention launch tuner: per shape class, every fitting config timed once on the GPU; the fastest is kept,
in memory and on disk (like inductor's autotune cache), so a second process skips the timing.

The disk cache is a JSON file per (device, torch, triton, jit source, tuned space): any of them changing starts a new
file. Folder: $PQCOMPILE_CACHE_DIR, else ~/.cache/pqcompile; PQCOMPILE_TUNER_CACHE=0 turns it off. It is read
as JSON only (never unpickled), and an entry that is not a config of the current space is ignored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import tempfile
from collections.abc import Callable, Sequence

import torch

from .settings import LaunchConfig

log = logging.getLogger(__name__)

_TUNED: dict[tuple, LaunchConfig] = {}  # shape class -> the fastest config of its space
_LAST: list[LaunchConfig | None] = [None]


def last_config() -> LaunchConfig | None:
    """The config the last tuned attention call launched (bench reports it); None before any."""
    return _LAST[0]


def chunks_fit(c: LaunchConfig, W: int, block_p: int) -> bool:
    """Pair chunks need 8-bit codes (byte j = pair j), split dots and whole chunks of >= 16 pairs."""
    return c.pair_chunks == 1 or (W == 8 and c.split_dot and block_p % c.pair_chunks == 0
                                  and block_p // c.pair_chunks >= 16)


def candidates(space: Sequence[LaunchConfig], G: int, block_p: int, W: int) -> list[LaunchConfig]:
    """The configs of `space` a launch with group size G, block_p pairs and W-bit codes can use.

    A block never spans two groups and holds at most 8192 dequantized elements. Codes that straddle bytes try
    each config with byte planes too (faster at some shapes on the H200); 8-bit codes have one load path, so
    configs asking for another are dropped; sub-byte codes try a per-pair byte load only where the space lists
    one (never faster on the H200).
    """
    fit = [c for c in space if c.block_n <= G and c.block_n * block_p <= 8192 and chunks_fit(c, W, block_p)]
    if W == 8 or 8 % W:
        fit = [c for c in fit if not c.alt_code_load]
    if 8 % W:
        fit += [c._replace(alt_code_load=True) for c in fit]
    return fit


def pick(key: tuple, launch: Callable[[LaunchConfig], None], space: Sequence[LaunchConfig]) -> LaunchConfig:
    """The fastest config of `space` for shape class `key`, timed on the first call of the class.

    Timed as CUDA-graph replays: the GPU time a graphed decode step pays (event timing of eager launches measures
    the host launch cost at small shapes and picks slower kernels there). Later calls are a dict lookup, cheaper
    than triton.autotune's per-call bookkeeping (~100 us of host time). While a CUDA graph is being captured
    nothing is timed: the first config is used.
    """
    best = _TUNED.get(key)
    if best is None:
        best = _from_disk(key, space)
        if best is not None:
            _TUNED[key] = best
    if best is None and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        best = space[0]
    if best is None:
        best = _time_all(key, launch, space)
        _to_disk(key, best, space)
    _LAST[0] = best
    return best


def cache_file(space: Sequence[LaunchConfig]) -> pathlib.Path | None:
    """This process's tuner cache file for `space`, or None when the disk cache is off."""
    if os.environ.get("PQCOMPILE_TUNER_CACHE", "1") == "0":
        return None
    root = pathlib.Path(os.environ.get("PQCOMPILE_CACHE_DIR") or pathlib.Path.home() / ".cache" / "pqcompile")
    tag = hashlib.sha256(repr((_environment(), [tuple(c) for c in space])).encode()).hexdigest()[:20]
    return root / f"tuner-{tag}.json"


@functools.cache
def _environment() -> tuple:
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    jit = pathlib.Path(__file__).parent / "jit"
    source = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(jit.glob("*.py")))).hexdigest()
    return device, torch.__version__, triton.__version__, source


def _load(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _from_disk(key: tuple, space: Sequence[LaunchConfig]) -> LaunchConfig | None:
    path = cache_file(space)
    entry = _load(path).get(repr(key)) if path else None
    try:
        config = LaunchConfig(*entry) if isinstance(entry, list) else None
    except TypeError:
        return None
    return config if config in space else None


def _to_disk(key: tuple, best: LaunchConfig, space: Sequence[LaunchConfig]) -> None:
    """Merge one entry into the file; written to a temporary file and renamed, so readers never see half a file."""
    path = cache_file(space)
    if path is None or best not in space:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load(path)
        data[repr(key)] = list(best)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f)
        os.replace(f.name, path)
    except OSError as e:  # a read-only home: tune again next time
        log.debug("polar attention tuner cache not written to %s: %s", path, e)


# PQCOMPILE_PARALLEL_COMPILE=N (N > 0 threads, "0" off; default min(16, CPUs)): the space's kernels are compiled on
# N threads before the timing (Triton's compile releases the GIL). On the H200 host it took the first decode step of
# 32 layers from 62.2 s to 36.9 s, same tokens (docs/benchmarks.md §4.11).
PARALLEL_COMPILE = os.environ.get("PQCOMPILE_PARALLEL_COMPILE", str(min(16, os.cpu_count() or 1)))


def precompile(launch, space: Sequence[LaunchConfig], threads: int) -> int:
    """Every config's kernels compiled before any is timed, `threads` at a time, through Triton's AsyncCompileMode
    (the compiles land in the JIT's own cache, where the timed launches find them). A config that fails to compile
    is left to the timing, which skips it. Returns the configs submitted (0 where this Triton lacks the mode or the
    launch cannot compile alone)."""
    compile_only = getattr(launch, "compile_only", None)
    try:
        from concurrent.futures import ThreadPoolExecutor

        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return 0
    if compile_only is None or threads < 1 or len(space) < 2:
        return 0
    submitted = 0
    try:
        with ThreadPoolExecutor(threads) as pool, AsyncCompileMode(pool, ignore_errors=True):
            for c in space:
                try:
                    compile_only(c)
                    submitted += 1
                except Exception as e:  # noqa: BLE001 (the timing compiles it again and skips it)
                    log.debug("polar attention config %s did not compile ahead: %s", tuple(c), e)
    except Exception as e:  # noqa: BLE001 (whatever went wrong here, the timing compiles in a row as before)
        log.info("polar attention: compiling the tuned space ahead failed (%s); compiling in a row", e)
    return submitted


def _time_all(key, launch, space) -> LaunchConfig:
    threads = int(PARALLEL_COMPILE) if PARALLEL_COMPILE.isdigit() else 0
    if threads:
        precompile(launch, space, threads)
    times = []
    for c in space:
        try:
            times.append((_gpu_time(lambda c=c: launch(c)), c))
        except Exception as e:  # noqa: BLE001 (a config that fails to compile here is skipped)
            log.debug("polar attention config %s failed: %s", tuple(c), e)
    if not times:  # nothing compiled: launch the first config and let its error surface
        return space[0]
    best = min(times)[1]
    _TUNED[key] = best
    log.info("polar attention tuned %s -> %s (%.1f us); every config: %s", key, tuple(best), min(times)[0] * 1e3,
             ", ".join(f"{tuple(c)} {t * 1e3:.1f}" for t, c in sorted(times)))
    return best


def _gpu_time(fn) -> float:
    """Median ms of fn replayed in a CUDA graph; the first call (compile, buffer allocation) runs before capture."""
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=20, return_mode="median")
    except RuntimeError as e:  # a platform that cannot capture: event timing, host launch cost included
        log.debug("polar attention tuning without CUDA graphs: %s", e)
        return do_bench(fn, warmup=5, rep=20, return_mode="median")
