"""Triton: the static cache's write of new keys and of new values (jit code only; host wrapper:
kernels/static_write.py).

New tokens of an open group go to the cache's ring buffer (slot t % G); a group that completes is encoded in place
with the encode kernel's encode_store (values: value_encode_store, per token). Positions and the length are read
on the device (CUDA-graph replays).
"""

import triton
import triton.language as tl

from .encode import encode_store, value_encode_store


@triton.jit
def decode_pairs(crow, pp, sp_k, offs_p, pmask, NB: tl.constexpr, RB: tl.constexpr, AB: tl.constexpr,
                 KIND: tl.constexpr):
    """The reconstructed x, y [G, BLOCK_P] (fp32, accurate cos/sin) of one encoded group (codec.decode; KIND as
    encode_store's)."""
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
    polar = r_s.to(tl.int32, bitcast=True) < 0  # polar-hybrid: the sign of the first scale
    r = r_min[None, :] + ((code & ((1 << RB) - 1)).to(tl.float32) + 0.5) * tl.abs(r_s)[None, :]
    phi = a_min[None, :] + ((code >> RB).to(tl.float32) + 0.5) * a_s[None, :]
    if KIND == 3:
        return r, phi
    x, y = r * tl.cos(phi), r * tl.sin(phi)
    if KIND == 2:
        x, y = tl.where(polar[None, :], x, r), tl.where(polar[None, :], y, phi)
    return x, y


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
    BLOCK_P: tl.constexpr, FIRST: tl.constexpr, ON_GPU: tl.constexpr, KIND: tl.constexpr = 0,
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
                ox, oy = decode_pairs(crow, pp, sp_k, offs_p, pmask, NB, RB, AB, KIND)
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
                encode_store(x, y, crow, pp, sp_k, tile, offs_p, pmask, P, NB, G, RB, AB, BLOCK_P, ON_GPU, KIND)
        else:
            keep = to_ring[:, None] & pmask[None, :]
            tl.store(rrow + xi[None, :] * sr_d, x.to(RT), mask=keep)
            tl.store(rrow + yi[None, :] * sr_d, y.to(RT), mask=keep)


@triton.jit
def decode_value_rows(crow, prow, rows, offs_d, NBV: tl.constexpr, VB: tl.constexpr, VCG: tl.constexpr,
                      VMAX: tl.constexpr):
    """Encoded value rows where rows [T] (codes at crow [T, 1] + byte, params at prow [T, 1] + 2 * group + k) ->
    fp32 [T, BLOCK_DV]: value_codec.decode's min + (c + 0.5) * scale (the product is exact), clamped to the ring
    dtype's range +-VMAX."""
    dmask = rows[:, None] & (offs_d < NBV * 8 // VB)[None, :]
    byte = tl.load(crow + ((offs_d * VB) >> 3)[None, :], mask=dmask, other=0).to(tl.int32)
    code = (byte >> ((offs_d * VB) & 7)[None, :]) & ((1 << VB) - 1)
    g2 = 2 * (offs_d // VCG)[None, :]
    vmin = tl.load(prow + g2, mask=dmask, other=0.0).to(tl.float32)
    scale = tl.load(prow + g2 + 1, mask=dmask, other=0.0).to(tl.float32)
    v = vmin + (code.to(tl.float32) + 0.5) * scale
    return tl.minimum(tl.maximum(v, -VMAX), VMAX)


@triton.jit(do_not_specialize=["S"])
def value_static_write_kernel(
    New, sn_b, sn_h, sn_t, sn_d,  # new values [B, H, S, Dv], in the ring's dtype
    Pos, Len,  # int64: positions [S] (contiguous, first one read), tokens held before this write [1]
    Ring, sr_b, sr_h, sr_t, sr_d,  # [B, H, G, Dv]: the open group, slot = t % G
    Codes, sc_b, sc_h, sc_t,  # uint8 [B, H, Tcap, NBV], byte stride 1
    Params, sp_b, sp_h, sp_t,  # bf16 [B, H, Tcap, Dv/VCG, 2], (min, scale) contiguous per token
    H, S, Tcap,
    DV: tl.constexpr, NBV: tl.constexpr, G: tl.constexpr, VB: tl.constexpr, VCG: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr, FIRST: tl.constexpr, VMAX: tl.constexpr, ON_GPU: tl.constexpr,
):
    """Write S new value tokens at positions start.. (start read on the device), the keys' schedule per token:
    program (bh, j) owns BLOCK_T tokens (FIRST: of the group holding `start`, j-th tile of its G tokens; else the
    j-th tile after that group). A token of a group that completes by the write's end is encoded (its row: new, or
    older from the ring, or decoded from its own codes when a rewind re-opens an encoded group, as the reference
    decodes that group into the ring); a token of the still-open group goes to the ring. Two launches (FIRST,
    then the rest) so the ring and the old length are read before anything overwrites them; the second one's
    program (0, 0) stores the new length. Tokens at or past Tcap are dropped (attention then returns NaN)."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    start = tl.load(Pos).to(tl.int32)
    end = start + S
    g0 = start // G
    if FIRST:
        tt = g0 * G + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    else:
        if bh == 0 and tl.program_id(1) == 0:
            tl.store(Len, end.to(tl.int64))
        tt = (g0 + 1) * G + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_DV)
    dmask = (offs_d < DV)[None, :]
    new_ok = (tt >= start) & (tt < end)
    RT = Ring.dtype.element_ty
    nrow = New + b * sn_b + h * sn_h + (tt - start).to(tl.int64)[:, None] * sn_t
    v = tl.load(nrow + offs_d[None, :] * sn_d, mask=new_ok[:, None] & dmask, other=0.0).to(tl.float32)
    rrow = Ring + b * sr_b + h * sr_h + (tt % G).to(tl.int64)[:, None] * sr_t + offs_d[None, :] * sr_d
    crow = Codes + b * sc_b + h * sc_h + tt.to(tl.int64)[:, None] * sc_t
    prow = Params + b * sp_b + h * sp_h + tt.to(tl.int64)[:, None] * sp_t
    complete = (tt // G + 1) * G <= end
    to_ring = new_ok
    if FIRST:  # the group's tokens before `start`: the ring, or decoded codes after a rewind
        old = tt < start
        if (g0 + 1) * G <= tl.load(Len).to(tl.int32):
            ov = decode_value_rows(crow, prow, old, offs_d, NBV, VB, VCG, VMAX).to(RT).to(tl.float32)
            to_ring = tt < end  # the re-opened group's kept tokens move back to the ring
        else:  # (needed only to encode: an open group's old tokens stay where they are)
            ov = tl.load(rrow, mask=(old & complete)[:, None] & dmask, other=0.0).to(tl.float32)
        v = tl.where(old[:, None], ov, v)
    value_encode_store(v, complete & (tt < end) & (tt < Tcap), crow, prow, NBV, VB, VCG, BLOCK_T, BLOCK_DV, ON_GPU)
    tl.store(rrow, v.to(RT), mask=(to_ring & ~complete)[:, None] & dmask)
