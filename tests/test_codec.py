"""Reference PolarQuant codec (pqcompile.codec): round-trip bounds, LUT attention, append, packing, bad input.

Every bound is derived from the quantizer: a value v in a group with stored (min, scale) is reconstructed at
the midpoint of its bin, so |v - v_hat| <= scale / 2, plus the fp32 rounding of the quantizer's own
arithmetic (a few ulps of the group's range).
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqcompile import codec as C
from pqcompile.codec import Codec, Pairing
from pqcompile.config import PairingMode

EPS32 = torch.finfo(torch.float32).eps
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PAIRINGS = [
    Pairing("half"),
    Pairing("interleaved"),
    Pairing("half", 4),
    Pairing("interleaved", 4),
]


def make_keys(shape, kind="normal", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, _, D = shape
    if kind == "zeros":
        k = torch.zeros(shape)
    elif kind == "constant":  # every group has zero range in radius and angle
        k = torch.randn(B, H, 1, D, generator=g).expand(shape).clone()
    elif kind == "huge":
        k = torch.randn(shape, generator=g) * 1e30
    elif kind == "outliers":  # RoPE-like: a few channels much larger than the rest
        k = torch.randn(shape, generator=g) * (1 + 20 * torch.rand(D, generator=g) ** 8)
    elif kind == "partly_constant":  # half the pairs constant over time, the rest random
        k = torch.randn(shape, generator=g)
        k[..., : D // 4] = k[..., :1, : D // 4]
        k[..., D // 2: D // 2 + D // 4] = k[..., :1, D // 2: D // 2 + D // 4]
    else:
        k = torch.randn(shape, generator=g) * 3
    return k.to(dtype)


def check_roundtrip(keys: torch.Tensor, codec: Codec) -> None:
    """The state of `keys` reconstructs every radius/angle within half a bin of its group, the tail exactly."""
    B, H, T, D = keys.shape
    G, P = codec.group_size, D // 2
    n = T // G
    state = C.encode(keys, codec)
    # layout (module docstring of codec.py)
    assert state.codes.shape == (B, H, n * G, math.ceil(P * codec.code_bits / 8))
    assert state.codes.dtype == torch.uint8
    assert state.params.shape == (B, H, n, 4, P)
    assert state.tail.shape == (B, H, T % G + C.TAIL_PAD, D)
    assert state.tail.dtype == keys.dtype
    # tail: the newest T % G tokens bit-identical, padding zero
    assert torch.equal(state.tail[:, :, : T % G], keys[:, :, n * G:])
    assert not state.tail[:, :, T % G:].any()

    dense = C.decode(state, T, codec)
    assert dense.shape == keys.shape and dense.dtype == keys.dtype
    assert torch.isfinite(dense).all()
    assert torch.equal(dense[:, :, n * G:], keys[:, :, n * G:])
    if n == 0:
        return

    r, phi = C.to_polar(keys[:, :, : n * G], codec.pairing)  # [B, H, n*G, P] fp32
    r_hat, phi_hat = C.decode_polar(state, codec, D)
    p = state.params.float()  # [B, H, n, 4, P]
    for v, v_hat, vmin, scale, bits, name in (
        (r, r_hat, p[:, :, :, 0], p[:, :, :, 1], codec.radius_bits, "radius"),
        (phi, phi_hat, p[:, :, :, 2], p[:, :, :, 3], codec.angle_bits, "angle"),
    ):
        assert (scale >= 0).all()
        v, v_hat = v.view(B, H, n, G, P), v_hat.view(B, H, n, G, P)
        # the stored range covers the group: min <= v <= min + 2^bits * scale
        vmin_, top = vmin.unsqueeze(3), (vmin + (1 << bits) * scale).unsqueeze(3)
        span = vmin_.abs() + top.abs()
        assert (v >= vmin_).all(), name
        assert (v <= top + 4 * EPS32 * span).all(), name
        bound = scale.unsqueeze(3) / 2 + 4 * EPS32 * span
        err = (v - v_hat).abs()
        assert (err <= bound).all(), f"{name}: worst error / half bin = {(err / bound).max().item():.3f}"

    # dense keys: per pair |(x, y) - (x_hat, y_hat)| <= |r - r_hat| + r_hat |phi - phi_hat|, rounded to dtype
    xs, ys = codec.pairing.indices(D)
    enc = dense[:, :, : n * G].float()
    orig = keys[:, :, : n * G].float()
    pair_err = torch.hypot(enc[..., xs] - orig[..., xs], enc[..., ys] - orig[..., ys]).view(B, H, n, G, P)
    r_hat_g = r_hat.view(B, H, n, G, P)
    eps_dt = torch.finfo(keys.dtype).eps
    bound = (p[:, :, :, 1].unsqueeze(3) / 2 + r_hat_g * p[:, :, :, 3].unsqueeze(3) / 2
             + (8 * EPS32 + eps_dt) * (r_hat_g + r.view(B, H, n, G, P)))
    assert (pair_err <= bound).all(), f"dense: worst error / bound = {(pair_err / bound).max().item():.3f}"


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("bits", [(4, 4), (3, 3), (2, 2), (3, 5), (1, 1), (7, 1), (1, 7)])
@pytest.mark.parametrize("pairing", PAIRINGS, ids=str)
def test_roundtrip_half_bin(bits, pairing):
    codec = Codec(*bits, 16, pairing)
    check_roundtrip(make_keys((2, 3, 37, 8), "outliers", seed=sum(bits)), codec)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [5, 16, 32, 47, 97])
def test_roundtrip_dtypes_and_lengths(dtype, T):
    check_roundtrip(make_keys((1, 2, T, 16), dtype=dtype, seed=T), Codec(4, 4, 16, Pairing("half")))


@pytest.mark.parametrize("kind", ["zeros", "constant", "partly_constant"])
def test_zero_range_groups(kind):
    codec = Codec(4, 4, 16, Pairing("half"))
    keys = make_keys((1, 2, 48, 8), kind)
    check_roundtrip(keys, codec)
    state = C.encode(keys, codec)
    if kind != "partly_constant":
        # v = min exactly when it is representable; otherwise the bin is a bf16 rounding gap
        dense = C.decode(state, 48, codec)
        assert torch.isfinite(dense).all()
        r, _ = C.to_polar(keys, codec.pairing)
        assert (state.params[:, :, :, 1].float() <= r.amax() * 2 ** -8 / 16 + 1e-38).all()


def test_zeros_decode_to_zeros():
    codec = Codec(4, 4, 16, Pairing("interleaved"))
    keys = torch.zeros(1, 1, 40, 8)
    assert torch.equal(C.decode(C.encode(keys, codec), 40, codec), keys)


def test_huge_values_fp32():
    codec = Codec(4, 4, 16, Pairing("half"))
    keys = make_keys((1, 2, 40, 8), "huge")
    check_roundtrip(keys, codec)
    dense = C.decode(C.encode(keys, codec), 40, codec)
    assert torch.isfinite(dense).all()
    # a 4-bit angle over at most 2*pi and a 4-bit radius: relative error well under 1
    assert ((dense.double() - keys.double()).norm() / keys.double().norm()) < 0.5


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 20, 39])  # inside the first group, a later group, the tail
def test_non_finite_raises(bad, where):
    codec = Codec(4, 4, 16, Pairing("half"))
    keys = make_keys((1, 2, 40, 8))
    keys[0, 1, where, 3] = bad
    with pytest.raises(ValueError, match=r"inf or NaN.*\(1, 2, 40, 8\)"):
        C.encode(keys, codec)
    state = C.encode(keys[:, :, :where], codec)
    with pytest.raises(ValueError, match="new_keys"):
        C.append(state, where, keys[:, :, where:], codec)


@st.composite
def fuzz_case(draw):
    r = draw(st.integers(1, 7))
    a = draw(st.integers(1, 8 - r))
    G = draw(st.sampled_from([16, 32]))
    D = draw(st.sampled_from([2, 4, 6, 8, 12, 16]))
    layout = draw(st.sampled_from(["half", "interleaved"]))
    rot = draw(st.sampled_from([None] + [x for x in range(2, D, 2)]))
    T = draw(st.one_of(st.integers(0, 3 * G + 1), st.sampled_from([G - 1, G, G + 1, 2 * G])))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["normal", "outliers", "zeros", "constant", "partly_constant", "huge"]))
    if kind == "huge":
        dtype = torch.float32
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return Codec(r, a, G, Pairing(layout, rot)), (B, H, T, D), dtype, kind, seed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_case())
def test_fuzz_roundtrip(case):
    codec, shape, dtype, kind, seed = case
    check_roundtrip(make_keys(shape, kind, dtype, seed), codec)


@settings(max_examples=60, deadline=None)
@given(fuzz_case(), st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_fuzz_append_chunks_equal_encode_all(case, chunks):
    codec, shape, dtype, kind, seed = case
    keys = make_keys(shape, kind, dtype, seed)
    T = shape[2]
    cuts = [0]
    for c in chunks:
        cuts.append(min(cuts[-1] + c, T))
    cuts.append(T)
    state = C.encode(keys[:, :, :0], codec)
    for lo, hi in itertools.pairwise(cuts):
        if hi > lo:
            state = C.append(state, lo, keys[:, :, lo:hi], codec)
    whole = C.encode(keys, codec)
    for got, want in zip(state, whole):
        assert got.dtype == want.dtype and torch.equal(got, want)


# --------------------------------------------------------------------------- append


@pytest.mark.parametrize("bits", [(4, 4), (3, 3), (2, 5)])
@pytest.mark.parametrize("pairing", PAIRINGS, ids=str)
def test_append_one_token_at_a_time_equals_encode_all(bits, pairing):
    codec = Codec(*bits, 16, pairing)
    keys = make_keys((2, 2, 53, 8), "outliers", seed=7)
    state = C.encode(keys[:, :, :3], codec)  # a prefill shorter than one group
    for t in range(3, 53):
        state = C.append(state, t, keys[:, :, t: t + 1], codec)
        if t + 1 in (16, 32, 48):  # a group was just flushed: the tail holds only padding
            assert state.tail.shape[2] == C.TAIL_PAD
    whole = C.encode(keys, codec)
    for name, got, want in zip(C.PolarData._fields, state, whole):
        assert torch.equal(got, want), name


def test_append_mismatched_state_raises():
    codec = Codec(4, 4, 16, Pairing("half"))
    state = C.encode(make_keys((1, 2, 20, 8)), codec)
    with pytest.raises(ValueError, match=r"new_keys shape \(1, 2, 1, 6\)"):
        C.append(state, 20, make_keys((1, 2, 1, 6)), codec)
    with pytest.raises(ValueError, match=r"new_keys shape \(2, 2, 1, 8\)"):
        C.append(state, 20, make_keys((2, 2, 1, 8)), codec)
    with pytest.raises(ValueError, match="20|21"):
        C.append(state, 21, make_keys((1, 2, 1, 8)), codec)  # wrong seq_len for this tail


# --------------------------------------------------------------------------- attention over the codes


def decode64(state, codec, T, D):
    """Independent fp64 reconstruction of the keys the codes stand for (the exact target of the LUT)."""
    B, H, Tc, _ = state.codes.shape
    G, P = codec.group_size, D // 2
    code = C.unpack_codes(state.codes, codec.code_bits, P).long().view(B, H, Tc // G, G, P)
    c_r, c_a = code % (1 << codec.radius_bits), code >> codec.radius_bits
    p = state.params.double().unsqueeze(3)
    r = (p[..., 0, :] + (c_r + 0.5) * p[..., 1, :]).view(B, H, Tc, P)
    phi = (p[..., 2, :] + (c_a + 0.5) * p[..., 3, :]).view(B, H, Tc, P)
    xs, ys = codec.pairing.indices(D)
    k = torch.empty(B, H, Tc, D, dtype=torch.float64)
    k[..., xs], k[..., ys] = r * torch.cos(phi), r * torch.sin(phi)
    return torch.cat([k, state.tail[:, :, : T - Tc].double()], dim=2)


def manual_attention(q, k, v, mask, scale, softcap, is_causal):
    """Dense reference: q [B, Hq, S, D], k [B, Hkv, T, D], v [B, Hkv|Hq, T, Dv]; causal aligned bottom-right."""
    Hq, S, T = q.shape[1], q.shape[2], k.shape[2]
    k = k.repeat_interleave(Hq // k.shape[1], dim=1)
    v = v.repeat_interleave(Hq // v.shape[1], dim=1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if is_causal:
        s = s.masked_fill(~torch.ones(S, T, dtype=torch.bool).tril(T - S), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    return torch.softmax(s, dim=-1) @ v


def check_attention_error(out, plain, exact, q, k, v, scale):
    """flash-attention's rule: the LUT path's error against the fp64 reference is at most 2x that of plain fp32
    attention on the decoded keys, plus the fp32 rounding floor of the logits: a few ulps of
    scale * sum_j |q_j k_j| (Higham's dot-product bound), carried to the output by at most max |v|."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logit_mag = (scale * (q.double().abs() @ k.double().abs().transpose(-1, -2))).max().item()
    floor = 4 * EPS32 * logit_mag * v.abs().max().item()
    err_lut = (out.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    assert err_lut <= 2 * err_plain + floor, (err_lut, err_plain, floor)


def make_mask(kind, B, S, T, seed):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    keep = torch.rand(B, 1, S, T, generator=g) > 0.3
    keep[..., -1] = True  # no fully masked row (the causal diagonal is the last key)
    if kind == "bool":
        return keep
    return torch.where(keep, -torch.rand(B, 1, S, T, generator=g) * 3, torch.tensor(float("-inf")))


@pytest.mark.parametrize("S, is_causal", [(1, False), (1, True), (4, True), (4, False)])
@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_lut_attention_matches_dense_sdpa(S, is_causal, ratio, mask_kind, scale):
    B, Hkv, T, D, Dv = 2, 2, 45, 16, 8
    codec = Codec(4, 4, 16, Pairing("half"))
    seed = S * 100 + ratio * 10 + (mask_kind is not None)
    keys = make_keys((B, Hkv, T, D), "outliers", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(B, Hkv * ratio, S, D, generator=g)
    v = torch.randn(B, Hkv, T, Dv, generator=g)
    mask = make_mask(mask_kind, B, S, T, seed)
    state = C.encode(keys, codec)

    out = C.attention(q, state, T, v, codec, mask=mask, scale=scale, is_causal=is_causal)
    assert out.shape == (B, Hkv * ratio, S, Dv) and out.dtype == q.dtype

    # dense SDPA on the decoded keys (explicit bottom-right causal mask: SDPA's is_causal is top-left)
    dense_k = C.decode(state, T, codec)
    sdpa_mask = mask
    if is_causal:
        causal = torch.ones(S, T, dtype=torch.bool).tril(T - S)
        if mask is None:
            sdpa_mask = causal
        elif mask.dtype == torch.bool:
            sdpa_mask = mask & causal
        else:
            sdpa_mask = mask.masked_fill(~causal, float("-inf"))
    sdpa = F.scaled_dot_product_attention(q, dense_k.repeat_interleave(ratio, 1), v.repeat_interleave(ratio, 1),
                                          attn_mask=sdpa_mask, scale=scale)
    exact = manual_attention(q.double(), decode64(state, codec, T, D), v.double(), mask, scale, None, is_causal)
    check_attention_error(out, sdpa, exact, q, dense_k, v, scale)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_query_gets_zeros_like_sdpa(kind):
    """A padding row (left-padded batch) may see no key at all: torch SDPA gives 0 there, and so must we (NaN
    would flow into every later token through the padded positions' values)."""
    codec = Codec(4, 4, 16, Pairing("half"))
    g = torch.Generator().manual_seed(7)
    keys, q, v = torch.randn(2, 2, 37, 16, generator=g), torch.randn(2, 4, 3, 16, generator=g), torch.randn(
        2, 2, 37, 8, generator=g)
    keep = torch.ones(2, 1, 3, 37, dtype=torch.bool)
    keep[1, :, 0] = False  # batch 1, query 0: nothing visible
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    state = C.encode(keys, codec)
    out = C.attention(q, state, 37, v, codec, mask=mask)
    sdpa = F.scaled_dot_product_attention(q, C.decode(state, 37, codec).repeat_interleave(2, 1),
                                          v.repeat_interleave(2, 1), attn_mask=mask)
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0])) and torch.equal(sdpa[1, :, 0], out[1, :, 0])
    torch.testing.assert_close(out[0], sdpa[0], rtol=1e-4, atol=1e-5)
    poisoned = C.PolarData(state.codes, state.params.clone().fill_(float("nan")), state.tail)
    assert C.attention(q, poisoned, 37, v, codec, mask=mask)[0].isnan().all()  # NaN input: still NaN


