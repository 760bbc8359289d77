"""Host-side helpers shared by the kernel wrappers: input checks, buffer allocation, pair indices, host arithmetic,
and `launch` (a JIT kernel's launch with Triton's argument specialization done once per key)."""

from __future__ import annotations

import functools
import os
import threading
import types
from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from .. import codec as ref
from ..codec import KINDS, Codec
from ..value_codec import ValueCodec

MAX_HEAD_DIM = 256
TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def alloc(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the wrappers hand to a kernel comes from here (tests poison it to catch unwritten data)."""
    return torch.empty(shape, dtype=dtype, device=device)


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_gpu(t: torch.Tensor) -> bool:
    """Launches for t are compiled for the GPU (fast trig, tensor-core dtypes), not run by the interpreter."""
    return t.is_cuda and not interpret()


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (shape {tuple(t.shape)})")
    if not (t.is_cuda or interpret()):
        raise ValueError(f"{name} must be a CUDA tensor (or set TRITON_INTERPRET=1), got {t.device}")


def kind_index(codec: Codec) -> int:
    """The kernels' KIND constexpr: the codec kind's index in key_cells.KINDS."""
    return KINDS.index(codec.kind)


def check_codec(codec: Codec) -> None:
    G = codec.group_size
    if not (1 <= codec.radius_bits and 1 <= codec.angle_bits and codec.code_bits <= 8):
        raise ValueError(f"bits {codec.radius_bits}+{codec.angle_bits} unsupported: need r, a >= 1, r + a <= 8")
    if G < 16 or G & (G - 1):
        raise ValueError(f"group_size {G} unsupported: need a power of two >= 16")


@functools.cache
def pair_index(pairing: ref.Pairing, head_dim: int, device: torch.device):
    """(x dims, y dims) of the pairs, int32 on device, zero-padded to max(16, next_pow2(D/2)) (the attention's pair
    block). One entry per (pairing, D, device), shared by every kernel: created on first use and kept, so its first
    use must not be inside a CUDA-graph tree's warm-up, whose memory pool would then hold two tensors no graph output
    tracks (inductor refuses the run). The backend creates it at compile time (prepare_constants)."""
    xs, ys = pairing.indices(head_dim)
    pad = [0] * (max(16, next_pow2(len(xs))) - len(xs))
    return (torch.tensor(xs + pad, dtype=torch.int32, device=device),
            torch.tensor(ys + pad, dtype=torch.int32, device=device))


def prepare_constants(pairing: ref.Pairing, head_dim: int, device: torch.device) -> None:
    """Create the device constants the kernels of one site read (pair_index), outside any graph's memory pool."""
    pair_index(pairing, head_dim, device)


def pair_tile(block_p: int, G: int, P: int) -> int:
    """Pairs per encode / static-write program: the setting's tile, capped by P and by 8192 // G elements."""
    return max(8, min(next_pow2(block_p), 8192 // G, next_pow2(P)))


def row_tile(block_t: int, block_dv: int, limit: int) -> int:
    """Tokens per value encode / value static-write program (a power of two): the setting's tile, capped by 4096
    elements a program and by `limit` rounded up to a power of two (the group size, or the tokens to encode)."""
    return max(1, min(block_t, max(1, 4096 // block_dv), next_pow2(max(1, limit))))


def check_value_codec(vcodec, ring: bool = False) -> None:
    """A ValueCodec (it validates its own bits and channel group); ring: a static cache's, group size as the keys'."""
    if not isinstance(vcodec, ValueCodec):
        raise TypeError(f"vcodec must be a value_codec.ValueCodec, got {type(vcodec).__name__}")
    G = vcodec.group_size
    if ring and (G < 16 or G & (G - 1)):
        raise ValueError(f"group_size {G} unsupported: need a power of two >= 16")


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


# --------------------------------------------------------------------------- host arithmetic
# triton.cdiv and triton.next_power_of_2 are constexpr_functions in recent Triton (3.5+): a host call costs 2-3 us
# (argument unwrapping); the wrappers call these instead. Same results for every int.


def cdiv(x: int, y: int) -> int:
    return (x + y - 1) // y


def next_pow2(n: int) -> int:
    """triton.next_power_of_2 (0 for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else triton.next_power_of_2(n)


# --------------------------------------------------------------------------- launches
# JITFunction.run re-derives on every launch what a repeated launch already knows: each argument's specialization
# (~70 native_specialize_impl calls for the attention kernel), the kernel cache key (a string of the options),
# launch metadata. `launch` keys the compiled kernel on what decides Triton's specialization instead (ints by value,
# tensors by dtype and 16-byte alignment, the do-not-specialize ints by their i32 range, the kwargs mapping by
# identity: the wrappers pass cached, never-mutated mappings) and calls the kernel's launcher as JITFunction.run
# does. Anything it does not model goes through Triton's own path: the interpreter, pre-run hooks, launch
# enter/exit hooks (profilers), a stages-inspection hook, a Triton whose kernels lack the launcher attributes.
# A miss launches through JITFunction.run, which returns the kernel it launched; that kernel is kept for the key.
# Not re-checked on a hit (Triton checks them per launch): that the globals a kernel read when it was compiled are
# unchanged, and Triton options read from the environment per launch (TRITON_DEBUG etc. changed mid-process; a
# new shape sees them). PQCOMPILE_FAST_LAUNCH=0 always launches through Triton; =check launches fast and asserts
# on every hit that Triton would have launched the same kernel with the same arguments (GPU validation).

FAST_LAUNCH = os.environ.get("PQCOMPILE_FAST_LAUNCH", "1")
_MAX_ENTRIES = 512  # per kernel; a full table is cleared (misses just launch through Triton)
_I32 = range(-(2**31), 2**31)

try:
    from triton import knobs as _knobs
    from triton.runtime.driver import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # an older Triton: Triton's own launch path only
    _knobs = _driver = _JITFunction = None


def frozen(**kwargs) -> Mapping:
    """An immutable kwargs mapping for `launch`, one per distinct content (its identity keys the launch cache); the
    values' types are part of the content (True and 1 are different constexprs)."""
    key = (*kwargs.items(), *map(type, kwargs.values()))
    found = _FROZEN.get(key)
    if found is None:
        if len(_FROZEN) > 4096:
            _FROZEN.clear()
        found = _FROZEN[key] = types.MappingProxyType(kwargs)
    return found


_FROZEN: dict = {}
# Triton's interpreter patches triton.language's globals for the length of a launch and keeps the grid index in a
# module global: launches from two threads at once fail or leave the patches behind (docs/reliability.md, finding 17).
_INTERPRETER = threading.Lock()


def launch(fn, grid: tuple, args: tuple, kwargs: Mapping) -> None:
    """fn[grid](*args, **kwargs), args positional and kwargs a mapping that is never mutated (`frozen`, or one
    cached by the caller): the same kernel, arguments, grid and stream as Triton's own launch."""
    fast = _FAST.get(id(fn))  # (by id: a JITFunction hashes its source's cache key, ~2 us)
    if fast is None:
        if type(fn) is not _JITFunction or FAST_LAUNCH == "0":  # the interpreter, bench's recorders, an old Triton
            if interpret():
                with _INTERPRETER:
                    fn[grid](*args, **kwargs)
                return
            fn[grid](*args, **kwargs)
            return
        fast = _FAST[id(fn)] = _FastLaunch(fn)  # (it holds fn: the id is not reused)
    elif FAST_LAUNCH == "0":
        fn[grid](*args, **kwargs)
        return
    fast(grid, args, kwargs)


def compile_only(fn, grid: tuple, args: tuple, kwargs: Mapping) -> None:
    """fn compiled for these arguments as `launch` would compile it, not launched (Triton's warmup; under an
    AsyncCompileMode the compile runs on its executor). Nothing to do where `launch` would not compile."""
    if type(fn) is _JITFunction:
        fn.run(*args, grid=grid, warmup=True, **kwargs)


_FAST: dict = {}
_Tensor = torch.Tensor
_HookChain = getattr(_knobs, "HookChain", None) if _knobs is not None else None


def _spec(a):
    """What Triton's specialization of a non-int argument depends on (ints are keyed by value)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, not a.data_ptr() & 15
    if a is None or a.__class__ is float:  # None: a constexpr None; a float is fp32 whatever its value
        return a.__class__
    return a.__class__, a


class _FastLaunch:
    """The compiled kernels of one JITFunction by launch key, and the launch itself."""

    def __init__(self, fn):
        self.fn = fn
        self.dns = tuple(i for i, p in enumerate(fn.params) if p.do_not_specialize and not p.is_constexpr)
        self.params = [(p.name, p.default) for p in fn.params]
        self.entries: dict = {}

    def __call__(self, grid, args, kwargs) -> None:
        rt = _knobs.runtime
        enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
        if (self.fn.pre_run_hooks or not (enter is None or (type(enter) is _HookChain and not enter.calls))
                or not (leave is None or (type(leave) is _HookChain and not leave.calls))
                or getattr(rt, "add_stages_inspection_hook", None) is not None):  # (hooks see Triton's metadata)
            self.fn[grid](*args, **kwargs)
            return
        drv = _driver.active
        device = drv.get_current_device()
        key = [a if a.__class__ is int else (a.dtype, not a.data_ptr() & 15) if a.__class__ is _Tensor
               else a.__class__ if a is None or a.__class__ is float else _spec(a) for a in args]  # (_spec inline)
        for i in self.dns:  # do_not_specialize ints: only their type (i32 in range) decides
            if i < len(args) and args[i].__class__ is int and args[i] in _I32:
                key[i] = "i32"
        key = (id(kwargs), device, rt.debug, *key)
        entry = self.entries.get(key)
        if entry is None:
            self._first(key, grid, args, kwargs)
            return
        run, function, packed, tail, kernel, _ = entry
        if FAST_LAUNCH == "check":
            self._check(kernel, device, grid, args, kwargs, tail)
        n = len(grid)
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, drv.get_current_stream(device), function,
            packed, None, enter, leave, *args, *tail)

    def _first(self, key, grid, args, kwargs) -> None:
        """Launch through Triton (compiling if needed) and keep the kernel it launched for the key."""
        kernel = self.fn.run(*args, grid=grid, warmup=False, **kwargs)
        run = getattr(kernel, "run", None)  # initialized by the launch just made
        if not callable(run) or getattr(kernel, "function", None) is None or not hasattr(kernel, "packed_metadata"):
            return  # (an async compile's future, or a Triton laid out otherwise): Triton's path next time too
        tail = tuple(kwargs.get(name, default) for name, default in self.params[len(args):])
        if len(self.entries) >= _MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = (run, kernel.function, kernel.packed_metadata, tail, kernel, kwargs)  # kwargs: kept alive

    def _check(self, kernel, device, grid, args, kwargs, tail) -> None:
        """PQCOMPILE_FAST_LAUNCH=check: Triton's own lookup must give the same kernel and bound arguments."""
        theirs = self.fn.run(*args, grid=grid, warmup=True, **kwargs)
        bound = list(self.fn.device_caches[device][-1](*args, **kwargs)[0].values())
        ours = [*args, *tail]
        same = len(bound) == len(ours) and all(a is b or (not isinstance(a, torch.Tensor) and type(a) is type(b)
                                                        and a == b) for a, b in zip(bound, ours))
        if theirs is not kernel or not same:
            raise RuntimeError(f"pqcompile fast launch of {self.fn.__name__}: Triton would launch another kernel or "
                               "other arguments (set PQCOMPILE_FAST_LAUNCH=0 and report this)")
