"""Reference value codec (pqcompile.value_codec): round-trip bounds, packing, append, accounting, attention, bad input.

Every bound is derived from the quantizer: a value v in a (token, channel group) with stored bf16 (min, scale) is
reconstructed at the midpoint of its bin, so |v - v_hat| <= scale / 2 plus the fp32 rounding of the quantizer's
arithmetic (a few ulps of the group's range). The stored params are the exact range rounded outward to bf16:
min down by less than one bf16 ulp (<= 2^-7 |min|), scale up by less than one (factor <= 1 + 2^-7), so
scale <= (1 + 2^-7)(1 + 2^-24) (max - min + 2^-7 |min|) / 2^bits.
"""

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqcompile import codec as C
from pqcompile import value_codec as V
from pqcompile.codec import Codec, Pairing
from pqcompile.config import PolarQuantConfig
from pqcompile.value_codec import ValueCodec

EPS32 = torch.finfo(torch.float32).eps
BF16_REL = 2.0 ** -7  # one bf16 ulp relative to |x| (8 significant bits), for normal x
BF16_TINY = 2.0 ** -133  # one bf16 ulp below its smallest normal
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = [2, 4, 8]


def make_values(shape, kind="normal", dtype=torch.float32, seed=0, channel_group=8):
    """Fresh random values (never zeros). `constant`: every (token, channel group) holds one value."""
    g = torch.Generator().manual_seed(seed)
    B, H, T, Dv = shape
    if kind == "constant":
        v = torch.randn(B, H, T, Dv // channel_group, 1, generator=g).expand(-1, -1, -1, -1, channel_group)
        v = v.reshape(shape)
    elif kind == "huge":
        v = torch.randn(shape, generator=g) * 1e30
    elif kind == "tiny":
        v = torch.randn(shape, generator=g) * 1e-30
    elif kind == "fp16_large":  # near fp16's top, below 65504 by more than half a 2-bit bin of the range
        v = (torch.rand(shape, generator=g) * 2 - 1) * 3e4
    elif kind == "outliers":  # a few channels far larger than the rest (values' heavy-hitter channels)
        v = torch.randn(shape, generator=g) * (1 + 20 * torch.rand(Dv, generator=g) ** 8)
    elif kind == "offset":  # groups far from zero: min and max of one sign
        v = torch.randn(shape, generator=g) + 50 * torch.randn(B, H, T, 1, generator=g)
    else:
        v = torch.randn(shape, generator=g) * 3
    return v.to(dtype)


def ideal_half_bin(values, vc):
    """The bound from the exact group range: (1 + 2^-7)(1 + 2^-24)(max - min + bf16 gap of min) / 2^(bits+1)."""
    B, H, T, Dv = values.shape
    v = values.float().view(B, H, T, Dv // vc.channel_group, vc.channel_group)
    lo, hi = v.amin(-1), v.amax(-1)
    gap = torch.clamp(BF16_REL * lo.abs(), min=BF16_TINY)
    return (1 + BF16_REL) * (1 + EPS32) * (hi - lo + gap) / (1 << (vc.bits + 1))  # [B, H, T, Dv/cg]


def check_roundtrip(values: torch.Tensor, vc: ValueCodec) -> V.ValueData:
    """The state of `values` reconstructs every encoded element within half a bin of its group, the tail exactly."""
    B, H, T, Dv = values.shape
    G, cg, ng = vc.group_size, vc.channel_group, Dv // vc.channel_group
    Tc = T // G * G
    state = V.encode(values, vc)
    # layout (module docstring of value_codec.py)
    assert state.codes.shape == (B, H, Tc, Dv * vc.bits // 8) and state.codes.dtype == torch.uint8
    assert state.params.shape == (B, H, Tc, ng, 2) and state.params.dtype == torch.bfloat16
    assert state.params.is_contiguous() and state.params.stride(-1) == 1
    assert state.tail.shape == (B, H, T % G + C.TAIL_PAD, Dv) and state.tail.dtype == values.dtype
    # tail: the newest T % G tokens bit-identical, padding zero
    assert torch.equal(state.tail[:, :, : T % G], values[:, :, Tc:])
    assert not state.tail[:, :, T % G:].any()

    dense = V.decode(state, T, vc)
    assert dense.shape == values.shape and dense.dtype == values.dtype
    assert torch.isfinite(dense).all()
    assert torch.equal(dense[:, :, Tc:], values[:, :, Tc:])
    if Tc == 0:
        return state

    v = values[:, :, :Tc].float().view(B, H, Tc, ng, cg)
    v_hat = V.dequantize(state, vc).view(B, H, Tc, ng, cg)  # fp32
    p = state.params.float()
    vmin, scale = p[..., 0:1], p[..., 1:2]  # [B, H, Tc, ng, 1]
    top = vmin + (1 << vc.bits) * scale
    span = vmin.abs() + top.abs()
    assert (scale >= 0).all()
    # the stored range covers the group: min <= v <= min + 2^bits * scale (up to fp32 rounding of the range)
    assert (v >= vmin).all()
    assert (v <= top + 4 * EPS32 * span).all()
    bound = scale / 2 + 4 * EPS32 * span
    err = (v - v_hat).abs()
    assert (err <= bound).all(), f"worst error / half bin = {(err / bound).max().item():.3f}"
    # the stored half bin is the exact range's, rounded outward to bf16
    ideal = ideal_half_bin(values[:, :, :Tc], vc).unsqueeze(-1)
    assert (scale / 2 <= ideal).all(), f"worst stored / ideal half bin = {(scale / 2 / ideal).max().item():.4f}"
    # dense values: the fp32 reconstruction rounded to the dtype (half an ulp, or half a subnormal step)
    fi = torch.finfo(values.dtype)
    got = dense[:, :, :Tc].float().view(B, H, Tc, ng, cg)
    round_dt = fi.eps / 2 * (v_hat.abs() + fi.smallest_normal)
    assert ((got - v).abs() <= bound + round_dt).all()
    return state


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cg", [4, 8, 32])
@pytest.mark.parametrize("kind", ["normal", "outliers", "offset"])
def test_roundtrip_half_bin(bits, cg, kind):
    check_roundtrip(make_values((2, 3, 37, 32), kind, seed=bits * 100 + cg), ValueCodec(bits, cg, 16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [5, 16, 32, 47, 97])
@pytest.mark.parametrize("bits", BITS)
def test_roundtrip_dtypes_and_lengths(dtype, T, bits):
    check_roundtrip(make_values((1, 2, T, 16), dtype=dtype, seed=T), ValueCodec(bits, 8, 16))


@pytest.mark.parametrize("bits", BITS)
def test_default_shape_head_dim_128_group_64(bits):
    """The shipped configuration: D=128, value_group 64, G=128; 300 tokens = 2 groups + a 44-token tail."""
    vc = ValueCodec.from_config(PolarQuantConfig(value_bits=bits))
    assert vc == ValueCodec(bits, 64, 128)
    state = check_roundtrip(make_values((1, 2, 300, 128), "outliers", torch.bfloat16, seed=bits), vc)
    assert state.codes.shape[-1] == 128 * bits // 8 and state.params.shape[-2:] == (2, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_all_equal_groups(dtype, bits):
    """A (token, channel group) of equal values stores scale 0 and decodes exactly when the value is a bf16
    number; otherwise its bin is the bf16 rounding gap of the value (and the half-bin bound still holds)."""
    vc = ValueCodec(bits, 8, 16)
    values = make_values((2, 2, 40, 16), "constant", dtype, seed=bits)
    state = check_roundtrip(values, vc)
    Tc = state.codes.shape[2]
    if dtype == torch.bfloat16:
        assert not state.params[..., 1].any()
        assert torch.equal(V.decode(state, 40, vc), values)
    else:
        v = values[:, :, :Tc, ::8].float()  # one value per group
        assert (state.params[..., 1].float() <= (1 + BF16_REL) * BF16_REL * v.abs() / (1 << bits)).all()
    # exactly representable in bf16 whatever the dtype: exact
    exact = values.to(torch.bfloat16).to(dtype)
    assert torch.equal(V.decode(V.encode(exact, vc), 40, vc), exact)


@pytest.mark.parametrize("kind, dtype", [("huge", torch.float32), ("tiny", torch.float32), ("huge", torch.bfloat16),
                                         ("tiny", torch.bfloat16), ("fp16_large", torch.float16)])
@pytest.mark.parametrize("bits", BITS)
def test_huge_and_tiny_magnitudes(kind, dtype, bits):
    vc = ValueCodec(bits, 8, 16)
    values = make_values((1, 2, 40, 16), kind, dtype, seed=bits)
    state = check_roundtrip(values, vc)  # the half-bin bounds, relative to the groups' own magnitudes
    assert torch.isfinite(state.params).all() and (state.params[..., 1] > 0).all()  # no scale flushed to 0 or inf
    dense = V.decode(state, 40, vc)
    assert (dense[:, :, :32] != values[:, :, :32]).any()  # really quantized


@pytest.mark.parametrize("bits", BITS)
def test_fp16_at_its_largest_decodes_finite(bits):
    """A bin midpoint may lie up to half a bin above 65504 (8-bit: the group's range rounded outward makes
    the top bins' centers overshoot); decode clamps to fp16's finite range, which only moves v_hat toward v."""
    g = torch.Generator().manual_seed(bits)
    lo = -torch.rand(1, 1, 64, 1, generator=g) * 65504
    values = torch.cat([lo, torch.full((1, 1, 64, 1), 65504.0), torch.rand(1, 1, 64, 2, generator=g) * 65504], -1)
    values = values.repeat(1, 1, 1, 2).half()
    check_roundtrip(values, ValueCodec(bits, 4, 16))
    assert V.decode(V.encode(values, ValueCodec(bits, 4, 16)), 64, ValueCodec(bits, 4, 16)).isfinite().all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 20, 39])  # inside the first group, a later group, the tail
def test_non_finite_raises(bad, where):
    vc = ValueCodec(4, 8, 16)
    values = make_values((1, 2, 40, 16))
    values[0, 1, where, 3] = bad
    with pytest.raises(ValueError, match=r"values contains inf or NaN.*\(1, 2, 40, 16\)"):
        V.encode(values, vc)
    state = V.encode(values[:, :, :where], vc)
    with pytest.raises(ValueError, match="new_values"):
        V.append(state, where, values[:, :, where:], vc)


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("Dv", [8, 16, 64, 128])
def test_pack_unpack_roundtrip_and_layout(bits, Dv):
    g = torch.Generator().manual_seed(bits * 1000 + Dv)
    codes = torch.randint(0, 1 << bits, (2, 3, 5, Dv), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = C.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, Dv * bits // 8)
    assert torch.equal(C.unpack_codes(packed, bits, Dv), codes)
    # byte i of a row holds channels [i*8/bits, (i+1)*8/bits), the lowest channel in the lowest bits
    per = 8 // bits
    row = codes[1, 2, 4].long().view(-1, per)
    want = (row << (torch.arange(per) * bits)).sum(-1)
    assert packed[1, 2, 4].tolist() == want.tolist()


@pytest.mark.parametrize("bits", BITS)
def test_codes_are_the_quantizer_output(bits):
    """The packed codes decode, in fp64 straight from the stored codes and params, to dequantize()'s values."""
    vc = ValueCodec(bits, 16, 16)
    B, H, T, Dv = 2, 2, 48, 64
    state = V.encode(make_values((B, H, T, Dv), "outliers", seed=bits), vc)
    assert state.codes.shape[-1] == Dv * bits // 8  # really packed: 2-bit four, 4-bit two codes per byte
    code = C.unpack_codes(state.codes, bits, Dv).long().view(B, H, T, Dv // 16, 16)
    assert code.max() < (1 << bits) and code.min() >= 0
    p = state.params.double()
    want = (p[..., 0:1] + (code + 0.5) * p[..., 1:2]).view(B, H, T, Dv)
    got = V.dequantize(state, vc)
    assert ((got.double() - want).abs() <= 2 * EPS32 * (want.abs() + p[..., 0].abs().max())).all()


# --------------------------------------------------------------------------- append


def chunked_state(values, vc, sizes):
    """Append values in chunks of the given sizes (the last chunk takes what is left)."""
    T = values.shape[2]
    cuts = list(itertools.accumulate(sizes, initial=0))
    cuts = [min(c, T) for c in cuts] + [T]
    state = V.empty(vc, values.shape[0], values.shape[1], values.shape[3], values.dtype)
    for lo, hi in itertools.pairwise(cuts):
        if hi > lo:
            state = V.append(state, lo, values[:, :, lo:hi], vc)
    return state


def assert_same_state(got, want):
    for name, a, b in zip(V.ValueData._fields, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_append_one_token_at_a_time_equals_encode_all(bits, dtype):
    vc = ValueCodec(bits, 8, 16)
    values = make_values((2, 2, 53, 16), "outliers", dtype, seed=7)
    state = V.encode(values[:, :, :3], vc)  # a prefill shorter than one group
    for t in range(3, 53):
        state = V.append(state, t, values[:, :, t: t + 1], vc)
        if (t + 1) % 16 == 0:  # a group was just flushed: the tail holds only padding
            assert state.tail.shape[2] == C.TAIL_PAD
    assert_same_state(state, V.encode(values, vc))


@pytest.mark.parametrize("T, sizes", [
    (10, [3, 4]),  # T < G
    (32, [16, 16]),  # T = k*G exactly, chunks on the boundaries
    (32, [7, 20, 5]),  # T = k*G, chunks crossing them
    (97, [1, 30, 2, 40, 1]),  # odd T, a chunk spanning two boundaries
    (97, [97]),
    (64, [0, 50, 14]),
])
@pytest.mark.parametrize("bits", BITS)
def test_append_chunks_equal_encode_all(T, sizes, bits):
    vc = ValueCodec(bits, 4, 16)
    values = make_values((1, 3, T, 8), seed=T)
    assert_same_state(chunked_state(values, vc, sizes), V.encode(values, vc))


def test_keys_and_values_flush_together():
    """Same G: after every append the key and value states hold the same encoded count and tail length."""
    kc, vc = Codec(4, 4, 16, Pairing("half")), ValueCodec(4, 8, 16)
    keys, values = make_values((1, 2, 45, 8), seed=1), make_values((1, 2, 45, 16), seed=2)
    ks, vs = C.encode(keys[:, :, :5], kc), V.encode(values[:, :, :5], vc)
    for lo, hi in [(5, 6), (6, 20), (20, 33), (33, 45)]:
        ks = C.append(ks, lo, keys[:, :, lo:hi], kc)
        vs = V.append(vs, lo, values[:, :, lo:hi], vc)
        assert ks.codes.shape[2] == vs.codes.shape[2] and ks.tail.shape[2] == vs.tail.shape[2]


def test_append_mismatched_state_raises():
    vc = ValueCodec(4, 8, 16)
    state = V.encode(make_values((1, 2, 20, 16)), vc)
    with pytest.raises(ValueError, match=r"new_values shape \(1, 2, 1, 8\)"):
        V.append(state, 20, make_values((1, 2, 1, 8)), vc)
    with pytest.raises(ValueError, match=r"new_values shape \(2, 2, 1, 16\)"):
        V.append(state, 20, make_values((2, 2, 1, 16)), vc)
    with pytest.raises(ValueError, match="21"):
        V.append(state, 21, make_values((1, 2, 1, 16)), vc)  # wrong seq_len for this tail


def test_decode_wrong_seq_len_raises():
    vc = ValueCodec(4, 8, 16)
    state = V.encode(make_values((1, 2, 20, 16)), vc)
    for seq_len in (19, 21, 36):
        with pytest.raises(ValueError, match=rf"tail \(1, 2, 6, 16\) is not a state of seq_len={seq_len}"):
            V.decode(state, seq_len, vc)
    with pytest.raises(ValueError, match="seq_len=20"):  # a state from another codec's layout
        V.decode(state, 20, ValueCodec(2, 8, 16))


# --------------------------------------------------------------------------- property test


@st.composite
def fuzz_case(draw):
    bits = draw(st.sampled_from(BITS))
    cg = draw(st.sampled_from([c for c in (2, 4, 8, 16) if c * bits % 8 == 0]))
    Dv = cg * draw(st.integers(1, 4))
    G = draw(st.sampled_from([16, 32]))
    T = draw(st.one_of(st.integers(1, 3 * G + 1), st.sampled_from([G - 1, G, G + 1, 2 * G])))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["normal", "outliers", "offset", "constant", "huge", "tiny"]))
    if kind in ("huge", "tiny") and dtype == torch.float16:
        dtype = torch.float32
    chunks = draw(st.lists(st.integers(1, 40), min_size=1, max_size=5))
    return ValueCodec(bits, cg, G), (B, H, T, Dv), dtype, kind, draw(st.integers(0, 2 ** 31 - 1)), chunks


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_case())
def test_fuzz_half_bin_bound_and_append(case):
    vc, shape, dtype, kind, seed, chunks = case
    values = make_values(shape, kind, dtype, seed, channel_group=vc.channel_group)
    whole = check_roundtrip(values, vc)
    assert_same_state(chunked_state(values, vc, chunks), whole)


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("S, is_causal", [(1, False), (4, True)])
@pytest.mark.parametrize("ratio", [1, 4])
@pytest.mark.parametrize("mask_kind", [None, "bool"])
@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("bits", BITS)
def test_attention_is_codec_attention_over_decoded_values(S, is_causal, ratio, mask_kind, softcap, bits):
    B, Hkv, T, D, Dv = 2, 2, 45, 16, 32
    kc, vc = Codec(4, 4, 16, Pairing("half")), ValueCodec(bits, 8, 16)
    g = torch.Generator().manual_seed(S + 10 * ratio + bits)
    keys, values = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, Dv, generator=g) * 2
    q = torch.randn(B, Hkv * ratio, S, D, generator=g)
    mask = None
    if mask_kind:
        mask = torch.rand(B, 1, S, T, generator=g) > 0.3
        mask[..., -1] = True
    kd, vd = C.encode(keys, kc), V.encode(values, vc)
    kw = {"mask": mask, "softcap": softcap, "is_causal": is_causal}
    out = V.attention(q, kd, T, vd, kc, vc, **kw)
    assert out.shape == (B, Hkv * ratio, S, Dv) and out.dtype == q.dtype
    # the reference is codec.attention with the values' fp32 reconstruction, bit for bit
    assert torch.equal(out, C.attention(q, kd, T, V.decode(vd, T, vc, dtype=torch.float32), kc, **kw))
    # against dense values: softmax weights sum to 1, so each output channel moves by at most the largest
    # reconstruction error of that channel over the tokens (plus the fp32 rounding of the weighted sum)
    dense = C.attention(q, kd, T, values, kc, **kw)
    Tc = vd.codes.shape[2]
    err = (V.dequantize(vd, vc) - values[:, :, :Tc]).abs().amax(2)  # [B, Hkv, Dv]
    bound = err.repeat_interleave(ratio, 1).unsqueeze(2) + T * EPS32 * values.abs().max()
    assert ((out - dense).abs() <= bound).all()
    assert (out - dense).abs().max() > 0  # the values really are quantized


def test_attention_all_tail_equals_dense_values():
    kc, vc = Codec(4, 4, 16, Pairing("half")), ValueCodec(2, 8, 16)
    g = torch.Generator().manual_seed(3)
    keys, values, q = torch.randn(1, 2, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g), torch.randn(
        1, 2, 1, 8, generator=g)
    kd, vd = C.encode(keys, kc), V.encode(values, vc)
    assert torch.equal(V.attention(q, kd, 12, vd, kc, vc), C.attention(q, kd, 12, values, kc))


def test_attention_shape_errors():
    kc, vc = Codec(4, 4, 16, Pairing("half")), ValueCodec(4, 8, 16)
    kd = C.encode(make_values((1, 2, 20, 8)), kc)
    q = make_values((1, 2, 1, 8))
    with pytest.raises(ValueError, match=r"v shape \(1, 3, 20, 16\)"):  # values of another head count
        V.attention(q, kd, 20, V.encode(make_values((1, 3, 20, 16)), vc), kc, vc)
    with pytest.raises(ValueError, match="seq_len=20"):  # values of another length
        V.attention(q, kd, 20, V.encode(make_values((1, 2, 21, 16)), vc), kc, vc)


# --------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cg, Dv", [(4, 8), (64, 64), (64, 128), (32, 128)])
@pytest.mark.parametrize("T", [0, 1, 31, 32, 100])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nbytes_matches_state_bits(bits, cg, Dv, T, dtype):
    vc = ValueCodec(bits, cg, 32)
    B, H = 2, 3
    state = V.encode(make_values((B, H, T, Dv), dtype=dtype), vc)
    dt_bits = torch.finfo(dtype).bits
    assert V.nbytes(state) * 8 == B * H * V.state_bits(vc, T, Dv, tail_bits=dt_bits)
    # independently: Dv*bits code bits and Dv/cg bf16 (min, scale) per encoded token, tail + padding
    Tc = T // 32 * 32
    expect = Tc * (Dv * bits + Dv // cg * 2 * 16) + (T % 32 + C.TAIL_PAD) * Dv * dt_bits
    assert V.state_bits(vc, T, Dv, tail_bits=dt_bits) == expect
    if T:
        assert V.bits_per_element(vc, T, Dv, dt_bits) == expect / (T * Dv)


@pytest.mark.parametrize("bits, cg, expect", [(4, 64, 4.5), (2, 64, 2.5), (8, 64, 8.5), (4, 32, 5.0), (2, 128, 2.25)])
def test_steady_bits_per_element(bits, cg, expect):
    vc = ValueCodec(bits, cg, 128)
    assert V.steady_bits_per_element(vc, 128) == pytest.approx(expect)  # bits + 2 * 16 / cg
    # the tail amortizes away: long caches approach the steady rate from above
    long = V.bits_per_element(vc, 1000 * 128, 128)
    assert expect < long < expect + 0.01


def test_sub_byte_codes_are_really_packed():
    values = make_values((1, 1, 64, 128))
    sizes = {bits: V.encode(values, ValueCodec(bits, 64, 32)).codes.shape[-1] for bits in BITS}
    assert sizes == {2: 32, 4: 64, 8: 128}
    assert [ValueCodec(b, 64).code_bytes(128) for b in BITS] == [32, 64, 128]


# --------------------------------------------------------------------------- options and bad input


def test_from_config_and_check_fits():
    assert ValueCodec.from_config(PolarQuantConfig()) is None  # values dense by default
    cfg = PolarQuantConfig(value_bits=2, value_group=32, group_size=256)
    assert ValueCodec.from_config(cfg) == ValueCodec(2, 32, 256)
    for D in (32, 64, 128, 256):
        assert V.check_fits(cfg, D) is None
    for D in (16, 48, 80, 96 + 8):
        reason = V.check_fits(cfg, D)
        assert f"head_dim={D}" in reason and "value_group=32" in reason
    assert V.check_fits(PolarQuantConfig(), 80) is None  # dense values fit any head_dim


@pytest.mark.parametrize("bits, cg, text", [
    (3, 8, "value_bits=3 is invalid; allowed: 2, 4, 8"),
    (None, 8, "value_bits=None is invalid; allowed: 2, 4, 8"),
    (16, 8, "value_bits=16"),
    (4.0, 8, "value_bits=4.0"),
    (4, 48, "value_group=48 is invalid; allowed: a power of two >= 2"),
    (4, 1, "value_group=1"),
    (4, 0, "value_group=0"),
    (2, 2, "value_group=2 is invalid with value_bits=2; allowed: a power of two >= 4"),
])
def test_invalid_value_codec_raises(bits, cg, text):
    with pytest.raises(ValueError, match="ValueCodec") as info:
        ValueCodec(bits, cg, 16)
    assert text in str(info.value)


def test_invalid_group_size_raises():
    with pytest.raises(ValueError, match="group_size=0"):
        ValueCodec(4, 8, 0)


@pytest.mark.parametrize("Dv", [12, 4, 20])
def test_head_dim_not_divisible_raises(Dv):
    vc = ValueCodec(4, 8, 16)
    with pytest.raises(ValueError, match=rf"values shape \(1, 2, 20, {Dv}\).*head_dim={Dv}.*value_group=8"):
        V.encode(make_values((1, 2, 20, Dv)), vc)
    with pytest.raises(ValueError, match=rf"head_dim={Dv}.*value_group=8"):
        V.empty(vc, 1, 2, Dv, torch.float32)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.uint8, torch.bool])