@pytest.mark.parametrize("softcap", [5.0, 30.0])
@pytest.mark.parametrize("pairing", PAIRINGS, ids=str)
@pytest.mark.parametrize("bits", [(4, 4), (3, 3), (2, 2)])
def test_lut_attention_softcap_and_pairings(softcap, pairing, bits):
    B, Hkv, ratio, S, T, D = 1, 2, 2, 3, 70, 8
    codec = Codec(*bits, 32, pairing)
    keys = make_keys((B, Hkv, T, D), "outliers", seed=3) * 3
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, Hkv * ratio, S, D, generator=g) * 3
    v = torch.randn(B, Hkv * ratio, T, D, generator=g)  # v with the query heads' count is accepted too
    state = C.encode(keys, codec)
    out = C.attention(q, state, T, v, codec, softcap=softcap, is_causal=True)
    exact = manual_attention(q.double(), decode64(state, codec, T, D), v.double(), None, None, softcap, True)
    plain = manual_attention(q, C.decode(state, T, codec), v, None, None, softcap, True)
    check_attention_error(out, plain, exact, q, keys, v, None)
    # softcap changes the result (so the test would notice it being ignored)
    no_cap = C.attention(q, state, T, v, codec, is_causal=True)
    assert (no_cap - out).abs().max() > 1e-3


