"""The fused polar decode attention's launch: one call's plan (grid, constexprs, tuner key; cached per shape
class), its arguments, the split-K forward and reduction launches, and the config choice (tuner or fixed).
pqcompile.kernels.attention checks the arguments and calls `attend`."""

from __future__ import annotations

import math
import types

import torch
import triton.language as tl

from ..codec import Codec
from . import common, tuner
from .jit.attention import polar_attn_fwd_kernel, polar_attn_reduce_kernel
from .settings import LaunchConfig, settings


def attend(q, codes, params, tail, vt, codec, vcodec, *, seq_len, length, mask, scale, softcap, is_causal,
            num_splits, t_max=None):
    """Launch the fused kernel (and the split reduction). seq_len: a host int, or None with `length` (a device
    tensor) for a static state whose encoded part and tail (its ring) are found from the length in-kernel, t_max
    the key extent of its mask. vt: (dense v,) or (value tail, codes, params) under vcodec."""
    B, Hq, S, _ = q.shape
    T = seq_len if length is None else t_max  # the mask's key extent
    packed = None
    if vcodec is not None:
        vcodes, vparams = vt[1], vt[2]  # each token's codes and params contiguous (the kernel relies on it)
        nb, ng = vcodes.shape[-1], vparams.shape[-2]
        packed = (vcodes if vcodes.stride()[-2:] in ((nb, 1), (0, 1)) else vcodes.contiguous(),
                  vparams if vparams.stride()[-3:] in ((2 * ng, 2, 1), (0, 2, 1)) else vparams.contiguous(), vcodec)
    launch = _Launch(q, _unit_last(codes), _unit_last(params), tail, _unit_last(vt[0]), codec,
                     _broadcast_mask(mask, (B, Hq, S, T), q.device), seq_len=seq_len, length=length, scale=scale,
                     softcap=softcap, is_causal=is_causal, num_splits=num_splits, packed=packed, t_max=t_max)
    plan = launch.plan
    if plan.tuned:
        config = tuner.pick(launch.key, launch, plan.space)
        launch.partials.clear()  # the tuner's were allocated on its side stream: this launch allocates on the caller's
    else:
        config = plan.fixed_config()
    launch(config)
    return launch.out


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _broadcast_mask(mask, shape, device):
    """mask expanded to [B, Hq, S, T] (stride 0 where broadcast); bool as uint8, which the kernel loads."""
    if mask is None:
        return None
    common.check_device("mask", mask, device)
    try:
        mask = mask.expand(shape)
    except RuntimeError:
        raise ValueError(f"mask shape {tuple(mask.shape)} is not broadcastable to {shape}") from None
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _fixed_config(codec: Codec, block_p: int) -> LaunchConfig:
    """settings.attention fitted to the call: a block within one group, byte-plane loads only where they exist."""
    c, W = settings.attention, codec.code_bits
    if not tuner.chunks_fit(c, W, block_p):
        raise ValueError(f"pair_chunks={c.pair_chunks} needs 8-bit codes, split dots and chunks of >= 16 pairs "
                         f"(codes of {W} bits, {block_p} pairs)")
    return c._replace(block_n=min(codec.group_size, c.block_n, max(16, 8192 // block_p)),
                      alt_code_load=c.alt_code_load and W != 8)


_PLANS: dict = {}  # plan key -> _Plan
_MAX_PLANS = 256  # a full table is cleared (a miss only rebuilds a plan)


class _Plan:
    """What an attention launch derives from shapes, dtypes, the codecs and the settings alone, computed once per
    plan key (`_Launch.__init__`): the grid's shape, the kernels' constexprs, the tuner's candidates and key, and
    the kwargs mapping of each launch config (kept, so that common.launch can key on its identity). Nothing here
    depends on the length, the strides or the data: those are read on every call."""

    def __init__(self, q, tail, v, codec, mask, *, static, softcap, is_causal, num_splits, packed, on_gpu):
        B, Hq, S, D = q.shape
        H, G = tail.shape[1], codec.group_size
        R = Hq // H
        RG, NQG = (R, H) if v.shape[1] == H else (1, Hq)
        Dv, P, NB = v.shape[-1], D // 2, codec.code_bytes(D)
        self.codec, self.G, self.S, self.Dv, self.NQG, self.R, self.RG = codec, G, S, Dv, NQG, R, RG
        self.rows = RG * S
        self.block_m = max(16, min(64, common.next_pow2(self.rows)))
        self.MB = common.cdiv(self.rows, self.block_m)
        # tl.dot needs K >= 16 on the GPU: a head dim under 32 scores over pairs padded to 16 (masked, zero)
        self.block_p, self.block_dv = max(16, common.next_pow2(P)), max(16, common.next_pow2(Dv))
        self.n_prog = B * NQG * self.MB
        self.sms, self.num_splits, self.on_gpu = common.sm_count(q.device), num_splits, on_gpu
        self.out_shape, self.dtype, self.device = (B, Hq, S, Dv), q.dtype, q.device
        self.xi, self.yi = common.pair_index(codec.pairing, D, q.device)
        if packed is None:  # None: constexprs, the dense kernel's signature
            vb, vcg, nbv = 0, 0, 0
        else:
            vcodes, _, vcodec = packed
            vb, vcg, nbv = vcodec.bits, vcodec.channel_group, vcodes.shape[-1]
        has_mask, mask_bool = mask is not None, mask is not None and mask.dtype == torch.uint8
        qt, vt = (common.TL[q.dtype], common.TL[v.dtype]) if on_gpu else (tl.float32, tl.float32)
        meta = {
            "P": P, "NB": NB, "G": G, "RB": codec.radius_bits, "AB": codec.angle_bits, "BLOCK_M": self.block_m,
            "BLOCK_P": self.block_p, "BLOCK_DV": self.block_dv, "HAS_MASK": has_mask, "MASK_BOOL": mask_bool,
            "SOFTCAP": bool(softcap), "CAUSAL": bool(is_causal) and S > 1, "FAST": on_gpu, "QT": qt, "VT": vt,
            "LEN_DEVICE": static,
            "PREC": "ieee" if torch.float32 in (q.dtype, v.dtype) else "tf32",  # fp32 inputs: no TF32 rounding
            "CB": codec.code_bits // math.gcd(codec.code_bits, 8),  # bytes of the smallest whole word of codes
            "VB": vb, "VCG": vcg, "NBV": nbv,
        }
        if codec.kind != "polar":  # (polar-circ decodes as polar: its launches are polar's)
            meta["KIND"] = common.kind_index(codec) if codec.kind != "polar-circ" else 0
        # packed values dequantized after the dot: tl.dot needs channel groups of >= 16; row blocks of 64 (prompts)
        # spill there (sm_90 SASS, bench/compile_kernels.py), so they dequantize before it
        form = settings.value_form if packed is not None and vcg >= 16 and self.block_m <= 32 else "dequant"
        if form == "dot" and G < 32:  # 16-token blocks: the contiguous code load gave wrong sums with bf16 inputs
            form = "dot-bytes"  # on the H200 (bench/value_dot_check.py, not isolated further); the per-channel one
        if form != "dequant":
            ut = tl.float32 if vt == tl.float32 else tl.bfloat16  # bf16 for fp16 values too: p * scale's range
            meta.update(VDOT=True, VLOAD=int(form == "dot-bytes"), UT=ut)
        self.meta = meta
        # the tuner's shape class: what changes the best config (lengths and grids by power of two); the second
        # entry, the length's bit length, is filled in per call
        self.key_rest = (self.n_prog.bit_length(), P, NB, codec.radius_bits, G, self.block_m, self.block_dv,
                         has_mask, mask_bool, meta["CAUSAL"], bool(softcap), q.dtype, v.dtype, tail.dtype, vb, vcg,
                         form, meta.get("KIND", 0))
        self.space = tuner.candidates(settings.tuned_space, G, self.block_p, codec.code_bits)
        self.tuned = (on_gpu and settings.autotune and num_splits is None and bool(self.space)
                      and self.rows <= settings.tune_max_rows)
        self._fixed = None
        self._fwd_kwargs: dict = {}  # LaunchConfig -> the forward kernel's kwargs
        self._reduce_kwargs: dict = {}  # BLOCK_S -> the reduction's kwargs

    def fixed_config(self) -> LaunchConfig:
        if self._fixed is None:
            self._fixed = _fixed_config(self.codec, self.block_p)
        return self._fixed

    def fwd_kwargs(self, c: LaunchConfig):
        key = (*c, *map(type, c))  # (True and 1 are different constexprs)
        kw = self._fwd_kwargs.get(key)
        if kw is None:
            kw = self._fwd_kwargs[key] = types.MappingProxyType({
                **self.meta, "BLOCK_N": c.block_n, "SPLIT_DOT": c.split_dot, "PPS": c.programs_per_sm,
                "ALT": c.alt_code_load, "NCH": c.pair_chunks, "num_warps": c.num_warps, "num_stages": c.num_stages,
                **({"maxnreg": c.maxnreg} if c.maxnreg else {})})
        return kw

    def reduce_kwargs(self, splits: int):
        block_s = min(32, common.next_pow2(splits))
        kw = self._reduce_kwargs.get(block_s)
        if kw is None:
            kw = self._reduce_kwargs[block_s] = types.MappingProxyType({
                "BLOCK_M": self.block_m, "BLOCK_DV": self.block_dv, "BLOCK_S": block_s, "num_warps": 4})
        return kw


class _Launch:
    """One attention call's kernel arguments but the launch config; calling it with a config launches the kernel
    (and the split reduction). Grid (B * NQG, splits, MB): a program serves RG query heads x S positions in
    row blocks of BLOCK_M, over its split of the kv head's tokens. packed: (value codes, value params, ValueCodec)
    with v the value tail (ring), or None for dense v. The shape-only part comes from a cached _Plan."""

    def __init__(self, q, codes, params, tail, v, codec, mask, *, seq_len, length, scale, softcap, is_causal,
                 num_splits, packed=None, t_max=None):
        on_gpu = common.on_gpu(q)
        pkey = (q.shape, q.dtype, q.device, tail.shape[1], tail.dtype, v.shape[1], v.shape[-1], v.dtype, codec,
                None if mask is None else mask.dtype, length is None, bool(softcap), bool(is_causal), num_splits,
                None if packed is None else (packed[2], packed[0].shape[-1]), on_gpu, settings.generation)
        plan = _PLANS.get(pkey)
        if plan is None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            plan = _PLANS[pkey] = _Plan(q, tail, v, codec, mask, static=length is not None, softcap=softcap,
                                        is_causal=is_causal, num_splits=num_splits, packed=packed, on_gpu=on_gpu)
        self.plan, self.on_gpu, self.num_splits = plan, on_gpu, num_splits
        G = plan.G
        if length is None:
            self.Tc, self.L = seq_len // G * G, seq_len % G
            len_arg, t_max = q, seq_len
        else:  # the grid covers the capacity; the kernel divides the actual length among the splits
            self.Tc, self.L = codes.shape[2], 0
            len_arg, t_max = length, v.shape[2] if packed is None else t_max
        self.out = out = common.alloc(plan.out_shape, plan.dtype, plan.device)
        self.partials: dict = {}
        m_arg, m_strides = (mask, mask.stride()) if mask is not None else (q, (0, 0, 0, 0))
        if packed is None:
            packed_args = (None,) * 8
        else:
            vcodes, vparams, _ = packed
            packed_args = (vcodes, *vcodes.stride()[:3], vparams, *vparams.stride()[:3])
        so = out.stride()[:3]
        self.args_in = (q, *q.stride(), codes, *codes.stride()[:3], params, *params.stride()[:4], tail, *tail.stride(),
                        v, *v.stride()[:3], *packed_args, m_arg, *m_strides, plan.xi, plan.yi, out, *so)
        self.args_len = (len_arg, seq_len or 0, self.Tc, t_max, plan.NQG, plan.S, plan.R, plan.RG, plan.Dv,
                         float(q.shape[-1] ** -0.5 if scale is None else scale), float(softcap) if softcap else 1.0)
        self.reduce_args = (out, *so, plan.NQG, plan.MB, plan.S, plan.RG, plan.Dv)
        self.key = (length is None, (self.Tc + self.L).bit_length(), *plan.key_rest)

    @property
    def block_p(self) -> int:
        return self.plan.block_p

    def splits(self, block_n: int, programs_per_sm: int) -> int:
        """Splits of the token range: about programs_per_sm programs an SM, each split a whole number of blocks."""
        cdiv, plan = common.cdiv, self.plan
        n_blocks = self.Tc // block_n + cdiv(self.L, block_n)
        want = self.num_splits if self.num_splits is not None else cdiv(programs_per_sm * plan.sms, plan.n_prog)
        return cdiv(n_blocks, cdiv(n_blocks, max(1, min(want, n_blocks))))

    def _partial_buffers(self, splits: int):
        """fp32 (acc, max, sum) per split, grown as needed; with one split the kernel writes the output directly.
        One allocation holds all three (each part's offset a multiple of 64 bytes, as separate buffers were)."""
        if splits == 1:
            return self.out, self.out, self.out
        if self.partials.get("n", 0) < splits:
            plan = self.plan
            n = plan.n_prog * splits * plan.block_m
            buf = common.alloc((n * (plan.block_dv + 2),), torch.float32, plan.device)
            self.partials.update(n=splits, bufs=torch.split_with_sizes(buf, (n * plan.block_dv, n, n)))
        return self.partials["bufs"]

    def __call__(self, c: LaunchConfig, run=None) -> None:
        run = run or common.launch  # (looked up per call: bench/host_overhead.py stubs it)
        plan = self.plan
        splits = self.splits(c.block_n, c.programs_per_sm)
        parts = self._partial_buffers(splits)
        run(polar_attn_fwd_kernel, (plan.n_prog // plan.MB, splits, plan.MB),
            (*self.args_in, *parts, *self.args_len), plan.fwd_kwargs(c))
        if splits > 1:
            run(polar_attn_reduce_kernel, (plan.n_prog, min(plan.block_m, plan.rows)),
                (*parts, *self.reduce_args, splits), plan.reduce_kwargs(splits))

    def compile_only(self, c: LaunchConfig) -> None:
        """Config c's kernels compiled for this call, not launched (the tuner compiles its space in parallel)."""
        self(c, run=common.compile_only)
