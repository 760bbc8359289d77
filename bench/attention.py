"""Polar decode attention and encode on the GPU: correctness at real shapes, then timings in one run.

    python bench/attention.py                 # check, then the full table; JSON to bench/results/
    python bench/attention.py --tune          # check, then sweep kernel launch configs on a few shapes
    python bench/attention.py --out DIR       # where the JSON goes (default bench/results)
    python bench/attention.py --sweep-encode  # also time encode and one-token static writes per tile config
    python bench/attention.py --shapes extra  # only some rows (all, main, extra, none)
    python bench/attention.py --values 4 2    # + K4+4 with packed values V4 / V2 per row (checked first)
    python bench/attention.py --codecs channel polar-hybrid  # + K4+4 of other key codecs (and over --values)

Contenders on the same logical cache (q_len 1, bf16): SDPA flash and SDPA cuDNN on dense bf16 K/V
(enable_gqa), and the polar kernel (4+4, 3+3, 2+2 keys, bf16 V; with --values also 4+4 keys over packed values,
value_codec.py, each with its byte floor). Encode is timed against the SDPA prefill (causal, q_len = T) of the same
tokens. Times are do_bench medians in microseconds.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import logging
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pqcompile import codec as ref
from pqcompile import kernels
from pqcompile import value_codec as vref
from pqcompile.kernels import LaunchConfig, RowTile, Tile, settings, tuner
from pqcompile.kernels.settings import VALUE_FORMS

SCRIPT_VERSION = 13  # recorded in the JSON; bench/NOTES.md says what each version changed
# Tuned configs not yet in the product space: pair chunks (not yet run on a GPU; --pair-chunks adds them).
PAIR_CHUNK_SPACE = (
    LaunchConfig(64, True, 6, 4, 3, maxnreg=168, pair_chunks=2),
    LaunchConfig(64, True, 8, 4, 3, maxnreg=128, pair_chunks=2),
    LaunchConfig(32, True, 8, 4, 3, maxnreg=128, pair_chunks=2),
    LaunchConfig(64, True, 4, 8, 3, maxnreg=128, pair_chunks=2),
)


def with_alt_sub_byte(space) -> tuple:
    """space plus each config with the alternative code load: sub-byte codes then try per-pair byte loads too
    (--alt-sub-byte; correct on the H200, never picked there)."""
    return (*space, *(c._replace(alt_code_load=True) for c in space if not c.alt_code_load))


BITS = [(4, 4), (3, 3), (2, 2)]
MAIN = [(1, 4096), (1, 32768), (1, 131072), (8, 8192), (8, 32768), (8, 131072), (32, 32768)]
EXTRA = [  # (Hq, Hkv, D, B, T): D=64 (SmolLM2-like) and D=256 MQA
    (9, 3, 64, 1, 32768), (9, 3, 64, 8, 32768), (8, 1, 256, 1, 32768), (8, 1, 256, 8, 32768),
]
PREFILL_MAX_TOKENS = 262144  # SDPA prefill of B*T above this is too slow to time here


def us(fn, warmup=25, rep=100) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = us(lambda: y.copy_(x)) * 1e-6
    return 2 * 2 * 1024**3 / t


# --------------------------------------------------------------------------- correctness

CASES = [  # B, Hq, Hkv, T, D, S, bits, pairing, v_heads, mask, causal, softcap, dtype
    (2, 32, 8, 8192 + 77, 128, 1, (4, 4), "half", 8, None, False, None, torch.bfloat16),
    (1, 32, 8, 4096, 128, 1, (3, 3), "half", 8, None, False, None, torch.bfloat16),
    (2, 32, 8, 2048 + 5, 128, 4, (2, 2), "interleaved", 8, "bool", True, None, torch.float16),
    (3, 9, 3, 3000, 64, 1, (4, 4), "half", 9, "float", False, 30.0, torch.bfloat16),
    (2, 8, 1, 1500, 256, 2, (4, 3), "half@64", 1, None, True, None, torch.bfloat16),
    (1, 12, 4, 1000, 96, 1, (4, 4), "half", 4, None, False, None, torch.float32),
    (2, 16, 2, 127, 128, 16, (4, 4), "half", 2, "bool", True, None, torch.bfloat16),
]


def encode_agreement(keys, c) -> dict:
    """The encode kernel (through append) against the reference encode: codes, params, tail."""
    D = keys.shape[-1]
    kd = kernels.append(ref.empty(c, *keys.shape[:2], D, keys.dtype, "cuda"), 0, keys, c)
    rd = ref.encode(keys, c)
    if rd.codes.shape[2] == 0:
        return {"code_mismatch": 0.0, "code_max_diff": 0, "params_equal": 1.0,
                "tail_equal": torch.equal(kd.tail, rd.tail), "state": rd}
    ck = ref.unpack_codes(kd.codes, c.code_bits, D // 2).int()
    cr = ref.unpack_codes(rd.codes, c.code_bits, D // 2).int()
    rmask = (1 << c.radius_bits) - 1
    return {"code_mismatch": (ck != cr).float().mean().item(),
            "code_max_diff": ((ck & rmask) - (cr & rmask)).abs().max().item(),
            "params_equal": (kd.params.float() == rd.params.float()).float().mean().item(),
            "tail_equal": bool(torch.equal(kd.tail, rd.tail)), "state": rd}


def attention_inputs(B, Hq, H, T, D, S, vh, mk, dt):
    q = torch.randn(B, Hq, S, D, device="cuda", dtype=dt)
    v = torch.randn(B, vh, T, D, device="cuda", dtype=dt)
    mask = None
    if mk == "bool":
        mask = torch.rand(B, 1, S, T, device="cuda") > 0.2
        mask[..., -1] = True
    elif mk == "float":
        mask = torch.randn(B, Hq, S, T, device="cuda")
    return q, v, mask


def fixed_error(config, q, rd, T, v, c, kw, o_r) -> float:
    """Relative error of the kernel launched with one fixed config."""
    with settings.override(autotune=False, attention=config):
        o_k = kernels.attention(q, rd, T, v, c, **kw)
    return ((o_k.float() - o_r.float()).norm() / o_r.float().norm()).item()


def check_configs(configs, case) -> bool:
    """Every config, fixed, on one case (a config that fails here is one the tuner would skip: reported)."""
    ok = True
    for config in configs:
        try:
            e = fixed_error(config, *case)
        except Exception as ex:  # noqa: BLE001 (report it; the tuner skips a config that fails to compile)
            print(f"  config {tuple(config)}: FAILED {type(ex).__name__}: {str(ex)[:200]}", flush=True)
            ok = False
            continue
        print(f"  config {tuple(config)}: err={e:.2e}", flush=True)
        ok &= e < 2e-2
    return ok


def check(log: list, configs, first_only: bool = False) -> bool:
    """Kernels vs the reference at real shapes; every config of `configs` fixed on the first case, the alternative
    code load fixed on every case with sub-byte or straddling codes. first_only: the first case only."""
    torch.manual_seed(0)
    ok = True
    for B, Hq, H, T, D, S, bits, pairing, vh, mk, causal, softcap, dt in CASES[:1] if first_only else CASES:
        c = ref.Codec(*bits, 128, ref.Pairing.parse(pairing))
        agree = encode_agreement(torch.randn(B, H, T, D, device="cuda", dtype=dt), c)
        rd = agree.pop("state")
        q, v, mask = attention_inputs(B, Hq, H, T, D, S, vh, mk, dt)
        kw = {"mask": mask, "is_causal": causal, "softcap": softcap}
        o_r = ref.attention(q, rd, T, v, c, **kw)
        if not log:
            ok &= check_configs(configs, (q, rd, T, v, c, kw, o_r))
        if c.code_bits != 8:  # the alternative code load of this width, fixed (the tuner may not pick it here)
            e = fixed_error(settings.attention._replace(alt_code_load=True), q, rd, T, v, c, kw, o_r)
            print(f"  alt code load ({c.code_bits}-bit codes): err={e:.2e}", flush=True)
            ok &= e < 2e-2
        o_k = kernels.attention(q, rd, T, v, c, **kw)
        err = ((o_k.float() - o_r.float()).norm() / o_r.float().norm()).item()
        tol = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dt]
        good = (err < tol and torch.isfinite(o_k).all().item() and agree["code_mismatch"] < 1e-3
                and agree["code_max_diff"] <= 1 and agree["params_equal"] > 0.999 and agree["tail_equal"])
        ok &= good
        row = {"case": f"B{B} Hq{Hq} Hkv{H} T{T} D{D} S{S} {bits[0]}+{bits[1]} {pairing} v{vh} mask={mk} "
                       f"causal={causal} softcap={softcap} {str(dt)[6:]}",
               "attn_rel_err": err, **agree, "ok": bool(good)}
        log.append(row)
        print(("ok  " if good else "BAD ") + row["case"], f"err={err:.2e} code_mis={agree['code_mismatch']:.1e} "
              f"params_eq={agree['params_equal']:.4f}", flush=True)
    return ok


VALUE_CASES = [  # B, Hq, Hkv, T, D, S, mask, causal, softcap, dtype: K4+4 half over packed values
    (2, 32, 8, 8192 + 77, 128, 1, None, False, None, torch.bfloat16),
    (2, 32, 8, 2048 + 5, 128, 4, "bool", True, None, torch.float16),
    (3, 9, 3, 3000, 64, 1, "float", False, 30.0, torch.bfloat16),
    (1, 12, 4, 1000, 96, 1, None, False, None, torch.float32),
    (2, 8, 1, 1500, 256, 2, None, True, None, torch.bfloat16),
]


def value_codec_for(bits: int, group: int, D: int) -> vref.ValueCodec:
    """The value codec of a run at head dim D: the requested channel group, or the largest one that divides D."""
    while D % group:
        group //= 2
    return vref.ValueCodec(bits, max(group, 8 // bits), 128)


def check_values(log: list, values, group: int) -> bool:
    """Packed values: the value encode (append_values) equals the reference bit for bit, and attention over them
    matches value_codec.attention."""
    torch.manual_seed(3)
    ok = True
    for B, Hq, H, T, D, S, mk, causal, softcap, dt in VALUE_CASES:
        c = ref.Codec(4, 4, 128, ref.Pairing())
        kd = ref.encode(torch.randn(B, H, T, D, device="cuda", dtype=dt), c)
        q, vals, mask = attention_inputs(B, Hq, H, T, D, S, H, mk, dt)
        for vb in values:
            vc = value_codec_for(vb, group, D)
            vd = kernels.append_values(vref.empty(vc, B, H, D, dt, "cuda"), 0, vals, vc)
            vr = vref.encode(vals, vc)
            equal = all(torch.equal(a, b) for a, b in zip(vd, vr))
            kw = {"mask": mask, "is_causal": causal, "softcap": softcap}
            o_r = vref.attention(q, kd, T, vr, c, vc, **kw)
            o_k = kernels.attention(q, kd, T, vd, c, vcodec=vc, **kw)
            err = ((o_k.float() - o_r.float()).norm() / o_r.float().norm()).item()
            tol = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dt]
            good = equal and err < tol and bool(torch.isfinite(o_k).all())
            ok &= good
            row = {"case": f"B{B} Hq{Hq} Hkv{H} T{T} D{D} S{S} 4+4 {vc} {settings.value_form} mask={mk} "
                           f"causal={causal} softcap={softcap} {str(dt)[6:]}", "attn_rel_err": err,
                   "value_codes_equal": equal, "ok": good}
            log.append(row)
            print(("ok  " if good else "BAD ") + row["case"], f"err={err:.2e} codes_equal={equal}", flush=True)
    return ok


# --------------------------------------------------------------------------- timing


def dense_us(q, k, v, backend, causal=False) -> float | None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def fn():
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    try:
        fn()
        torch.cuda.synchronize()
    except RuntimeError as e:
        print(f"  sdpa {backend} unavailable: {str(e)[:80]}", flush=True)
        return None
    return us(fn)


def graph_us(fn) -> float | None:
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
    except Exception as e:  # noqa: BLE001 (report it, keep the run)
        print(f"  cuda graph timing failed: {str(e)[:80]}", flush=True)
        return None


def host_us(fn, n=200) -> float:
    """CPU time to enqueue one call (no sync inside the loop)."""
    import time

    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    t = time.perf_counter() - t
    torch.cuda.synchronize()
    return t / n * 1e6


def time_dense(row: dict, q, k, v, bw, graphs: bool) -> None:
    """The dense contenders (SDPA flash, cuDNN) and the dense byte floor."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    row["flash_us"] = dense_us(q, k, v, "flash")
    row["cudnn_us"] = dense_us(q, k, v, "cudnn")
    row["dense_best_us"] = min(x for x in (row["flash_us"], row["cudnn_us"]) if x is not None)
    row["dense_floor_us"] = (2 * k.numel() * 2 + 2 * q.numel() * 2) / bw * 1e6
    if graphs:  # GPU time without host launch overhead (CUDA graph replay)
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def dense(be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            row[f"{name}_graph_us"] = graph_us(dense)
        row["dense_graph_best_us"] = min((x for x in (row["flash_graph_us"], row["cudnn_graph_us"]) if x),
                                         default=None)


def time_polar(row: dict, key: str, fn, nbytes: int, bw, graphs: bool, graph_this: bool) -> None:
    """One polar contender under the settings in force: eager time, the config the tuner picked, graph time."""
    t = us(fn)
    if settings.autotune and tuner.last_config():  # (block_n, split_dot, pps, warps, stages, alt, maxnreg, chunks)
        row[key + "_config"] = str(tuple(tuner.last_config()))
    if graphs and graph_this:
        row[key + "_graph_us"] = g = graph_us(fn)
        if g and row.get("dense_graph_best_us"):
            row[key + "_graph_ratio"] = g / row["dense_graph_best_us"]
            row[key + "_graph_floor_frac"] = nbytes / bw * 1e6 / g
    if graphs and row["B"] * row["T"] <= 32768:
        row[key + "_host_us"] = host_us(fn)
    row[key + "_us"] = t
    row[key + "_ratio"] = t / row["dense_best_us"]
    row[key + "_TBps"] = nbytes / t * 1e-6
    row[key + "_floor_frac"] = nbytes / bw * 1e6 / t


def time_encode(row: dict, k, v, Hq) -> None:
    """Encode of the row's keys, against the SDPA prefill of the same tokens."""
    B, _, T, D = k.shape
    c = ref.Codec(4, 4, 128, ref.Pairing())
    row["encode44_us"] = us(lambda: kernels.encode_groups(k, c))
    row["encode44_graph_us"] = graph_us(lambda: kernels.encode_groups(k, c))
    if B * T <= PREFILL_MAX_TOKENS:
        qp = torch.randn(B, Hq, T, D, device="cuda", dtype=k.dtype)
        pre = [x for x in (dense_us(qp, k, v, "flash", True), dense_us(qp, k, v, "cudnn", True)) if x]
        row["prefill_best_us"] = min(pre)
        row["encode_frac_of_prefill"] = row["encode44_us"] / row["prefill_best_us"]
        if row["encode44_graph_us"]:  # (prefill's host cost is negligible next to its GPU time)
            row["encode_graph_frac_of_prefill"] = row["encode44_graph_us"] / row["prefill_best_us"]


def time_codecs(row: dict, q, k, v, bw, graphs: bool, codecs, values, value_group: int) -> None:
    """K4+4 of each key codec kind of `codecs` (key_cells.py): over bf16 V and over packed values of each width of
    `values` (the default value form), graph-timed against the row's dense best; and its key encode."""
    B, H, T, D = k.shape
    for kind in codecs:
        c = ref.Codec(4, 4, 128, ref.Pairing(), kind)
        kd = kernels.append(ref.empty(c, B, H, D, k.dtype, "cuda"), 0, k, c)
        tag = kind.replace("-", "_") + "44"
        nbytes = ref.nbytes(kd) + v.numel() * 2 + 2 * q.numel() * 2
        time_polar(row, tag, lambda kd=kd, c=c: kernels.attention(q, kd, T, v, c), nbytes, bw, graphs, True)
        row[tag + "_floor_us"] = nbytes / bw * 1e6
        if row.get("polar44_graph_us") and row.get(tag + "_graph_us"):
            row[tag + "_vs_polar44"] = row[tag + "_graph_us"] / row["polar44_graph_us"]
        row[tag + "_encode_graph_us"] = graph_us(lambda c=c: kernels.encode_groups(k, c))
        for vb in values:
            vc = value_codec_for(vb, value_group, D)
            vd = kernels.append_values(vref.empty(vc, B, H, D, v.dtype, "cuda"), 0, v, vc)
            nbytes = ref.nbytes(kd) + vref.nbytes(vd) + 2 * q.numel() * 2
            time_polar(row, f"{tag}_v{vb}", lambda vd=vd, vc=vc, kd=kd, c=c: kernels.attention(q, kd, T, vd, c,
                                                                                               vcodec=vc),
                       nbytes, bw, graphs, True)
            row[f"{tag}_v{vb}_floor_us"] = nbytes / bw * 1e6
            del vd


def time_shape(Hq, H, D, B, T, bw, configs=None, bits=BITS, encode=True, graphs=False, values=(),
               value_group=64, value_forms=None, codecs=()) -> dict:
    """One row: dense contenders, polar per width and per config (name -> LaunchConfig fixed, or None: tuned),
    K4+4 over packed values per width of `values`, encode. configs None: the tuned settings only."""
    dt = torch.bfloat16
    torch.manual_seed(1)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dt)
    k = torch.randn(B, H, T, D, device="cuda", dtype=dt)
    v = torch.randn(B, H, T, D, device="cuda", dtype=dt)
    row = {"B": B, "T": T, "Hq": Hq, "Hkv": H, "D": D}
    time_dense(row, q, k, v, bw, graphs)
    for rb, ab in bits:
        c = ref.Codec(rb, ab, 128, ref.Pairing())
        data = kernels.append(ref.empty(c, B, H, D, dt, "cuda"), 0, k, c)
        nbytes = ref.nbytes(data) + v.numel() * 2 + 2 * q.numel() * 2
        for name, config in (configs or {"": None}).items():
            fixed = {} if config is None else {"autotune": False, "attention": config}
            with settings.override(**fixed):
                time_polar(row, f"polar{rb}{ab}{name}", lambda data=data, c=c: kernels.attention(q, data, T, v, c),
                           nbytes, bw, graphs, (rb, ab) == (4, 4))
        row[f"polar{rb}{ab}_floor_us"] = nbytes / bw * 1e6
    if values:
        time_values(row, q, k, v, bw, graphs, values, value_group, value_forms)
    if codecs:
        time_codecs(row, q, k, v, bw, graphs, codecs, values, value_group)
    if encode:
        time_encode(row, k, v, Hq)
    torch.cuda.empty_cache()  # the caches go when the function returns
    return row