@pytest.mark.parametrize("pairing", PAIRINGS, ids=str)
@pytest.mark.parametrize("bits", [(4, 4), (3, 3), (2, 2), (1, 7)])
def test_polar_scores_are_the_lut_sum(bits, pairing):
    """polar_scores is docs/design.md §1.4's sum, term by term: score = sum_j r_j LUT[j][c_j] with
    LUT[j][c] = q_xj cos(phi_c) + q_yj sin(phi_c), here in fp64 straight from the stored codes and params."""
    B, Hkv, R, S, T, D, G = 2, 2, 3, 4, 48, 8, 16
    codec = Codec(*bits, G, pairing)
    state = C.encode(make_keys((B, Hkv, T, D), "outliers", seed=5), codec)
    q = torch.randn(B, Hkv * R, S, D, generator=torch.Generator().manual_seed(6)) * 3
    P, A = D // 2, 1 << codec.angle_bits
    code = C.unpack_codes(state.codes, codec.code_bits, P).long()  # [B, Hkv, T, P]
    c_r, c_a = code & ((1 << codec.radius_bits) - 1), code >> codec.radius_bits
    p = state.params.double().repeat_interleave(G, dim=2)  # [B, Hkv, T, 4, P]: each token's group
    r = p[..., 0, :] + (c_r + 0.5) * p[..., 1, :]  # [B, Hkv, T, P]
    phi = p[..., 2, :, None] + (torch.arange(A) + 0.5) * p[..., 3, :, None]  # [B, Hkv, T, P, A]
    xs, ys = pairing.indices(D)
    qx = q[..., xs].double().view(B, Hkv, R, S, 1, P, 1)
    qy = q[..., ys].double().view(B, Hkv, R, S, 1, P, 1)
    lut = qx * phi.cos()[:, :, None, None] + qy * phi.sin()[:, :, None, None]  # [B, Hkv, R, S, T, P, A]
    picked = lut.gather(-1, c_a[:, :, None, None, :, :, None].expand(B, Hkv, R, S, T, P, 1)).squeeze(-1)
    want = (r[:, :, None, None] * picked).sum(-1).view(B, Hkv * R, S, T)
    got = C.polar_scores(q, state, codec)
    assert got.shape == (B, Hkv * R, S, T) and got.dtype == torch.float32
    # fp32 arithmetic: each term r (q_x cos + q_y sin) within a few ulps (phi, cos/sin, products), plus the
    # rounding of a sum of D terms
    mag = (r[:, :, None, None] * (qx.abs() + qy.abs()).squeeze(-1)).sum(-1).view(B, Hkv * R, S, T)
    assert ((got.double() - want).abs() <= (D + 16) * EPS32 * mag).all()


