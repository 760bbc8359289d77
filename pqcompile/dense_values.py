"""DenseValues: uncompressed values that the backend keeps in a DynamicCache, appended to in place.

With keys compressed and values not (value_bits None), HF's DynamicCache would still build every layer's values
anew each step (`torch.cat([past, new], -2)`); inside one compiled decode graph every layer's old and new value
tensors are alive at once, so the step's peak memory is twice the values. The prefill rewrite therefore puts a
DenseValues where HF keeps `layer.values`: one buffer [B, H, capacity, Dv] whose first T rows are the values.
HF's cat writes the new rows in place (`pqcompile::write_rows_`), the backend grows the buffer between steps
(dynamic.reserve_all), and any other op runs on `dequantize()`, which is a view of the first T rows: nothing
is copied and nothing warns.
"""

from __future__ import annotations

import torch

from . import ops
from .compressed import CompressedTensor
from .dynamic import CACHE_OPS, DynamicCompressed, capacity_for, refusal

__all__ = ["DenseValues", "hold_values"]

aten = torch.ops.aten


class DenseValues(CompressedTensor):
    """Logical shape [B, H, T, Dv]; `buf` [B, H, capacity, Dv]; metadata: the group size (capacity grows by at
    least that many rows)."""

    inner_names = ("buf",)
    dtype_from = "buf"
    growing_dim = 2
    growing_inner = ("buf",)
    fallback_warns = False  # the fallback's "dense tensor" is a view: nothing is materialized
    buf: torch.Tensor
    codec: int

    @property
    def seq_len(self):
        return self.logical_shape[2]

    @property
    def capacity(self):
        return self.buf.shape[2]

    @property
    def group_size(self) -> int:
        return self.codec

    # the staleness check and its marks are DynamicCompressed's, on `buf` instead of `codes`
    check_current = DynamicCompressed.check_current
    mark_current = DynamicCompressed.mark_current

    @property
    def codes(self) -> torch.Tensor:  # what check_current / mark_current / reserve_all key on
        return self.buf

    @property
    def tail(self) -> torch.Tensor:  # (the "ring" of check_current: the buffer itself, never copied by a crop)
        return self.buf

    @classmethod
    def from_dense(cls, values: torch.Tensor, group_size: int) -> DenseValues:
        B, H, T, Dv = values.shape
        buf = values.new_empty(B, H, capacity_for(T, 0, group_size), Dv)
        ops.write_rows_(buf, values, 0)
        return cls(buf, group_size, values.shape)

    def dequantize(self) -> torch.Tensor:
        return self.buf[:, :, : self.seq_len]

    def _grown(self, capacity: int) -> torch.Tensor:
        buf = self.buf.new_empty(*self.buf.shape[:2], capacity, self.buf.shape[3])
        buf[:, :, : self.seq_len].copy_(self.buf[:, :, : self.seq_len])
        return buf

    def appended(self, new: torch.Tensor) -> DenseValues:
        self.check_current()
        T, S = self.seq_len, new.shape[2]
        buf = self.buf if T + S <= self.capacity else self._grown(capacity_for(T + S, self.capacity, self.codec))
        try:
            ops.write_rows_(buf, new, T)
        except ValueError as e:  # misshapen rows: refused before anything was written
            raise refusal(e, type(self).__name__, T, S) from e
        out = DenseValues(buf, self.codec, (*self.shape[:2], T + S, self.shape[3]))
        out.mark_current()
        return out

    def reserve(self, tokens: int | None = None) -> bool:
        cap = capacity_for(max(self.seq_len, tokens or 0), self.capacity, self.codec)
        if cap == self.capacity:
            return False
        self.buf = self._grown(cap)
        self.mark_current()
        return True

    def held_buffers(self) -> tuple[torch.Tensor, ...]:
        return (self.buf,)

    def grown_to(self, other: DenseValues) -> None:  # reserve_all: share the newest state's new buffer
        self.buf = other.buf

    def cropped(self, length: int) -> DenseValues:
        """The first `length` rows (HF crop), copied: later appends overwrite the rows after a cut, and a crop is
        rare enough to stay exact and simple."""
        self.check_current()
        out = DenseValues(self.buf.clone(), self.codec, (*self.shape[:2], length, self.shape[3]))
        out.mark_current()
        return out

    def map_inner(self, fn) -> DenseValues:
        """fn applied to the buffer (a batch-dim op, a copy, a move); the length kept."""
        buf = fn(self.buf)
        return DenseValues(buf, self.codec, (buf.shape[0], buf.shape[1], self.seq_len, buf.shape[3]))


for _ops, _impl in CACHE_OPS:  # cat, detach/alias, clone, index_select, index, repeat_interleave, slice
    DenseValues.implements(*_ops)(_impl)


@DenseValues.implements(aten._to_copy.default)
def _to_copy(func, x, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, memory_format=None):
    return x.map_inner(lambda t: t.to(dtype=dtype or t.dtype, device=device or t.device, non_blocking=non_blocking))


def hold_values(values: torch.Tensor, group_size: int) -> DenseValues:
    """Prefill rewrite: the dense values HF is about to cache -> DenseValues (appended to in place from then on)."""
    return DenseValues.from_dense(values, group_size)