def value_keys(vb: int, value_forms) -> list[tuple[str, str]]:
    """(row key prefix, settings.value_form) per form timed: the first form keeps the plain key."""
    forms = value_forms or [settings.value_form]
    return [(f"polar44_v{vb}" + (f"_{f.replace('-', '_')}" if i else ""), f) for i, f in enumerate(forms)]


def time_values(row: dict, q, k, v, bw, graphs: bool, values, value_group: int, value_forms=None) -> None:
    """K4+4 over packed values of each width (tuned, graph-timed): time, byte floor (codes, params, tails, q and
    out over the copy bandwidth), ratio vs the best dense SDPA; and the value encode of the row's tokens."""
    B, H, T, D = k.shape
    c = ref.Codec(4, 4, 128, ref.Pairing())
    kd = kernels.append(ref.empty(c, B, H, D, k.dtype, "cuda"), 0, k, c)
    row["polar44_key_bytes_per_token"] = ref.nbytes(kd) / (B * T)  # all kv heads
    for vb in values:
        vc = value_codec_for(vb, value_group, D)
        vd = kernels.append_values(vref.empty(vc, B, H, D, v.dtype, "cuda"), 0, v, vc)
        nbytes = ref.nbytes(kd) + vref.nbytes(vd) + 2 * q.numel() * 2
        for key, form in value_keys(vb, value_forms):
            row[key + "_codec"] = f"{vc} {form}"
            row[key + "_value_bytes_per_token"] = vref.nbytes(vd) / (B * T)
            with settings.override(value_form=form):
                time_polar(row, key, lambda vd=vd, vc=vc: kernels.attention(q, kd, T, vd, c, vcodec=vc), nbytes, bw,
                           graphs, True)
            row[key + "_floor_us"] = nbytes / bw * 1e6
            row[key + "_bytes_vs_dense"] = nbytes / (2 * k.numel() * 2 + 2 * q.numel() * 2)
        row[f"vencode{vb}_graph_us"] = graph_us(lambda vc=vc: kernels.encode_value_groups(v, vc))
        del vd