@pytest.mark.parametrize("T", [10, 32])  # all tail / no tail
def test_lut_attention_edge_lengths(T):
    codec = Codec(4, 4, 16, Pairing("interleaved"))
    keys = make_keys((1, 1, T, 8), seed=T)
    q, v = make_keys((1, 2, 1, 8), seed=1), make_keys((1, 1, T, 4), seed=2)
    state = C.encode(keys, codec)
    out = C.attention(q, state, T, v, codec)
    plain = manual_attention(q, C.decode(state, T, codec), v, None, None, None, False)
    exact = manual_attention(q.double(), decode64(state, codec, T, 8), v.double(), None, None, None, False)
    check_attention_error(out, plain, exact, q, keys, v, None)


def test_attention_shape_errors():
    codec = Codec(4, 4, 16, Pairing("half"))
    state = C.encode(make_keys((1, 2, 20, 8)), codec)
    v = make_keys((1, 2, 20, 8))
    with pytest.raises(ValueError, match=r"q shape \(1, 3, 1, 8\)"):  # 3 query heads over 2 kv-heads
        C.attention(make_keys((1, 3, 1, 8)), state, 20, v, codec)
    with pytest.raises(ValueError, match=r"q shape \(1, 2, 1, 6\)"):
        C.attention(make_keys((1, 2, 1, 6)), state, 20, v, codec)
    with pytest.raises(ValueError, match=r"v shape \(1, 2, 19, 8\)"):
        C.attention(make_keys((1, 2, 1, 8)), state, 20, v[:, :, :19], codec)


