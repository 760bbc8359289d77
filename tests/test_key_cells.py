"""The codec kinds' cells (pqcompile.key_cells): bounds from the quantizer, the circular arc, the hybrid's choice,
the flag bit, and the kind's path through Codec, the ops' layout string and the config."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pqcompile import codec as C
from pqcompile import key_cells, ops
from pqcompile.config import PolarQuantConfig


def clustered(T=128, P=16, centre=math.pi, spread=0.3, seed=1):
    """x, y [1, 1, T, P] whose angles cluster around `centre` (pi: the cluster straddles the +-pi cut)."""
    g = torch.Generator().manual_seed(seed)
    phi = centre + spread * torch.randn(1, 1, T, P, generator=g)
    r = 1 + 0.1 * torch.rand(1, 1, T, P, generator=g)
    return r * torch.cos(phi), r * torch.sin(phi)


def cell_errors(x, y, kind, bits=(4, 4)):
    """Round trip through one group: (|x_hat - x|, |y_hat - y|) and the params."""
    c1, c2, params = key_cells.encode_cells(x, y, kind, *bits)
    xh, yh = key_cells.decode_cells(c1, c2, params, kind)
    return (xh - x).abs(), (yh - y).abs(), params


def test_arc_start_straddling_pi():
    phi = torch.tensor([3.0, 3.1, -3.1, -3.0, 3.05])[:, None]
    assert key_cells.arc_start(phi).item() == pytest.approx(3.0)
    rel = key_cells.arc_offsets(phi, torch.tensor([3.0]))
    assert rel.max().item() == pytest.approx(2 * math.pi - 6.0, abs=1e-5) and rel.min().item() == 0


def test_arc_start_is_the_plain_range_without_a_wrap():
    phi = torch.tensor([-1.0, 0.5, 0.2, -0.3])[:, None]
    assert key_cells.arc_start(phi).item() == -1.0


@pytest.mark.parametrize("kind", ["polar", "polar-circ"])
def test_polar_cells_within_half_a_bin(kind):
    """Radius within half its bin; the angle within half its bin modulo 2 pi."""
    x, y = clustered()
    c1, c2, p = key_cells.encode_cells(x, y, kind, 4, 4)
    r, phi = torch.hypot(x, y), torch.atan2(y, x)
    r_hat = C.bin_center(c1, p[..., 0, :].float().unsqueeze(-2), p[..., 1, :].float().unsqueeze(-2))
    phi_hat = C.bin_center(c2, p[..., 2, :].float().unsqueeze(-2), p[..., 3, :].float().unsqueeze(-2))
    assert ((r_hat - r).abs() <= p[..., 1, :].float().unsqueeze(-2) / 2 + 1e-6).all()
    d = torch.remainder(phi_hat - phi + math.pi, 2 * math.pi) - math.pi
    assert (d.abs() <= p[..., 3, :].float().unsqueeze(-2) / 2 + 1e-5).all()


def test_circular_cells_beat_linear_ones_on_a_cluster_at_pi():
    x, y = clustered()
    lin = sum(e.pow(2).sum() for e in cell_errors(x, y, "polar")[:2])
    circ = sum(e.pow(2).sum() for e in cell_errors(x, y, "polar-circ")[:2])
    assert circ < 0.1 * lin  # the arc is ~1.8 rad of the 2 pi the linear range spans: ~1/12 of the error


def test_circular_equals_polar_when_the_angles_do_not_wrap():
    x, y = clustered(centre=0.3)
    a, b = (key_cells.encode_cells(x, y, kind, 4, 4) for kind in ("polar", "polar-circ"))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 1.0, 1e3]), bits=st.sampled_from([2, 3, 4]))
@settings(max_examples=30, deadline=None)
def test_channel_and_hybrid_cells_within_their_bins(seed, scale, bits):
    """Channel cells: each coordinate within half its bin. Hybrid: each (group, pair) is exactly the channel cell
    or (flag set) the circular polar cell of the same keys, whichever key_cells.prefer_polar picks."""
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(2, 16, 8, generator=g) * scale for _ in range(2))
    ex, ey, p = cell_errors(x, y, "channel", (bits, bits))
    assert (ex <= p[..., 1, :].float().unsqueeze(-2) / 2 * 1.0001 + 1e-30).all()
    assert (ey <= p[..., 3, :].float().unsqueeze(-2) / 2 * 1.0001 + 1e-30).all()
    _, _, hyb = key_cells.encode_cells(x, y, "polar-hybrid", bits, bits)
    _, _, pol = key_cells.encode_cells(x, y, "polar-circ", bits, bits)
    polar = key_cells.is_polar(hyb, "polar-hybrid")
    assert torch.equal(polar, key_cells.prefer_polar(pol[..., 0, :], pol[..., 1, :], pol[..., 3, :], p[..., 1, :],
                                                     p[..., 3, :], bits))
    flagged = torch.stack([pol[..., 0, :], -pol[..., 1, :], pol[..., 2, :], pol[..., 3, :]], dim=-2)
    assert torch.equal(hyb, torch.where(polar.unsqueeze(-2), flagged, p))


def test_hybrid_never_worse_than_its_prediction_says():
    """Summed over many groups the hybrid's squared error is at most the better single kind's (+ noise)."""
    g = torch.Generator().manual_seed(0)
    x, y = clustered(P=64, spread=1.0)
    x, y = x + 0.3 * torch.randn(x.shape, generator=g), y
    err = {k: sum(e.pow(2).sum() for e in cell_errors(x, y, k)[:2]).item()
           for k in ("polar-circ", "channel", "polar-hybrid")}
    assert err["polar-hybrid"] <= 1.05 * min(err["polar-circ"], err["channel"])


@pytest.mark.parametrize("kind", C.KINDS)
def test_kind_round_trips_through_the_ops_layout(kind):
    c = C.Codec(3, 4, 32, C.Pairing.parse("interleaved@16"), kind)
    assert ops._codec(*ops.codec_args(c)) == c
    assert (kind in str(c)) == (kind != "polar")


def test_config_rejects_an_unknown_codec_listing_the_valid_ones():
    with pytest.raises(ValueError, match="codec='polar-x'.*'polar', 'polar-circ', 'polar-hybrid', 'channel'"):
        PolarQuantConfig(codec="polar-x")
    with pytest.raises(ValueError, match="codec"):
        C.Codec(kind="cartesian")
    assert C.Codec.from_config(PolarQuantConfig(codec="channel"), C.Pairing()).kind == "channel"


def check_cells_roundtrip(keys: torch.Tensor, codec: C.Codec) -> None:
    """Any kind: the tail exact, and every encoded pair within its own cell's bound. A Cartesian cell: each
    coordinate within half its bin; a polar cell: the pair within half a radius bin plus the top radius times half
    an angle bin (modulo 2 pi for the circular range); plus the fp32 and the key dtype's rounding."""
    B, H, T, D = keys.shape
    G, P, n = codec.group_size, D // 2, T // codec.group_size
    state = C.encode(keys, codec)
    dense = C.decode(state, T, codec)
    assert dense.shape == keys.shape and torch.equal(dense[:, :, n * G:], keys[:, :, n * G:])
    if n == 0:
        return
    xs, ys = codec.pairing.indices(D)
    k, d = (t[:, :, : n * G].float().view(B, H, n, G, D) for t in (keys, dense))
    x, y, xh, yh = k[..., xs], k[..., ys], d[..., xs], d[..., ys]
    p = state.params.float()  # [B, H, n, 4, P]
    m1, s1, m2, s2 = (p[..., i, :].unsqueeze(3) for i in range(4))
    s1 = s1.abs()
    eps = 8 * torch.finfo(torch.float32).eps + torch.finfo(keys.dtype).eps
    fi = torch.finfo(keys.dtype)
    floor = fi.smallest_normal * fi.eps  # the spacing of the dtype's subnormals: the decode's cast rounds to it
    top1, top2 = m1.abs() + (1 << codec.radius_bits) * s1, m2.abs() + (1 << codec.angle_bits) * s2
    cart = (((xh - x).abs() <= s1 / 2 + eps * (top1 + x.abs()) + floor)
            & ((yh - y).abs() <= s2 / 2 + eps * (top2 + y.abs()) + floor))
    r = torch.hypot(x, y)
    pair = torch.hypot(xh - x, yh - y)
    polar_ok = pair <= s1 / 2 + top1 * s2 / 2 + eps * (top1 + r) * (2 + top2 + 2 * math.pi) + 2 * floor
    polar = key_cells.is_polar(state.params, codec.kind)
    polar = torch.as_tensor(polar).expand(B, H, n, P).unsqueeze(3) if isinstance(polar, bool) else polar.unsqueeze(3)
    ok = torch.where(polar, polar_ok, cart)
    assert ok.all(), f"{codec}: {(~ok).sum().item()} of {ok.numel()} pairs outside their cell's bound"


@pytest.mark.parametrize("kind", C.KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kind_round_trips_within_its_cells(kind, dtype):
    g = torch.Generator().manual_seed(len(kind))
    keys = (torch.randn(2, 2, 75, 32, generator=g) * 3).to(dtype)
    x, y = clustered(T=75, P=4)
    keys[..., :4], keys[..., 16:20] = x[0, 0], y[0, 0]
    check_cells_roundtrip(keys, C.Codec(3, 4, 16, C.Pairing.parse("interleaved@24"), kind))
