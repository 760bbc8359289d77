"""PolarKeys (pqcompile.cache) in eager mode: the ops HF's cache code applies, the dense fallback, DynamicCache."""

import inspect
import warnings

import pytest
import torch
from transformers import DynamicCache

from pqcompile import cache as cache_mod
from pqcompile import codec as C
from pqcompile.cache import PolarKeys
from pqcompile.codec import Codec, Pairing

CODECS = [Codec(4, 4, 16, Pairing("half")), Codec(3, 3, 16, Pairing("interleaved")), Codec(2, 5, 32, Pairing("half", 4))]


def keys_(B=2, H=2, T=37, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g) * 2).to(dtype)


def assert_state_equal(pk: PolarKeys, want: C.PolarData) -> None:
    """Bit-identical inner tensors, compared in codec.py's layout."""
    for name, got, exp in zip(C.PolarData._fields, pk.data_, want):
        assert got.dtype == exp.dtype, name
        assert torch.equal(got, exp), name


@pytest.mark.parametrize("codec", CODECS, ids=str)
@pytest.mark.parametrize("T0, S", [(0, 5), (5, 1), (15, 1), (16, 1), (37, 11), (30, 40), (10, 6)])
def test_cat_equals_encode_of_concatenation(codec, T0, S):
    k = keys_(T=T0 + S, seed=T0 * 7 + S)
    pk = PolarKeys.from_dense(k[:, :, :T0], codec)
    assert isinstance(pk, PolarKeys) and pk.shape == (2, 2, T0, 8)
    assert_state_equal(pk, C.encode(k[:, :, :T0], codec))
    again = pk.clone()  # cat appends in place: pk itself becomes an earlier state
    out = torch.cat([pk, k[:, :, T0:]], dim=-2)
    assert isinstance(out, PolarKeys)
    assert out.shape == k.shape and out.dtype == k.dtype and out.seq_len == T0 + S
    assert_state_equal(out, C.encode(k, codec))
    torch.testing.assert_close(out.dequantize(), C.decode(C.encode(k, codec), T0 + S, codec), rtol=0, atol=0)
    # dim=2 is the same as dim=-2
    assert_state_equal(torch.cat([again, k[:, :, T0:]], dim=2), C.encode(k, codec))


def test_cat_appends_in_place_and_refuses_an_earlier_state():
    codec = CODECS[0]
    k = keys_(T=40, seed=5)
    pk = PolarKeys.from_dense(k[:, :, :20], codec)
    codes, tail = pk.codes.data_ptr(), pk.tail.data_ptr()
    out = torch.cat([pk, k[:, :, 20:21]], dim=-2)
    assert out.codes.data_ptr() == codes and out.tail.data_ptr() == tail  # no history copied
    # the state before a one-token step is still whole (a step verify refused is retried from it) ...
    assert_state_equal(torch.cat([pk, k[:, :, 20:21]], dim=-2), C.encode(k[:, :, :21], codec))
    out = torch.cat([pk, k[:, :, 20:34]], dim=-2)  # ... until the appends wrap the ring into its open group
    with pytest.raises(RuntimeError, match="earlier state of a cache that now holds 34"):
        torch.cat([pk, k[:, :, 20:21]], dim=-2)
    with pytest.raises(RuntimeError, match="earlier state"):
        pk[:, :, :10]
    crop = out[:, :, :30]  # a crop copies the ring: the state it was cut from is stale even for one token
    with pytest.raises(RuntimeError, match="earlier state of a cache that now holds 30"):
        torch.cat([out, k[:, :, 34:35]], dim=-2)
    out = torch.cat([crop, k[:, :, 30:40]], dim=-2)  # the cropped state goes on: 40 tokens, 2 groups encoded
    assert out.capacity == 32  # from_dense of 20 tokens made room for 2 groups: no growth was needed
    d = out.dequantize()
    assert torch.equal(d[:, :, :16], C.decode(C.encode(k, codec), 40, codec)[:, :, :16])
    assert torch.equal(d[:, :, 32:], k[:, :, 32:])  # the ring: exact
    out = torch.cat([out, k[:, :, :9]], dim=-2)  # 49 tokens: the flush at 48 grows the buffers, with room for
    assert out.capacity == 64 and not out.reserve()  # the next group (what the backend keeps between steps)


def test_capacity_grows_by_a_64th_at_least():
    from pqcompile.dynamic import capacity_for

    assert capacity_for(0, 0, 128) == 128 and capacity_for(300, 0, 128) == 384
    assert capacity_for(300, 384, 128) == 384  # room for the open group: unchanged
    assert capacity_for(384, 384, 128) == 512  # its group must be able to flush
    assert capacity_for(32768, 32768, 128) == 32768 + 512  # 1/64 of 32k
    assert capacity_for(131072, 131072, 128) == 131072 + 2048
    assert capacity_for(1024, 1024, 128) == 1152  # under 64 groups: one group at a time


