"""CompressedTensor: the base of the tensors that stand, compressed, where a Hugging Face cache keeps a dense one.

torchao's pattern: a traceable wrapper subclass whose state is a few plain inner tensors, named in the class
attribute `inner_names`, plus hashable metadata (`codec`, the flatten context). It reports the logical dense
shape and dtype. Dynamo and AOTAutograd flatten it to its inner tensors, so compiled graphs and custom ops
only see plain tensors. Each subclass registers one small function per op it keeps compressed
(`@Cls.implements(aten.op, ...)`, a table per class, looked up along the MRO); any other op runs on
`dequantize()`: correct, but the dense tensor is materialized, and the first time per op it warns.

Subclasses: DynamicCompressed (below: the state of a DynamicCache tensor, codes/params of complete token
groups plus a full-precision tail, with every op HF's DynamicCache applies) and its PolarKeys (cache.py) and
PolarValues (values.py); StaticPolarKeys / StaticPolarValues (static_cache.py, preallocated buffers).
A new codec declares `inner_names`, `dtype_from` (and `growing_dim` if it lives in a DynamicCache), writes
`dequantize()` and a `from_dense` constructor, and implements the ops its cache applies (cat, detach/alias,
clone, _to_copy, index_select, slice): a DynamicCache codec derives from DynamicCompressed and gets them all.
"""

from __future__ import annotations

import contextlib
import contextvars
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
        *inner, self.codec, _shape = args
        for name, t in zip(self.inner_names, inner, strict=True):
            setattr(self, name, t)
        if self.growing_dim is not None and not torch.compiler.is_compiling():
            # Say so up front, so that dynamo compiles one dynamic graph instead of a static one first and a
            # dynamic one on the next call (docs/design.md §8.11).
            for t in (self, *(getattr(self, n) for n in self.growing_inner)):
                torch._dynamo.maybe_mark_dynamic(t, self.growing_dim)

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
            return impl

        return register

    @classmethod
    def _lookup(cls, table: str, func) -> Callable | None:
        for klass in cls.__mro__:
            impl = vars(klass).get(table, {}).get(func)
            if impl is not None:
                return impl
        return None

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


# --------------------------------------------------------------------------- the DynamicCache state


