"""Compressed values in the kernels vs pqcompile.value_codec (the ground truth), fresh random inputs.

Attention reads packed values (codes + per-token (min, scale)) and dequantizes them in registers; the value
encode (append_values) and the static write (static_write_values) must give the reference's codes bit for bit
(the quantizer is exact: min, max, scale and floor((v - min) / scale) are the same fp32 operations). Buffers the
wrappers allocate start poisoned (NaN / 0xFF), static buffers start as garbage.
"""

import pytest
import torch

from pqcompile import codec as ref
from pqcompile import kernels
from pqcompile import value_codec as vref
from pqcompile.value_codec import ValueCodec, ValueData

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the kernels run in the Triton interpreter
TOL = {torch.float32: 1e-4 if DEVICE == "cpu" else 3e-3, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def make_mask(kind, B, Hq, S, T):
    if kind == "bool":  # per (batch, query) with some keys hidden; the newest key always visible
        m = torch.rand(B, 1, S, T, device=DEVICE) > 0.3
        m[..., -1] = True
        return m
    if kind == "pad":  # 2D padding mask broadcast over heads and queries: left padding per sequence
        m = torch.ones(B, 1, 1, T, dtype=torch.bool, device=DEVICE)
        for b in range(B):
            m[b, ..., : b * (T // 3)] = False
        return m
    if kind == "float":
        return torch.randn(B, Hq, S, T, device=DEVICE)
    return None


def run_case(B, Hq, H, T, D, Dv, S, vbits, cg, *, G=16, kbits=(4, 4), mask=None, causal=False, softcap=None,
             scale=None, dtype=torch.float32, splits=2, seed=0):
    torch.manual_seed(seed)
    c, vc = ref.Codec(*kbits, G, ref.Pairing()), ValueCodec(vbits, cg, G)
    kd = ref.encode((torch.randn(B, H, T, D, device=DEVICE) * 2).to(dtype), c)
    vd = vref.encode((torch.randn(B, H, T, Dv, device=DEVICE) * 3 + 1).to(dtype), vc)
    q = torch.randn(B, Hq, S, D, device=DEVICE).to(dtype)
    kw = {"mask": make_mask(mask, B, Hq, S, T), "is_causal": causal, "softcap": softcap, "scale": scale}
    out = kernels.attention(q, kd, T, vd, c, vcodec=vc, num_splits=splits, **kw)
    want = vref.attention(q, kd, T, vd, c, vc, **kw)
    assert out.shape == want.shape == (B, Hq, S, Dv) and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"
    return out


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("B, Hq, H, T, D, Dv, S, vbits, cg, G, mask, causal, dtype", [
    (2, 4, 2, 37, 64, 64, 1, 4, 32, 16, None, False, torch.float32),  # odd T, GQA 2
    (1, 8, 2, 32, 128, 128, 4, 2, 64, 16, None, True, torch.float32),  # T = k*G, q_len 4 causal, GQA 4
    (1, 6, 2, 11, 64, 64, 1, 8, 32, 16, "bool", False, torch.float32),  # T < G: the tail only
    (2, 4, 1, 97 + 128, 64, 128, 1, 4, 64, 128, "bool", False, torch.float32),  # Dv > D, G 128, MQA
    (1, 4, 2, 53, 128, 64, 4, 2, 32, 16, "float", True, torch.bfloat16),  # Dv < D
    (3, 4, 2, 48, 64, 64, 1, 8, 64, 16, "pad", False, torch.float16),
    (1, 4, 4, 40, 64, 96, 2, 4, 32, 16, None, True, torch.float32),  # Dv 96: a padded channel group
    (1, 4, 2, 30, 64, 64, 1, 4, 2, 16, None, False, torch.float32),  # the smallest groups (one byte)
    (1, 4, 2, 30, 64, 64, 1, 2, 4, 16, "float", False, torch.bfloat16),
    (1, 4, 2, 45, 128, 128, 1, 8, 128, 16, None, False, torch.float16),  # one group a token
])
def test_attention_matches_reference(B, Hq, H, T, D, Dv, S, vbits, cg, G, mask, causal, dtype, poisoned):
    run_case(B, Hq, H, T, D, Dv, S, vbits, cg, G=G, mask=mask, causal=causal, dtype=dtype, seed=T + vbits + cg)


@pytest.mark.parametrize("form", ["dot", "dot-bytes", "dequant"])
@pytest.mark.parametrize("B, Hq, H, T, D, Dv, S, vbits, cg, G, causal, softcap, dtype", [
    (2, 8, 2, 77, 128, 128, 1, 4, 64, 16, False, None, torch.float32),  # odd T, GQA 4, two groups a token
    (1, 4, 2, 11, 64, 64, 1, 4, 16, 16, False, None, torch.float32),  # T < G: the tail only
    (1, 8, 2, 40, 256, 256, 4, 2, 128, 32, True, None, torch.bfloat16),  # D256, q_len 4 causal
    (1, 4, 2, 45, 96, 96, 2, 8, 32, 16, True, 4.0, torch.float16),  # D96: a padded group, softcap
    (1, 4, 1, 50, 64, 128, 1, 2, 16, 16, False, None, torch.float32),  # MQA, Dv > D, the smallest dot group
    (1, 4, 2, 70, 128, 64, 3, 4, 32, 32, True, None, torch.float32),  # Dv < D
])
def test_attention_value_forms(form, B, Hq, H, T, D, Dv, S, vbits, cg, G, causal, softcap, dtype, poisoned):
    """Each way the kernel can read packed values (kernels.settings.value_form) against the reference: after
    the dot with contiguous or per-channel code loads, or dequantized before it."""
    with kernels.settings.override(value_form=form):
        run_case(B, Hq, H, T, D, Dv, S, vbits, cg, G=G, causal=causal, softcap=softcap, dtype=dtype, splits=3,
                 seed=T + D + vbits)


def test_value_form_setting_is_checked():
    with pytest.raises(ValueError, match="value_form='after'"), kernels.settings.override(value_form="after"):
        pass
    assert kernels.settings.value_form == "dot"


@pytest.mark.parametrize("splits", [None, 1, 3, 64])  # heuristic, direct store, reduce, more than blocks
def test_attention_splits(splits, poisoned):
    run_case(1, 4, 2, 75, 64, 64, 1, 4, 32, splits=splits)


def test_attention_key_widths_softcap_scale(poisoned):
    run_case(1, 4, 1, 33, 64, 64, 1, 2, 32, kbits=(3, 3), softcap=3.0, scale=0.3)
    run_case(2, 16, 1, 20, 64, 64, 16, 4, 64, kbits=(2, 2), causal=True, splits=1)  # rows beyond one row block


def test_attention_fully_masked_query_gets_zeros(poisoned):
    torch.manual_seed(3)
    c, vc = ref.Codec(4, 4, 16, ref.Pairing()), ValueCodec(4, 32, 16)
    kd = ref.encode(torch.randn(2, 2, 45, 64, device=DEVICE), c)
    vd = vref.encode(torch.randn(2, 2, 45, 64, device=DEVICE), vc)
    q = torch.randn(2, 8, 2, 64, device=DEVICE)
    mask = torch.ones(2, 1, 2, 45, dtype=torch.bool, device=DEVICE)
    mask[1, :, 0] = False
    out = kernels.attention(q, kd, 45, vd, c, vcodec=vc, mask=mask, num_splits=3)
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))
    torch.testing.assert_close(out, vref.attention(q, kd, 45, vd, c, vc, mask=mask), rtol=1e-4, atol=1e-4)


def test_attention_falls_back_past_the_kernel_head_dim():
    torch.manual_seed(4)
    c, vc = ref.Codec(4, 4, 16, ref.Pairing()), ValueCodec(4, 64, 16)
    kd = ref.encode(torch.randn(1, 1, 20, 64, device=DEVICE), c)
    vd = vref.encode(torch.randn(1, 1, 20, 320, device=DEVICE), vc)
    q = torch.randn(1, 2, 1, 64, device=DEVICE)
    out = kernels.attention(q, kd, 20, vd, c, vcodec=vc)
    torch.testing.assert_close(out, vref.attention(q, kd, 20, vd, c, vc))


def test_attention_rejects_bad_values():
    c, vc = ref.Codec(4, 4, 16, ref.Pairing()), ValueCodec(4, 32, 16)
    kd = ref.encode(torch.randn(1, 2, 20, 64, device=DEVICE), c)
    vals = torch.randn(1, 2, 20, 64, device=DEVICE)
    vd = vref.encode(vals, vc)
    q = torch.randn(1, 4, 1, 64, device=DEVICE)
    with pytest.raises(TypeError, match="ValueData"):
        kernels.attention(q, kd, 20, vals, c, vcodec=vc)
    with pytest.raises(TypeError, match="vcodec"):
        kernels.attention(q, kd, 20, vd, c)
    with pytest.raises(ValueError, match=r"\(1, 4, 16, 32\)") as e:  # values repeated to Hq heads: not packed
        rep = ValueData(*(t.repeat_interleave(2, dim=1) for t in vd))
        kernels.attention(q, kd, 20, rep, c, vcodec=vc)
    assert "tensor(" not in str(e.value)
    with pytest.raises(ValueError, match="share the group size"):
        kernels.attention(q, kd, 20, vd, c, vcodec=ValueCodec(4, 32, 32))
    with pytest.raises(ValueError, match="not divisible by value_group=64"):
        kernels.attention(q, kd, 20, vref.encode(torch.randn(1, 2, 20, 96, device=DEVICE), ValueCodec(4, 32, 16)),
                          c, vcodec=ValueCodec(4, 64, 16))
    with pytest.raises(ValueError, match=r"codes \(1, 2, 16, 32\)"):  # a state of 20 tokens, read as 36
        kernels.attention(q, ref.encode(torch.randn(1, 2, 36, 64, device=DEVICE), c), 36, vd, c, vcodec=vc)
    with pytest.raises(TypeError, match="value codes must be uint8"):
        kernels.attention(q, kd, 20, ValueData(vd.codes.int(), vd.params, vd.tail), c, vcodec=vc)


# --------------------------------------------------------------------------- append_values (encode kernel)


@pytest.mark.parametrize("vbits, cg, D, dtype", [
    (4, 32, 64, torch.float32), (2, 64, 128, torch.bfloat16), (8, 32, 96, torch.float16), (4, 2, 64, torch.float32),
    (2, 4, 64, torch.float16), (8, 128, 128, torch.bfloat16),
])
def test_append_values_matches_reference_bit_for_bit(vbits, cg, D, dtype, poisoned):
    """Prefill then decode steps crossing group boundaries: the reference's state exactly, fresh tensors."""
    torch.manual_seed(vbits * D + cg)
    vc = ValueCodec(vbits, cg, 16)
    B, H = 2, 2
    k_state = r_state = vref.empty(vc, B, H, D, dtype, DEVICE)
    T = 0
    for S in (37, 1, 10, 1, 20):
        new = torch.randn(B, H, S, D, device=DEVICE) * 4 - 1
        if S == 20:  # a constant channel group (scale 0) and a constant token
            new[:, :, 3, :cg] = 0.75
            new[:, :, 4] = -2.0
        out = kernels.append_values(k_state, T, new, vc)
        for old, fresh in zip(k_state, out):
            assert fresh.data_ptr() != old.data_ptr() or fresh.numel() == 0
        k_state, r_state, T = out, vref.append(r_state, T, new, vc), T + S
        for name, kt, rt in zip(ValueData._fields, k_state, r_state):
            assert kt.shape == rt.shape and kt.dtype == rt.dtype, name
            assert torch.equal(kt, rt), name


def test_encode_value_groups_into_writes_only_its_rows():
    torch.manual_seed(5)
    vc = ValueCodec(4, 32, 16)
    vals = torch.randn(2, 2, 21, 64, device=DEVICE)  # not a whole number of groups: the quantizer is per token
    codes = torch.full((2, 2, 40, 32), 0xAB, dtype=torch.uint8, device=DEVICE)
    params = torch.full((2, 2, 40, 2, 2), 7.0, dtype=torch.bfloat16, device=DEVICE)
    kernels.encode_value_groups_into(vals, codes, params, 5, vc)
    codes_r, params_r = vref.encode_groups(vals, vc)
    assert torch.equal(codes[:, :, 5:26], codes_r) and torch.equal(params[:, :, 5:26], params_r)
    assert (codes[:, :, :5] == 0xAB).all() and (codes[:, :, 26:] == 0xAB).all()
    assert (params[:, :, :5] == 7).all() and (params[:, :, 26:] == 7).all()


def test_strided_values_and_non_finite_poison():
    torch.manual_seed(6)
    vc = ValueCodec(2, 32, 16)
    vals = torch.randn(2, 32, 3, 64, device=DEVICE).transpose(1, 2)  # [B, H, T, D] view of BTHD storage
    assert all(torch.equal(a, b) for a, b in zip(kernels.encode_value_groups(vals, vc),
                                                 vref.encode_groups(vals.contiguous(), vc)))
    vals = torch.randn(1, 1, 16, 64, device=DEVICE)
    vals[0, 0, 5, 40] = float("inf")
    _, params = kernels.encode_value_groups(vals, vc)
    assert torch.isnan(params[0, 0, 5, 1, 0])  # the token and channel group holding the inf
    assert torch.isfinite(params[0, 0, 5, 0]).all() and torch.isfinite(params[0, 0, 4]).all()


def test_append_values_rejects_bad_input():
    vc = ValueCodec(4, 32, 16)
    state = vref.empty(vc, 1, 2, 64, torch.float32, DEVICE)
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 64\)"):
        kernels.append_values(state, 5, torch.randn(1, 2, 3, 64, device=DEVICE), vc)  # tail holds 0 tokens, not 5
    with pytest.raises(TypeError, match="float16"):
        kernels.append_values(state, 0, torch.randint(0, 3, (1, 2, 3, 64), device=DEVICE), vc)
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 48\).*not divisible by value_group=32"):
        kernels.append_values(state, 0, torch.randn(1, 2, 3, 48, device=DEVICE), vc)
    with pytest.raises(TypeError, match="ValueCodec"):
        kernels.append_values(state, 0, torch.randn(1, 2, 3, 64, device=DEVICE), ref.Codec())
    codes = torch.zeros(1, 2, 16, 32, dtype=torch.uint8, device=DEVICE)
    params = torch.zeros(1, 2, 16, 2, 2, dtype=torch.bfloat16, device=DEVICE).transpose(3, 4)  # (min, scale) apart
    with pytest.raises(ValueError, match=r"value params shape \(1, 2, 16, 2, 2\)"):
        kernels.encode_value_groups_into(torch.randn(1, 2, 16, 64, device=DEVICE), codes, params, 0, vc)