# --------------------------------------------------------------------------- packing and accounting


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("P", [1, 3, 4, 7, 8, 64])
def test_pack_unpack_roundtrip(bits, P):
    g = torch.Generator().manual_seed(bits * 100 + P)
    codes = torch.randint(0, 1 << bits, (2, 3, 5, P), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = C.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, math.ceil(P * bits / 8))
    assert torch.equal(C.unpack_codes(packed, bits, P), codes)
    # documented layout: pair j at bits [j*bits, (j+1)*bits) of the row, little-endian
    row = codes[1, 2, 4].tolist()
    stream = sum(c << (j * bits) for j, c in enumerate(row))
    assert packed[1, 2, 4].tolist() == list(stream.to_bytes(packed.shape[-1], "little"))


@pytest.mark.parametrize("bits", [(4, 4), (3, 3), (2, 2), (3, 5), (1, 1), (1, 6)])
@pytest.mark.parametrize("D", [8, 64, 128])
@pytest.mark.parametrize("T", [0, 1, 31, 32, 100])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nbytes_matches_state_bits(bits, D, T, dtype):
    codec = Codec(*bits, 32, Pairing("half"))
    B, H = 2, 3
    state = C.encode(make_keys((B, H, T, D), dtype=dtype), codec)
    dt_bits = torch.finfo(dtype).bits
    assert C.nbytes(state) * 8 == B * H * C.state_bits(codec, T, D, tail_bits=dt_bits)
    # independently: codes ceil(P*w/8) bytes per token, 4 bf16 params per group and pair, tail + padding
    P, G = D // 2, 32
    expect = (T // G * G * math.ceil(P * sum(bits) / 8) * 8 + T // G * 4 * P * 16
              + (T % G + C.TAIL_PAD) * D * dt_bits)
    assert C.state_bits(codec, T, D, tail_bits=dt_bits) == expect
    if T:
        assert C.bits_per_element(codec, T, D, dt_bits) == expect / (T * D)


