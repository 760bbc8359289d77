"""Host wrappers of the fused polar decode attention kernel: checks, split-K launch, the per-shape tuner.

`attention` has the semantics and shapes of pqcompile.codec.attention; `static_attention` serves a static
cache, its length read on the device only. See the package docstring for the differences by design.
"""

from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl

from .. import codec as ref
from ..codec import KEY_DTYPES, PARAM_DTYPE, Codec, PolarData
from . import common
from .polar_attention import polar_attn_fwd_kernel, polar_attn_reduce_kernel

log = logging.getLogger(__name__)

# Attention launch: tuned on the GPU over ATTN_TUNE_SPACE (per shape class and length bucket, see _tune), else the
# fixed config below (interpreter, group_size < 32, or autotune=False). ablate != 0 gives wrong results on
# purpose: timing of the kernel with one stage left out (bench only).
# tune_alt_sub_byte: per-pair byte loads of sub-byte codes join the tuned space (v7: verified on the H200, never
# faster). tune_pair_chunks: the NCH > 1 configs join it (v9: off until run on a GPU).
ATTN_CONFIG = {"autotune": True, "block_n": 64, "split_dot": True, "programs_per_sm": 2, "num_warps": 4,
               "num_stages": 3, "alt_code_load": False, "maxnreg": None, "pair_chunks": 1, "ablate": 0,
               "tune_alt_sub_byte": False, "tune_pair_chunks": False}
# (BLOCK_N, SPLIT_DOT, PPS, num_warps, num_stages, ALT_CODE_LOAD, maxnreg, NCH). Left alone, ptxas gives the 4+4
# kernel ~240 registers a thread: two programs of 4 warps per SM. maxnreg caps it for 3 (168) or 4 (128) resident
# programs (2 of 8 warps); PPS sizes the grid to match. NCH > 1 scores an encoded block in NCH chunks of pairs
# (8-bit codes, split dots): shorter live ranges, so the caps cost fewer or no spills.
ATTN_TUNE_SPACE = [
    (64, True, 2, 4, 3, False, None, 1), (64, False, 2, 4, 3, False, None, 1), (64, True, 4, 4, 3, False, None, 1),
    (128, True, 2, 4, 3, False, None, 1), (32, True, 4, 4, 3, False, None, 1), (32, True, 8, 2, 4, False, None, 1),
    (64, True, 8, 4, 3, False, None, 1),
    (64, True, 3, 4, 3, False, 168, 1), (64, True, 6, 4, 3, False, 168, 1), (64, True, 4, 4, 3, False, 128, 1),
    (32, True, 3, 4, 3, False, 168, 1), (32, True, 6, 4, 3, False, 168, 1), (32, True, 4, 4, 3, False, 128, 1),
    (32, True, 8, 4, 3, False, 128, 1), (64, True, 2, 8, 3, False, 128, 1),
    (64, True, 6, 4, 3, False, 168, 2), (64, True, 8, 4, 3, False, 128, 2), (32, True, 8, 4, 3, False, 128, 2),
    (64, True, 4, 8, 3, False, 128, 2),
]


LAST_CONFIG = [None]  # the config the last tuned attention call used (bench reports it)
_TUNED: dict = {}  # shape class -> the fastest config of the space