def test_reserve_makes_room_without_changing_the_state():
    """pqcompile.reserve(cache, n): every tensor that appends in place (compressed keys, dense values held in place)
    gets room for n tokens by the growth policy, one allocation; appends up to n then copy nothing; the state reads
    the same before and after; HF's own dense tensors are left alone."""
    import pqcompile
    from pqcompile.dense_values import DenseValues

    codec = CODECS[0]
    k_all, v_all = keys_(T=300, seed=3), keys_(T=300, seed=4)
    cache = DynamicCache()
    cache.update(k_all[:, :, :20], v_all[:, :, :20], 0)
    cache.update(k_all[:, :, :20], v_all[:, :, :20], 1)  # layer 1 stays dense (HF's tensors)
    layer = cache.layers[0]
    layer.keys, layer.values = PolarKeys.from_dense(layer.keys, codec), DenseValues.from_dense(layer.values, 16)
    before = layer.keys.dequantize().clone(), layer.values.dequantize().clone()
    assert (layer.keys.capacity, layer.values.capacity) == (32, 32)
    assert pqcompile.reserve(cache, 250) == 2 and pqcompile.reserve(cache, 250) == 0
    assert (layer.keys.capacity, layer.values.capacity) == (256, 256)  # (250 // 16 + 1) * 16, once
    assert torch.equal(layer.keys.dequantize(), before[0]) and torch.equal(layer.values.dequantize(), before[1])
    assert torch.equal(cache.layers[1].keys, k_all[:, :, :20])
    codes, buf = layer.keys.codes.data_ptr(), layer.values.buf.data_ptr()
    for t0, t1 in ((20, 100), (100, 101), (101, 250)):
        keys, values = cache.update(k_all[:, :, t0:t1], v_all[:, :, t0:t1], 0)
        assert keys.codes.data_ptr() == codes and values.buf.data_ptr() == buf  # appended in place, no growth
    assert_state_equal(keys, C.encode(k_all[:, :, :250], codec))
    assert torch.equal(values.dequantize(), v_all[:, :, :250])
    assert pqcompile.reserve(cache, 256) == 2  # past the room: the growth policy (at least a 64th; here a group)
    assert (cache.layers[0].keys.capacity, cache.layers[0].values.capacity) == (272, 272)
    assert_state_equal(cache.layers[0].keys, C.encode(k_all[:, :, :250], codec))


def test_cat_one_token_at_a_time():
    codec = CODECS[0]
    k = keys_(T=50, seed=3)
    pk = PolarKeys.from_dense(k[:, :, :1], codec)
    for t in range(1, 50):
        pk = torch.cat([pk, k[:, :, t: t + 1]], dim=-2)
        assert pk.shape[-2] == t + 1
    assert_state_equal(pk, C.encode(k, codec))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_from_dense_keeps_dtype(dtype):
    k = keys_(dtype=dtype)
    pk = PolarKeys.from_dense(k, CODECS[0])
    assert pk.dtype == dtype and pk.dequantize().dtype == dtype
    assert_state_equal(pk, C.encode(k, CODECS[0]))


@pytest.mark.parametrize("idx", [[1, 0], [0, 0], [1], [2, 0, 1, 1]])
def test_index_select_on_batch_dim(idx):
    codec = CODECS[1]
    k = keys_(B=3, seed=5)
    pk = PolarKeys.from_dense(k, codec)
    index = torch.tensor(idx)
    out = pk.index_select(0, index)
    assert isinstance(out, PolarKeys) and out.shape == (len(idx), 2, 37, 8)
    assert_state_equal(out, C.encode(k[index], codec))
    adv = pk[index, ...]  # HF batch_select_indices
    assert isinstance(adv, PolarKeys)
    assert_state_equal(adv, C.encode(k[index], codec))


@pytest.mark.parametrize("sl", [slice(1, None), slice(0, 1), slice(1, 3), slice(None, -1)])
def test_slice_on_batch_dim(sl):
    codec = CODECS[0]
    k = keys_(B=3, seed=6)
    out = PolarKeys.from_dense(k, codec)[sl]
    assert isinstance(out, PolarKeys) and out.shape == k[sl].shape
    assert_state_equal(out, C.encode(k[sl], codec))