# --------------------------------------------------------------------------- static cache


G, CAP = 16, 64
VALS96 = torch.randn(2, 2, 80, 96, generator=torch.Generator().manual_seed(7)).to(DEVICE) * 2
VALS = VALS96[..., :64]
SCHEDULES = {
    "prefill-then-decode": [(0, 37), (37, 1), (38, 2)],
    "decode-completes-a-group": [(0, 15), (15, 1), (16, 1)],
    "chunk-spans-groups": [(0, 5), (5, 45), (50, 1)],
    "rewind-into-encoded-group": [(0, 40), (20, 7)],
    "rewind-completes-the-group": [(0, 40), (20, 13)],
    "rewind-inside-open-group": [(0, 40), (35, 2)],
}


def value_state(vc, B, H, Dv, dtype):
    """Preallocated static buffers full of garbage (a kernel that skips an element shows)."""
    g = torch.Generator(device="cpu").manual_seed(99)
    return (torch.randint(0, 256, (B, H, CAP, vc.code_bytes(Dv)), dtype=torch.uint8, generator=g).to(DEVICE),
            torch.randn(B, H, CAP, vc.num_groups(Dv), 2, generator=g).to(torch.bfloat16).to(DEVICE),
            torch.randn(B, H, G, Dv, generator=g).to(dtype).to(DEVICE),
            torch.zeros(1, dtype=torch.int64, device=DEVICE))


