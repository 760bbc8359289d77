"""DenseValues: the dense values the backend holds in a DynamicCache when only the keys are compressed."""

import warnings

import pytest
import torch
from transformers import DynamicCache

from pqcompile.dense_values import DenseValues


def values_(B=2, H=2, T=37, D=8, seed=0):
    return torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def no_warning():
    """Its fallback is a view: nothing warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield


def test_cat_writes_in_place_and_equals_dense_cat():
    v = values_(T=60, seed=1)
    dv = DenseValues.from_dense(v[:, :, :20], 16)
    assert dv.shape == (2, 2, 20, 8) and dv.capacity == 32 and torch.equal(dv.dequantize(), v[:, :, :20])
    buf = dv.buf.data_ptr()
    for t in range(20, 60):
        dv = torch.cat([dv, v[:, :, t: t + 1]], dim=-2)
        if t == 30:
            assert dv.buf.data_ptr() == buf  # rows written into the same buffer: no history copied
    assert isinstance(dv, DenseValues) and dv.shape == v.shape and torch.equal(dv.dequantize(), v)
    assert dv.capacity >= 60 and dv.capacity % 16 == 0
    assert not dv.reserve() or dv.capacity >= 64


def test_other_ops_run_on_the_view_without_copying():
    v = values_(seed=2)
    dv = DenseValues.from_dense(v, 16)
    out = dv * 2 + 1  # any op: the first T rows
    assert type(out) is torch.Tensor and torch.equal(out, v * 2 + 1)
    assert torch.equal(dv.transpose(1, 2), v.transpose(1, 2)) and dv.dequantize()._base is dv.buf


def test_cache_ops_in_a_dynamic_cache():
    k, v = values_(T=45, seed=3), values_(T=45, seed=4)
    cache = DynamicCache()
    cache.update(k[:, :, :20], v[:, :, :20], 0)
    cache.layers[0].values = DenseValues.from_dense(cache.layers[0].values, 16)
    for t in range(20, 45):
        _keys, values = cache.update(k[:, :, t: t + 1], v[:, :, t: t + 1], 0)
        assert isinstance(values, DenseValues) and torch.equal(values.dequantize(), v[:, :, : t + 1])
    beam = torch.tensor([1, 0])
    cache.reorder_cache(beam)
    assert torch.equal(cache.layers[0].values.dequantize(), v[beam])
    cache.batch_repeat_interleave(2)
    want = v[beam].repeat_interleave(2, dim=0)
    assert isinstance(cache.layers[0].values, DenseValues) and torch.equal(cache.layers[0].values.dequantize(), want)
    cache.batch_select_indices(torch.tensor([0, 3]))
    want = want[[0, 3]]
    cache.crop(-17)  # 45 -> 28
    got = cache.layers[0].values
    assert isinstance(got, DenseValues) and torch.equal(got.dequantize(), want[:, :, :28])
    moved = got.to(torch.float64)
    assert isinstance(moved, DenseValues) and moved.dtype == torch.float64 and moved.shape == got.shape


def test_an_earlier_state_is_refused_once_overwritten():
    v = values_(T=40, seed=5)
    dv = DenseValues.from_dense(v[:, :, :20], 16)
    nxt = torch.cat([dv, v[:, :, 20:21]], dim=-2)
    assert torch.equal(torch.cat([dv, v[:, :, 20:21]], dim=-2).dequantize(), nxt.dequantize())  # a retried step
    crop = nxt[:, :, :10]  # a crop copies the rows it keeps: both states stay valid
    assert torch.equal(torch.cat([crop, v[:, :, 10:12]], dim=-2).dequantize(), v[:, :, :12])
    longer = torch.cat([nxt, v[:, :, 21:30]], dim=-2)  # room for 32: the same buffer
    assert torch.equal(longer.dequantize(), v[:, :, :30])
    torch.cat([nxt, v[:, :, 21:22]], dim=-2)  # allowed (its rows are whole), but it rewinds the buffer to 22 rows:
    with pytest.raises(RuntimeError, match="earlier state of a cache that now holds 22"):
        torch.cat([longer, v[:, :, 30:31]], dim=-2)  # the longer state is refused, not silently wrong
