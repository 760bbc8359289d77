"""Triton kernels for the PolarQuant key cache: host wrappers with input checks and launch configs.

`append` and `attention` have the semantics and shapes of pqcompile.codec.append / codec.attention (the
ground truth); pqcompile.ops calls them for CUDA tensors. They also run on CPU tensors under
TRITON_INTERPRET=1 (tests). Differences from the reference, by design:
  - atan2/sqrt/cos/sin may differ from torch by an ulp (cos/sin use the GPU's fast approximations), so a
    code can land one bin off at a bin edge, and q.k uses the tensor cores in q's dtype.
  - append does not scan new keys for inf/NaN (that would sync the GPU every decode step); a non-finite
    key instead poisons its pair's group params with NaN, so attention over it returns NaN, never a
    plausible wrong number.
Fallbacks to the reference (logged at debug level): head_dim or value dim > 256, seq_len == 0, q_len == 0.
Errors: wrong dtypes (TypeError), wrong shapes/devices/layouts (ValueError); messages show shapes only.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
import triton
import triton.language as tl

from .. import codec as ref
from ..codec import KEY_DTYPES, PARAM_DTYPE, TAIL_PAD, Codec, PolarData
from ..config import PairingMode
from .polar_attention import polar_attn_fwd_kernel, polar_attn_reduce_kernel
from .polar_encode import polar_encode_kernel, polar_static_write_kernel

log = logging.getLogger(__name__)

MAX_HEAD_DIM = 256
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

ENCODE_CONFIG = {"num_warps": 8}
# Attention launch: tuned on the GPU over ATTN_TUNE_SPACE (per shape class and length bucket, see _tune), else the
# fixed config below (interpreter, group_size < 32, or autotune=False). ablate != 0 gives wrong results on
# purpose: timing of the kernel with one stage left out (bench only).
ATTN_CONFIG = {"autotune": True, "block_n": 64, "split_dot": True, "programs_per_sm": 2, "num_warps": 4,
               "num_stages": 3, "code_planes": False, "ablate": 0}
ATTN_TUNE_SPACE = [  # (BLOCK_N, SPLIT_DOT, PPS, num_warps, num_stages, CODE_PLANES)
    (64, True, 2, 4, 3, False), (64, False, 2, 4, 3, False), (64, True, 4, 4, 3, False), (128, True, 2, 4, 3, False),
    (32, True, 4, 4, 3, False), (32, True, 8, 2, 4, False), (64, True, 8, 4, 3, False),
]
# codes that straddle bytes (3+3, 2+3, ...) also try byte-plane loads (load_codes): same results, fewer loads


LAST_CONFIG = [None]  # the config the last tuned attention call used (bench reports it)
_TUNED: dict = {}  # shape class -> best (BLOCK_N, SPLIT_DOT, PPS, num_warps, num_stages)


def _tune(key, launch, space):
    """Time every config of `space` once per shape class (do_bench median) and remember the fastest.

    Plain dict lookup on later calls: triton.autotune's per-call bookkeeping cost ~100 us of host time.
    Never tunes while a CUDA graph is being captured (uses the first config then).
    """
    best = _TUNED.get(key)
    if best is not None:
        return best
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return space[0]
    from triton.testing import do_bench

    times = []
    for c in space:
        try:
            times.append((do_bench(lambda c=c: launch(c), warmup=5, rep=20, return_mode="median"), c))
        except Exception as e:  # noqa: BLE001 (a config that fails to compile here is skipped)
            log.debug("polar attention config %s failed: %s", c, e)
    if not times:  # nothing compiled: launch the first config and let its error surface
        return space[0]
    best = min(times)[1]
    _TUNED[key] = best
    log.info("polar attention tuned %s -> %s (%.1f us)", key, best, min(times)[0] * 1e3)
    return best


def _alloc(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the wrappers hand to a kernel comes from here (tests poison it to catch unwritten data)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (shape {tuple(t.shape)})")
    if not (t.is_cuda or _interpret()):
        raise ValueError(f"{name} must be a CUDA tensor (or set TRITON_INTERPRET=1), got {t.device}")


def _check_codec(codec: Codec) -> None:
    G = codec.group_size
    if not (1 <= codec.radius_bits and 1 <= codec.angle_bits and codec.code_bits <= 8):
        raise ValueError(f"bits {codec.radius_bits}+{codec.angle_bits} unsupported: need r, a >= 1, r + a <= 8")
    if G < 16 or G & (G - 1):
        raise ValueError(f"group_size {G} unsupported: need a power of two >= 16")


@functools.cache
def _pair_index(pairing: ref.Pairing, head_dim: int, device: torch.device):
    """(x dims, y dims) of the pairs, int32 on device, zero-padded to next_pow2(D/2)."""
    xs, ys = pairing.indices(head_dim)
    pad = [0] * (triton.next_power_of_2(len(xs)) - len(xs))
    return (torch.tensor(xs + pad, dtype=torch.int32, device=device),
            torch.tensor(ys + pad, dtype=torch.int32, device=device))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


# --------------------------------------------------------------------------- encode


def encode_groups_into(keys: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, group_offset: int,
                       codec: Codec) -> None:
    """Encode complete groups keys [B, H, n*G, D] into codes[:, :, off*G:(off+n)*G], params[:, :, off:off+n].

    codes: uint8 [B, H, >= (off+n)*G, NB] and params: bf16 [B, H, >= off+n, 4, D/2], both with unit
    stride in the last dim (preallocated: a static cache passes its own buffers).
    """
    ref.check_keys("keys", keys, finite=False)
    _check_codec(codec)
    B, H, T, D = keys.shape
    G, P, NB = codec.group_size, D // 2, codec.code_bytes(D)
    n = T // G
    if T % G:
        raise ValueError(f"keys shape {tuple(keys.shape)}: T must be a multiple of group_size {G}")
    if codes.dtype != torch.uint8 or params.dtype != PARAM_DTYPE:
        raise TypeError(f"codes must be uint8 and params bfloat16, got {codes.dtype} and {params.dtype}")
    if (codes.dim() != 4 or tuple(codes.shape[:2]) != (B, H) or codes.shape[3] != NB
            or codes.shape[2] < (group_offset + n) * G or codes.stride(3) != 1):
        raise ValueError(f"codes shape {tuple(codes.shape)} cannot take {n} groups at group {group_offset} of "
                         f"keys {tuple(keys.shape)} ({NB} bytes per token, unit last stride)")
    if (params.dim() != 5 or tuple(params.shape[:2]) != (B, H) or tuple(params.shape[3:]) != (4, P)
            or params.shape[2] < group_offset + n or params.stride(4) != 1):
        raise ValueError(f"params shape {tuple(params.shape)} cannot take {n} groups at group {group_offset} of "
                         f"keys {tuple(keys.shape)} (unit last stride)")
    for name, t in (("keys", keys), ("codes", codes), ("params", params)):
        _check_device(name, t, keys.device)
    if n == 0 or B * H == 0:
        return
    xi, yi = _pair_index(codec.pairing, D, keys.device)
    block_p = min(max(8, 8192 // G), max(8, triton.next_power_of_2(P)))
    pairs = 0
    if codec.pairing.rotary_dim in (None, D):
        pairs = 1 if codec.pairing.layout is PairingMode.HALF else 2
    grid = (B * H * n, triton.cdiv(P, block_p))
    polar_encode_kernel[grid](
        keys, *keys.stride(), xi, yi, codes, *codes.stride()[:3], params, *params.stride()[:4],
        H, n, group_offset,
        P=P, NB=NB, G=G, RB=codec.radius_bits, AB=codec.angle_bits, BLOCK_P=block_p, PAIRS=pairs,
        ON_GPU=keys.is_cuda and not _interpret(), num_warps=ENCODE_CONFIG["num_warps"],
    )


def encode_groups(keys: torch.Tensor, codec: Codec) -> tuple[torch.Tensor, torch.Tensor]:
    """Like codec.encode_groups: keys [B, H, n*G, D] -> codes [B, H, n*G, NB], params [B, H, n, 4, D/2]."""
    B, H, T, D = keys.shape
    codes = _alloc((B, H, T, codec.code_bytes(D)), torch.uint8, keys.device)
    params = _alloc((B, H, T // codec.group_size, 4, D // 2), PARAM_DTYPE, keys.device)
    encode_groups_into(keys, codes, params, 0, codec)
    return codes, params


def append(data: PolarData, seq_len: int, new_keys: torch.Tensor, codec: Codec) -> PolarData:
    """codec.append with the encode kernel: state of seq_len tokens + new_keys [B, H, S, D] -> fresh state."""
    ref.check_keys("new_keys", new_keys, finite=False)
    B, H, S, D = new_keys.shape
    G, NB = codec.group_size, codec.code_bytes(D)
    filled = seq_len % G
    codes, params, tail = data
    if tail.shape != (B, H, filled + TAIL_PAD, D):
        raise ValueError(f"new_keys shape {tuple(new_keys.shape)} does not fit a state of {seq_len} tokens "
                         f"with tail {tuple(tail.shape)}")
    Tc = seq_len - filled
    if codes.shape != (B, H, Tc, NB) or params.shape != (B, H, Tc // G, 4, D // 2):
        raise ValueError(f"codes {tuple(codes.shape)} / params {tuple(params.shape)} do not fit a state of "
                         f"{seq_len} tokens of keys [B={B}, H={H}, D={D}], group {G}")
    for name, t in (("codes", codes), ("params", params), ("tail", tail)):
        _check_device(name, t, new_keys.device)
    done = (filled + S) // G * G
    rest = filled + S - done
    new_codes = _alloc((B, H, Tc + done, NB), codes.dtype, codes.device)
    new_params = _alloc((B, H, (Tc + done) // G, 4, D // 2), params.dtype, params.device)
    new_codes[:, :, :Tc].copy_(codes)
    new_params[:, :, : Tc // G].copy_(params)
    new_tail = _alloc((B, H, rest + TAIL_PAD, D), tail.dtype, tail.device)
    new_tail[:, :, rest:].zero_()
    keys = new_keys.to(tail.dtype)
    if done:
        pending = keys if filled == 0 else torch.cat([tail[:, :, :filled], keys], dim=2)
        encode_groups_into(pending[:, :, :done], new_codes, new_params, Tc // G, codec)
        new_tail[:, :, :rest].copy_(pending[:, :, done:])
    else:
        new_tail[:, :, :filled].copy_(tail[:, :, :filled])
        new_tail[:, :, filled:rest].copy_(keys)
    return PolarData(new_codes, new_params, new_tail)


# --------------------------------------------------------------------------- attention


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
    _check_codec(codec)
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
        _check_device(name, t, q.device)
    Dv = v.shape[-1]
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM or seq_len == 0 or S == 0 or B == 0:
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
    _check_codec(codec)
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
        _check_device(name, t, q.device)
    if D > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM or 0 in q.shape or v.shape[2] == 0:
        raise ValueError(f"static polar attention supports head_dim <= {MAX_HEAD_DIM} and non-empty inputs, "
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
        _check_device("mask", mask, q.device)
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
    sms = _sm_count(q.device)
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

    on_gpu = q.is_cuda and not _interpret()
    qt = _TL[q.dtype] if on_gpu else tl.float32
    vt = _TL[v.dtype] if on_gpu else tl.float32
    xi, yi = _pair_index(codec.pairing, D, q.device)
    out = _alloc((B, Hq, S, Dv), q.dtype, q.device)
    m_arg, m_strides = (mask, mask.stride()) if mask is not None else (q, (0, 0, 0, 0))
    has_mask, mask_bool = mask is not None, mask is not None and mask.dtype == torch.uint8
    causal = bool(is_causal) and S > 1
    part = {}

    def launch(c):
        block_n, split_dot, pps, warps, stages, planes = c
        splits = n_splits(block_n, pps)
        if splits > 1 and part.get("n", 0) < splits:
            part.update(n=splits, o=_alloc((n_prog * splits * block_m * block_dv,), torch.float32, q.device),
                        ml=_alloc((2, n_prog * splits * block_m), torch.float32, q.device))
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
            BLOCK_N=block_n, SPLIT_DOT=split_dot, PPS=pps, PLANES=planes, num_warps=warps, num_stages=stages,
        )
        if splits > 1:
            polar_attn_reduce_kernel[(n_prog, min(block_m, rows))](
                o_part, ml[0], ml[1], out, *out.stride()[:3], NQG, MB, S, RG, Dv, splits,
                BLOCK_M=block_m, BLOCK_DV=block_dv, BLOCK_S=min(32, triton.next_power_of_2(splits)), num_warps=4,
            )

    space = [c for c in ATTN_TUNE_SPACE if c[0] <= G and c[0] * block_p <= 8192]  # a block never spans groups
    if 8 % W:
        space += [c[:5] + (True,) for c in space]
    if on_gpu and cfg["autotune"] and num_splits is None and not cfg["ablate"] and space:
        key = (length is None, (Tc + L).bit_length(), n_prog.bit_length(), P, NB, codec.radius_bits, G, block_m,
               block_dv, has_mask, mask_bool, causal, bool(softcap), q.dtype, v.dtype, tail.dtype)
        LAST_CONFIG[0] = _tune(key, launch, space)
        launch(LAST_CONFIG[0])
    else:
        block_n = min(G, cfg["block_n"], max(16, 8192 // block_p))
        launch((block_n, cfg["split_dot"], cfg["programs_per_sm"], cfg["num_warps"], cfg["num_stages"],
                cfg["code_planes"] and bool(8 % W)))
    return out


# --------------------------------------------------------------------------- static write


def static_write(codes: torch.Tensor, params: torch.Tensor, ring: torch.Tensor, length: torch.Tensor,
                 new_keys: torch.Tensor, positions: torch.Tensor, codec: Codec, *, check: bool = True) -> None:
    """In place, like ops.static_write_ on the reference: write new_keys [B, H, S, D] at positions [S] (contiguous,
    from at most `length`), encoding every group that completes; then length = positions[0] + S.

    The positions and the length are read on the device only, so the write can be captured in a CUDA graph.
    check=True first validates them on the host (a sync): HF's IndexError past the capacity, ValueError for
    non-contiguous positions. Unchecked, a write past the capacity drops the groups beyond it and the length
    it leaves makes static_attention return NaN.
    """
    ref.check_keys("new_keys", new_keys, finite=False)
    _check_codec(codec)
    B, H, S, D = new_keys.shape
    G, P, NB = codec.group_size, D // 2, codec.code_bytes(D)
    Tcap = codes.shape[2]
    if (codes.dtype != torch.uint8 or params.dtype != PARAM_DTYPE or length.dtype != torch.int64
            or positions.dtype not in (torch.int64, torch.int32)):
        raise TypeError(f"codes, params, length, positions must be uint8, bfloat16, int64, int64|int32, got "
                        f"{codes.dtype}, {params.dtype}, {length.dtype}, {positions.dtype}")
    if (codes.shape != (B, H, Tcap, NB) or Tcap % G or params.shape != (B, H, Tcap // G, 4, P)
            or ring.shape != (B, H, G, D) or length.shape != (1,) or positions.shape != (S,)
            or codes.stride(-1) != 1 or params.stride(-1) != 1):
        raise ValueError(f"static state codes {tuple(codes.shape)}, params {tuple(params.shape)}, ring "
                         f"{tuple(ring.shape)}, length {tuple(length.shape)} cannot take new keys "
                         f"{tuple(new_keys.shape)} at positions {tuple(positions.shape)} (group {G})")
    for name, t in (("codes", codes), ("params", params), ("ring", ring), ("length", length)):
        _check_device(name, t, new_keys.device)
    positions = positions.to(new_keys.device)
    new_keys = new_keys.to(ring.dtype)  # (rounded here: the interpreter's in-kernel casts truncate)
    if S == 0:
        return
    if check:
        start, L = int(positions[0]), int(length[0])
        if start + S > Tcap:
            raise IndexError(f"index {start + S - 1} is out of bounds for dimension 2 with size {Tcap}: the static "
                             "cache is too small for the requested tokens")
        if start > L or not torch.equal(positions.cpu(), torch.arange(start, start + S)):
            raise ValueError(f"static cache writes must be contiguous from the current length {L}; got positions "
                             f"[{start}, ..] of {S}")
    xi, yi = _pair_index(codec.pairing, D, new_keys.device)
    block_p = min(max(8, 8192 // G), max(8, triton.next_power_of_2(P)))
    on_gpu = new_keys.is_cuda and not _interpret()
    for first, n_groups in ((True, 1), (False, max(1, triton.cdiv(S - 1, G)))):  # the second stores the length
        polar_static_write_kernel[(B * H, n_groups, triton.cdiv(P, block_p))](
            new_keys, *new_keys.stride(), positions, length, ring, *ring.stride(), xi, yi,
            codes, *codes.stride()[:3], params, *params.stride()[:4], H, S, Tcap // G,
            P=P, NB=NB, G=G, RB=codec.radius_bits, AB=codec.angle_bits, BLOCK_P=block_p, FIRST=first,
            ON_GPU=on_gpu, num_warps=ENCODE_CONFIG["num_warps"],
        )


__all__ = [
    "ATTN_CONFIG",
    "ATTN_TUNE_SPACE",
    "ENCODE_CONFIG",
    "append",
    "attention",
    "encode_groups",
    "encode_groups_into",
    "static_attention",
    "static_write",
]
