"""Triton: fused PolarQuant encode of complete key groups (jit code only; host wrapper in __init__).

One program per (batch, head, group, pair tile): load the group's x/y dims, radius and angle, per-pair
min/max over the group's tokens, bf16 params rounded outward (min down, scale up) through bit casts,
quantize with the reference's bin_index, pack the codes little-endian, store at a group offset.
Mirrors pqcompile.codec.encode_groups; see its module docstring for the layout.
"""

import triton
import triton.language as tl

try:  # the dispatcher module (triton >= 3.0); its functions do not run in the interpreter
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older triton
    libdevice = None


@triton.jit
def atan2_poly(y, x):
    """atan2 in fp32 for the interpreter (libdevice is not interpreted): a few ulp from torch.atan2."""
    ax = tl.abs(x)
    ay = tl.abs(y)
    hi = tl.maximum(ax, ay)
    lo = tl.minimum(ax, ay)
    t = tl.where(hi > 0, lo / tl.where(hi > 0, hi, 1.0), 0.0)
    big = t > 0.41421356237309503  # tan(pi/8): reduce to |u| <= tan(pi/8)
    u = tl.where(big, (t - 1.0) / (t + 1.0), t)
    z = u * u
    p = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * u + u
    a = tl.where(big, 0.7853981633974483 + p, p)
    a = tl.where(ay > ax, 1.5707963267948966 - a, a)
    a = tl.where(x.to(tl.int32, bitcast=True) < 0, 3.141592653589793 - a, a)  # sign bit: -0.0 counts
    return tl.where(y.to(tl.int32, bitcast=True) < 0, -a, a)


@triton.jit
def round_bf16_bits(x, UP: tl.constexpr):
    """fp32 -> the fp32 value of the bf16 rounded toward +inf (UP) or -inf; exact in any later bf16 cast."""
    bits = x.to(tl.int32, bitcast=True)
    trunc = bits & -65536  # clear the low 16 bits: rounding toward zero
    inexact = (bits & 65535) != 0
    if UP:
        away = inexact & (x > 0)
    else:
        away = inexact & (x < 0)
    return (trunc + tl.where(away, 65536, 0)).to(tl.float32, bitcast=True)


@triton.jit
def bin_codes(v, vmin, scale, BITS: tl.constexpr, EXACT_DIV: tl.constexpr):
    """codec.bin_index: floor((v - min) / scale), scale == 0 -> 0, clamped to [0, 2^BITS - 1]; int32."""
    pos = scale > 0
    safe = tl.where(pos, scale, 1.0)
    if EXACT_DIV:
        c = tl.floor(tl.math.div_rn(v - vmin[None, :], tl.broadcast_to(safe[None, :], v.shape)))
    else:
        c = tl.floor((v - vmin[None, :]) / safe[None, :])
    c = tl.where(pos[None, :], c, 0.0)
    c = tl.minimum(tl.maximum(c, 0.0), (1 << BITS) - 1.0)
    return c.to(tl.int32)


