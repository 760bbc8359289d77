"""CompressedTensor (pqcompile.compressed): a toy codec built on it, per-class op tables, the dense fallback and
its warnings, flatten/unflatten through dynamo."""

import warnings

import pytest
import torch

from pqcompile import compressed
from pqcompile.cache import PolarKeys
from pqcompile.codec import Codec, Pairing
from pqcompile.compressed import CompressedTensor
from pqcompile.static_cache import StaticPolarKeys

aten = torch.ops.aten


class RowInt8(CompressedTensor):
    """A toy codec: int8 codes and one scale per row of the last dim; what a second codec needs to write."""

    inner_names = ("q", "scale")
    dtype_from = "scale"

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> "RowInt8":
        scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
        return cls((x / scale).round().to(torch.int8), scale, "int8-rows", x.shape)

    def dequantize(self) -> torch.Tensor:
        return self.q.to(self.dtype) * self.scale


@RowInt8.implements(aten.detach.default, aten.clone.default)
def _each(func, x, **kwargs):
    return x.rewrap(q=func(x.q, **kwargs), scale=func(x.scale, **kwargs))


@RowInt8.implements(aten.cat.default)
def _cat(func, tensors, dim=0):
    if dim not in (0, -3) or not all(isinstance(t, RowInt8) for t in tensors):
        return NotImplemented
    first = tensors[0]
    return first.rewrap(q=torch.cat([t.q for t in tensors]), scale=torch.cat([t.scale for t in tensors]),
                        shape=(sum(t.shape[0] for t in tensors), *first.shape[1:]))


class RowInt8Cat1(RowInt8):
    """Inherits RowInt8's table; adds cat on dim 1 without touching it."""


@RowInt8Cat1.implements(aten.cat.default)
def _cat1(func, tensors, dim=0):
    if dim != 1:
        return NotImplemented
    first = tensors[0]
    return first.rewrap(q=torch.cat([t.q for t in tensors], 1), scale=torch.cat([t.scale for t in tensors], 1),
                        shape=(first.shape[0], sum(t.shape[1] for t in tensors), first.shape[2]))


def x_(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def fresh_warnings():
    compressed.reset_fallback_warnings()
    yield
    compressed.reset_fallback_warnings()


def test_a_toy_codec_gets_construction_repr_and_bytes():
    x = x_(3, 4, 8)
    r = RowInt8.from_dense(x)
    assert r.shape == x.shape and r.dtype == x.dtype and r.device == x.device
    torch.testing.assert_close(r.dequantize(), x, atol=x.abs().max().item() / 127, rtol=0)
    assert repr(r) == "RowInt8(shape=(3, 4, 8), dtype=torch.float32, codec=int8-rows)"
    assert r.nbytes_held() == 3 * 4 * 8 + 3 * 4 * 4
    assert r.inner_tensors() == (r.q, r.scale)
    with pytest.raises(TypeError, match="no inner tensor"):
        r.rewrap(tail=x)


def test_registered_ops_stay_compressed_others_fall_back_once():
    a, b = RowInt8.from_dense(x_(2, 4, 8)), RowInt8.from_dense(x_(3, 4, 8, seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both = torch.cat([a, b])
        cl = a.clone()
    assert type(both) is RowInt8 and both.shape == (5, 4, 8) and torch.equal(both.q, torch.cat([a.q, b.q]))
    assert type(cl) is RowInt8 and cl.q.data_ptr() != a.q.data_ptr()
    with pytest.warns(UserWarning, match=r"aten.cat.default has no compressed implementation for RowInt8"):
        dense = torch.cat([a, a], dim=1)  # the impl declines dim 1: the dense fallback
    assert type(dense) is torch.Tensor and torch.equal(dense, torch.cat([a.dequantize()] * 2, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per op
        torch.cat([a, a], dim=1)


def test_each_class_has_its_own_table_and_inherits_along_the_mro():
    assert RowInt8._aten_impls is not RowInt8Cat1._aten_impls is not PolarKeys._aten_impls
    assert aten.cat.default not in StaticPolarKeys._aten_impls  # PolarKeys' cat is PolarKeys' only
    assert RowInt8Cat1._lookup("_aten_impls", aten.cat.default) is _cat1
    assert RowInt8Cat1._lookup("_aten_impls", aten.clone.default) is _each  # inherited
    assert RowInt8._lookup("_aten_impls", aten.cat.default) is _cat  # the subclass's entry is its own
    a = RowInt8Cat1.from_dense(x_(2, 4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = torch.cat([a, a], dim=1)
    assert type(out) is RowInt8Cat1 and out.shape == (2, 8, 8)
    # torch-level functions turn __torch_function__ on for the class that registers one, only
    assert PolarKeys.__torch_function__ is not torch._C._disabled_torch_function_impl
    for cls in (RowInt8, StaticPolarKeys, CompressedTensor):
        assert cls.__torch_function__ is torch._C._disabled_torch_function_impl


def test_quiet_fallbacks():
    r = RowInt8.from_dense(x_(2, 4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with compressed.quiet_fallbacks():
            r.sum()
    with pytest.warns(UserWarning, match="aten.sum.default"):
        r.sum()


def test_flatten_unflatten_uses_the_given_outer_size():
    r = RowInt8.from_dense(x_(2, 4, 8))
    names, ctx = r.__tensor_flatten__()
    assert names == ["q", "scale"] and ctx == "int8-rows"
    back = RowInt8.__tensor_unflatten__({n: getattr(r, n) for n in names}, ctx, (2, 4, 8), r.stride())
    assert type(back) is RowInt8 and back.q is r.q and back.shape == (2, 4, 8)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiles_without_graph_breaks():
    """fullgraph: any graph break is an error. PolarKeys has __torch_function__ on (repeat_interleave)."""
    codec = Codec(4, 4, 16, Pairing("half"))
    keys = PolarKeys.from_dense(x_(1, 2, 20, 8), codec)

    def step(keys, new, q):
        keys = torch.cat([keys, new], dim=-2)
        att = q @ keys.dequantize().transpose(-1, -2)
        return keys, att * keys.shape[-2]

    new, q = x_(1, 2, 1, 8, seed=1), x_(1, 2, 1, 8, seed=2)
    got_keys, got = torch.compile(step, backend="aot_eager", fullgraph=True)(keys, new, q)
    want_keys, want = step(keys, new, q)
    assert isinstance(got_keys, PolarKeys) and got_keys.shape == (1, 2, 21, 8)
    assert torch.equal(got_keys.codes, want_keys.codes) and torch.equal(got_keys.tail, want_keys.tail)
    torch.testing.assert_close(got, want)
    r = RowInt8.from_dense(x_(2, 4, 8))
    out = torch.compile(lambda r: torch.cat([r, r]).dequantize() + 1, backend="aot_eager", fullgraph=True)(r)
    torch.testing.assert_close(out, torch.cat([r.dequantize()] * 2) + 1)