def ref_static_write_values(codes, params, ring, length, new, positions, vc):
    """ops.static_write_'s reference schedule, on value_codec: a rewind into an encoded group decodes its kept
    tokens back into the ring; each group that completes is encoded; the rest goes to the ring."""
    S = new.shape[2]
    start, L = int(positions[0]), int(length[0])
    if start < L // G * G:
        g0 = start // G
        n = (g0 + 1) * G
        pad = ring.new_zeros(*ring.shape[:2], ref.TAIL_PAD, ring.shape[3])
        kept = vref.decode(ValueData(codes[:, :, :n], params[:, :, :n], pad), n, vc, dtype=ring.dtype)
        ring[:, :, : start - g0 * G] = kept[:, :, g0 * G: start]
    pending = torch.cat([ring[:, :, : start % G], new.to(ring.dtype)], dim=2)
    first, done = start // G * G, pending.shape[2] // G * G
    if done:
        codes[:, :, first: first + done], params[:, :, first: first + done] = vref.encode_groups(pending[:, :, :done],
                                                                                             vc)
    ring[:, :, : pending.shape[2] - done] = pending[:, :, done:]
    length.fill_(start + S)


def write_values(write, vc, schedule, dtype, Dv=64):
    st = value_state(vc, 2, 2, Dv, dtype)
    for start, S in schedule:
        write(*st, VALS96[:, :, start: start + S, :Dv], torch.arange(start, start + S, device=DEVICE), vc)
    return st


