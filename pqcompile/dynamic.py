"""DynamicCompressed: the base of the compressed tensors that live in a Hugging Face DynamicCache (PolarKeys,
PolarValues), appended to in place; the capacity policy, the earlier-state check, the backend's between-steps
growth (reserve_all) and the DynamicCache ops they share with dense_values.DenseValues (docs/design.md §2.1)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor

from .compressed import CompressedTensor

aten = torch.ops.aten


GROWTH = 64  # a buffer grows by at least 1/GROWTH of its capacity
RELEASE_BYTES = 32 << 20  # a growth to CUDA buffers this large hands the allocator's free blocks back


def release_freed(nbytes: int, device: torch.device) -> None:
    """After a growth to buffers of `nbytes` freed the old ones: return the caching allocator's free blocks to the
    driver before the next allocation. A freed block is its own segment, a little smaller than the next layer's
    grown buffer, so that buffer cannot reuse it; a smaller allocation that follows (the next layer's key codes
    after these values, params after codes) would best-fit into it and split it, and a split segment can never be
    handed back. At 32 layers this left
    1.2-1.7 GB reserved but unusable at the capacity limit (docs/benchmarks.md §3.7). Growths of this size come
    every 1/64 of the context, so the synchronizing empty_cache is rare."""
    if device.type == "cuda" and nbytes >= RELEASE_BYTES:
        torch.cuda.empty_cache()


def capacity_for(tokens: int, current: int, G: int) -> int:
    """Code rows a state of `tokens` tokens should hold: room for its open group to flush, grown by at least
    1/GROWTH of the current capacity at a time. The slack (<= 1/64, ~1.6%) is memory the cache holds for nothing,
    which decides how long a context fits; the copies it saves are cheap next to attention, which reads the whole
    history every step while a growth copies it once every 64th of its size (outside the graph, one layer at a
    time)."""
    need = (tokens // G + 1) * G
    if not current:  # a fresh state (no comparison: no guard in a graph)
        return need
    if current >= need:
        return current
    return max(need, -(-(current + current // GROWTH) // G) * G)


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
        return self.logical_shape[2]

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
        try:
            state.write_(new)
        except ValueError as e:  # non-finite or misshapen tokens: refused before anything was written
            raise refusal(e, type(self).__name__, T, S) from e
        out = state.with_data(state.codes, state.params, state.tail, T + S)
        out.mark_current()
        return out

    def reserve(self, tokens: int | None = None) -> bool:
        """Eagerly grow the buffers so that the open group can flush without growing inside a compiled step
        (in place: this wrapper's inner tensors are replaced); with `tokens`, room for that many tokens by the same
        policy (`capacity_for`). True if they grew."""
        cap = capacity_for(max(self.seq_len, tokens or 0), self.capacity, self.group_size)
        if cap == self.capacity:
            return False
        self.codes, self.params = self._grown_buffers(cap)
        self.mark_current()
        return True

    def held_buffers(self) -> tuple[torch.Tensor, ...]:
        """The buffers a growth replaces."""
        return self.codes, self.params

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
        ring = newest.tail
        if newest.reserve():
            for t in group:
                if t is not newest:
                    t.grown_to(newest)
            if newest.tail is not ring:  # DenseValues: its "ring" is the buffer that grew
                for hook in RING_MOVED:
                    hook(ring, newest.tail)
            del ring  # the last reference to a grown DenseValues' old buffer
            release_freed(sum(b.nbytes for b in newest.held_buffers()), newest.codes.device)
        newest.mark_current()


def reserve(cache, tokens: int) -> int:
    """Room for `tokens` tokens per sequence in every cache tensor of a HF cache that appends in place (compressed
    keys and values, dense values held in place), grown by `capacity_for` one tensor at a time; HF's own dense
    tensors are left as they are. Appends up to that length then never copy the history (a prompt's first
    allocation does this for its own length). Returns how many tensors grew."""
    grown = 0
    for layer in getattr(cache, "layers", None) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if appends_in_place(t) and t.reserve(tokens):
                grown += 1
                release_freed(sum(b.nbytes for b in t.held_buffers()), t.codes.device)
    return grown


# hook(old, new) after reserve_all replaced a state's ring tensor (the tensor verify's state check keys on) by a
# grown copy with the same rows (verify/integrity.py registers one)
RING_MOVED: list[Callable[[torch.Tensor, torch.Tensor], None]] = []


def refusal(error: Exception, where: str, position: int, count: int | None) -> ValueError:
    """The ValueError of a refused append (non-finite or misshapen tokens, refused before anything is written),
    saying where and at which token position; `refused` marks it so that an outer caller that knows the layer
    (the backend) rewrites the context instead of adding a second one."""
    after = f", {position + count} after the step" if count else ""
    err = ValueError(f"{error} [{where}: appending at token position {position} (the cache holds {position} "
                     f"tokens{after}) was refused; the cache keeps its {position} tokens]")
    err.refused = error  # type: ignore[attr-defined]
    return err


def refused_by(error: BaseException, states: list) -> tuple[int, int | None] | None:
    """(index in `states`, new tokens or None) of the cache tensor an exception from a compiled call was raised
    for: the innermost frame of its traceback that holds one of their buffers, directly or in a list / dict (the
    refusing op holds its own state's, or auto_functionalize its bases; only outer frames hold every layer's).
    The error path only: nothing is recorded per step."""
    owner: dict[int | None, int] = {}
    for i, s in enumerate(states):
        for t in (s.tail, s.codes):
            owner.setdefault(_data_ptr(t), i)
    owner.pop(None, None)
    frames, tb = [], error.__traceback__
    while tb is not None:
        frames.insert(0, tb.tb_frame)  # innermost first
        tb = tb.tb_next
    count = next((v.shape[2] for f in frames for k, v in f.f_locals.items()
                  if k.startswith("new") and isinstance(v, torch.Tensor) and v.dim() == 4), None)
    for frame in frames:
        for value in frame.f_locals.values():
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
            for t in items:
                t = t.tail if isinstance(t, CompressedTensor) else t
                if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) and _data_ptr(t) in owner:
                    return owner[_data_ptr(t)], count
    return None


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