TILE_SWEEP = [Tile(64, 8), Tile(32, 8), Tile(32, 4), Tile(16, 4), Tile(16, 2), Tile(8, 2)]
VALUE_TILE_SWEEP = [RowTile(32, 8), RowTile(32, 4), RowTile(16, 4), RowTile(16, 2), RowTile(8, 2), RowTile(4, 1)]


def sweep_value_tiles(row: dict, v, values, value_group: int) -> None:
    """The value encode of the row's tokens and a one-token value static write, per RowTile of VALUE_TILE_SWEEP."""
    B, H, T, D = v.shape
    G = 128
    for vb in values:
        vc = value_codec_for(vb, value_group, D)
        codes = torch.zeros(B, H, T, vc.code_bytes(D), dtype=torch.uint8, device="cuda")
        params = torch.zeros(B, H, T, vc.num_groups(D), 2, dtype=torch.bfloat16, device="cuda")
        ring = torch.zeros(B, H, G, D, dtype=v.dtype, device="cuda")
        pos = T - G // 2
        length = torch.tensor([pos], dtype=torch.int64, device="cuda")
        positions = torch.tensor([pos], dtype=torch.int64, device="cuda")
        new = v[:, :, :1].contiguous()
        for tile in VALUE_TILE_SWEEP:
            with settings.override(value_tile=tile):
                name = f"t{tile.block_t}w{tile.num_warps}"
                row[f"vencode{vb}_{name}_us"] = graph_us(lambda vc=vc: kernels.encode_value_groups(v, vc))
                args = (codes, params, ring, length, new, positions, vc)
                row[f"vwrite{vb}_{name}_us"] = graph_us(lambda args=args: kernels.static_write_values(*args,
                                                                                                  check=False))


