"""Triton: fused PolarQuant encode of complete key groups (jit code only; host wrapper: kernels/encode.py).

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
def uniform_cell(v, BITS: tl.constexpr, ON_GPU: tl.constexpr):
    """quantizer.group_params + bin_index over the group (axis 0): (codes int32, min, scale as fp32 of bf16)."""
    vmin = round_bf16_bits(tl.min(v, axis=0), False)
    scale = round_bf16_bits((tl.max(v, axis=0) - vmin) * (1.0 / (1 << BITS)), True)
    return bin_codes(v, vmin, scale, BITS, ON_GPU), vmin, scale


@triton.jit
def _last_two(last_a, prev_a, last_b, prev_b):
    """Scan combine: the last two elements of a concatenation (prev -inf: a run of one element). Associative."""
    return last_b, tl.where(prev_b > float("-inf"), prev_b, last_a)


@triton.jit
def circular_cell(phi, G: tl.constexpr, BITS: tl.constexpr, ON_GPU: tl.constexpr):
    """key_cells._circ_cell: angle bins over the shortest arc holding the group's angles. The angles of each pair
    sorted (a bitonic sort along the group), each one's predecessor by a scan, then the reference's own
    arithmetic: the gaps s[i] - s[i-1], the wrap-around gap, the start right after the largest."""
    s = tl.sort(tl.trans(phi), dim=1)  # [BLOCK_P, G]
    _, pred = tl.associative_scan((s, tl.full(s.shape, float("-inf"), tl.float32)), 1, _last_two)
    gap = tl.where(pred > float("-inf"), s - pred, 0.0)  # the smallest angle's gap is the wrap-around one
    inner = tl.max(gap, axis=1)
    lo = tl.min(s, axis=1)
    wrap = (lo + 6.283185307179586) - tl.max(s, axis=1)
    after = tl.min(tl.where(gap == inner[:, None], s, float("inf")), axis=1)
    a_min = round_bf16_bits(tl.where(wrap >= inner, lo, after), False)
    rel = phi - a_min[None, :]
    rel = tl.where(rel < 0, (phi + 6.283185307179586) - a_min[None, :], rel)
    scale = round_bf16_bits(tl.max(rel, axis=0) * (1.0 / (1 << BITS)), True)
    return bin_codes(rel, tl.zeros_like(scale), scale, BITS, ON_GPU), a_min, scale


@triton.jit
def encode_store(x, y, crow, pp, sp_k, tile, offs_p, pmask, P: tl.constexpr, NB: tl.constexpr,
                 G: tl.constexpr, RB: tl.constexpr, AB: tl.constexpr, BLOCK_P: tl.constexpr, ON_GPU: tl.constexpr,
                 KIND: tl.constexpr = 0):
    """Encode one group's pairs x, y [G, BLOCK_P] (fp32) and store its codes (token rows crow [G, 1] + byte)
    and params (pp [BLOCK_P] + k * sp_k). KIND: key_cells.KINDS index (0 polar, 1 polar-circ, 2 polar-hybrid,
    3 channel)."""
    W: tl.constexpr = RB + AB
    if KIND != 3:
        if ON_GPU:  # torch's own functions on CUDA (CUDA's math library): the same bits
            r = libdevice.hypot(x, y)
            phi = libdevice.atan2(y, x)
        else:
            r = tl.sqrt_rn(x * x + y * y)
            phi = atan2_poly(y, x)
        c_r, p0, p1 = uniform_cell(r, RB, ON_GPU)
        if KIND == 0:
            c_a, p2, p3 = uniform_cell(phi, AB, ON_GPU)
        else:
            c_a, p2, p3 = circular_cell(phi, G, AB, ON_GPU)
        code = c_r | (c_a << RB)
    if KIND >= 2:
        c_x, x_min, x_s = uniform_cell(x, RB, ON_GPU)
        c_y, y_min, y_s = uniform_cell(y, AB, ON_GPU)
    if KIND == 2:  # key_cells.prefer_polar: products of bf16 numbers, exact in fp64, so FMA or not decides alike
        r_mid = (p0 + p1 * (1 << (RB - 1))).to(tl.bfloat16).to(tl.float64)
        t = r_mid * p3.to(tl.float64)
        polar = p1.to(tl.float64) * p1.to(tl.float64) + t * t < (x_s.to(tl.float64) * x_s.to(tl.float64)
                                                                  + y_s.to(tl.float64) * y_s.to(tl.float64))
        code = tl.where(polar[None, :], code, c_x | (c_y << RB))
        p0, p1 = tl.where(polar, p0, x_min), tl.where(polar, -p1, x_s)  # the sign of the first scale: polar
        p2, p3 = tl.where(polar, p2, y_min), tl.where(polar, p3, y_s)
    if KIND == 3:
        c_x, p0, p1 = uniform_cell(x, RB, ON_GPU)
        c_y, p2, p3 = uniform_cell(y, AB, ON_GPU)
        code = c_x | (c_y << RB)
    # a non-finite key poisons its pair's params (NaN) instead of yielding plausible garbage codes
    bad = tl.max((~(tl.abs(x) + tl.abs(y) < float("inf"))).to(tl.int32), axis=0) > 0  # NaN or inf
    p0 = tl.where(bad, float("nan"), p0)
    code = tl.where(pmask[None, :], code, 0)

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

    tl.store(pp, p0.to(tl.bfloat16), mask=pmask)
    tl.store(pp + sp_k, p1.to(tl.bfloat16), mask=pmask)
    tl.store(pp + 2 * sp_k, p2.to(tl.bfloat16), mask=pmask)
    tl.store(pp + 3 * sp_k, p3.to(tl.bfloat16), mask=pmask)


@triton.jit(do_not_specialize=["n_groups", "group_offset"])
def polar_encode_kernel(
    K, sk_b, sk_h, sk_t, sk_d,  # keys [B, H, n*G, D], any strides
    XI, YI,  # int32 [P]: the x and y dim of each pair (PAIRS == 0)
    Codes_out, sc_b, sc_h, sc_t,  # uint8 [B, H, >=(off+n)*G, NB], byte stride 1
    Params_out, sp_b, sp_h, sp_g, sp_k,  # bf16 [B, H, >=off+n, 4, P], pair stride 1
    H, n_groups, group_offset,
    P: tl.constexpr, NB: tl.constexpr, G: tl.constexpr, RB: tl.constexpr, AB: tl.constexpr,
    BLOCK_P: tl.constexpr, PAIRS: tl.constexpr, ON_GPU: tl.constexpr, KIND: tl.constexpr = 0,
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
    encode_store(x, y, crow, pp, sp_k, tile, offs_p, pmask, P, NB, G, RB, AB, BLOCK_P, ON_GPU, KIND)


# --------------------------------------------------------------------------- values (value_codec.py)


@triton.jit
def value_bin_index(v, vmin, scale, BITS: tl.constexpr, EXACT_DIV: tl.constexpr):
    """value_codec's quantizer (codec.bin_index): floor((v - min) / scale), scale == 0 -> 0, clamped to
    [0, 2^BITS - 1]; int32. vmin and scale broadcast against v. The one helper both value writers use."""
    pos = scale > 0
    safe = tl.where(pos, scale, 1.0)
    if EXACT_DIV:  # IEEE division, as torch's (the GPU's `/` is approximate)
        c = tl.floor(tl.math.div_rn(v - vmin, tl.broadcast_to(safe, v.shape)))
    else:
        c = tl.floor((v - vmin) / safe)
    c = tl.where(pos, c, 0.0)
    c = tl.minimum(tl.maximum(c, 0.0), (1 << BITS) - 1.0)
    return c.to(tl.int32)


@triton.jit
def value_encode_store(v, t_ok, crow, prow, NBV: tl.constexpr, VB: tl.constexpr, VCG: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr, ON_GPU: tl.constexpr):
    """Quantize BLOCK_T value rows v [T, BLOCK_DV] (fp32; channels past Dv are whole padding groups) per token and
    channel group, and store the rows where t_ok [T]: codes at crow [T, 1] + byte, (min, scale) bf16 at prow
    [T, 1] + 2 * group + k. value_codec.encode_groups bit for bit: min rounded down to bf16, scale =
    (max - min) / 2^VB rounded up, code = value_bin_index. A non-finite value poisons its group's min (NaN)."""
    NG: tl.constexpr = BLOCK_DV // VCG
    v3 = tl.reshape(v, [BLOCK_T, NG, VCG])
    vmin = round_bf16_bits(tl.min(v3, axis=2), False)  # [T, NG]
    scale = round_bf16_bits((tl.max(v3, axis=2) - vmin) * (1.0 / (1 << VB)), True)
    bad = tl.max((~(tl.abs(v3) < float("inf"))).to(tl.int32), axis=2) > 0  # NaN or inf
    vmin = tl.where(bad, float("nan"), vmin)
    code = value_bin_index(v3, vmin[:, :, None], scale[:, :, None], VB, ON_GPU)  # [T, NG, VCG]
    PER: tl.constexpr = 8 // VB
    NBB: tl.constexpr = BLOCK_DV // PER  # bytes of a padded row
    if PER == 1:
        byte = tl.reshape(code, [BLOCK_T, NBB])
    else:
        byte = tl.sum(tl.reshape(code, [BLOCK_T, NBB, PER]) << (tl.arange(0, PER) * VB)[None, None, :], axis=2)
    offs_b = tl.arange(0, NBB)
    tl.store(crow + offs_b[None, :], byte.to(tl.uint8), mask=t_ok[:, None] & (offs_b < NBV)[None, :])
    offs_g = tl.arange(0, NG)
    pmask = t_ok[:, None] & (offs_g < NBV // (VCG * VB // 8))[None, :]
    tl.store(prow + 2 * offs_g[None, :], vmin.to(tl.bfloat16), mask=pmask)
    tl.store(prow + 2 * offs_g[None, :] + 1, scale.to(tl.bfloat16), mask=pmask)


@triton.jit(do_not_specialize=["n_tokens", "token_offset"])
def value_encode_kernel(
    V, sv_b, sv_h, sv_t, sv_d,  # values [B, H, n, Dv], any strides
    Codes_out, sc_b, sc_h, sc_t,  # uint8 [B, H, >= off + n, NBV], byte stride 1
    Params_out, sp_b, sp_h, sp_t,  # bf16 [B, H, >= off + n, Dv/VCG, 2], (min, scale) contiguous per token
    H, n_tokens, token_offset,
    DV: tl.constexpr, NBV: tl.constexpr, VB: tl.constexpr, VCG: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_DV: tl.constexpr, ON_GPU: tl.constexpr,
):
    """value_codec.encode_groups of n tokens into rows token_offset.. : one program per (batch x head, BLOCK_T
    tokens), whole rows (the quantizer is per token)."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    tt = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = tt < n_tokens
    offs_d = tl.arange(0, BLOCK_DV)
    v = tl.load(V + b * sv_b + h * sv_h + tt.to(tl.int64)[:, None] * sv_t + offs_d[None, :] * sv_d,
                mask=t_ok[:, None] & (offs_d < DV)[None, :], other=0.0).to(tl.float32)
    rows = (token_offset + tt).to(tl.int64)[:, None]
    value_encode_store(v, t_ok, Codes_out + b * sc_b + h * sc_h + rows * sc_t, Params_out + b * sp_b + h * sp_h
                       + rows * sp_t, NBV, VB, VCG, BLOCK_T, BLOCK_DV, ON_GPU)