def test_wrong_dtype_raises_type_error(dtype):
    vc = ValueCodec(4, 8, 16)
    values = torch.ones(1, 2, 20, 16, dtype=dtype)
    with pytest.raises(TypeError, match=rf"values must be float16, bfloat16 or float32, got {dtype}"):
        V.encode(values, vc)
    state = V.encode(make_values((1, 2, 20, 16)), vc)
    with pytest.raises(TypeError, match=rf"new_values .*{dtype}"):
        V.append(state, 20, values[:, :, :1], vc)
    with pytest.raises(TypeError, match=str(dtype)):
        V.empty(vc, 1, 2, 16, dtype)


def test_not_a_tensor_raises_type_error():
    with pytest.raises(TypeError, match="values must be a torch.Tensor, got list"):
        V.encode([[1.0, 2.0]], ValueCodec())


@pytest.mark.parametrize("shape", [(2, 20, 8), (20, 8), (1, 1, 2, 20, 8)])
def test_wrong_rank_raises(shape):
    with pytest.raises(ValueError, match=r"values must be \[B, H, T, Dv\], got shape " + str(shape).replace(
            "(", r"\(").replace(")", r"\)")):
        V.encode(torch.ones(shape), ValueCodec(4, 8, 16))


def test_messages_show_shapes_not_tensors():
    vc = ValueCodec(4, 8, 16)
    values = make_values((1, 2, 20, 12))
    with pytest.raises(ValueError) as info:
        V.encode(values, vc)
    assert "tensor(" not in str(info.value) and "(1, 2, 20, 12)" in str(info.value)
    assert len(str(info.value)) < 200  # short: no dumped data