@pytest.mark.parametrize("codec", CODECS, ids=str)
@pytest.mark.parametrize("n", [37, 36, 33, 32, 31, 20, 16, 3, 0])  # tail / group boundary / inside a group
def test_crop_by_slicing(codec, n):
    k = keys_(T=37, seed=n)
    pk = PolarKeys.from_dense(k, codec)
    full = pk.dequantize()
    # the same through a negative end (HF DynamicLayer.crop: keys[..., :-k, :]); on a copy, as a crop makes its
    # input an earlier state of the cache
    if n < 37:
        torch.testing.assert_close(pk.clone()[..., : n - 37, :].dequantize(), full[:, :, :n])
    out = pk[..., :n, :]
    assert isinstance(out, PolarKeys) and out.shape == (2, 2, n, 8)
    torch.testing.assert_close(out.dequantize(), full[:, :, :n])
    # the cropped cache keeps growing: newly appended tokens come back exactly while they sit in the tail
    G = codec.group_size
    new = keys_(T=3, seed=99)
    grown = torch.cat([out, new], dim=-2)
    assert isinstance(grown, PolarKeys) and grown.shape == (2, 2, n + 3, 8)
    d = grown.dequantize()
    torch.testing.assert_close(d[:, :, : (n // G) * G], full[:, :, : (n // G) * G], rtol=0, atol=0)
    if (n + 3) // G == n // G:  # no flush happened
        assert torch.equal(d[:, :, n:], new)
        torch.testing.assert_close(d[:, :, :n], full[:, :, :n])


def test_crop_into_group_then_refill_flushes_a_group():
    codec = CODECS[0]
    k = keys_(T=40, seed=8)
    pk = PolarKeys.from_dense(k, codec)[..., :20, :]  # cuts the second group: 4 decoded rows go to the tail
    grown = torch.cat([pk, keys_(T=12, seed=9)], dim=-2)  # 32 tokens: the second group is complete again
    assert grown.shape[-2] == 32
    assert grown.data_.codes.shape[2] == 32 and grown.data_.tail.shape[2] == C.TAIL_PAD
    # the refilled group is encoded from the reconstructed rows 16..19 and the 12 new tokens
    refilled = C.encode(torch.cat([pk.dequantize()[:, :, 16:], keys_(T=12, seed=9)], dim=-2), codec)
    want = C.PolarData(torch.cat([pk.data_.codes[:, :, :16], refilled.codes], dim=2),
                       torch.cat([pk.data_.params[:, :, :1], refilled.params], dim=2), refilled.tail)
    assert_state_equal(grown, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_to_dtype_keeps_polar_keys(dtype):
    pk = PolarKeys.from_dense(keys_(), CODECS[0])
    out = pk.to(dtype)
    assert isinstance(out, PolarKeys) and out.dtype == dtype and out.shape == pk.shape
    assert torch.equal(out.data_.codes, pk.data_.codes) and torch.equal(out.data_.params, pk.data_.params)
    assert torch.equal(out.dequantize(), pk.dequantize().to(dtype))
    moved = pk.to("cpu")
    assert isinstance(moved, PolarKeys)
    assert_state_equal(moved, pk.data_)


def test_clone_and_detach_keep_polar_keys():
    pk = PolarKeys.from_dense(keys_(), CODECS[0])
    for out in (pk.clone(), pk.detach()):
        assert isinstance(out, PolarKeys) and out.shape == pk.shape and out.codec == pk.codec
        assert_state_equal(out, pk.data_)
    cl = pk.clone()
    assert cl.data_.codes.data_ptr() != pk.data_.codes.data_ptr()
    assert cl.data_.tail.data_ptr() != pk.data_.tail.data_ptr()


def test_repr_does_not_dequantize():
    pk = PolarKeys.from_dense(keys_(), CODECS[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = repr(pk)
    assert "PolarKeys" in text and "(2, 2, 37, 8)" in text


def test_unsupported_op_falls_back_dense_and_warns_once():
    cache_mod.reset_fallback_warnings()
    pk = PolarKeys.from_dense(keys_(), CODECS[0])
    with pytest.warns(UserWarning, match="aten.add.Tensor"):
        out = pk + 1
    assert type(out) is torch.Tensor
    assert torch.equal(out, pk.dequantize() + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: silent
        again = pk + 1
    assert torch.equal(again, out)
    with pytest.warns(UserWarning, match="aten.mul.Tensor"):  # another op warns on its own
        torch.testing.assert_close(pk * 2, pk.dequantize() * 2)


def test_quiet_fallbacks_neither_warn_nor_use_up_the_warning():
    cache_mod.reset_fallback_warnings()
    pk = PolarKeys.from_dense(keys_(), CODECS[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with cache_mod.quiet_fallbacks():
            quiet = pk - 1
    torch.testing.assert_close(quiet, pk.dequantize() - 1)
    with pytest.warns(UserWarning, match="aten.sub.Tensor"):  # the user's own call still warns
        pk - 1


def test_dense_fallback_on_other_dims():
    pk = PolarKeys.from_dense(keys_(), CODECS[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(pk.sum(-1), pk.dequantize().sum(-1))
        torch.testing.assert_close(pk[:, :1], pk.dequantize()[:, :1])
        torch.testing.assert_close(pk.transpose(-1, -2) * 1, pk.dequantize().transpose(-1, -2))


# --------------------------------------------------------------------------- inside a real DynamicCache


def crop(cache: DynamicCache, remove: int) -> None:
    """DynamicCache.crop across transformers versions: 5.x takes -tokens_to_remove, 4.x the new length."""
    params = inspect.signature(type(cache.layers[0]).crop).parameters
    cache.crop(-remove if "tokens_to_remove" in params else cache.get_seq_length() - remove)


def test_lives_in_dynamic_cache():
    codec = CODECS[0]
    B, H, D = 2, 2, 8
    k_all, v_all = keys_(B, H, 45, D, seed=1), keys_(B, H, 45, D, seed=2)
    cache = DynamicCache()
    cache.update(k_all[:, :, :20], v_all[:, :, :20], 0)
    cache.layers[0].keys = PolarKeys.from_dense(cache.layers[0].keys, codec)
    assert cache.get_seq_length() == 20
    for t in range(20, 45):  # decode steps, crossing the group boundaries at 32
        keys, values = cache.update(k_all[:, :, t: t + 1], v_all[:, :, t: t + 1], 0)
        assert isinstance(keys, PolarKeys) and keys.shape == (B, H, t + 1, D)
        assert cache.get_seq_length() == t + 1
    assert cache.layers[0].keys is keys
    assert_state_equal(keys, C.encode(k_all, codec))
    assert torch.equal(values, v_all)
    # no dense copy of the keys is held: the state is well below dense size even with the tail
    assert keys.nbytes_held() < 0.5 * k_all.numel() * k_all.element_size()

    beam = torch.tensor([1, 0])
    cache.reorder_cache(beam)
    assert isinstance(cache.layers[0].keys, PolarKeys)
    assert_state_equal(cache.layers[0].keys, C.encode(k_all[beam], codec))
    assert torch.equal(cache.layers[0].values, v_all[beam])

    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(torch.tensor([1]))
        assert isinstance(cache.layers[0].keys, PolarKeys) and cache.layers[0].keys.shape[0] == 1
        assert_state_equal(cache.layers[0].keys, C.encode(k_all[:1], codec))

    before = cache.layers[0].keys.dequantize()
    crop(cache, 5)  # 45 -> 40: cuts into the group [32, 48)
    assert cache.get_seq_length() == 40
    assert isinstance(cache.layers[0].keys, PolarKeys)
    torch.testing.assert_close(cache.layers[0].keys.dequantize(), before[:, :, :40])
    crop(cache, 12)  # 40 -> 28: cuts into the encoded group [16, 32)
    assert cache.get_seq_length() == 28
    torch.testing.assert_close(cache.layers[0].keys.dequantize(), before[:, :, :28])

    keys, _ = cache.update(k_all[:1, :, :4], v_all[:1, :, :4], 0)  # 28 -> 32: the cut group is complete again
    assert isinstance(keys, PolarKeys) and cache.get_seq_length() == 32
    assert keys.data_.codes.shape[2] == 32


def test_batch_repeat_interleave_in_dynamic_cache_stays_compressed():
    codec = CODECS[0]
    k, v = keys_(seed=3), keys_(seed=4)
    cache = DynamicCache()
    cache.update(k, v, 0)
    cache.layers[0].keys = PolarKeys.from_dense(k, codec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dense fallback
        cache.batch_repeat_interleave(2)
    got = cache.layers[0].keys
    assert isinstance(got, PolarKeys)
    assert_state_equal(got, C.encode(k.repeat_interleave(2, dim=0), codec))
    assert torch.equal(cache.layers[0].values, v.repeat_interleave(2, dim=0))
    assert cache.get_seq_length() == 37


@pytest.mark.parametrize("call", [lambda x: x.repeat_interleave(2, dim=0), lambda x: x.repeat_interleave(2, 0),
                                  lambda x: torch.repeat_interleave(x, 2, dim=0)], ids=["method", "dim", "function"])
def test_repeat_interleave_on_batch_dim_stays_compressed(call):
    """Torch-level (aten's decomposes before __torch_dispatch__): the method and the function."""
    k = keys_(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = call(PolarKeys.from_dense(k, CODECS[0]))
    assert isinstance(out, PolarKeys) and out.shape == (4, 2, 37, 8)
    assert_state_equal(out, C.encode(k.repeat_interleave(2, dim=0), CODECS[0]))


def test_repeat_interleave_on_other_dims_falls_back_dense():
    pk = PolarKeys.from_dense(keys_(seed=3), CODECS[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pk.repeat_interleave(2, dim=1)
        flat = pk.repeat_interleave(torch.tensor(2))
    assert type(out) is torch.Tensor and torch.equal(out, pk.dequantize().repeat_interleave(2, dim=1))
    assert type(flat) is torch.Tensor and torch.equal(flat, pk.dequantize().repeat_interleave(2))