@triton.jit
def encode_store(x, y, crow, pp, sp_k, tile, offs_p, pmask, P: tl.constexpr, NB: tl.constexpr,
                 G: tl.constexpr, RB: tl.constexpr, AB: tl.constexpr, BLOCK_P: tl.constexpr, ON_GPU: tl.constexpr):
    """Encode one group's pairs x, y [G, BLOCK_P] (fp32) and store its codes (token rows crow [G, 1] + byte)
    and params (pp [BLOCK_P] + k * sp_k)."""
    W: tl.constexpr = RB + AB
    r = tl.sqrt_rn(x * x + y * y)  # [G, BLOCK_P]
    if ON_GPU:
        phi = libdevice.atan2(y, x)
    else:
        phi = atan2_poly(y, x)

    r_min = round_bf16_bits(tl.min(r, axis=0), False)
    r_s = round_bf16_bits((tl.max(r, axis=0) - r_min) * (1.0 / (1 << RB)), True)
    a_min = round_bf16_bits(tl.min(phi, axis=0), False)
    a_s = round_bf16_bits((tl.max(phi, axis=0) - a_min) * (1.0 / (1 << AB)), True)
    # a non-finite key poisons its pair's params (NaN) instead of yielding plausible garbage codes
    bad = tl.max((~(r < float("inf"))).to(tl.int32), axis=0) > 0  # NaN or inf
    r_min = tl.where(bad, float("nan"), r_min)

    c_r = bin_codes(r, r_min, r_s, RB, ON_GPU)
    c_a = bin_codes(phi, a_min, a_s, AB, ON_GPU)
    code = tl.where(pmask[None, :], c_r | (c_a << RB), 0)

    if W == 8:  # one byte per pair
        tl.store(crow + offs_p[None, :], code.to(tl.uint8), mask=pmask[None, :])
    elif 8 % W == 0:  # PER whole codes per byte
        PER: tl.constexpr = 8 // W
        byte = tl.sum(tl.reshape(code, [G, BLOCK_P // PER, PER]) << (tl.arange(0, PER) * W)[None, None, :], axis=2)
        offs_b = tile * (BLOCK_P // PER) + tl.arange(0, BLOCK_P // PER)
        tl.store(crow + offs_b[None, :], byte.to(tl.uint8), mask=(offs_b < NB)[None, :])
    else:  # codes straddle bytes: 8 consecutive pairs -> one W-byte little-endian word
        CH: tl.constexpr = BLOCK_P // 8
        word = tl.sum(tl.reshape(code.to(tl.int64), [G, CH, 8]) << (tl.arange(0, 8) * W).to(tl.int64)[None, None, :],
                      axis=2)
        k8 = tl.arange(0, 8)
        byte = (word[:, :, None] >> (k8 * 8).to(tl.int64)[None, None, :]) & 255  # [G, CH, 8]
        byte_idx = (tile * CH + tl.arange(0, CH))[:, None] * W + k8[None, :]  # [CH, 8]
        bmask = (k8[None, :] < W) & (byte_idx < NB)
        tl.store(crow[:, :, None] + byte_idx[None, :, :], byte.to(tl.uint8), mask=bmask[None, :, :])

    tl.store(pp, r_min.to(tl.bfloat16), mask=pmask)
    tl.store(pp + sp_k, r_s.to(tl.bfloat16), mask=pmask)
    tl.store(pp + 2 * sp_k, a_min.to(tl.bfloat16), mask=pmask)
    tl.store(pp + 3 * sp_k, a_s.to(tl.bfloat16), mask=pmask)


@triton.jit(do_not_specialize=["n_groups", "group_offset"])
def polar_encode_kernel(
    K, sk_b, sk_h, sk_t, sk_d,  # keys [B, H, n*G, D], any strides
    XI, YI,  # int32 [P]: the x and y dim of each pair (PAIRS == 0)
    Codes_out, sc_b, sc_h, sc_t,  # uint8 [B, H, >=(off+n)*G, NB], byte stride 1
    Params_out, sp_b, sp_h, sp_g, sp_k,  # bf16 [B, H, >=off+n, 4, P], pair stride 1
    H, n_groups, group_offset,
    P: tl.constexpr, NB: tl.constexpr, G: tl.constexpr, RB: tl.constexpr, AB: tl.constexpr,
    BLOCK_P: tl.constexpr, PAIRS: tl.constexpr, ON_GPU: tl.constexpr,
):
    """PAIRS: 0 = any pairing through XI/YI, 1 = half split (x_j = j, y_j = j + P), 2 = interleaved."""
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    bh = pid // n_groups
    g = pid % n_groups
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_t = tl.arange(0, G)
    offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    rows = K + b * sk_b + h * sk_h + (g * G + offs_t).to(tl.int64)[:, None] * sk_t
    if PAIRS == 1:
        x = tl.load(rows + offs_p[None, :] * sk_d, mask=pmask[None, :], other=0.0).to(tl.float32)
        y = tl.load(rows + (offs_p + P)[None, :] * sk_d, mask=pmask[None, :], other=0.0).to(tl.float32)
    elif PAIRS == 2:
        offs_2 = tile * 2 * BLOCK_P + tl.arange(0, 2 * BLOCK_P)
        xy = tl.load(rows + offs_2[None, :] * sk_d, mask=(offs_2 < 2 * P)[None, :], other=0.0).to(tl.float32)
        x, y = tl.split(tl.reshape(xy, [G, BLOCK_P, 2]))
    else:
        xi = tl.load(XI + offs_p, mask=pmask, other=0)
        yi = tl.load(YI + offs_p, mask=pmask, other=0)
        x = tl.load(rows + xi[None, :] * sk_d, mask=pmask[None, :], other=0.0).to(tl.float32)
        y = tl.load(rows + yi[None, :] * sk_d, mask=pmask[None, :], other=0.0).to(tl.float32)

    grp = group_offset + g
    crow = Codes_out + b * sc_b + h * sc_h + (grp * G + offs_t).to(tl.int64)[:, None] * sc_t
    pp = Params_out + b * sp_b + h * sp_h + grp.to(tl.int64) * sp_g + offs_p
    encode_store(x, y, crow, pp, sp_k, tile, offs_p, pmask, P, NB, G, RB, AB, BLOCK_P, ON_GPU)


@triton.jit
def decode_pairs(crow, pp, sp_k, offs_p, pmask, NB: tl.constexpr, RB: tl.constexpr, AB: tl.constexpr):
    """The reconstructed x, y [G, BLOCK_P] (fp32, accurate cos/sin) of one encoded group (codec.decode)."""
    W: tl.constexpr = RB + AB
    if W == 8:
        code = tl.load(crow + offs_p[None, :], mask=pmask[None, :], other=0).to(tl.int32)
    else:  # the two bytes holding each pair's W bits (a pair never spans more than two)
        idx = (offs_p * W) >> 3
        lo = tl.load(crow + idx[None, :], mask=(pmask & (idx < NB))[None, :], other=0).to(tl.int32)
        hi = tl.load(crow + idx[None, :] + 1, mask=(pmask & (idx + 1 < NB))[None, :], other=0).to(tl.int32)
        code = ((lo | (hi << 8)) >> ((offs_p * W) & 7)[None, :]) & ((1 << W) - 1)
    r_min = tl.load(pp, mask=pmask, other=0.0).to(tl.float32)
    r_s = tl.load(pp + sp_k, mask=pmask, other=0.0).to(tl.float32)
    a_min = tl.load(pp + 2 * sp_k, mask=pmask, other=0.0).to(tl.float32)
    a_s = tl.load(pp + 3 * sp_k, mask=pmask, other=0.0).to(tl.float32)
    r = r_min[None, :] + ((code & ((1 << RB) - 1)).to(tl.float32) + 0.5) * r_s[None, :]
    phi = a_min[None, :] + ((code >> RB).to(tl.float32) + 0.5) * a_s[None, :]
    return r * tl.cos(phi), r * tl.sin(phi)


@triton.jit(do_not_specialize=["S"])
def polar_static_write_kernel(
    New, sn_b, sn_h, sn_t, sn_d,  # new keys [B, H, S, D], in the ring's dtype
    Pos, Len,  # int64: positions [S] (contiguous, first one read), tokens held before this write [1]
    Ring, sr_b, sr_h, sr_t, sr_d,  # [B, H, G, D]: the open group, slot = t % G
    XI, YI,  # int32 [BLOCK_P]: the x and y dim of each pair
    Codes, sc_b, sc_h, sc_t,  # uint8 [B, H, Tcap, NB], byte stride 1
    Params, sp_b, sp_h, sp_g, sp_k,  # bf16 [B, H, Tcap/G, 4, P], pair stride 1
    H, S, n_cap_groups,
    P: tl.constexpr, NB: tl.constexpr, G: tl.constexpr, RB: tl.constexpr, AB: tl.constexpr,
    BLOCK_P: tl.constexpr, FIRST: tl.constexpr, ON_GPU: tl.constexpr,
):
    """Write S new tokens at positions start.. (start read on the device): program (bh, j, tile) owns the
    j-th group the write touches (FIRST: the group holding `start`; else the ones after it). A group that
    completes is encoded from its older tokens (ring, or its own codes when a rewind re-opens an encoded
    group) and the new ones; an open group's new tokens go to the ring. Two launches (FIRST, then the rest)
    so the ring and the old length are read before anything overwrites them; the second one's program
    (0, 0, 0) stores the new length."""
    bh = tl.program_id(0)
    tile = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    start = tl.load(Pos).to(tl.int32)
    end = start + S
    g = start // G + tl.program_id(1) + (0 if FIRST else 1)
    if not FIRST:  # noqa: SIM102 (FIRST is a constexpr: resolved at compile time)
        if bh == 0 and tl.program_id(1) == 0 and tile == 0:
            tl.store(Len, end.to(tl.int64))
    if g * G < end:
        offs_t = tl.arange(0, G)
        tt = g * G + offs_t
        offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        xi = tl.load(XI + offs_p)
        yi = tl.load(YI + offs_p)
        new_ok = ((tt >= start) & (tt < end))[:, None] & pmask[None, :]
        nrow = New + b * sn_b + h * sn_h + (tt - start).to(tl.int64)[:, None] * sn_t
        RT = Ring.dtype.element_ty
        x = tl.load(nrow + xi[None, :] * sn_d, mask=new_ok, other=0.0).to(tl.float32)  # new keys: ring dtype
        y = tl.load(nrow + yi[None, :] * sn_d, mask=new_ok, other=0.0).to(tl.float32)
        rrow = Ring + b * sr_b + h * sr_h + offs_t.to(tl.int64)[:, None] * sr_t  # slot of tt = offs_t
        crow = Codes + b * sc_b + h * sc_h + tt.to(tl.int64)[:, None] * sc_t
        pp = Params + b * sp_b + h * sp_h + g.to(tl.int64) * sp_g + offs_p
        complete = (g + 1) * G <= end
        to_ring = (tt >= start) & (tt < end)  # an open group: only its new tokens are stored
        if FIRST:  # the group's tokens before `start`: the ring, or decoded codes after a rewind
            old_ok = (tt < start)[:, None] & pmask[None, :]
            if (g + 1) * G <= tl.load(Len).to(tl.int32):
                ox, oy = decode_pairs(crow, pp, sp_k, offs_p, pmask, NB, RB, AB)
                ox = ox.to(RT).to(tl.float32)
                oy = oy.to(RT).to(tl.float32)
                to_ring = tt < end  # the re-opened group's kept tokens move back to the ring
            else:  # (needed only to encode: an open group's old tokens stay where they are)
                need = (tt < tl.where(complete, start, 0))[:, None] & pmask[None, :]
                ox = tl.load(rrow + xi[None, :] * sr_d, mask=need, other=0.0).to(tl.float32)
                oy = tl.load(rrow + yi[None, :] * sr_d, mask=need, other=0.0).to(tl.float32)
            x = tl.where(old_ok, ox, x)
            y = tl.where(old_ok, oy, y)
        if complete:  # encode (a group past the capacity is dropped: attention then sees a length beyond
            if g < n_cap_groups:  # the capacity and returns NaN)
                encode_store(x, y, crow, pp, sp_k, tile, offs_p, pmask, P, NB, G, RB, AB, BLOCK_P, ON_GPU)
        else:
            keep = to_ring[:, None] & pmask[None, :]
            tl.store(rrow + xi[None, :] * sr_d, x.to(RT), mask=keep)
            tl.store(rrow + yi[None, :] * sr_d, y.to(RT), mask=keep)
