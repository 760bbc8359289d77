"""Triton: fused split-K flash-decoding attention over PolarQuant keys (jit code only; host: kernels/attention.py).

Grid (B * NQG, splits, MB). A program serves RG query heads (all heads of a GQA group when V has Hkv
heads, one head when V was already repeated to Hq heads) times S query positions = up to BLOCK_M rows,
over one contiguous range of BLOCK_N-token blocks of its kv-head. Encoded blocks are dequantized in
registers (r, phi from the bin centers; cos/sin through the hardware approximations on the GPU) into
their x and y halves [N, P] and scored with tl.dot shared by all rows (two dots q_x k_x^T + q_y k_y^T,
or one over x/y interleaved: SPLIT_DOT), whole (NCH = 1) or in NCH chunks of pairs. The full-precision tail
blocks are scored the same way from the tail buffer. BLOCK_N, SPLIT_DOT, PPS (programs per SM, sets the split
count), NCH, the warp/stage counts and a register cap (maxnreg: how many programs fit an SM) are tuned on the
GPU by the host wrapper. Online softmax in fp32, P @ V, then either the final output (one split) or per-split
partials (acc, max, sum) reduced by polar_attn_reduce_kernel. Dense dequantized keys never leave registers.
Values (VB): VB = 0 reads dense V [B, Hkv | Hq, T, Dv] (token t at row t); VB in {2, 4, 8} reads packed values
(value_codec.py): an encoded block's codes [N, NBV] and (min, scale) [N, Dv/VCG, 2] are dequantized in registers
to [N, BLOCK_DV] (load_values: the keys' bin_unit and one FMA) or, VDOT, after the dot (packed_block_update: per
channel group (p * scale) @ codes as exact bf16 plus p @ (min + scale / 2)), the tail blocks read the dense value tail (row
t - Tc: the state's tail, or a static cache's ring at slot t % G); V then has Hkv heads only. With VB = 0 the
packed-value arguments are None (constexprs: the launch's signature and SASS are those of the dense kernel).
LEN_DEVICE (static caches, CUDA graphs): the length is read from device memory, the grid is sized by the
capacity and every split divides the actual length; the tail is the cache's ring (token t at slot t % G).
The kernel body is not split into more helpers: inlining a helper reorders the constants the compiler hoists,
which changes the SASS (register allocation) of launches timed on the H200 (`bench/compile_kernels.py --hash`).
"""

import triton
import triton.language as tl

from .key_decode import bin_unit, cell_halves, cos_sin, decode_codes, load_codes, score_pair_chunk