@pytest.mark.parametrize("bits, G, D", [((4, 4), 128, 128), ((3, 3), 128, 64), ((2, 2), 64, 128), ((4, 4), 32, 64)])
def test_steady_bits_per_element(bits, G, D):
    codec = Codec(*bits, G, Pairing("half"))
    P = D // 2
    expect = (math.ceil(P * sum(bits) / 8) * 8 + 4 * P * 16 / G) / D
    assert C.steady_bits_per_element(codec, D) == pytest.approx(expect)
    if P * sum(bits) % 8 == 0:  # w/2 code bits + 4 bf16 numbers per G tokens and pair
        assert expect == pytest.approx(sum(bits) / 2 + 32 / G)
    # the tail amortizes away: long caches approach the steady rate from above
    long = C.bits_per_element(codec, 1000 * G, D)
    assert expect < long < expect + 0.01


def test_sub_byte_codes_are_really_packed():
    keys = make_keys((1, 1, 64, 128))
    sizes = {bits: C.encode(keys, Codec(*bits, 32, Pairing("half"))).codes.shape[-1]
             for bits in [(4, 4), (3, 3), (2, 2), (1, 1)]}
    assert sizes == {(4, 4): 64, (3, 3): 48, (2, 2): 32, (1, 1): 16}


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.uint8, torch.bool])
def test_wrong_dtype_raises_type_error(dtype):
    codec = Codec(4, 4, 16, Pairing("half"))
    keys = torch.zeros(1, 2, 20, 8, dtype=dtype)
    with pytest.raises(TypeError, match=rf"keys .*{dtype}"):
        C.encode(keys, codec)
    state = C.encode(torch.zeros(1, 2, 20, 8), codec)
    with pytest.raises(TypeError, match=rf"new_keys .*{dtype}"):
        C.append(state, 20, keys[:, :, :1], codec)


