"""PolarValues / StaticPolarValues in eager mode: every cache op against the dense reference (value_codec.py), no
dense copy held, bytes, polar attention over compressed keys and values, and torch.library.opcheck of the value
ops."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from pqcompile import ops, value_ops
from pqcompile import value_codec as V
from pqcompile.cache import PolarKeys, polar_sdpa
from pqcompile.codec import Codec, Pairing
from pqcompile.static_cache import StaticPolarKeys, StaticPolarValues, polar_static_sdpa
from pqcompile.value_codec import ValueCodec
from pqcompile.values import PolarValues, compress_values, polar_values_in

VCODECS = [ValueCodec(4, 8, 16), ValueCodec(2, 16, 16), ValueCodec(8, 4, 32)]
KCODEC = Codec(4, 4, 16, Pairing("half"))


def values_(B=2, H=2, T=37, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g) * 2).to(dtype)


def assert_state_equal(pv: PolarValues, want: V.ValueData) -> None:
    """Bit-identical inner tensors, compared in value_codec.py's layout."""
    for name, got, exp in zip(V.ValueData._fields, pv.data_, want):
        assert got.dtype == exp.dtype and got.shape == exp.shape, name
        assert torch.equal(got, exp), name


@pytest.fixture(autouse=True)
def no_fallback():
    """Every op here has a compressed implementation: a dense fallback warning is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield


@pytest.mark.parametrize("vc", VCODECS, ids=str)
@pytest.mark.parametrize("T0, S", [(0, 5), (5, 1), (15, 1), (16, 1), (37, 11), (30, 40)])
def test_cat_equals_encode_of_concatenation(vc, T0, S):
    v = values_(T=T0 + S, seed=T0 * 7 + S)
    pv = PolarValues.from_dense(v[:, :, :T0], vc)
    assert isinstance(pv, PolarValues) and pv.shape == (2, 2, T0, 16)
    assert_state_equal(pv, V.encode(v[:, :, :T0], vc))
    out = torch.cat([pv, v[:, :, T0:]], dim=-2)
    assert isinstance(out, PolarValues) and out.shape == v.shape and out.seq_len == T0 + S
    assert_state_equal(out, V.encode(v, vc))
    torch.testing.assert_close(out.dequantize(), V.decode(V.encode(v, vc), T0 + S, vc), rtol=0, atol=0)
    # params are flattened: no dim of size 1 (one channel group); only the capacity (rows) grows
    assert out.params.shape == (2, 2, out.capacity, 16 // vc.channel_group * 2)
    assert out.capacity % vc.group_size == 0 and out.capacity >= (T0 + S) // vc.group_size * vc.group_size


def test_one_token_at_a_time_and_no_dense_copy_held():
    vc = VCODECS[0]
    v = values_(T=50, seed=3)
    pv = PolarValues.from_dense(v[:, :, :1], vc)
    for t in range(1, 50):
        pv = torch.cat([pv, v[:, :, t: t + 1]], dim=-2)
    assert_state_equal(pv, V.encode(v, vc))
    # the state is codes + params with room for 64 tokens and a ring of one group: nothing dense of the groups
    assert pv.inner_tensors() == (pv.codes, pv.params, pv.tail) and pv.tail.shape[2] == vc.group_size
    cap = pv.capacity  # grown lazily in eager use: as far as the appends needed
    assert cap == 48 and pv.nbytes_held() * 8 == 2 * 2 * V.state_bits(vc, 50, 16, tail_bits=32, capacity=cap)
    assert pv.nbytes_held() - pv.tail.numel() * pv.tail.element_size() < 0.4 * v.numel() * v.element_size()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_keeps_dtype_and_to_dtype_applies_to_the_tail(dtype):
    v = values_(dtype=dtype)
    pv = PolarValues.from_dense(v, VCODECS[0])
    assert pv.dtype == dtype and pv.dequantize().dtype == dtype
    assert_state_equal(pv, V.encode(v, VCODECS[0]))
    out = pv.to(torch.float32)
    assert isinstance(out, PolarValues) and out.dtype == torch.float32 and torch.equal(out.codes, pv.codes)
    # the encoded groups now reconstruct in fp32 (before: rounded to `dtype`), the tail is the same numbers
    torch.testing.assert_close(out.dequantize(), pv.dequantize().float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(out.dequantize()[:, :, 32:], v[:, :, 32:].float())
    moved = pv.to("cpu")
    assert isinstance(moved, PolarValues)
    assert_state_equal(moved, pv.data_)


def test_clone_detach_index_select_index_slice_repeat_interleave():
    vc = VCODECS[1]
    v = values_(B=3, seed=5)
    pv = PolarValues.from_dense(v, vc)
    for out in (pv.clone(), pv.detach()):
        assert isinstance(out, PolarValues) and out.codec == vc
        assert_state_equal(out, pv.data_)
    assert pv.clone().codes.data_ptr() != pv.codes.data_ptr()
    index = torch.tensor([2, 0, 0])
    for out in (pv.index_select(0, index), pv[index, ...]):  # reorder_cache, batch_select_indices
        assert isinstance(out, PolarValues) and out.shape == (3, 2, 37, 16)
        assert_state_equal(out, V.encode(v[index], vc))
    for sl in (slice(1, None), slice(0, 1)):
        assert_state_equal(pv[sl], V.encode(v[sl], vc))
    for out in (pv.repeat_interleave(2, dim=0), torch.repeat_interleave(pv, 2, dim=0)):  # batch_repeat_interleave
        assert isinstance(out, PolarValues) and out.shape == (6, 2, 37, 16)
        assert_state_equal(out, V.encode(v.repeat_interleave(2, dim=0), vc))
    assert "PolarValues" in repr(pv) and "(3, 2, 37, 16)" in repr(pv)


@pytest.mark.parametrize("n", [37, 33, 32, 31, 20, 16, 3, 0])
def test_crop_moves_the_cut_group_back_to_the_tail(n):
    vc = VCODECS[0]
    v = values_(T=37, seed=n)
    pv = PolarValues.from_dense(v, vc)
    full = pv.dequantize()
    out = pv[..., :n, :]
    assert isinstance(out, PolarValues) and out.shape == (2, 2, n, 16)
    torch.testing.assert_close(out.dequantize(), full[:, :, :n], rtol=0, atol=0)
    if n < 37:  # (on a copy: a crop makes its input an earlier state of the cache)
        torch.testing.assert_close(PolarValues.from_dense(v, vc)[..., : n - 37, :].dequantize(), full[:, :, :n],
                                   rtol=0, atol=0)
    # keeps growing; a refilled group is encoded from the reconstruction of its kept tokens and the new ones
    new = values_(T=16, seed=99)
    grown = torch.cat([out, new], dim=-2)
    G = vc.group_size
    keep = n // G * G
    want = V.encode(torch.cat([full[:, :, keep:n], new], dim=2), vc)
    assert torch.equal(grown.data_.codes[:, :, keep:], want.codes)
    assert torch.equal(grown.data_.params[:, :, keep:], want.params) and torch.equal(grown.data_.tail, want.tail)
    assert torch.equal(grown.data_.codes[:, :, :keep], V.encode(v, vc).codes[:, :, :keep])


def test_lives_in_dynamic_cache_next_to_polar_keys():
    vc, B, H, D = VCODECS[0], 2, 2, 16
    k_all, v_all = values_(B, H, 45, D, seed=1), values_(B, H, 45, D, seed=2)
    cache = DynamicCache()
    cache.update(k_all[:, :, :20], v_all[:, :, :20], 0)
    layer = cache.layers[0]
    layer.keys, layer.values = PolarKeys.from_dense(layer.keys, KCODEC), PolarValues.from_dense(layer.values, vc)
    for t in range(20, 45):
        _keys, values = cache.update(k_all[:, :, t: t + 1], v_all[:, :, t: t + 1], 0)
        assert isinstance(values, PolarValues) and values.shape == (B, H, t + 1, D)
    assert polar_values_in(cache) == [cache.layers[0].values]
    assert_state_equal(values, V.encode(v_all, vc))
    beam = torch.tensor([1, 0])
    cache.reorder_cache(beam)
    assert_state_equal(cache.layers[0].values, V.encode(v_all[beam], vc))
    cache.batch_repeat_interleave(2)
    assert_state_equal(cache.layers[0].values, V.encode(v_all[beam].repeat_interleave(2, dim=0), vc))
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert cache.layers[0].values.shape[0] == 2
    before = cache.layers[0].values.dequantize()
    cache.crop(-17)  # 45 -> 28: cuts into the encoded group [16, 32)
    got = cache.layers[0].values
    assert isinstance(got, PolarValues) and got.shape[2] == 28 and got.encoded == 16
    torch.testing.assert_close(got.dequantize(), before[:, :, :28], rtol=0, atol=0)


@pytest.mark.parametrize("mask", [False, True])
def test_polar_sdpa_reads_both_code_streams(mask):
    vc = VCODECS[0]
    k, v = values_(T=41, seed=1), values_(T=41, seed=2)
    keys, vals = PolarKeys.from_dense(k, KCODEC), PolarValues.from_dense(v, vc)
    q = values_(B=2, H=4, T=3, seed=3)
    m = torch.rand(2, 1, 3, 41, generator=torch.Generator().manual_seed(4)) > 0.2 if mask else None
    got = polar_sdpa(q, keys, vals, attn_mask=m)
    want = F.scaled_dot_product_attention(q, keys.dequantize(), vals.dequantize(), attn_mask=m, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert compress_values(v, 4, 8, 16).codec == vc


def test_static_values_write_crop_and_attention():
    vc, T = VCODECS[0], 40
    v, k = values_(B=2, T=T, seed=7), values_(B=2, T=T, seed=8)
    vals = StaticPolarValues.zeros(2, 2, 64, 16, torch.float32, "cpu", vc)
    keys = StaticPolarKeys.zeros(2, 2, 64, 16, torch.float32, "cpu", KCODEC)
    assert vals.params.shape == (2, 2, 64, 4) and vals.ring.shape == (2, 2, 16, 16)
    vals.index_copy_(2, torch.arange(30), v[:, :, :30])  # HF's StaticLayer.update
    keys.index_copy_(2, torch.arange(30), k[:, :, :30])
    for t in range(30, T):
        vals.index_copy_(2, torch.tensor([t]), v[:, :, t: t + 1])
        keys.index_copy_(2, torch.tensor([t]), k[:, :, t: t + 1])
    assert int(vals.length) == T
    dense = vals.dequantize()
    torch.testing.assert_close(dense[:, :, :T], V.decode(V.encode(v, vc), T, vc), rtol=0, atol=0)
    assert not dense[:, :, T:].any()
    assert torch.equal(vals[:, :, :20].dequantize(), dense[:, :, :20])
    q = values_(B=2, H=4, T=1, seed=9)
    got = polar_static_sdpa(q, keys, vals)
    want = F.scaled_dot_product_attention(q, keys.dequantize()[:, :, :T], dense[:, :, :T], enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # rewind into an encoded group (HF crop, then a write): the kept tokens come back as their reconstruction
    vals.index_copy_(2, torch.arange(20, 22), v[:, :, 20:22])
    assert int(vals.length) == 22
    torch.testing.assert_close(vals.dequantize()[:, :, :20], dense[:, :, :20], rtol=0, atol=0)
    beam = vals.index_select(0, torch.tensor([1, 1]))
    assert isinstance(beam, StaticPolarValues) and torch.equal(beam.codes[0], vals.codes[1])
    copy = StaticPolarValues.zeros(2, 2, 64, 16, torch.float32, "cpu", vc)
    copy.copy_(vals)
    assert torch.equal(copy.dequantize(), vals.dequantize())
    vals.zero_()
    assert int(vals.length) == 0 and not vals.codes.any()


# --------------------------------------------------------------------------- the ops: torch.library.opcheck


def _dynamic_state(T=37, vc=VCODECS[0]):
    pv = PolarValues.from_dense(values_(T=T, seed=11), vc)
    return pv.codes, pv.params, pv.tail


@pytest.mark.parametrize("T", [5, 37])
def test_opcheck_dynamic_value_ops(T):
    vc = VCODECS[0]
    vargs = value_ops.vcodec_args(vc)
    codes, params, tail = _dynamic_state(T, vc)
    new = values_(T=3, seed=12)
    torch.library.opcheck(value_ops.append_values_, (codes, params, tail, new, T, *vargs))
    torch.library.opcheck(value_ops.decode_values, (codes, params, tail, T, *vargs))
    keys = PolarKeys.from_dense(values_(T=T, seed=13), KCODEC)
    q = values_(B=2, H=4, T=2, seed=14)
    mask = torch.zeros(2, 1, 2, T)
    for m, causal in ((None, True), (mask, False)):
        torch.library.opcheck(value_ops.attention_qv, (q, keys.codes, keys.params, keys.tail, codes, params, tail, T, m,
                                                 0.25, 0.0, causal, *ops.codec_args(KCODEC), *vargs))


def test_opcheck_static_value_ops():
    vc = VCODECS[0]
    vargs = value_ops.vcodec_args(vc)

    def state():
        vals = StaticPolarValues.zeros(1, 2, 48, 16, torch.float32, "cpu", vc)
        vals.index_copy_(2, torch.arange(20), values_(B=1, T=20, seed=15))
        return vals

    vals = state()
    keys = StaticPolarKeys.zeros(1, 2, 48, 16, torch.float32, "cpu", KCODEC)
    keys.index_copy_(2, torch.arange(20), values_(B=1, T=20, seed=16))
    torch.library.opcheck(value_ops.static_write_values_, (*state().inner()[:4], values_(B=1, T=1, seed=17),
                                                     torch.tensor([20]), *vargs))
    q = values_(B=1, H=4, T=1, seed=18)
    torch.library.opcheck(value_ops.static_attention_qv, (q, *keys.inner()[:4], *vals.inner()[:3], None, 0.25, False,
                                                    *ops.codec_args(KCODEC), *vargs))
    torch.library.opcheck(value_ops.static_decode_values, (*vals.inner(), 48))