def assert_same_value_state(a, b):
    L = int(b[3])
    assert int(a[3]) == L
    Tc = L // G * G
    assert torch.equal(a[0][:, :, :Tc], b[0][:, :, :Tc]) and torch.equal(a[1][:, :, :Tc], b[1][:, :, :Tc])
    assert torch.equal(a[2][:, :, : L % G], b[2][:, :, : L % G])


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("vbits, cg", [(4, 32), (2, 64), (8, 16)])
def test_static_write_values_matches_reference(schedule, vbits, cg):
    vc = ValueCodec(vbits, cg, G)
    a = write_values(kernels.static_write_values, vc, SCHEDULES[schedule], torch.float32)
    b = write_values(ref_static_write_values, vc, SCHEDULES[schedule], torch.float32)
    assert_same_value_state(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("schedule", ["chunk-spans-groups", "rewind-completes-the-group"])
def test_static_write_values_half_ring(dtype, schedule):
    """A 16-bit ring from fp32 values, Dv 96 (a padded channel group), 4 tokens a program. A rewind casts the
    decoded values to the ring's dtype in the kernel, which the interpreter truncates (the GPU rounds)."""
    if DEVICE == "cpu" and schedule.startswith("rewind"):
        pytest.skip("the interpreter's fp32 -> 16-bit casts truncate")
    vc = ValueCodec(4, 32, G)
    schedule = SCHEDULES[schedule]
    with kernels.settings.override(value_tile=kernels.RowTile(4, 1)):
        a = write_values(kernels.static_write_values, vc, schedule, dtype, Dv=96)
    b = write_values(ref_static_write_values, vc, schedule, dtype, Dv=96)
    assert_same_value_state(a, b)


@pytest.mark.parametrize("form", ["dot", "dequant"])
@pytest.mark.parametrize("S, causal, mask_extent, vbits", [(1, False, 60, 4), (4, True, None, 2), (2, False, 1, 8)])
def test_static_attention_with_packed_values(S, causal, mask_extent, vbits, form, poisoned):
    """Keys and values written by the static kernels, attention over the first `length` tokens vs the reference
    over the same tokens (a mask of HF's max_cache_len < capacity, none, or one broadcast over keys)."""
    torch.manual_seed(8)
    c, vc = ref.Codec(4, 4, G, ref.Pairing()), ValueCodec(vbits, 32, G)
    keys = torch.randn(2, 2, 41, 64, device=DEVICE)
    kst = (torch.randint(0, 256, (2, 2, CAP, c.code_bytes(64)), dtype=torch.uint8, device=DEVICE),
           torch.randn(2, 2, CAP // G, 4, 32, device=DEVICE).to(torch.bfloat16),
           torch.randn(2, 2, G, 64, device=DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE))
    vst = value_state(vc, 2, 2, 64, torch.float32)
    for start, n in ((0, 37), (37, 4)):
        pos = torch.arange(start, start + n, device=DEVICE)
        kernels.static_write_values(*vst, VALS[:, :, start: start + n], pos, vc)
        kernels.static_write(*kst, keys[:, :, start: start + n], pos, c)
    assert int(kst[3]) == int(vst[3]) == 41
    q = torch.randn(2, 8, S, 64, device=DEVICE)
    mask = None if mask_extent is None else torch.rand(2, 1, S, mask_extent, device=DEVICE) > 0.3
    if mask is not None:
        mask[..., -1] = True
    with kernels.settings.override(value_form=form):
        out = kernels.static_attention(q, *kst, ValueData(*vst[:3]), c, vcodec=vc, mask=mask, scale=0.125,
                                       is_causal=causal)
    pad = torch.zeros(2, 2, ref.TAIL_PAD, 64, device=DEVICE)  # the reference over what the kernels wrote
    kd = ref.PolarData(kst[0][:, :, :32], kst[1][:, :, :2], torch.cat([kst[2][:, :, :9], pad], dim=2))
    vd = ValueData(vst[0][:, :, :32], vst[1][:, :, :32], torch.cat([vst[2][:, :, :9], pad], dim=2))
    assert all(torch.equal(a, b) for a, b in zip(vd, vref.encode(VALS[:, :, :41], vc)))
    m_ref = None if mask is None else mask[..., :41] if mask_extent > 1 else mask
    want = vref.attention(q, kd, 41, vd, c, vc, mask=m_ref, scale=0.125, is_causal=causal)
    err = ((out - want).norm() / want.norm()).item()
    assert err < TOL[torch.float32], f"relative error {err:.2e}"


def test_static_write_values_errors_and_capacity():
    vc = ValueCodec(4, 32, G)
    st = write_values(kernels.static_write_values, vc, [(0, 60)], torch.float32)
    with pytest.raises(IndexError, match="out of bounds"):
        kernels.static_write_values(*st, VALS[:, :, :5], torch.arange(60, 65, device=DEVICE), vc)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.static_write_values(*st, VALS[:, :, :2], torch.tensor([10, 12], device=DEVICE), vc)
    with pytest.raises(ValueError, match=r"ring \(2, 2, 8, 64\)"):
        kernels.static_write_values(st[0], st[1], st[2][:, :, :8], st[3], VALS[:, :, :1],
                                    torch.tensor([60], device=DEVICE), vc)
    assert int(st[3]) == 60  # nothing was written
    c = ref.Codec(4, 4, G, ref.Pairing())
    kst = (torch.zeros(2, 2, CAP, 32, dtype=torch.uint8, device=DEVICE),
           torch.zeros(2, 2, CAP // G, 4, 32, dtype=torch.bfloat16, device=DEVICE),
           torch.zeros(2, 2, G, 64, device=DEVICE), st[3])
    with pytest.raises(ValueError, match=r"ring \(2, 2, 8, 64\) does not fit"):  # a value ring of the wrong length
        kernels.static_attention(torch.randn(2, 4, 1, 64, device=DEVICE), *kst,
                                 ValueData(st[0], st[1], st[2][:, :, :8]), c, vcodec=vc)
    # unchecked, a write past the capacity drops the tokens beyond it and leaves a length that gives NaN
    kernels.static_write_values(*st, VALS[:, :, :8], torch.arange(60, 68, device=DEVICE), vc, check=False)
    assert int(st[3]) == 68
    out = kernels.static_attention(torch.randn(2, 4, 1, 64, device=DEVICE), *kst, ValueData(*st[:3]), c, vcodec=vc)
    assert out.isnan().all()
