"""CompressedTensor: the base of the tensors that stand, compressed, where a Hugging Face cache keeps a dense one.

torchao's pattern: a traceable wrapper subclass whose state is a few plain inner tensors, named in the class
attribute `inner_names`, plus hashable metadata (`codec`, the flatten context). It reports the logical dense
shape and dtype. Dynamo and AOTAutograd flatten it to its inner tensors, so compiled graphs and custom ops
only see plain tensors. Each subclass registers one small function per op it keeps compressed
(`@Cls.implements(aten.op, ...)`, a table per class, looked up along the MRO); any other op runs on
`dequantize()`: correct, but the dense tensor is materialized, and the first time per op it warns.

Subclasses: DynamicCompressed (dynamic.py: the state of a DynamicCache tensor, appended to in place, with every
op HF's DynamicCache applies) and its PolarKeys (cache.py) and PolarValues (values.py); DenseValues
(dense_values.py); StaticPolarKeys / StaticPolarValues (static_cache.py, preallocated buffers).
A new codec declares `inner_names`, `dtype_from` (and `growing_dim` if it lives in a DynamicCache), writes
`dequantize()` and a `from_dense` constructor, and implements the ops its cache applies (cat, detach/alias,
clone, _to_copy, index_select, slice): a DynamicCache codec derives from DynamicCompressed and gets them all.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch._ops import OpOverload
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_map

_warned: set = set()  # ops whose dense fallback has warned (once per process, whatever the class)
_quiet: contextvars.ContextVar[bool] = contextvars.ContextVar("pqcompile_quiet_fallbacks", default=False)


@contextlib.contextmanager
def quiet_fallbacks() -> Iterator[None]:
    """Dense fallbacks inside neither warn nor use up their one-time warning. For code that runs ops on
    compressed tensors by design (verify runs HF's original graph on them): the warning stays for the user's."""
    token = _quiet.set(True)
    try:
        yield
    finally:
        _quiet.reset(token)


def reset_fallback_warnings() -> None:
    """Forget which ops have warned: each warns again on its next dense fallback (tests)."""
    _warned.clear()


def dense_fallback(func, args, kwargs):
    """Any op without a compressed implementation: run it on the dequantized tensors (correct, lossy, slow)."""

    def unwrap(x):
        if not isinstance(x, CompressedTensor):
            return x
        # fake tensors: dynamo tracing HF's code, not an op the user runs
        if (x.fallback_warns and func not in _warned and not _quiet.get()
                and not isinstance(x.inner_tensors()[0], FakeTensor)):
            _warned.add(func)
            warnings.warn(f"pqcompile: {func} has no compressed implementation for {type(x).__name__}; it runs on "
                          "the dequantized tensor (correct, but the dense tensor is materialized)", stacklevel=4)
        return x.dequantize()

    return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


class CompressedTensor(torch.Tensor):
    """Construct as `Cls(*inner tensors in inner_names order, codec, shape)`, shape the logical dense shape."""

    inner_names: ClassVar[tuple[str, ...]] = ()
    dtype_from: ClassVar[str] = ""  # the inner tensor held in the logical dtype: gives the wrapper dtype and device
    growing_dim: ClassVar[int | None] = None  # grows between compiled calls (DynamicCache's T): marked dynamic
    growing_inner: ClassVar[tuple[str, ...]] = ()  # the inner tensors whose growing_dim grows too
    fallback_warns: ClassVar[bool] = True  # False where dequantize() is a view (nothing is materialized)
    codec: Any
    # this class's own implementations (implements()); __init_subclass__ gives each subclass fresh tables
    _aten_impls: ClassVar[dict] = {}
    _function_impls: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._aten_impls, cls._function_impls = {}, {}

    @staticmethod
    def __new__(cls, *args):
        *inner, _codec, shape = args
        like = inner[cls.inner_names.index(cls.dtype_from)]
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=like.dtype, device=like.device,
                                                   requires_grad=False)

    def __init__(self, *args):
        *inner, self.codec, shape = args
        for name, t in zip(self.inner_names, inner, strict=True):
            setattr(self, name, t)
        # The logical shape as a plain tuple: `self.shape` on a class with torch-level impls runs
        # __torch_function__ (~4 us of Python a call), and the eager code between decode steps reads lengths often.
        self.logical_shape = tuple(shape)
        if self.growing_dim is not None and not torch.compiler.is_compiling():
            # Say so up front, so that dynamo compiles one dynamic graph instead of a static one first and a
            # dynamic one on the next call (docs/design.md §8.11). Marking the wrapper marks its inner tensors of
            # the same rank too (growing_inner are all [B, H, rows, ...]).
            torch._dynamo.maybe_mark_dynamic(self, self.growing_dim)

    def inner_tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, n) for n in self.inner_names)

    def rewrap(self, shape=None, **inner: torch.Tensor) -> CompressedTensor:
        """The same class and codec over the given inner tensors (the others shared), of `shape` (default: same)."""
        tensors = [inner.pop(n, getattr(self, n)) for n in self.inner_names]
        if inner:
            raise TypeError(f"{type(self).__name__} has no inner tensor {sorted(inner)}")
        return type(self)(*tensors, self.codec, self.shape if shape is None else shape)

    def __repr__(self) -> str:  # never prints (or dequantizes) the inner tensors
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, codec={self.codec!s})"

    def __tensor_flatten__(self):
        return list(self.inner_names), self.codec

    def _stable_hash_for_caching(self) -> str:
        """What identifies this input for AOTAutograd's disk cache (torch's extension point): the class, the codec
        and every tensor's sizes (symbols by name), strides, dtype and device. torch's default pickles the inner
        tensors' metadata, which fails on symbolic sizes (every decode graph of a growing cache), and the cache
        was then bypassed."""
        def desc(t: torch.Tensor) -> str:
            return f"{[str(s) for s in t.shape]}{[str(s) for s in t.stride()]}{t.dtype}{t.device.type}"

        cls = type(self)
        text = "|".join([f"{cls.__module__}.{cls.__qualname__}", repr(self.codec), str(list(self.logical_shape)),
                         str(self.dtype), str(self.requires_grad)] + [f"{n}:{desc(getattr(self, n))}"
                                                                      for n in self.inner_names])
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def __tensor_unflatten__(cls, inner, codec, outer_size, outer_stride):
        # outer_size comes from dynamo: deriving the shape from the inner sizes breaks symbolic binding
        # (docs/design.md §8.9)
        return cls(*(inner[n] for n in cls.inner_names), codec, outer_size)

    def dequantize(self) -> torch.Tensor:
        """The dense tensor of the logical shape and dtype (lossy where the codec is)."""
        raise NotImplementedError

    def nbytes_held(self) -> int:
        """Bytes of the inner tensors: what the cache holds for this tensor."""
        return sum(t.numel() * t.element_size() for t in self.inner_tensors())

    # ------------------------------------------------------------------ op registry and dispatch

    @classmethod
    def implements(cls, *ops) -> Callable:
        """Decorator registering `impl(func, *args, **kwargs)` for `ops` on this class (and its subclasses).
        aten ops run at dispatch level. Torch-level functions (torch.Tensor.repeat_interleave) are for ops that
        decompose before dispatch; they turn on __torch_function__ for the class. An impl returns
        NotImplemented for arguments it does not cover: the op then runs as if unregistered."""

        def register(impl: Callable) -> Callable:
            for op in ops:
                if isinstance(op, OpOverload):
                    cls._aten_impls[op] = impl
                else:
                    cls._function_impls[op] = impl
                    cls.__torch_function__ = classmethod(_torch_function)
            _RESOLVED.clear()
            return impl

        return register

    @classmethod
    def _lookup(cls, table: str, func) -> Callable | None:
        key = (cls, table, func)
        try:
            return _RESOLVED[key]
        except KeyError:
            pass
        impl = next((i for k in cls.__mro__ if (i := vars(k).get(table, {}).get(func)) is not None), None)
        _RESOLVED[key] = impl
        return impl

    # Off unless a class registers a torch-level function (implements): otherwise every torch call on the tensor,
    # eager or traced by dynamo, would run Python here for nothing.
    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = cls._lookup("_aten_impls", func)
        if impl is not None:
            out = impl(func, *args, **kwargs)
            if out is not NotImplemented:
                return out
        return dense_fallback(func, args, kwargs)


_RESOLVED: dict = {}  # (class, table, func) -> impl or None: _lookup's MRO walk, once per key


def _torch_function(cls, func, types, args=(), kwargs=None):
    """__torch_function__ of a class with torch-level impls: those, else what the disabled one does."""
    kwargs = kwargs or {}
    impl = cls._lookup("_function_impls", func)
    if impl is not None:
        out = impl(func, *args, **kwargs)
        if out is not NotImplemented:
            return out
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


aten = torch.ops.aten


@CompressedTensor.implements(aten.copy_.default)
def _copy_(func, dst, src, non_blocking=False):
    """AOTAutograd writes a mutated input back with copy_ (compiled graphs mutate the inner buffers in place;
    inductor then finds each copy a no-op: source and destination are the same buffer)."""
    if type(src) is not type(dst) or any(d.shape != s.shape for d, s in zip(dst.inner_tensors(), src.inner_tensors())):
        return NotImplemented
    for d, s in zip(dst.inner_tensors(), src.inner_tensors()):
        if d is not s:
            d.copy_(s)
    return dst
