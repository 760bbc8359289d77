"""Triton: dequantizing key codes in registers, for the attention kernel (jit code only; kernels/jit/attention.py).

cos/sin (hardware approximations on the GPU), bin centres by integer bit tricks, the code loads and their unpacking,
the non-polar codec kinds' cells (cell_halves), and the pair-chunked scoring of 8-bit codes. Functions inline into
the kernel: moving them between modules does not change its SASS (bench/compile_kernels.py --hash).
"""

import triton
import triton.language as tl


@triton.jit
def cos_sin(phi, FAST: tl.constexpr):
    if FAST:
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [phi], dtype=tl.float32, is_pure=True,
                                      pack=1)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [phi], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        c = tl.cos(phi)
        s = tl.sin(phi)
    return c, s


@triton.jit
def bin_unit(code, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """The BITS-bit field of int32 `code` at bit SHIFT -> float32 1 + (field + 0.5) / 2^BITS, exactly, in two
    integer ops (the field placed in the top mantissa bits, the half bit set; I2F is a quarter-rate op)."""
    if SHIFT > 23 - BITS:
        f = (code >> (SHIFT - (23 - BITS))) & (((1 << BITS) - 1) << (23 - BITS))
    else:
        f = (code << ((23 - BITS) - SHIFT)) & (((1 << BITS) - 1) << (23 - BITS))
    return (f | (0x3F800000 | (1 << (22 - BITS)))).to(tl.float32, bitcast=True)


@triton.jit
def load_codes(Crow, offs_j, ok, NB: tl.constexpr, W: tl.constexpr, BLOCK_P: tl.constexpr, ALT: tl.constexpr,
               CB: tl.constexpr):
    """Raw code bytes of BLOCK_N tokens (row pointers Crow [N, 1]); ok: scalar, False -> zeros.

    Sub-byte codes (W | 8): the row's bytes, unpacked by a reshape in decode_codes; ALT: each pair's own byte
    (a gather of neighbouring lanes, no reshape). Codes that straddle bytes: the two bytes holding each pair's
    bits (two gathers per pair); ALT: 8*CB/W pairs fill CB whole bytes (a word), loaded as CB strided byte
    planes and joined. ALT is a tuned variant: same results, the faster one wins on the GPU."""
    nb = tl.where(ok, NB, 0)  # (a scalar bool in a mask trips the interpreter)
    if W == 8:
        raw = tl.load(Crow + offs_j[None, :], mask=(offs_j < nb)[None, :], other=0)
    elif 8 % W == 0 and ALT:  # each pair's byte
        idx = (offs_j * W) >> 3
        raw = tl.load(Crow + idx[None, :], mask=(idx < nb)[None, :], other=0)
    elif 8 % W == 0:  # whole codes per byte: one contiguous byte load
        offs_b = tl.arange(0, BLOCK_P // (8 // W))
        raw = tl.load(Crow + offs_b[None, :], mask=(offs_b < nb)[None, :], other=0)
    elif ALT:
        PPW: tl.constexpr = 8 * CB // W
        offs_w = tl.arange(0, BLOCK_P // PPW) * CB
        raw = tl.load(Crow + offs_w[None, :], mask=(offs_w < nb)[None, :], other=0).to(tl.int64)
        for k in tl.static_range(1, CB):
            byte = tl.load(Crow + offs_w[None, :] + k, mask=(offs_w + k < nb)[None, :], other=0).to(tl.int64)
            raw = raw | (byte << (8 * k))
    else:  # codes straddle bytes: the two bytes holding each pair's bits
        idx = (offs_j * W) >> 3
        lo = tl.load(Crow + idx[None, :], mask=(idx < nb)[None, :], other=0).to(tl.int32)
        hi = tl.load(Crow + idx[None, :] + 1, mask=(idx + 1 < nb)[None, :], other=0).to(tl.int32)
        raw = lo | (hi << 8)
    return raw


@triton.jit
def decode_codes(raw, offs_j, W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, ALT: tl.constexpr,
                 CB: tl.constexpr):
    """Raw bytes from load_codes -> int32 [N, BLOCK_P] W-bit codes in pair order."""
    if W == 8:
        code = raw.to(tl.int32)
    elif 8 % W == 0 and not ALT:
        PER: tl.constexpr = 8 // W
        code = (raw.to(tl.int32)[:, :, None] >> (tl.arange(0, PER) * W)[None, None, :]) & ((1 << W) - 1)
        code = tl.reshape(code, [BLOCK_N, BLOCK_P])
    elif 8 % W != 0 and ALT:
        PPW: tl.constexpr = 8 * CB // W
        code = (raw[:, :, None] >> (tl.arange(0, PPW) * W).to(tl.int64)[None, None, :]) & ((1 << W) - 1)
        code = tl.reshape(code.to(tl.int32), [BLOCK_N, BLOCK_P])
    else:  # one byte (W | 8, ALT) or two (straddling) per pair, in lane order
        code = (raw.to(tl.int32) >> ((offs_j * W) & 7)[None, :]) & ((1 << W) - 1)
    return code


@triton.jit
def cell_halves(code, p0, p1, a_w, a_0, RB: tl.constexpr, AB: tl.constexpr, FAST: tl.constexpr,
                KIND: tl.constexpr):
    """Dequantized x and y halves [N, P] of a block of keys of the kinds that are not all polar (KIND 2
    polar-hybrid: polar where the first scale's sign bit is set, else Cartesian; 3 channel: Cartesian, no trig),
    from the codes, the first min and scale as loaded (p0, p1) and the second's terms (a_w, a_0 as the polar path's).
    The polar kinds keep their own inline path in the kernel body (its SASS is the timed one)."""
    polar = p1.to(tl.int32, bitcast=True) < 0
    r_w = tl.abs(p1) * (1 << RB)
    u = bin_unit(code, 0, RB) * r_w[None, :] + (p0 - r_w)[None, :]
    v = bin_unit(code, RB, AB) * a_w[None, :] + a_0[None, :]
    if KIND == 3:
        return u, v
    c, s = cos_sin(v, FAST)
    return tl.where(polar[None, :], u * c, u), tl.where(polar[None, :], u * s, v)


@triton.jit
def score_pair_chunk(qk, Qrow, sq_d, row_ok, XI, YI, Crow, Pg, sp_k, c, P: tl.constexpr, RB: tl.constexpr,
                     AB: tl.constexpr, PC: tl.constexpr, FAST: tl.constexpr, QT: tl.constexpr, PREC: tl.constexpr,
                     KIND: tl.constexpr = 0):
    """qk += q · k over pairs [c*PC, (c+1)*PC) of one block of 8-bit codes (byte j = pair j). Splitting the pairs
    into chunks shortens the dequantized tiles' live ranges (fewer registers a thread, more programs per SM);
    the q chunks are loop-invariant loads the compiler hoists out of the block loop. The dequant repeats the
    whole-block path's rather than sharing a helper with it, which would change that path's SASS."""
    offs_h = c * PC + tl.arange(0, PC)
    hmask = offs_h < P
    qx = tl.load(Qrow + tl.load(XI + offs_h)[None, :] * sq_d, mask=row_ok[:, None] & hmask[None, :], other=0.0)
    qy = tl.load(Qrow + tl.load(YI + offs_h)[None, :] * sq_d, mask=row_ok[:, None] & hmask[None, :], other=0.0)
    if KIND >= 2:
        a_w = tl.load(Pg + 3 * sp_k + offs_h, mask=hmask, other=0.0).to(tl.float32) * (1 << AB)
        a_0 = tl.load(Pg + 2 * sp_k + offs_h, mask=hmask, other=0.0).to(tl.float32) - a_w
        code = tl.load(Crow + offs_h[None, :], mask=hmask[None, :], other=0).to(tl.int32)
        kx, ky = cell_halves(code, tl.load(Pg + offs_h, mask=hmask, other=0.0).to(tl.float32),
                             tl.load(Pg + sp_k + offs_h, mask=hmask, other=0.0).to(tl.float32), a_w, a_0, RB, AB,
                             FAST, KIND)
        qk = tl.dot(qx.to(QT), tl.trans(kx.to(QT)), qk, input_precision=PREC)
        qk = tl.dot(qy.to(QT), tl.trans(ky.to(QT)), qk, input_precision=PREC)
    else:  # (the polar path's loads in their first order: the SASS of the polar launches stays what was timed)
        r_w = tl.load(Pg + sp_k + offs_h, mask=hmask, other=0.0).to(tl.float32) * (1 << RB)
        r_0 = tl.load(Pg + offs_h, mask=hmask, other=0.0).to(tl.float32) - r_w
        a_w = tl.load(Pg + 3 * sp_k + offs_h, mask=hmask, other=0.0).to(tl.float32) * (1 << AB)
        a_0 = tl.load(Pg + 2 * sp_k + offs_h, mask=hmask, other=0.0).to(tl.float32) - a_w
        code = tl.load(Crow + offs_h[None, :], mask=hmask[None, :], other=0).to(tl.int32)
        rad = bin_unit(code, 0, RB) * r_w[None, :] + r_0[None, :]
        cs, sn = cos_sin(bin_unit(code, RB, AB) * a_w[None, :] + a_0[None, :], FAST)
        qk = tl.dot(qx.to(QT), tl.trans((rad * cs).to(QT)), qk, input_precision=PREC)
        qk = tl.dot(qy.to(QT), tl.trans((rad * sn).to(QT)), qk, input_precision=PREC)
    return qk
