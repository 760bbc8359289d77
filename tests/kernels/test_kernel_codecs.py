"""Every key codec kind through the kernels (encode, dynamic attention, pair chunks, static write + attention)
against the reference cells (pqcompile.key_cells), on fresh random keys with clusters that straddle +-pi.

Encode: the kinds decide from maxima, minima and bf16 params only, so the kernel's cells and choices equal the
reference's; on the GPU bit for bit (the same CUDA atan2 / hypot), in the interpreter up to the polyfill atan2's
ulp (a bin edge, rarely). The channel kind has no transcendental: bit for bit everywhere.
"""

import math

import pytest
import torch

from pqcompile import codec as ref
from pqcompile import kernels, key_cells, ops
from pqcompile.kernels import settings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = [k for k in ref.KINDS if k != "polar"]  # polar: the other kernel tests


def keys_with_clusters(B, H, T, D, seed, dtype=torch.float32):
    """Random keys where some pairs point the same way within a group (polar cells win there) and some of those
    straddle the +-pi cut (circular arcs win)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, T, D, generator=g) * 2
    P = D // 2
    r = torch.rand(B, H, T, P // 4, generator=g) + 0.5
    ang = math.pi + 0.2 * torch.randn(B, H, 1, P // 4, generator=g)  # a cluster around +-pi
    k[..., : P // 4], k[..., P: P + P // 4] = r * torch.cos(ang), r * torch.sin(ang)
    return k.to(dtype).to(DEVICE)


def assert_same_encoding(c, codes_k, params_k, codes_r, params_r, D):
    if DEVICE == "cuda" or c.kind == "channel":
        assert torch.equal(params_k.view(torch.int16), params_r.view(torch.int16))
        assert torch.equal(codes_k, codes_r)
        return
    cell_same = (params_k.view(torch.int16) == params_r.view(torch.int16)).all(dim=-2)  # [B, H, n, P]
    assert cell_same.float().mean().item() > 0.98, f"cells equal for {cell_same.float().mean():.4f} only"
    B, H, n, P = cell_same.shape
    ck, cr = (ref.unpack_codes(x, c.code_bits, P).view(B, H, n, -1, P) for x in (codes_k, codes_r))
    differ = (ck != cr) & cell_same.unsqueeze(-2)  # codes of equal cells: a bin edge at most, rarely
    assert differ.float().mean().item() < 3e-3


@pytest.mark.parametrize("kind", ref.KINDS)
@pytest.mark.parametrize("bits,pairing", [((4, 4), "half"), ((3, 3), "interleaved"), ((2, 2), "half@32")])
def test_encode_matches_reference(kind, bits, pairing, poisoned):
    c = ref.Codec(*bits, 16, ref.Pairing.parse(pairing), kind)
    keys = keys_with_clusters(2, 2, 32, 64, seed=len(kind) + bits[0])
    codes, params = kernels.encode_groups(keys, c)
    assert_same_encoding(c, codes, params, *ref.encode_groups(keys, c), 64)


def test_hybrid_takes_the_cell_it_predicts_better(poisoned):
    """The kernel's polar-hybrid params are, per (group, pair), the kernel's polar-circ cell with the sign of its
    radius scale set, or its channel cell, as key_cells.prefer_polar decides from those two cells' params."""
    keys = keys_with_clusters(1, 2, 64, 64, seed=3)
    (_, hyb), (_, pol), (_, car) = (kernels.encode_groups(keys, ref.Codec(4, 4, 16, ref.Pairing(), kind))
                                    for kind in ("polar-hybrid", "polar-circ", "channel"))
    choose = key_cells.prefer_polar(pol[..., 0, :], pol[..., 1, :], pol[..., 3, :], car[..., 1, :], car[..., 3, :], 4)
    assert 0 < choose.float().mean() < 1  # both kinds of cell occur
    assert torch.equal(torch.signbit(hyb[..., 1, :].float()), choose)
    flagged = pol.clone()
    flagged[..., 1, :] = -flagged[..., 1, :]
    want = torch.where(choose.unsqueeze(-2), flagged, car)
    assert torch.equal(hyb.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("Hq,H,D,S,T,mask,causal", [
    (4, 2, 64, 1, 45, None, False),
    (8, 2, 128, 4, 53, "float", True),
    (6, 3, 64, 3, 40, "bool", False),
])
def test_attention_matches_reference(kind, Hq, H, D, S, T, mask, causal, poisoned):
    c = ref.Codec(4, 4, 16, ref.Pairing(), kind)
    data = ref.encode(keys_with_clusters(2, H, T, D, seed=T), c)
    torch.manual_seed(T)
    q = torch.randn(2, Hq, S, D, device=DEVICE)
    v = torch.randn(2, H, T, D, device=DEVICE)
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, S, T, device=DEVICE) > 0.3
        m[..., -1] = True
    elif mask == "float":
        m = torch.randn(2, Hq, S, T, device=DEVICE)
    out = kernels.attention(q, data, T, v, c, mask=m, is_causal=causal)
    want = ref.attention(q, data, T, v, c, mask=m, is_causal=causal)
    err = ((out - want).norm() / want.norm()).item()
    assert err < (1e-4 if DEVICE == "cpu" else 3e-3), f"relative error {err:.2e}"