def test_not_a_tensor_raises_type_error():
    with pytest.raises(TypeError, match="keys"):
        C.encode([[1.0, 2.0]], Codec())


@pytest.mark.parametrize("shape", [(1, 2, 20, 7), (1, 2, 20, 1)])
def test_odd_head_dim_raises(shape):
    with pytest.raises(ValueError, match=rf"keys .*{tuple(shape)}".replace("(", r"\(").replace(")", r"\)")):
        C.encode(torch.zeros(shape), Codec(4, 4, 16, Pairing("half")))


@pytest.mark.parametrize("shape", [(2, 20, 8), (20, 8), (1, 1, 2, 20, 8)])
def test_wrong_rank_raises(shape):
    with pytest.raises(ValueError, match=r"keys must be \[B, H, T, D\], got shape " + str(shape).replace(
            "(", r"\(").replace(")", r"\)")):
        C.encode(torch.zeros(shape), Codec(4, 4, 16, Pairing("half")))


@pytest.mark.parametrize("pairing, D", [(Pairing("half", 3), 8), (Pairing("half", 10), 8),
                                        (Pairing("interleaved", 5), 8), (Pairing("half", 0), 8)])
def test_pairing_that_does_not_fit_raises(pairing, D):
    with pytest.raises(ValueError, match=f"head_dim={D}"):
        C.encode(torch.zeros(1, 1, 4, D), Codec(4, 4, 16, pairing))


def test_pairing_auto_is_rejected():
    with pytest.raises(ValueError, match="auto"):
        Pairing(PairingMode.AUTO)


@pytest.mark.parametrize("pairing, D, xs, ys", [
    (Pairing("half"), 8, [0, 1, 2, 3], [4, 5, 6, 7]),
    (Pairing("interleaved"), 8, [0, 2, 4, 6], [1, 3, 5, 7]),
    (Pairing("half", 4), 8, [0, 1, 4, 5], [2, 3, 6, 7]),
    (Pairing("interleaved", 4), 8, [0, 2, 4, 5], [1, 3, 6, 7]),
])
def test_pairing_indices(pairing, D, xs, ys):
    assert pairing.indices(D) == (xs, ys)
    assert Pairing.parse(str(pairing)) == pairing