def tune_space(G: int, block_p: int, W: int) -> list[tuple]:
    """The configs tried for a group size, pair block and code width: a block never spans groups; pair chunks
    only for 8-bit codes (chunks of >= 16 pairs) when tune_pair_chunks is set; codes that straddle bytes also
    try byte planes; sub-byte codes try per-pair bytes only when tune_alt_sub_byte is set."""
    space = [c for c in ATTN_TUNE_SPACE if c[0] <= G and c[0] * block_p <= 8192
             and (c[7] == 1 or (W == 8 and block_p // c[7] >= 16 and ATTN_CONFIG["tune_pair_chunks"]))]
    if 8 % W or (W < 8 and ATTN_CONFIG["tune_alt_sub_byte"]):
        space += [c[:5] + (True,) + c[6:] for c in space]
    return space


def _tune(key, launch, space):
    """Time every config of `space` once per shape class and remember the fastest.

    Timed as CUDA-graph replays (GPU time: what a graphed decode step pays; event timing of eager launches
    measures the host launch cost at small shapes and picked slower kernels there). Plain dict lookup on later
    calls: triton.autotune's per-call bookkeeping cost ~100 us of host time. Never tunes while a CUDA graph is
    being captured (uses the first config then).
    """
    best = _TUNED.get(key)
    if best is not None:
        return best
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return space[0]
    times = []
    for c in space:
        try:
            times.append((_gpu_time(lambda c=c: launch(c)), c))
        except Exception as e:  # noqa: BLE001 (a config that fails to compile here is skipped)
            log.debug("polar attention config %s failed: %s", c, e)
    if not times:  # nothing compiled: launch the first config and let its error surface
        return space[0]
    best = min(times)[1]
    _TUNED[key] = best
    log.info("polar attention tuned %s -> %s (%.1f us); every config: %s", key, best, min(times)[0] * 1e3,
             ", ".join(f"{c} {t * 1e3:.1f}" for t, c in sorted(times)))
    return best


def _gpu_time(fn) -> float:
    """Median ms of fn replayed in a CUDA graph; the first call (compile, buffer allocation) runs before capture."""
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=20, return_mode="median")
    except RuntimeError as e:  # a platform that cannot capture: event timing, host launch cost included
        log.debug("polar attention tuning without CUDA graphs: %s", e)
        return do_bench(fn, warmup=5, rep=20, return_mode="median")


def attention(q: torch.Tensor, data: PolarData, seq_len: int, v: torch.Tensor, codec: Codec, *,
              mask: torch.Tensor | None = None, scale: float | None = None, softcap: float | None = None,
              is_causal: bool = False, num_splits: int | None = None) -> torch.Tensor:
    """codec.attention with the fused kernel: q [B, Hq, S, D], v [B, Hkv|Hq, T, Dv] -> [B, Hq, S, Dv].

    num_splits overrides the split-K heuristic (tests); None picks ~2 programs per SM.
    """
    codes, params, tail = data
    for name, t in (("q", q), ("v", v), ("tail", tail)):
        if not isinstance(t, torch.Tensor) or t.dtype not in KEY_DTYPES:
            raise TypeError(f"{name} must be a float16/bfloat16/float32 tensor, got {getattr(t, 'dtype', type(t))}")
    if codes.dtype != torch.uint8 or params.dtype != PARAM_DTYPE:
        raise TypeError(f"codes must be uint8 and params bfloat16, got {codes.dtype} and {params.dtype}")
    if mask is not None and not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise TypeError(f"mask must be bool or floating point, got {mask.dtype}")
    common.check_codec(codec)
    B, Hq, S, D = q.shape if q.dim() == 4 else (0, 0, 0, 0)
    H, G = tail.shape[1], codec.group_size
    if q.dim() != 4 or tail.dim() != 4 or tail.shape[0] != B or tail.shape[-1] != D or H == 0 or Hq % H:
        raise ValueError(f"q shape {tuple(q.shape)} does not fit keys [B={tail.shape[0]}, H={H}, "
                         f"T={seq_len}, D={tail.shape[-1]}]")
    if v.dim() != 4 or v.shape[0] != B or v.shape[2] != seq_len or v.shape[1] not in (H, Hq):
        raise ValueError(f"v shape {tuple(v.shape)} does not fit keys [B={B}, H={H}, T={seq_len}]")
    Tc, NB, P = seq_len // G * G, codec.code_bytes(D), D // 2
    if (codes.shape != (B, H, Tc, NB) or params.shape != (B, H, Tc // G, 4, P)
            or tail.shape[2] < seq_len - Tc):
        raise ValueError(f"state codes {tuple(codes.shape)}, params {tuple(params.shape)}, tail "
                         f"{tuple(tail.shape)} does not hold {seq_len} tokens of D={D}, group {G}")
    for name, t in (("q", q), ("codes", codes), ("params", params), ("tail", tail), ("v", v)):
        common.check_device(name, t, q.device)
    Dv = v.shape[-1]
    if D > common.MAX_HEAD_DIM or Dv > common.MAX_HEAD_DIM or seq_len == 0 or S == 0 or B == 0:
        log.debug("polar attention falls back to the reference for q %s, v %s", tuple(q.shape), tuple(v.shape))
        return ref.attention(q, data, seq_len, v, codec, mask=mask, scale=scale, softcap=softcap,
                             is_causal=is_causal)
    return _attend(q, codes, params, tail, v, codec, seq_len=seq_len, length=None, mask=mask, scale=scale,
                   softcap=softcap, is_causal=is_causal, num_splits=num_splits)


def static_attention(q: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, ring: torch.Tensor,
                     length: torch.Tensor, v: torch.Tensor, codec: Codec, *, mask: torch.Tensor | None = None,
                     scale: float | None = None, is_causal: bool = False,
                     num_splits: int | None = None) -> torch.Tensor:
    """Attention over the first `length` tokens of a static state, the length read on the device only (the
    call is CUDA-graph safe). codes [B, H, Tcap, NB], params [B, H, Tcap/G, 4, P], ring [B, H, G, D],
    length int64 [1], v [B, H|Hq, Tmax, Dv] (Tmax <= Tcap), mask broadcastable to [B, Hq, S, Tmax].
    A length beyond Tmax (a write past the capacity) gives NaN."""
    common.check_codec(codec)
    for name, t in (("q", q), ("v", v), ("ring", ring)):
        if t.dtype not in KEY_DTYPES:
            raise TypeError(f"{name} must be a float16/bfloat16/float32 tensor, got {t.dtype}")
    if codes.dtype != torch.uint8 or params.dtype != PARAM_DTYPE or length.dtype != torch.int64:
        raise TypeError(f"codes, params and length must be uint8, bfloat16 and int64, got {codes.dtype}, "
                        f"{params.dtype}, {length.dtype}")
    G = codec.group_size
    B, H, Tcap, NB = codes.shape
    D = ring.shape[-1]
    if (q.dim() != 4 or q.shape[0] != B or q.shape[-1] != D or q.shape[1] % H or ring.shape != (B, H, G, D)
            or params.shape != (B, H, Tcap // G, 4, D // 2) or Tcap % G or NB != codec.code_bytes(D)
            or length.shape != (1,) or v.dim() != 4 or v.shape[0] != B or v.shape[1] not in (H, q.shape[1])
            or v.shape[2] > Tcap):
        raise ValueError(f"static state codes {tuple(codes.shape)}, params {tuple(params.shape)}, ring "
                         f"{tuple(ring.shape)}, length {tuple(length.shape)} does not fit q {tuple(q.shape)}, "
                         f"v {tuple(v.shape)} (group {G})")
    for name, t in (("q", q), ("codes", codes), ("params", params), ("ring", ring), ("length", length),
                    ("v", v)):
        common.check_device(name, t, q.device)
    if D > common.MAX_HEAD_DIM or v.shape[-1] > common.MAX_HEAD_DIM or 0 in q.shape or v.shape[2] == 0:
        raise ValueError(f"static polar attention supports head_dim <= {common.MAX_HEAD_DIM} and non-empty inputs, "
                         f"got q {tuple(q.shape)}, v {tuple(v.shape)}")
    return _attend(q, codes, params, ring, v, codec, seq_len=None, length=length, mask=mask, scale=scale,
                   softcap=None, is_causal=is_causal, num_splits=num_splits)


def _attend(q, codes, params, tail, v, codec, *, seq_len, length, mask, scale, softcap, is_causal, num_splits):
    """Launch the fused kernel (and the split reduction). seq_len: a host int, or None with `length` (a device
    tensor) for a static state whose encoded part and tail (its ring) are found from the length in-kernel."""
    B, Hq, S, D = q.shape
    H, G = tail.shape[1], codec.group_size
    T = seq_len if length is None else v.shape[2]  # the mask's key extent
    if mask is not None:
        common.check_device("mask", mask, q.device)
        try:
            mask = mask.expand(B, Hq, S, T)
        except RuntimeError:
            raise ValueError(f"mask shape {tuple(mask.shape)} is not broadcastable to {(B, Hq, S, T)}") from None
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
    codes = codes if codes.stride(-1) == 1 else codes.contiguous()
    params = params if params.stride(-1) == 1 else params.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()

    cfg = ATTN_CONFIG
    R = Hq // H
    RG, NQG = (R, H) if v.shape[1] == H else (1, Hq)
    Dv, P, NB, W = v.shape[-1], D // 2, codec.code_bytes(D), codec.code_bits
    rows = RG * S
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    MB = triton.cdiv(rows, block_m)
    block_p, block_dv = triton.next_power_of_2(P), max(16, triton.next_power_of_2(Dv))
    n_prog = B * NQG * MB
    sms = common.sm_count(q.device)
    if length is None:
        Tc, L = seq_len // G * G, seq_len % G
        len_arg, t_max = q, seq_len
    else:  # the grid covers the capacity; the kernel divides the actual length among the splits
        Tc, L = codes.shape[2], 0
        len_arg, t_max = length, v.shape[2]

    def n_splits(block_n: int, pps: int) -> int:
        n_blocks = Tc // block_n + triton.cdiv(L, block_n)
        want = num_splits if num_splits is not None else triton.cdiv(pps * sms, n_prog)
        return triton.cdiv(n_blocks, triton.cdiv(n_blocks, max(1, min(want, n_blocks))))

    on_gpu = common.on_gpu(q)
    qt = common.TL[q.dtype] if on_gpu else tl.float32
    vt = common.TL[v.dtype] if on_gpu else tl.float32
    xi, yi = common.pair_index(codec.pairing, D, q.device)
    out = common.alloc((B, Hq, S, Dv), q.dtype, q.device)
    m_arg, m_strides = (mask, mask.stride()) if mask is not None else (q, (0, 0, 0, 0))
    has_mask, mask_bool = mask is not None, mask is not None and mask.dtype == torch.uint8
    causal = bool(is_causal) and S > 1
    part = {}

    def launch(c):
        block_n, split_dot, pps, warps, stages, alt, maxnreg, nch = c
        splits = n_splits(block_n, pps)
        if splits > 1 and part.get("n", 0) < splits:
            part.update(n=splits, o=common.alloc((n_prog * splits * block_m * block_dv,), torch.float32, q.device),
                        ml=common.alloc((2, n_prog * splits * block_m), torch.float32, q.device))
        o_part, ml = (part["o"], part["ml"]) if splits > 1 else (out, (out, out))
        polar_attn_fwd_kernel[(n_prog // MB, splits, MB)](
            q, *q.stride(), codes, *codes.stride()[:3], params, *params.stride()[:4], tail, *tail.stride(),
            v, *v.stride()[:3], m_arg, *m_strides, xi, yi, out, *out.stride()[:3], o_part, ml[0], ml[1],
            len_arg, seq_len or 0, Tc, t_max, NQG, S, R, RG, Dv, float(D ** -0.5 if scale is None else scale),
            float(softcap) if softcap else 1.0,
            P=P, NB=NB, G=G, RB=codec.radius_bits, AB=codec.angle_bits,
            BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_DV=block_dv, HAS_MASK=has_mask, MASK_BOOL=mask_bool,
            SOFTCAP=bool(softcap), CAUSAL=causal, FAST=on_gpu, QT=qt, VT=vt, ABLATE=cfg["ablate"],
            LEN_DEVICE=length is not None, PREC="ieee" if torch.float32 in (q.dtype, v.dtype) else "tf32",
            CB=W // math.gcd(W, 8),
            BLOCK_N=block_n, SPLIT_DOT=split_dot, PPS=pps, ALT=alt, NCH=nch, num_warps=warps, num_stages=stages,
            **({"maxnreg": maxnreg} if maxnreg else {}),
        )
        if splits > 1:
            polar_attn_reduce_kernel[(n_prog, min(block_m, rows))](
                o_part, ml[0], ml[1], out, *out.stride()[:3], NQG, MB, S, RG, Dv, splits,
                BLOCK_M=block_m, BLOCK_DV=block_dv, BLOCK_S=min(32, triton.next_power_of_2(splits)), num_warps=4,
            )

    space = tune_space(G, block_p, W)
    if on_gpu and cfg["autotune"] and num_splits is None and not cfg["ablate"] and space:
        key = (length is None, (Tc + L).bit_length(), n_prog.bit_length(), P, NB, codec.radius_bits, G, block_m,
               block_dv, has_mask, mask_bool, causal, bool(softcap), q.dtype, v.dtype, tail.dtype)
        LAST_CONFIG[0] = _tune(key, launch, space)
        part.clear()  # partials the tuner allocated on its side stream: this launch allocates on the caller's
        launch(LAST_CONFIG[0])
    else:
        block_n = min(G, cfg["block_n"], max(16, 8192 // block_p))
        nch = cfg["pair_chunks"]
        if nch > 1 and (W != 8 or not cfg["split_dot"] or block_p % nch or block_p // nch < 16):
            raise ValueError(f"pair_chunks={nch} needs 8-bit codes, split dots and chunks of >= 16 pairs "
                             f"(codes of {W} bits, {block_p} pairs)")
        launch((block_n, cfg["split_dot"], cfg["programs_per_sm"], cfg["num_warps"], cfg["num_stages"],
                cfg["alt_code_load"] and W != 8, cfg["maxnreg"], nch))
    return out