@pytest.mark.parametrize("kind", KINDS)
def test_pair_chunks(kind, poisoned):
    """8-bit codes with the pair-chunked scoring path (score_pair_chunk)."""
    c = ref.Codec(4, 4, 16, ref.Pairing(), kind)
    data = ref.encode(keys_with_clusters(1, 2, 48, 64, seed=7), c)
    q = torch.randn(1, 4, 1, 64, device=DEVICE)
    v = torch.randn(1, 2, 48, 64, device=DEVICE)
    with settings.override(attention=settings.attention._replace(pair_chunks=2, split_dot=True)):
        out = kernels.attention(q, data, 48, v, c)
    want = ref.attention(q, data, 48, v, c)
    assert ((out - want).norm() / want.norm()).item() < (1e-4 if DEVICE == "cpu" else 3e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_static_write_and_attention(kind, monkeypatch, poisoned):
    """The static cache's in-place write (a prefill, decode steps, a rewind into an encoded group, which decodes
    that group's cells back into the ring) and its attention, kernels against the reference ops."""
    c = ref.Codec(3, 3, 16, ref.Pairing(), kind)
    keys = keys_with_clusters(2, 2, 60, 64, seed=11)
    writes = [(0, keys[:, :, :37]), (37, keys[:, :, 37:38]), (20, keys[:, :, 38:45])]
    q = torch.randn(2, 4, 1, 64, device=DEVICE)
    v = torch.randn(2, 2, 64, 64, device=DEVICE)
    states, outs = [], []
    for choice in ("triton", "reference"):
        monkeypatch.setenv("PQCOMPILE_KERNELS", choice)
        g = torch.Generator().manual_seed(1)
        st = (torch.randint(0, 256, (2, 2, 64, c.code_bytes(64)), dtype=torch.uint8, generator=g).to(DEVICE),
              torch.randn(2, 2, 16, 32, generator=g).to(torch.bfloat16).to(DEVICE),
              torch.randn(2, 2, 16, 64, generator=g).to(DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE))
        for start, k in writes:
            torch.ops.pqcompile.static_write_(*st, k, torch.arange(start, start + k.shape[2], device=DEVICE),
                                              *ops.codec_args(c))
        states.append(st)
        outs.append(torch.ops.pqcompile.static_attention(q, *st, v, None, 0.125, False, *ops.codec_args(c)))
    L = int(states[1][3])
    assert int(states[0][3]) == L == 27
    n = L // 16
    assert_same_encoding(c, states[0][0][:, :, : n * 16], ops.unflat(states[0][1][:, :, : n * 4]),
                         states[1][0][:, :, : n * 16], ops.unflat(states[1][1][:, :, : n * 4]), 64)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
