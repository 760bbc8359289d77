"""Host wrappers of the fused polar decode attention kernel: the entry points and their argument checks; the
launch itself (plan, split-K kernels, config choice) is attention_launch.py.

`attention` has the semantics and shapes of pqcompile.codec.attention (dense values) or value_codec.attention
(packed values: vcodec and a ValueData); `static_attention` serves a static cache, its length read on the device
only. See the package docstring for the differences by design.
"""

from __future__ import annotations

import logging

import torch

from .. import codec as ref
from .. import value_codec as vref
from ..codec import KEY_DTYPES, PARAM_DTYPE, Codec, PolarData
from ..value_codec import ValueCodec, ValueData
from . import attention_launch, common

log = logging.getLogger(__name__)


def attention(q: torch.Tensor, data: PolarData, seq_len: int, v: torch.Tensor | ValueData, codec: Codec, *,
              vcodec: ValueCodec | None = None, mask: torch.Tensor | None = None, scale: float | None = None,
              softcap: float | None = None, is_causal: bool = False, num_splits: int | None = None) -> torch.Tensor:
    """codec.attention with the fused kernel: q [B, Hq, S, D], v [B, Hkv|Hq, T, Dv] -> [B, Hq, S, Dv].

    With vcodec, v is the ValueData of seq_len tokens (value_codec's layout, Hkv heads) and the semantics are
    value_codec.attention's: the kernel dequantizes the packed values in registers.
    num_splits overrides the split-K heuristic (tests); None picks ~2 programs per SM.
    """
    codes, params, tail = data
    vt = _value_tensors(v, vcodec)
    for name, t in (("q", q), ("v" if vcodec is None else "value tail", vt[0]), ("tail", tail)):
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
    Tc, NB, P = seq_len // G * G, codec.code_bytes(D), D // 2
    if vcodec is None and (v.dim() != 4 or v.shape[0] != B or v.shape[2] != seq_len or v.shape[1] not in (H, Hq)):
        raise ValueError(f"v shape {tuple(v.shape)} does not fit keys [B={B}, H={H}, T={seq_len}]")
    if vcodec is not None:
        _check_values(vt, vcodec, codec, B, H, Tc, seq_len - Tc, f"{seq_len} tokens")
    if (codes.shape != (B, H, Tc, NB) or params.shape != (B, H, Tc // G, 4, P)
            or tail.shape[2] < seq_len - Tc):
        raise ValueError(f"state codes {tuple(codes.shape)}, params {tuple(params.shape)}, tail "
                         f"{tuple(tail.shape)} does not hold {seq_len} tokens of D={D}, group {G}")
    for name, t in (("q", q), ("codes", codes), ("params", params), ("tail", tail), *zip(_V_NAMES, vt)):
        common.check_device(name, t, q.device)
    Dv = vt[0].shape[-1]
    if D > common.MAX_HEAD_DIM or Dv > common.MAX_HEAD_DIM or seq_len == 0 or S == 0 or B == 0:
        log.debug("polar attention falls back to the reference for q %s, v %s", tuple(q.shape), tuple(vt[0].shape))
        if vcodec is not None:
            return vref.attention(q, data, seq_len, ValueData(*v), codec, vcodec, mask=mask, scale=scale,
                                  softcap=softcap, is_causal=is_causal)
        return ref.attention(q, data, seq_len, v, codec, mask=mask, scale=scale, softcap=softcap,
                             is_causal=is_causal)
    return attention_launch.attend(q, codes, params, tail, vt, codec, vcodec, seq_len=seq_len, length=None,
                                   mask=mask, scale=scale, softcap=softcap, is_causal=is_causal,
                                   num_splits=num_splits)


def attention_state(q: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, ring: torch.Tensor,
                    v: torch.Tensor, seq_len: int, codec: Codec, *, mask: torch.Tensor | None = None,
                    scale: float | None = None, softcap: float | None = None, is_causal: bool = False,
                    num_splits: int | None = None) -> torch.Tensor:
    """`attention` over a DynamicCache key state as pqcompile::attention receives it, without the op's views:
    codes [B, H, cap, NB] and params [B, H, cap/G*4, P] (flat) with spare rows, the ring [B, H, G, D] as the tail,
    dense v [B, Hkv|Hq, >= seq_len, Dv] (its first seq_len rows). The kernel gets the same pointers and strides as
    through ops._view (slices from row 0 keep both), so the launch is the same. Inputs that the same checks pass
    with the spare rows allowed go straight to the launch; anything else (an error, a reference fallback) takes
    the op's views and `attention`, which raises or falls back exactly as before."""
    G = codec.group_size
    Tc = seq_len // G * G
    dev = q.device if isinstance(q, torch.Tensor) else None
    fast = (dev is not None and all(isinstance(t, torch.Tensor) for t in (codes, params, ring, v))
            and q.dim() == codes.dim() == params.dim() == ring.dim() == v.dim() == 4
            and (mask is None or isinstance(mask, torch.Tensor)
                 and (mask.dtype == torch.bool or mask.is_floating_point())))
    if fast:
        B, Hq, S, D = q.shape
        _, H, cap, NB = codes.shape
        _, _, rows, P = params.shape
        Dv = v.shape[-1]
        fast = (q.dtype in KEY_DTYPES and v.dtype in KEY_DTYPES and ring.dtype in KEY_DTYPES
                and codes.dtype == torch.uint8 and params.dtype == PARAM_DTYPE
                and 1 <= codec.radius_bits and 1 <= codec.angle_bits and codec.code_bits <= 8
                and G >= 16 and not G & (G - 1)
                and ring.shape[0] == B and ring.shape[1] == H and ring.shape[3] == D and H and not Hq % H
                and ring.shape[2] >= seq_len - Tc
                and codes.shape[0] == B and cap >= Tc and NB == codec.code_bytes(D)
                and params.shape[0] == B and params.shape[1] == H and rows >= Tc // G * 4 and not rows % 4
                and P == D // 2
                and v.shape[0] == B and v.shape[1] in (H, Hq) and v.shape[2] >= seq_len
                and codes.stride(-1) == 1 and params.stride(-1) == 1 and v.stride(-1) == 1
                and codes.device == dev and params.device == dev and ring.device == dev and v.device == dev
                and (q.is_cuda or common.interpret())
                and 0 < D <= common.MAX_HEAD_DIM and Dv <= common.MAX_HEAD_DIM and seq_len > 0 and S and B)
    if not fast:
        data = PolarData(codes[:, :, :Tc], params[:, :, : Tc // G * 4].view(
            params.shape[0], params.shape[1], -1, 4, params.shape[-1]), ring)
        return attention(q, data, seq_len, v[:, :, :seq_len] if v.shape[2] > seq_len else v, codec, mask=mask,
                         scale=scale, softcap=softcap, is_causal=is_causal, num_splits=num_splits)
    return attention_launch.attend(q, codes, params.view(B, H, rows // 4, 4, P), ring, (v,), codec, None,
                                   seq_len=seq_len, length=None, mask=mask, scale=scale, softcap=softcap,
                                   is_causal=is_causal, num_splits=num_splits)


def static_attention(q: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, ring: torch.Tensor,
                     length: torch.Tensor, v: torch.Tensor | ValueData, codec: Codec, *,
                     vcodec: ValueCodec | None = None, mask: torch.Tensor | None = None, scale: float | None = None,
                     is_causal: bool = False, num_splits: int | None = None) -> torch.Tensor:
    """Attention over the first `length` tokens of a static state, the length read on the device only (the
    call is CUDA-graph safe). codes [B, H, Tcap, NB], params [B, H, Tcap/G, 4, P], ring [B, H, G, D],
    length int64 [1], v [B, H|Hq, Tmax, Dv] (Tmax <= Tcap), mask broadcastable to [B, Hq, S, Tmax].
    With vcodec, v is ValueData(codes [B, H, Tcap, NBv], params [B, H, Tcap, Dv/cg, 2], tail = the value ring
    [B, H, G, Dv]) read up to the same length; Tmax is then the mask's key extent (Tcap without a mask, or a
    mask that broadcasts over keys). A length beyond Tmax (a write past the capacity) gives NaN."""
    common.check_codec(codec)
    vt = _value_tensors(v, vcodec)
    for name, t in (("q", q), ("v" if vcodec is None else "value ring", vt[0]), ("ring", ring)):
        if t.dtype not in KEY_DTYPES:
            raise TypeError(f"{name} must be a float16/bfloat16/float32 tensor, got {t.dtype}")
    if codes.dtype != torch.uint8 or params.dtype != PARAM_DTYPE or length.dtype != torch.int64:
        raise TypeError(f"codes, params and length must be uint8, bfloat16 and int64, got {codes.dtype}, "
                        f"{params.dtype}, {length.dtype}")
    G = codec.group_size
    B, H, Tcap, NB = codes.shape
    D = ring.shape[-1]
    if vcodec is None:
        v_bad = v.dim() != 4 or v.shape[0] != B or v.shape[1] not in (H, q.shape[1]) or v.shape[2] > Tcap
    else:
        v_bad = False
        _check_values(vt, vcodec, codec, B, H, Tcap, G, f"a static state of capacity {Tcap}", exact_tail=True)
    if (q.dim() != 4 or q.shape[0] != B or q.shape[-1] != D or q.shape[1] % H or ring.shape != (B, H, G, D)
            or params.shape != (B, H, Tcap // G, 4, D // 2) or Tcap % G or NB != codec.code_bytes(D)
            or length.shape != (1,) or v_bad):
        raise ValueError(f"static state codes {tuple(codes.shape)}, params {tuple(params.shape)}, ring "
                         f"{tuple(ring.shape)}, length {tuple(length.shape)} does not fit q {tuple(q.shape)}, "
                         f"v {_v_shape(v, vcodec)} (group {G})")
    for name, t in (("q", q), ("codes", codes), ("params", params), ("ring", ring), ("length", length),
                    *zip(_V_NAMES, vt)):
        common.check_device(name, t, q.device)
    if vcodec is None:
        t_max = v.shape[2]
    else:  # the mask's key extent (HF's static mask covers max_cache_len <= Tcap)
        t_max = Tcap if mask is None or mask.dim() == 0 or mask.shape[-1] == 1 else mask.shape[-1]
        if t_max > Tcap:
            raise ValueError(f"mask shape {tuple(mask.shape)} covers more keys than the static state's capacity "
                             f"{Tcap}")
    if D > common.MAX_HEAD_DIM or vt[0].shape[-1] > common.MAX_HEAD_DIM or 0 in q.shape or t_max == 0:
        raise ValueError(f"static polar attention supports head_dim <= {common.MAX_HEAD_DIM} and non-empty inputs, "
                         f"got q {tuple(q.shape)}, v {_v_shape(v, vcodec)}")
    return attention_launch.attend(q, codes, params, ring, vt, codec, vcodec, seq_len=None, length=length,
                                   t_max=t_max, mask=mask, scale=scale, softcap=None, is_causal=is_causal,
                                   num_splits=num_splits)


_V_NAMES = ("v", "value codes", "value params")


def _value_tensors(v, vcodec) -> tuple:
    """(dense v,) or (value tail, codes, params) of a ValueData (any 3-tuple of tensors)."""
    if vcodec is None:
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"v must be a tensor when vcodec is None, got {type(v).__name__} (pass vcodec with a "
                            "ValueData)")
        return (v,)
    if not isinstance(vcodec, ValueCodec):
        raise TypeError(f"vcodec must be a value_codec.ValueCodec, got {type(vcodec).__name__}")
    if not (isinstance(v, tuple) and len(v) == 3 and all(isinstance(t, torch.Tensor) for t in v)):
        raise TypeError(f"with vcodec, v must be a value_codec.ValueData (codes, params, tail), got "
                        f"{type(v).__name__}")
    vcodes, vparams, vtail = v
    return vtail, vcodes, vparams


def _v_shape(v, vcodec) -> str:
    if vcodec is None:
        return str(tuple(v.shape))
    return f"codes {tuple(v[0].shape)}, params {tuple(v[1].shape)}, tail {tuple(v[2].shape)}"


def _check_values(vt, vcodec: ValueCodec, codec: Codec, B: int, H: int, Tc: int, L: int, what: str,
                  exact_tail: bool = False) -> None:
    """Packed values fit the keys: Hkv heads, Tc encoded tokens, a tail (ring) of >= L (exactly L) rows."""
    vtail, vcodes, vparams = vt
    if vcodes.dtype != torch.uint8 or vparams.dtype != PARAM_DTYPE:
        raise TypeError(f"value codes must be uint8 and value params bfloat16, got {vcodes.dtype} and "
                        f"{vparams.dtype}")
    if vcodec.group_size != codec.group_size:
        raise ValueError(f"ValueCodec {vcodec} and key codec {codec} must share the group size (keys and values "
                         "flush together)")
    Dv = vtail.shape[-1] if vtail.dim() == 4 else 0
    error = vcodec.fit_error(Dv)
    ng = Dv // vcodec.channel_group
    if (error or vtail.dim() != 4 or vtail.shape[:2] != (B, H) or vcodes.shape != (B, H, Tc, Dv * vcodec.bits // 8)
            or vparams.shape != (B, H, Tc, ng, 2) or (vtail.shape[2] != L if exact_tail else vtail.shape[2] < L)):
        raise ValueError(f"value state codes {tuple(vcodes.shape)}, params {tuple(vparams.shape)}, "
                         f"{'ring' if exact_tail else 'tail'} {tuple(vtail.shape)} does not fit keys [B={B}, H={H}] "
                         f"of {what} under ValueCodec {vcodec} (packed values need the Hkv heads, {Tc} encoded "
                         f"tokens{'; ' + error if error else ''})")