def sweep_tiles(H, D, B, T, values=(), value_group=64) -> dict:
    """GPU time (graph replay) of encode_groups over B*T tokens and of a one-token static write (a decode step,
    not at a group end, so replays are idempotent) into a cache of T tokens, per tile of TILE_SWEEP; with values,
    the same for the value encode and write per RowTile of VALUE_TILE_SWEEP."""
    torch.manual_seed(2)
    c = ref.Codec(4, 4, 128, ref.Pairing())
    k = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    G, P = c.group_size, D // 2
    codes = torch.zeros(B, H, T, c.code_bytes(D), dtype=torch.uint8, device="cuda")
    params = torch.zeros(B, H, T // G, 4, P, dtype=torch.bfloat16, device="cuda")
    ring = torch.zeros(B, H, G, D, dtype=torch.bfloat16, device="cuda")
    pos = T - G // 2
    length = torch.tensor([pos], dtype=torch.int64, device="cuda")
    positions = torch.tensor([pos], dtype=torch.int64, device="cuda")
    new = k[:, :, :1].contiguous()
    row = {"B": B, "T": T, "Hkv": H, "D": D}
    for name, setting, fn in (
            ("encode", "encode_tile", lambda: kernels.encode_groups(k, c)),
            ("write1", "write_tile",
             lambda: kernels.static_write(codes, params, ring, length, new, positions, c, check=False))):
        for tile in TILE_SWEEP:
            with settings.override(**{setting: tile}):
                row[f"{name}_p{tile.block_p}w{tile.num_warps}_us"] = graph_us(fn)
    if values:
        sweep_value_tiles(row, k, values, value_group)
    print({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


# --------------------------------------------------------------------------- runs

TUNE_BASE = LaunchConfig(64, True, 2, 4, 3)
TUNE_VARIANTS = {"": TUNE_BASE, "_join": TUNE_BASE._replace(split_dot=False),
                 "_p4": TUNE_BASE._replace(programs_per_sm=4), "_n128": TUNE_BASE._replace(block_n=128),
                 "_n32p4": TUNE_BASE._replace(block_n=32, programs_per_sm=4),
                 "_n32p8w2": TUNE_BASE._replace(block_n=32, programs_per_sm=8, num_warps=2, num_stages=4)}
TABLE_COLUMNS = ["dense_best_us", "polar44_us", "polar44_ratio", "polar44_floor_frac", "polar33_ratio", "polar22_ratio",
                 "dense_graph_best_us", "polar44_graph_us", "polar44_graph_ratio", "polar44_graph_floor_frac",
                 "polar44_host_us", "encode44_us", "encode44_graph_us", "encode_graph_frac_of_prefill"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--sweep-encode", action="store_true")
    ap.add_argument("--alt-sub-byte", action="store_true",
                    help="let the tuner try per-pair byte loads for sub-byte codes (2+2; correct on the H200, never "
                         "picked there)")
    ap.add_argument("--shapes", choices=["all", "main", "extra", "none"], default="all",
                    help="which rows of the table (main: Hq 32 / Hkv 8 / D 128; extra: D 64 and D 256 MQA)")
    ap.add_argument("--bits", nargs="+", default=[f"{r}+{a}" for r, a in BITS],
                    help="polar widths timed per row (radius+angle), default: 4+4 3+3 2+2")
    ap.add_argument("--only", nargs="+", default=None,
                    help="rows to time, as BxTk (any head dim) or BxTk/Dd, e.g. 8x32k 1x32k/D256")
    ap.add_argument("--pair-chunks", action="store_true",
                    help="let the tuner try scoring blocks in chunks of pairs (PAIR_CHUNK_SPACE; 4+4; not yet run "
                         "on a GPU)")
    ap.add_argument("--space", nargs="+", default=None, metavar="TUPLE",
                    help="replace the tuned space by these configs (A/B runs on little device time), e.g. "
                         "'(64, True, 6, 4, 3, False, 168, 2)' (fields of pqcompile.kernels.LaunchConfig)")
    ap.add_argument("--values", nargs="+", type=int, choices=[2, 4, 8], default=[], metavar="BITS",
                    help="also time K4+4 over packed values of these widths per row (e.g. 4 2), beside K-only and "
                         "dense, each with its byte floor; checked against value_codec first")
    ap.add_argument("--value-group", type=int, default=64,
                    help="channels per value group (--values; halved where it does not divide the head dim)")
    ap.add_argument("--value-forms", nargs="+", choices=VALUE_FORMS, default=None, metavar="FORM",
                    help="how the kernel reads packed values (kernels.settings.value_form), each checked and timed "
                         f"per row (A/B in one run; keys of forms after the first get _FORM), from {VALUE_FORMS}; "
                         "default: the product's")
    ap.add_argument("--quick-check", action="store_true",
                    help="check only the first case (every tuned config); skips most cold compiles")
    ap.add_argument("--codecs", nargs="+", choices=[k for k in ref.KINDS if k != "polar"], default=[],
                    help="also K4+4 of these key codecs per row (bf16 V, and over each --values width)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return ap.parse_args()


def tuned_space(args) -> tuple[LaunchConfig, ...]:
    """The tuner's space for this run: --space replaces the product's; --pair-chunks and --alt-sub-byte add to it."""
    space = tuple(LaunchConfig(*ast.literal_eval(c)) for c in args.space) if args.space else settings.tuned_space
    if args.pair_chunks and not args.space:
        space += PAIR_CHUNK_SPACE
    return with_alt_sub_byte(space) if args.alt_sub_byte else space


def run_tune(rows: list, bw: float) -> None:
    """Fixed launch configs against each other (and the tuner) on a few shapes."""
    for B, T in [(1, 4096), (8, 32768), (32, 32768)]:
        rows.append(time_shape(32, 8, 128, B, T, bw, TUNE_VARIANTS, bits=[(4, 4)], encode=False, graphs=B == 1))
        print({k: round(v, 1) if isinstance(v, float) else v for k, v in rows[-1].items()
               if not k.endswith(("_TBps", "_floor_frac"))}, flush=True)
    rows.append(time_shape(32, 8, 128, 8, 32768, bw, {"": TUNE_BASE, "_join": TUNE_VARIANTS["_join"]},
                           bits=[(3, 3), (2, 2)], encode=True))
    rows.append(time_shape(32, 8, 128, 1, 4096, bw, None, bits=[], encode=True))
    print({k: round(v, 1) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)


def run_table(args, rows: list, bw: float, save) -> None:
    """The table's rows, each with the tuned settings; saved after every row."""
    bits = [tuple(int(x) for x in b.split("+")) for b in args.bits]
    shapes = ([(32, 8, 128, B, T) for B, T in MAIN] if args.shapes in ("all", "main") else []) + (
        EXTRA if args.shapes in ("all", "extra") else [])
    if args.only:
        shapes = [s for s in shapes if {f"{s[3]}x{s[4] // 1024}k", f"{s[3]}x{s[4] // 1024}k/D{s[2]}"} & set(args.only)]
    for Hq, H, D, B, T in shapes:
        rows.append(time_shape(Hq, H, D, B, T, bw, graphs=True, bits=bits, values=args.values,
                               value_group=args.value_group, value_forms=args.value_forms, codecs=args.codecs))
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
        save()


def print_value_table(rows: list, values, value_forms=None) -> None:
    """GPU times (graph replay) and byte floors: dense SDPA, K4+4 K-only, K4+4 over each value width."""
    from tabulate import tabulate

    cols = ["dense_graph_best_us", "dense_floor_us", "polar44_graph_us", "polar44_floor_us", "polar44_graph_ratio"]
    for vb in values:
        for key, _ in value_keys(vb, value_forms):
            cols += [f"{key}_graph_us", f"{key}_floor_us", f"{key}_graph_ratio", f"{key}_graph_floor_frac",
                     f"{key}_bytes_vs_dense"]
    print(tabulate([[f"{r['B']}x{r['T'] // 1024}k Hq{r['Hq']}/{r['Hkv']} D{r['D']}"]
                    + [None if r.get(k) is None else round(r[k], 3 if not k.endswith("_us") else 1) for k in cols]
                    for r in rows], headers=["shape"] + cols, tablefmt="github"))


def print_codec_table(rows: list, codecs, values) -> None:
    """GPU times (graph replay) of each key codec against dense SDPA and against polar 4+4."""
    from tabulate import tabulate

    cols = ["dense_graph_best_us", "polar44_graph_us"]
    for kind in codecs:
        tag = kind.replace("-", "_") + "44"
        cols += [f"{tag}_graph_us", f"{tag}_graph_ratio", f"{tag}_vs_polar44", f"{tag}_encode_graph_us"]
        cols += [f"{tag}_v{vb}_{x}" for vb in values for x in ("graph_us", "graph_ratio", "graph_floor_frac")]
    print(tabulate([[f"{r['B']}x{r['T'] // 1024}k"] + [None if r.get(k) is None else round(r[k], 3) for k in cols]
                    for r in rows], headers=["shape"] + cols, tablefmt="github"))


def run(args) -> bool:
    """Check, then time (tune, table, tile sweep) under the settings in force; JSON after every row."""
    import triton
    from tabulate import tabulate

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = {"script_version": SCRIPT_VERSION, "date": now, "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "autotune": settings.autotune,
            "attn_config": settings.attention._asdict(), "tune_space": [str(tuple(c)) for c in settings.tuned_space]}
    checks, rows, sweeps = [], [], []
    configs = settings.tuned_space if args.space else (*settings.tuned_space, *PAIR_CHUNK_SPACE)
    ok = check(checks, list(dict.fromkeys(c for c in configs if not c.alt_code_load)), args.quick_check)
    if args.values:
        meta.update(values=args.values, value_group=args.value_group,
                    value_forms=args.value_forms or [settings.value_form])
        for form in args.value_forms or [settings.value_form]:
            with settings.override(value_form=form, autotune=False):  # correctness: the fixed launch, no timing
                ok &= check_values(checks, args.values, args.value_group)
    bw = copy_bandwidth()
    meta["copy_bandwidth_TBps"] = bw * 1e-12
    print(f"copy bandwidth {bw * 1e-12:.2f} TB/s; correctness {'OK' if ok else 'FAILED'}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    name = (f"attention-{datetime.date.today().isoformat()}{'-tune' if args.tune else ''}"
            f"{'-values' if args.values else ''}{'-codecs' if args.codecs else ''}.json")

    def save() -> None:  # after every row: a run cut short still leaves its numbers
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({"meta": meta, "checks": checks, "rows": rows, "tile_sweep": sweeps}, f, indent=1)

    if args.sweep_encode:
        for B, T in ((1, 4096), (1, 32768), (8, 32768)):
            sweeps.append(sweep_tiles(8, 128, B, T, args.values, args.value_group))
            save()
    if args.tune:
        run_tune(rows, bw)
    else:
        run_table(args, rows, bw, save)
        if rows:
            print(tabulate([[f"{r['B']}x{r['T'] // 1024}k Hq{r['Hq']}/{r['Hkv']} D{r['D']}"]
                            + [None if r.get(k) is None else round(r[k], 3 if not k.endswith("_us") else 1)
                               for k in TABLE_COLUMNS] for r in rows], headers=["shape"] + TABLE_COLUMNS,
                           tablefmt="github"))
        if rows and args.values:
            print_value_table(rows, args.values, args.value_forms)
        if rows and args.codecs:
            print_codec_table(rows, args.codecs, args.values)
    if sweeps:
        print(tabulate([[f"{r['B']}x{r['T'] // 1024}k", *(round(v, 1) for k, v in r.items() if k.endswith("_us"))]
                        for r in sweeps], headers=["tokens"] + [k for k in sweeps[0] if k.endswith("_us")]))
    save()
    return ok


def main() -> None:
    args = parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("pqcompile.kernels.tuner").setLevel(logging.INFO)  # the tuner's times, every config
    with settings.override(tuned_space=tuned_space(args)):
        ok = run(args)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