def capacity_for(tokens: int, current: int, G: int) -> int:
    """Code rows a state of `tokens` tokens should hold: room for its open group to flush, grown by at least
    1/16 of the current capacity at a time (slack <= ~6%, and a history copy only every 16th of its size)."""
    need = (tokens // G + 1) * G
    if not current:  # a fresh state (no comparison: no guard in a graph)
        return need
    if current >= need:
        return current
    return max(need, -(-(current + current // 16) // G) * G)


class DynamicCompressed(CompressedTensor):
    """A compressed DynamicCache tensor of logical shape [B, H, T, D], appended to in place.

    Inner tensors: `codes` and `params` with room for `capacity` tokens (a multiple of G: the first (T//G)*G
    rows hold the complete groups, the rest is spare), and `tail`, a ring [B, H, G, D] whose first T % G rows are
    the open group's tokens in full precision. `cat` writes the new tokens into the ring and, when a group
    completes, its codes into the next rows: no history is copied (docs/design.md §2.1). The wrapper a cache op
    returns shares the buffers of its input; the input is the cache's previous state and is not kept valid.

    A subclass gives `dequantize()`, `write_(new)` (the in-place append of new [B, H, S, D] at seq_len, given the
    capacity) and `param_rows(n)` (the rows of `params` that n tokens, a multiple of G, own). The ops HF's
    DynamicLayer applies (cat, detach/alias/clone, _to_copy, index_select / index / slice on the batch dim,
    repeat_interleave, crop) are implemented once, below, for every subclass."""

    inner_names = ("codes", "params", "tail")
    dtype_from = "tail"
    growing_dim = 2  # T: every decode step appends (and the capacity of codes / params grows now and then)
    growing_inner = ("codes", "params")
    codes: torch.Tensor
    params: torch.Tensor
    tail: torch.Tensor

    @property
    def seq_len(self):
        return self.shape[2]

    @property
    def group_size(self) -> int:
        return self.codec.group_size

    @property
    def capacity(self):
        return self.codes.shape[2]

    @property
    def encoded(self):
        """Tokens in complete groups: rows [0, encoded) of codes hold them."""
        return self.seq_len // self.group_size * self.group_size

    def write_(self, new: torch.Tensor) -> None:
        raise NotImplementedError

    def param_rows(self, n_tokens: int) -> int:
        raise NotImplementedError

    def with_data(self, codes, params, tail, seq_len) -> DynamicCompressed:
        B, H, _, D = tail.shape
        return type(self)(codes, params, tail, self.codec, (B, H, seq_len, D))

    def map_inner(self, fn, seq_len=None) -> DynamicCompressed:
        """fn applied to every inner tensor (a batch-dim op, a copy, a move); the length kept unless given."""
        return self.with_data(fn(self.codes), fn(self.params), fn(self.tail),
                              self.seq_len if seq_len is None else seq_len)

    def _grown_buffers(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """codes / params with room for `capacity` tokens, the encoded rows copied."""
        n = self.encoded
        codes = self.codes.new_empty(*self.codes.shape[:2], capacity, *self.codes.shape[3:])
        params = self.params.new_empty(*self.params.shape[:2], self.param_rows(capacity), *self.params.shape[3:])
        codes[:, :, :n].copy_(self.codes[:, :, :n])
        params[:, :, : self.param_rows(n)].copy_(self.params[:, :, : self.param_rows(n)])
        return codes, params

    def check_current(self) -> None:
        """Refuse to append to (or crop) an earlier state of a cache whose buffers have moved on since. The codes
        tensor carries the newest state's length and ring (_pq_len, _pq_ring); an earlier state of the same ring
        is still whole while every token appended after it went to its own open group (a decode step that a
        verify check refused, retried). Eager only: graphs see fake tensors, the backend checks their inputs."""
        written = getattr(self.codes, "_pq_len", None)
        if written is None or torch.compiler.is_compiling() or self.codes._pq_at != _data_ptr(self.codes):
            return  # untracked (or traced), or marks copied along with the tensor (copy.deepcopy): another buffer
        T, G = self.seq_len, self.group_size
        if getattr(self.codes, "_pq_ring", None) == _data_ptr(self.tail) and T <= written <= (T // G + 1) * G:
            return
        raise RuntimeError(
            f"{type(self).__name__} of {T} tokens is an earlier state of a cache that now holds {written}: the "
            "compressed cache appends in place, so an earlier state is not kept. Clone it (tensor.clone() or "
            "copy.deepcopy(cache)) before appending if both are needed")

    def mark_current(self) -> None:
        if torch.compiler.is_compiling():
            return
        codes = self.codes
        try:
            ring, at = self.tail.data_ptr(), codes.data_ptr()
        except RuntimeError:  # fake or functional tensors (AOTAutograd tracing a graph): nothing to mark
            return
        codes._pq_len, codes._pq_ring, codes._pq_at = self.seq_len, ring, at

    def appended(self, new: torch.Tensor) -> DynamicCompressed:
        """HF's cat([self, new], -2): the new tokens written in place (the buffers grow first if they must)."""
        self.check_current()
        T, S, G = self.seq_len, new.shape[2], self.group_size
        state = self
        if (T + S) // G * G > self.capacity:  # in a graph: a guard; the backend reserves between calls (reserve)
            codes, params = self._grown_buffers(capacity_for(T + S, self.capacity, G))
            state = self.with_data(codes, params, self.tail, T)
        state.write_(new)
        out = state.with_data(state.codes, state.params, state.tail, T + S)
        out.mark_current()
        return out

    def reserve(self) -> bool:
        """Eagerly grow the buffers so that the open group can flush without growing inside a compiled step
        (in place: this wrapper's inner tensors are replaced). True if they grew."""
        cap = capacity_for(self.seq_len, self.capacity, self.group_size)
        if cap == self.capacity:
            return False
        self.codes, self.params = self._grown_buffers(cap)
        self.mark_current()
        return True

    def grown_to(self, other: DynamicCompressed) -> None:
        """Share `other`'s buffers (reserve_all: a step's input, after its output grew)."""
        self.codes, self.params = other.codes, other.params

    def cropped(self, length: int) -> DynamicCompressed:
        """The first `length` tokens (HF crop, assisted decoding), sharing the encoded rows, in a copy of the ring
        (one group). Tokens of a cut group move to that ring as their reconstruction (they were already quantized;
        they are encoded again when the group refills)."""
        G = self.group_size
        self.check_current()
        ring = self.tail.clone()  # its own ring: the state it was cut from is then told apart (check_current)
        keep = length // G * G
        if keep < self.encoded:
            ring[:, :, : length - keep] = self.dequantize()[:, :, keep:length]
        out = self.with_data(self.codes, self.params, ring, length)
        out.mark_current()
        return out


def _data_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.data_ptr()
    except RuntimeError:  # fake or functional (tracing)
        return None


def appends_in_place(t) -> bool:
    """A cache tensor that cat appends to in place (DynamicCompressed, dense_values.DenseValues)."""
    return isinstance(t, CompressedTensor) and t.growing_dim is not None


def reserve_all(*tensor_lists) -> None:
    """After a compiled call: grow the DynamicCompressed tensors it returned so that the next decode step finds
    room (growing inside the graph would hold every layer's old and new buffers at once). Wrappers that share a
    buffer (a step's input and output) all get the new one, so the old buffer is freed layer by layer."""
    sharing: dict[int, list[DynamicCompressed]] = {}
    for tensors in tensor_lists:
        for t in tensors:
            if appends_in_place(t) and not isinstance(t.codes, FakeTensor):
                sharing.setdefault(id(t.codes), []).append(t)
    for group in sharing.values():
        newest = max(group, key=lambda t: t.seq_len)
        if newest.reserve():
            for t in group:
                if t is not newest:
                    t.grown_to(newest)
        newest.mark_current()


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


# The DynamicCache ops every tensor that appends in place shares (DynamicCompressed's, and DenseValues' through
# CACHE_OPS); each needs only map_inner, appended and cropped.
CACHE_OPS: list[tuple[tuple, Callable]] = []


def _cache_op(*ops):
    def register(impl):
        CACHE_OPS.append((ops, impl))
        return DynamicCompressed.implements(*ops)(impl)

    return register


@_cache_op(aten.cat.default)
def _cat(func, tensors, dim=0):
    """HF DynamicCache append: cat([past, new], dim=-2) -> encode new tokens, flush completed groups."""
    if len(tensors) != 2 or dim not in (-2, 2):
        return NotImplemented
    past, new = tensors
    if not appends_in_place(past) or isinstance(new, CompressedTensor) or new.dim() != 4:
        return NotImplemented
    return past.appended(new)


@_cache_op(aten.detach.default, aten.alias.default)
def _alias(func, x):
    return x.map_inner(func)


@_cache_op(aten.clone.default)
def _clone(func, x, memory_format=None):
    return x.map_inner(torch.clone)


@DynamicCompressed.implements(aten._to_copy.default)
def _to_copy(func, x, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
             memory_format=None):
    """.to(device) moves every inner tensor (HF offload / prefetch); a dtype change applies to the tail."""
    moved = x.map_inner(lambda t: t.to(device=device or t.device, non_blocking=non_blocking))
    if dtype is not None and dtype != x.dtype:
        moved = moved.with_data(moved.codes, moved.params, moved.tail.to(dtype), moved.seq_len)
    return moved


@_cache_op(aten.index_select.default)
def _index_select(func, x, dim, index):
    """Beam search reorder (index_select on the batch dim)."""
    if dim != 0:
        return NotImplemented
    return x.map_inner(lambda t: t.index_select(0, index))


@_cache_op(aten.index.Tensor)
def _index(func, x, indices):
    """HF batch_select_indices: x[indices, ...]."""
    if len(indices) != 1 or indices[0] is None:
        return NotImplemented
    return x.map_inner(lambda t: t[indices[0]])


@_cache_op(torch.Tensor.repeat_interleave, torch.repeat_interleave)
def _repeat_interleave(func, x, repeats, dim=None, *, output_size=None):
    """HF batch_repeat_interleave (dim 0). Torch-level: aten's repeat_interleave decomposes (unsqueeze, expand,
    ...) before __torch_dispatch__ sees it (docs/design.md §8.12)."""
    if dim != 0 or not appends_in_place(x) or not isinstance(repeats, int):
        return NotImplemented
    return x.map_inner(lambda t: t.repeat_interleave(repeats, dim=0))


@_cache_op(aten.slice.Tensor)
def _slice(func, x, dim=0, start=None, end=None, step=1):
    """Any range of the batch dim, the whole range of dims 1 and 3, and a prefix of dim 2 (crop)."""
    size = x.shape[dim]
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else min(end + size if end < 0 else end, size)
    if step != 1:
        return NotImplemented
    if dim == 0:
        return x.map_inner(lambda t: t[start:end])
    if dim in (1, -3, 3, -1):
        return NotImplemented if (start, end) != (0, size) else x.map_inner(lambda t: t)
    if start != 0:
        return NotImplemented
    return x.cropped(end)