@triton.jit
def load_values(VCrow, VProw, NBV: tl.constexpr, VB: tl.constexpr, VCG: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    """Packed values of BLOCK_N tokens (row pointers VCrow into the codes, VProw into the params, [N, 1]) -> fp32
    [N, BLOCK_DV] bin centres min + (c + 0.5) * scale = u * (2^VB * scale) + (min - 2^VB * scale), u = bin_unit(c).
    Codes: 8-bit, the row's bytes; 4- and 2-bit, each channel's own byte (neighbouring lanes load the same byte)
    shifted to its field, which keeps the tile elementwise: the sm_90 SASS of the hot loop is ~20% shorter than
    with a contiguous load unpacked by a reshape (bench/NOTES.md). Params: one (min, scale) per channel group
    [N, NG], broadcast over its VCG channels. Channels past Dv (padding) come out 0."""
    NG: tl.constexpr = BLOCK_DV // VCG  # channel groups of the padded row (those past Dv load 0)
    offs_c = tl.arange(0, BLOCK_DV)
    if VB == 8:
        code = tl.load(VCrow + offs_c[None, :], mask=(offs_c < NBV)[None, :], other=0).to(tl.int32)
    else:
        idx = (offs_c * VB) >> 3
        raw = tl.load(VCrow + idx[None, :], mask=(idx < NBV)[None, :], other=0).to(tl.int32)
        code = raw >> ((offs_c * VB) & 7)[None, :]  # bin_unit masks the other fields
    offs_g = tl.arange(0, NG)
    gmask = (offs_g < NBV // (VCG * VB // 8))[None, :]
    w = tl.load(VProw + 2 * offs_g[None, :] + 1, mask=gmask, other=0.0).to(tl.float32) * (1 << VB)
    z = tl.load(VProw + 2 * offs_g[None, :], mask=gmask, other=0.0).to(tl.float32) - w
    u = bin_unit(tl.reshape(code, [BLOCK_N, NG, VCG]), 0, VB)
    return tl.reshape(u * w[:, :, None] + z[:, :, None], [BLOCK_N, BLOCK_DV])


@triton.jit
def value_units(VCrow3, VB: tl.constexpr, VCG: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr,
                NGP: tl.constexpr, UT: tl.constexpr, VLOAD: tl.constexpr):
    """The raw codes of BLOCK_N tokens as exact numbers U [NGP, N, VCG] in UT (VCrow3 [NGP, N, 1]: each (channel
    group, token)'s first code byte; groups past NG, the padding of Dv, give 0). VLOAD 0: each group's bytes of
    a token loaded contiguously (cp.async), the fields split by shifts and interleaved by joins in registers; 1:
    each channel's own byte (neighbouring lanes load the same byte), shifted. bf16 from codes < 128: the code
    ORed into the bits of 128.0 (0x4300) less 128 (one packed bf16 add per two codes; no int -> float convert);
    8-bit codes and fp32 are converted."""
    gok = tl.arange(0, NGP) < NG
    if VLOAD == 0:
        offs_b = tl.arange(0, VCG * VB // 8)
        raw = tl.load(VCrow3 + offs_b[None, None, :], mask=gok[:, None, None], other=0).to(tl.int32)
        if VB == 8:
            code = raw
        elif VB == 4:
            code = tl.reshape(tl.join(raw & 15, raw >> 4), [NGP, BLOCK_N, VCG])
        else:  # channel 4i + k at bits 2k of byte i: join(join(f0, f2), join(f1, f3)) is f0 f1 f2 f3 in order
            code = tl.reshape(tl.join(tl.join(raw & 3, (raw >> 4) & 3), tl.join((raw >> 2) & 3, raw >> 6)),
                              [NGP, BLOCK_N, VCG])
    else:
        offs_c = tl.arange(0, VCG)
        raw = tl.load(VCrow3 + ((offs_c * VB) >> 3)[None, None, :], mask=gok[:, None, None], other=0).to(tl.int32)
        code = (raw >> ((offs_c * VB) & 7)[None, None, :]) & ((1 << VB) - 1)
    if UT == tl.bfloat16 and VB < 8:
        u = (code | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 128.0
    else:
        u = code.to(UT)
    return u


@triton.jit
def packed_block_update(qk, VCrow3, VProw3, tt, m_i, l_i, acc3, Mrow, sm_t, si, row_ok, seq_len, S_len,
                        scale, softcap, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, SOFTCAP: tl.constexpr,
                        CAUSAL: tl.constexpr, PREC: tl.constexpr, VB: tl.constexpr, VCG: tl.constexpr,
                        BLOCK_N: tl.constexpr, NG: tl.constexpr, NGP: tl.constexpr, UT: tl.constexpr,
                        VLOAD: tl.constexpr):
    """block_update over one block of packed values, dequantized after the dot. With p [M, N] the block's
    probabilities and, per channel group g, s_g, m_g [N] its tokens' scales and mins and U_g [N, VCG] their raw
    codes, p v over g's channels is (p * s_g) U_g + p (m_g + s_g / 2) (value_codec's bin centre m + (c + 1/2) s).
    acc3 [NGP, M, VCG] (group-major) takes the batched dot of p * s_g (rounded to UT) with U, accumulated onto
    acc3 * alpha + the fp32 row sums of p (m_g + s_g / 2); no per-element FMA, no dequantized tile. The caller
    puts the groups back in place after the last encoded block. Scoring and softmax repeat block_update's
    (sharing a helper would change the dense launches' SASS)."""
    s = qk * scale
    if SOFTCAP:
        e = tl.exp(2.0 * s / softcap)
        s = softcap * (1.0 - 2.0 / (e + 1.0))  # softcap * tanh(s / softcap)
    t_ok = tt < seq_len
    keep = t_ok[None, :] & row_ok[:, None]
    if CAUSAL:
        keep = keep & (tt[None, :] <= (seq_len - S_len + si)[:, None])
    if HAS_MASK:
        mv = tl.load(Mrow + tt.to(tl.int64)[None, :] * sm_t, mask=row_ok[:, None] & t_ok[None, :], other=0)
        if MASK_BOOL:
            keep = keep & (mv != 0)
        else:
            s = s + mv.to(tl.float32)
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2((s - m_use[:, None]) * 1.4426950408889634)
    alpha = tl.exp2((m_i - m_use) * 1.4426950408889634)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    prm = tl.load(VProw3, mask=(tl.arange(0, 2 * NGP) < 2 * NG)[None, :], other=0.0)  # [N, 2 NGP]: (min, scale)
    mn, sc = tl.split(tl.reshape(prm.to(tl.float32), [BLOCK_N, NGP, 2]))  # [N, NGP] each
    p3 = tl.broadcast_to(p[None, :, :], [NGP, p.shape[0], BLOCK_N])
    ps = (p3 * tl.trans(sc)[:, None, :]).to(UT)  # [NGP, M, N]
    u = value_units(VCrow3, VB, VCG, BLOCK_N, NG, NGP, UT, VLOAD)
    z = tl.sum(tl.trans(p)[:, None, :] * (mn + 0.5 * sc)[:, :, None], axis=0)  # [NGP, M]
    acc3 = tl.dot(ps, u, acc3 * alpha[None, :, None] + z[:, :, None], input_precision=PREC)
    return m_new, l_i, acc3


@triton.jit
def block_update(qk, v, tt, m_i, l_i, acc, Mrow, sm_t, si, row_ok, seq_len, S_len, scale, softcap,
                 HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, SOFTCAP: tl.constexpr, CAUSAL: tl.constexpr,
                 VT: tl.constexpr, PREC: tl.constexpr):
    """One block: scores qk [M, N] of tokens tt [N], values v [N, DV] -> updated (max, sum, acc [M, DV])."""
    s = qk * scale
    if SOFTCAP:
        e = tl.exp(2.0 * s / softcap)
        s = softcap * (1.0 - 2.0 / (e + 1.0))  # softcap * tanh(s / softcap)
    t_ok = tt < seq_len
    keep = t_ok[None, :] & row_ok[:, None]
    if CAUSAL:
        keep = keep & (tt[None, :] <= (seq_len - S_len + si)[:, None])
    if HAS_MASK:
        mv = tl.load(Mrow + tt.to(tl.int64)[None, :] * sm_t, mask=row_ok[:, None] & t_ok[None, :], other=0)
        if MASK_BOOL:
            keep = keep & (mv != 0)
        else:
            s = s + mv.to(tl.float32)
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2((s - m_use[:, None]) * 1.4426950408889634)
    alpha = tl.exp2((m_i - m_use) * 1.4426950408889634)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(VT), v.to(VT), input_precision=PREC)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["seq_len", "Tc", "t_max"])
def polar_attn_fwd_kernel(
    Qp, sq_b, sq_h, sq_s, sq_d,  # q [B, Hq, S, D]
    Cp, sc_b, sc_h, sc_t,  # codes uint8 [B, Hkv, Tc, NB], byte stride 1
    Pp, sp_b, sp_h, sp_g, sp_k,  # params bf16 [B, Hkv, Tc/G, 4, P], pair stride 1
    Kt, st_b, st_h, st_t, st_d,  # tail [B, Hkv, L + pad, D], or a static cache's ring [B, Hkv, G, D]
    Vp, sv_b, sv_h, sv_t,  # v [B, Hkv | Hq, T, Dv], dv stride 1; packed values: their tail (or ring) [B, Hkv, L, Dv]
    VCp, svc_b, svc_h, svc_t,  # packed values (VB > 0, else None): codes uint8 [B, Hkv, Tc, NBV], byte stride 1
    VPp, svp_b, svp_h, svp_t,  # and params bf16 [B, Hkv, Tc, Dv/VCG, 2], (min, scale) contiguous per token
    Mk, sm_b, sm_h, sm_s, sm_t,  # mask, broadcast to [B, Hq, S, T] (stride 0 where broadcast)
    XI, YI,  # int32 [BLOCK_P]: the x and y dim of each pair (zero-padded)
    Out, so_b, so_h, so_s,  # [B, Hq, S, Dv]: written directly when the grid has one split
    Opart, Mpart, Lpart,  # fp32 [rows, splits, BLOCK_M, BLOCK_DV], [rows, splits, BLOCK_M] otherwise
    Lp,  # int64 [1]: the length, read on the device (LEN_DEVICE; seq_len and Tc are then ignored)
    seq_len, Tc, t_max, NQG, S_len, R, RG, Dv, scale, softcap,
    P: tl.constexpr, NB: tl.constexpr, G: tl.constexpr, RB: tl.constexpr, AB: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    SOFTCAP: tl.constexpr, CAUSAL: tl.constexpr, FAST: tl.constexpr, QT: tl.constexpr, VT: tl.constexpr,
    LEN_DEVICE: tl.constexpr, PREC: tl.constexpr,  # PREC: "ieee" for fp32 inputs (no TF32 rounding)
    CB: tl.constexpr,  # bytes of the smallest whole word of codes: W / gcd(W, 8)
    BLOCK_N: tl.constexpr, SPLIT_DOT: tl.constexpr, PPS: tl.constexpr, ALT: tl.constexpr,  # tuned (PPS: grid)
    NCH: tl.constexpr,  # tuned: pair chunks per encoded block (> 1: 8-bit codes and split dots only)
    VB: tl.constexpr, VCG: tl.constexpr, NBV: tl.constexpr,  # value bits (0: dense V), channels per group, bytes
    VDOT: tl.constexpr = False,  # packed values dequantized after the dot (VB > 0, VCG >= 16), else before
    VLOAD: tl.constexpr = 0, UT: tl.constexpr = None,  # VDOT: the code load (value_units), the dots' dtype
    KIND: tl.constexpr = 0,  # the key codec: key_cells.KINDS index (cell_halves)
):
    W: tl.constexpr = RB + AB
    if LEN_DEVICE:  # a static cache: nothing on the host knows the length (CUDA-graph replays)
        seq_len = tl.load(Lp).to(tl.int32)
        bad, seq_len = seq_len > t_max, tl.minimum(seq_len, t_max)  # bad: written past the capacity, NaN out
        Tc = seq_len // G * G
    pid_q, split, n_splits, mb = tl.program_id(0), tl.program_id(1), tl.num_programs(1), tl.program_id(2)
    b, qg = (pid_q // NQG).to(tl.int64), pid_q % NQG
    kvh = ((qg * RG) // R).to(tl.int64)

    # rows: RG query heads x S positions; q split into the x and y halves of every pair
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < RG * S_len
    si, qh = offs_m % S_len, (qg * RG + offs_m // S_len).to(tl.int64)
    si64 = si.to(tl.int64)  # a row's offsets: S x the mask's row stride passes 2^31 in a long prefill
    offs_j = tl.arange(0, BLOCK_P)
    jmask = offs_j < P
    xi, yi = tl.load(XI + offs_j), tl.load(YI + offs_j)
    Qrow = Qp + b * sq_b + qh[:, None] * sq_h + si64[:, None] * sq_s
    qmask = row_ok[:, None] & jmask[None, :]
    qx = tl.load(Qrow + xi[None, :] * sq_d, mask=qmask, other=0.0).to(QT)  # [M, P]
    qy = tl.load(Qrow + yi[None, :] * sq_d, mask=qmask, other=0.0).to(QT)
    if not SPLIT_DOT:
        qxy = tl.reshape(tl.join(qx, qy), [BLOCK_M, 2 * BLOCK_P])  # [M, 2P], x/y interleaved
    offs_n, offs_dv = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < Dv
    Vrow = Vp + b * sv_b + qg.to(tl.int64) * sv_h + offs_dv[None, :]  # V head = qg (RG = R or RG = 1)
    Mrow = Mk + b * sm_b + qh[:, None] * sm_h + si64[:, None] * sm_s
    m_i, l_i = tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    # this split's range of BLOCK_N-token blocks: encoded blocks first, then the tail's
    n_code = Tc // BLOCK_N
    n_blocks = n_code + tl.cdiv(seq_len - Tc, BLOCK_N)
    if CAUSAL:  # blocks after the last key this program's rows may see are skipped
        n_blocks = tl.minimum(n_blocks, tl.cdiv(seq_len - S_len + tl.max(tl.where(row_ok, si, 0), 0) + 1, BLOCK_N))
    per = tl.cdiv(n_blocks, n_splits)
    first = split * per
    last = tl.minimum(first + per, n_blocks)
    Crow = Cp + b * sc_b + kvh * sc_h + offs_n.to(tl.int64)[:, None] * sc_t
    Pbase = Pp + b * sp_b + kvh * sp_h + offs_j
    if VB > 0:  # packed values: rows of the block's codes and params
        VCrow = VCp + b * svc_b + kvh * svc_h + offs_n.to(tl.int64)[:, None] * svc_t
        VProw = VPp + b * svp_b + kvh * svp_h + offs_n.to(tl.int64)[:, None] * svp_t
    if VDOT:  # per (channel group, token): the group's first code byte; per token: (min, scale) per group
        NGP: tl.constexpr = BLOCK_DV // VCG
        NG: tl.constexpr = NBV // (VCG * VB // 8)  # groups past NG (the padding of Dv) load nothing
        offs_g = tl.arange(0, NGP)
        # token strides NBV and 2 NG (the host makes both contiguous per token): known alignment, vector loads
        VCrow3 = (VCp + b * svc_b + kvh * svc_h + offs_n.to(tl.int64)[None, :, None] * NBV
                  + (offs_g * (VCG * VB // 8))[:, None, None])
        VProw3 = VPp + b * svp_b + kvh * svp_h + offs_n.to(tl.int64)[:, None] * (2 * NG) + tl.arange(0, 2 * NGP)[None, :]
        acc3 = tl.zeros([NGP, BLOCK_M, VCG], tl.float32)
    for blk in range(first, tl.minimum(last, n_code)):
        t0 = blk * BLOCK_N
        tt = t0 + offs_n
        pg = Pbase + (t0 // G).to(tl.int64) * sp_g
        if NCH > 1:
            tl.static_assert(W == 8 and SPLIT_DOT, "pair chunks: 8-bit codes, split dots")
            qk = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            pg0 = Pp + b * sp_b + kvh * sp_h + (t0 // G).to(tl.int64) * sp_g
            for c in tl.static_range(NCH):
                qk = score_pair_chunk(qk, Qrow, sq_d, row_ok, XI, YI, Crow + t0.to(tl.int64) * sc_t, pg0, sp_k, c,
                                      P, RB, AB, BLOCK_P // NCH, FAST, QT, PREC, KIND)
        else:  # bin centre min + (c + 0.5) * step = u * (2^bits * step) + (min - 2^bits * step), u = bin_unit(c)
            if KIND >= 2:
                a_w = tl.load(pg + 3 * sp_k, mask=jmask, other=0.0).to(tl.float32) * (1 << AB)
                a_0 = tl.load(pg + 2 * sp_k, mask=jmask, other=0.0).to(tl.float32) - a_w
                raw = load_codes(Crow + t0.to(tl.int64) * sc_t, offs_j, t0 >= 0, NB, W, BLOCK_P, ALT, CB)
                code = decode_codes(raw, offs_j, W, BLOCK_N, BLOCK_P, ALT, CB)
                kx, ky = cell_halves(code, tl.load(pg, mask=jmask, other=0.0).to(tl.float32),
                                     tl.load(pg + sp_k, mask=jmask, other=0.0).to(tl.float32), a_w, a_0, RB, AB,
                                     FAST, KIND)
            else:  # (loads in their first order, as in score_pair_chunk)
                r_w = tl.load(pg + sp_k, mask=jmask, other=0.0).to(tl.float32) * (1 << RB)
                r_0 = tl.load(pg, mask=jmask, other=0.0).to(tl.float32) - r_w
                a_w = tl.load(pg + 3 * sp_k, mask=jmask, other=0.0).to(tl.float32) * (1 << AB)
                a_0 = tl.load(pg + 2 * sp_k, mask=jmask, other=0.0).to(tl.float32) - a_w
                raw = load_codes(Crow + t0.to(tl.int64) * sc_t, offs_j, t0 >= 0, NB, W, BLOCK_P, ALT, CB)
                code = decode_codes(raw, offs_j, W, BLOCK_N, BLOCK_P, ALT, CB)
                rad = bin_unit(code, 0, RB) * r_w[None, :] + r_0[None, :]
                c, s = cos_sin(bin_unit(code, RB, AB) * a_w[None, :] + a_0[None, :], FAST)
                if SPLIT_DOT:  # (each product right before its dot, as first timed)
                    qk = tl.dot(qx, tl.trans((rad * c).to(QT)), input_precision=PREC)
                    qk = tl.dot(qy, tl.trans((rad * s).to(QT)), qk, input_precision=PREC)
                else:
                    kx, ky = rad * c, rad * s
            if SPLIT_DOT and KIND >= 2:
                qk = tl.dot(qx, tl.trans(kx.to(QT)), input_precision=PREC)
                qk = tl.dot(qy, tl.trans(ky.to(QT)), qk, input_precision=PREC)
            elif not SPLIT_DOT:
                k = tl.reshape(tl.join(kx.to(QT), ky.to(QT)), [BLOCK_N, 2 * BLOCK_P])
                qk = tl.dot(qxy, tl.trans(k), input_precision=PREC)
        if VB == 0:
            v = tl.load(Vrow + tt.to(tl.int64)[:, None] * sv_t, mask=dv_mask[None, :], other=0.0)
            m_i, l_i, acc = block_update(qk, v, tt, m_i, l_i, acc, Mrow, sm_t, si, row_ok, seq_len, S_len, scale,
                                         softcap, HAS_MASK, MASK_BOOL, SOFTCAP, CAUSAL, VT, PREC)
        elif VDOT:
            m_i, l_i, acc3 = packed_block_update(
                qk, VCrow3 + t0.to(tl.int64) * NBV, VProw3 + t0.to(tl.int64) * (2 * NG), tt, m_i, l_i, acc3, Mrow, sm_t, si, row_ok, seq_len, S_len, scale, softcap, HAS_MASK, MASK_BOOL, SOFTCAP, CAUSAL,
                PREC, VB, VCG, BLOCK_N, NG, NGP, UT, VLOAD)
        else:
            v = load_values(VCrow + t0.to(tl.int64) * svc_t, VProw + t0.to(tl.int64) * svp_t, NBV, VB, VCG, BLOCK_N,
                            BLOCK_DV)
            m_i, l_i, acc = block_update(qk, v, tt, m_i, l_i, acc, Mrow, sm_t, si, row_ok, seq_len, S_len, scale,
                                         softcap, HAS_MASK, MASK_BOOL, SOFTCAP, CAUSAL, VT, PREC)
    if VDOT:  # the channel groups back in place: acc [M, NGP * VCG], for the tail blocks and the store
        acc = tl.reshape(tl.permute(acc3, (1, 0, 2)), [BLOCK_M, BLOCK_DV])

    Tbase = Kt + b * st_b + kvh * st_h  # the full-precision tail, scored the same way
    for blk in range(tl.maximum(first, n_code), last):
        tt = blk * BLOCK_N + offs_n
        krow = Tbase + (tt - Tc).to(tl.int64)[:, None] * st_t
        kmask = (tt < seq_len)[:, None] & jmask[None, :]
        kx = tl.load(krow + xi[None, :] * st_d, mask=kmask, other=0.0)
        ky = tl.load(krow + yi[None, :] * st_d, mask=kmask, other=0.0)
        qk = tl.dot(qx, tl.trans(kx.to(QT)), input_precision=PREC)
        qk = tl.dot(qy, tl.trans(ky.to(QT)), qk, input_precision=PREC)
        if VB == 0:
            v = tl.load(Vrow + tt.to(tl.int64)[:, None] * sv_t, mask=(tt < seq_len)[:, None] & dv_mask[None, :],
                        other=0.0)
        else:  # the value tail: row t - Tc, like the keys'
            v = tl.load(Vrow + (tt - Tc).to(tl.int64)[:, None] * sv_t,
                        mask=(tt < seq_len)[:, None] & dv_mask[None, :], other=0.0)
        m_i, l_i, acc = block_update(qk, v, tt, m_i, l_i, acc, Mrow, sm_t, si, row_ok, seq_len, S_len, scale,
                                     softcap, HAS_MASK, MASK_BOOL, SOFTCAP, CAUSAL, VT, PREC)

    if LEN_DEVICE:
        acc = tl.where(bad, float("nan"), acc)
    if n_splits == 1:  # normalize and store the output
        o = acc / tl.where(row_ok & (l_i > 0), l_i, 1.0)[:, None]  # all keys masked: 0, as SDPA
        optr = Out + b * so_b + qh[:, None] * so_h + si64[:, None] * so_s + offs_dv[None, :]
        tl.store(optr, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_mask[None, :])
    else:  # partials for polar_attn_reduce_kernel
        row = (pid_q * tl.num_programs(2) + mb).to(tl.int64) * n_splits + split
        offs_mm = tl.arange(0, BLOCK_M)
        tl.store(Opart + row * (BLOCK_M * BLOCK_DV) + offs_mm[:, None] * BLOCK_DV + offs_dv[None, :], acc)
        tl.store(Mpart + row * BLOCK_M + offs_mm, m_i)
        tl.store(Lpart + row * BLOCK_M + offs_mm, l_i)


@triton.jit(do_not_specialize=["n_splits"])
def polar_attn_reduce_kernel(
    Opart, Mpart, Lpart,  # fp32 [rows, SPLITS, BLOCK_M, BLOCK_DV], [rows, SPLITS, BLOCK_M]
    Out, so_b, so_h, so_s,  # [B, Hq, S, Dv], dv stride 1
    NQG, MB, S_len, RG, Dv, n_splits,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per real output row: the splits' partials combined BLOCK_S at a time (loads in parallel)."""
    row = tl.program_id(0)  # (b * NQG + qg) * MB + mb
    mm = tl.program_id(1)  # row inside the block
    mb = row % MB
    pid_q = row // MB
    b = (pid_q // NQG).to(tl.int64)
    qg = pid_q % NQG
    m = mb * BLOCK_M + mm
    if m < RG * S_len:
        offs_s = tl.arange(0, BLOCK_S)
        offs_dv = tl.arange(0, BLOCK_DV)
        base = row.to(tl.int64) * n_splits
        m_run = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)
        l_run = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
        acc = tl.zeros([BLOCK_DV], tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            sp = s0 + offs_s
            ok = sp < n_splits
            idx = (base + sp) * BLOCK_M + mm
            mv = tl.load(Mpart + idx, mask=ok, other=float("-inf"))
            m_new = tl.maximum(m_run, tl.max(mv, 0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            w = tl.exp2((mv - m_use) * 1.4426950408889634)
            alpha = tl.exp2((m_run - m_use) * 1.4426950408889634)
            o = tl.load(Opart + idx[:, None] * BLOCK_DV + offs_dv[None, :], mask=ok[:, None], other=0.0)
            l_run = l_run * alpha + tl.sum(w * tl.load(Lpart + idx, mask=ok, other=0.0), 0)
            acc = acc * alpha + tl.sum(w[:, None] * o, 0)
            m_run = m_new
        qh = (qg * RG + m // S_len).to(tl.int64)
        optr = Out + b * so_b + qh * so_h + (m % S_len).to(tl.int64) * so_s + offs_dv
        out = acc / tl.where(l_run > 0, l_run, 1.0)  # all keys masked: 0, as SDPA (NaN stays NaN)
        tl.store(optr, out.to(Out.dtype.element_ty), mask=offs_dv < Dv)
