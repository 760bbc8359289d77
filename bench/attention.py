"""Polar decode attention and encode on the GPU: correctness at real shapes, then timings in one run.

    python bench/attention.py                 # check, then the full table; JSON to bench/results/
    python bench/attention.py --tune          # check, then sweep kernel launch configs on a few shapes
    python bench/attention.py --out DIR       # where the JSON goes (default bench/results)
    python bench/attention.py --sweep-encode  # also time encode and one-token static writes per tile config
    python bench/attention.py --shapes extra  # only some rows (all, main, extra, none)

Contenders on the same logical cache (q_len 1, bf16): SDPA flash and SDPA cuDNN on dense bf16 K/V
(enable_gqa), and the polar kernel (4+4, 3+3, 2+2 keys, bf16 V). Encode is timed against the SDPA
prefill (causal, q_len = T) of the same tokens. Times are do_bench medians in microseconds.
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

SCRIPT_VERSION = 9  # 4: parallel split reduction, exact fp32 dots; 5: byte-plane code loads tuned for 3+3;
# 6: tuner on CUDA-graph time, encode timed on GPU time too, encode / one-token static write tile sweep;
# 7: per-pair byte loads tuned for sub-byte codes (2+2); 8: register-capped configs (maxnreg) in the tuned space,
# bin centres as one FFMA from the code's bits, --bits; 9: pair chunks (NCH) in the tuned space
DEFAULT_CONFIG = dict(kernels.ATTN_CONFIG)
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


def check(log: list, first_only: bool = False) -> bool:
    """Kernels vs the reference at real shapes; first_only: the first case (every tuned config) only."""
    torch.manual_seed(0)
    ok = True
    cases = [  # B, Hq, Hkv, T, D, S, bits, pairing, v_heads, mask, causal, softcap, dtype
        (2, 32, 8, 8192 + 77, 128, 1, (4, 4), "half", 8, None, False, None, torch.bfloat16),
        (1, 32, 8, 4096, 128, 1, (3, 3), "half", 8, None, False, None, torch.bfloat16),
        (2, 32, 8, 2048 + 5, 128, 4, (2, 2), "interleaved", 8, "bool", True, None, torch.float16),
        (3, 9, 3, 3000, 64, 1, (4, 4), "half", 9, "float", False, 30.0, torch.bfloat16),
        (2, 8, 1, 1500, 256, 2, (4, 3), "half@64", 1, None, True, None, torch.bfloat16),
        (1, 12, 4, 1000, 96, 1, (4, 4), "half", 4, None, False, None, torch.float32),
        (2, 16, 2, 127, 128, 16, (4, 4), "half", 2, "bool", True, None, torch.bfloat16),
    ]
    for B, Hq, H, T, D, S, bits, pairing, vh, mk, causal, softcap, dt in cases[:1] if first_only else cases:
        c = ref.Codec(*bits, 128, ref.Pairing.parse(pairing))
        keys = torch.randn(B, H, T, D, device="cuda", dtype=dt)
        kd = kernels.append(ref.empty(c, B, H, D, dt, "cuda"), 0, keys, c)
        rd = ref.encode(keys, c)
        Tc = rd.codes.shape[2]
        ck = ref.unpack_codes(kd.codes, c.code_bits, D // 2).int()
        cr = ref.unpack_codes(rd.codes, c.code_bits, D // 2).int()
        code_mis = (ck != cr).float().mean().item() if Tc else 0.0
        code_far = ((ck & ((1 << c.radius_bits) - 1)) - (cr & ((1 << c.radius_bits) - 1))).abs().max().item() \
            if Tc else 0
        par_eq = (kd.params.float() == rd.params.float()).float().mean().item() if Tc else 1.0
        tail_eq = bool(torch.equal(kd.tail, rd.tail))
        q = torch.randn(B, Hq, S, D, device="cuda", dtype=dt)
        v = torch.randn(B, vh, T, D, device="cuda", dtype=dt)
        mask = None
        if mk == "bool":
            mask = torch.rand(B, 1, S, T, device="cuda") > 0.2
            mask[..., -1] = True
        elif mk == "float":
            mask = torch.randn(B, Hq, S, T, device="cuda")
        kw = {"mask": mask, "is_causal": causal, "softcap": softcap}
        o_r = ref.attention(q, rd, T, v, c, **kw)
        if len(log) == 0:  # every config of the tuning space, fixed, on the first case
            for cfg in kernels.ATTN_TUNE_SPACE:
                bn, sd, pps, w, st, alt, mr, nch = cfg
                kernels.ATTN_CONFIG.update(autotune=False, block_n=bn, split_dot=sd, programs_per_sm=pps, num_warps=w,
                                           num_stages=st, alt_code_load=alt, maxnreg=mr, pair_chunks=nch)
                try:
                    e = (kernels.attention(q, rd, T, v, c, **kw).float() - o_r.float()).norm() / o_r.float().norm()
                except Exception as ex:  # noqa: BLE001 (report it; the tuner skips a config that fails to compile)
                    print(f"  config {cfg}: FAILED {type(ex).__name__}: {str(ex)[:200]}", flush=True)
                    ok = False
                    continue
                print(f"  config {cfg}: err={e.item():.2e}", flush=True)
                ok &= e.item() < 2e-2
            kernels.ATTN_CONFIG.update(DEFAULT_CONFIG)
        if c.code_bits != 8:  # the alternative code load of this width, fixed (the tuner may not pick it here)
            kernels.ATTN_CONFIG.update(autotune=False, alt_code_load=True)
            e = (kernels.attention(q, rd, T, v, c, **kw).float() - o_r.float()).norm() / o_r.float().norm()
            print(f"  alt code load ({c.code_bits}-bit codes): err={e.item():.2e}", flush=True)
            ok &= e.item() < 2e-2
            kernels.ATTN_CONFIG.update(DEFAULT_CONFIG)
        o_k = kernels.attention(q, rd, T, v, c, **kw)
        # the error the output dtype itself makes: fp32 reference rounded to dt, against the fp64-ish ref
        err = ((o_k.float() - o_r.float()).norm() / o_r.float().norm()).item()
        tol = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dt]
        good = (err < tol and torch.isfinite(o_k).all().item() and code_mis < 1e-3 and code_far <= 1
                and par_eq > 0.999 and tail_eq)
        ok &= good
        row = {"case": f"B{B} Hq{Hq} Hkv{H} T{T} D{D} S{S} {bits[0]}+{bits[1]} {pairing} v{vh} mask={mk} "
                        f"causal={causal} softcap={softcap} {str(dt)[6:]}",
                   "attn_rel_err": err, "code_mismatch": code_mis, "code_max_diff": code_far, "params_equal": par_eq,
                   "tail_equal": tail_eq, "ok": bool(good)}
        log.append(row)
        print(("ok  " if good else "BAD ") + row["case"], f"err={err:.2e} code_mis={code_mis:.1e} "
              f"params_eq={par_eq:.4f}", flush=True)
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


def time_shape(Hq, H, D, B, T, bw, configs=None, bits=BITS, encode=True, graphs=False) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dt = torch.bfloat16
    torch.manual_seed(1)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dt)
    k = torch.randn(B, H, T, D, device="cuda", dtype=dt)
    v = torch.randn(B, H, T, D, device="cuda", dtype=dt)
    row = {"B": B, "T": T, "Hq": Hq, "Hkv": H, "D": D}
    row["flash_us"] = dense_us(q, k, v, "flash")
    row["cudnn_us"] = dense_us(q, k, v, "cudnn")
    dense_best = min(x for x in (row["flash_us"], row["cudnn_us"]) if x is not None)
    row["dense_best_us"] = dense_best
    dense_bytes = 2 * k.numel() * 2 + 2 * q.numel() * 2
    row["dense_floor_us"] = dense_bytes / bw * 1e6
    if graphs:  # GPU time without host launch overhead (CUDA graph replay)
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def dense(be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            row[f"{name}_graph_us"] = graph_us(dense)
        row["dense_graph_best_us"] = min((x for x in (row["flash_graph_us"], row["cudnn_graph_us"]) if x),
                                         default=None)
    for rb, ab in bits:
        c = ref.Codec(rb, ab, 128, ref.Pairing())
        data = kernels.append(ref.empty(c, B, H, D, dt, "cuda"), 0, k, c)
        nbytes = ref.nbytes(data) + v.numel() * 2 + 2 * q.numel() * 2
        for name, cfg in (configs or {"": None}).items():
            saved = dict(kernels.ATTN_CONFIG)
            if cfg:
                kernels.ATTN_CONFIG.update(cfg)
            try:
                def fn(data=data, c=c):
                    return kernels.attention(q, data, T, v, c)
                t = us(fn)
                key = f"polar{rb}{ab}{name}"
                if kernels.ATTN_CONFIG["autotune"]:
                    # (BLOCK_N, SPLIT_DOT, PPS, warps, stages, ALT_CODE_LOAD)
                    row[key + "_config"] = str(kernels.LAST_CONFIG[0])
                if graphs and (rb, ab) == (4, 4):
                    row[key + "_graph_us"] = g = graph_us(fn)
                    if g and row.get("dense_graph_best_us"):
                        row[key + "_graph_ratio"] = g / row["dense_graph_best_us"]
                        row[key + "_graph_floor_frac"] = nbytes / bw * 1e6 / g
                if graphs and B * T <= 32768:
                    row[key + "_host_us"] = host_us(fn)
            finally:
                kernels.ATTN_CONFIG.clear()
                kernels.ATTN_CONFIG.update(saved)
            row[key + "_us"] = t
            row[key + "_ratio"] = t / dense_best
            row[key + "_TBps"] = nbytes / t * 1e-6
            row[key + "_floor_frac"] = nbytes / bw * 1e6 / t
        row[f"polar{rb}{ab}_floor_us"] = nbytes / bw * 1e6
    if encode:  # encode vs prefill of the same tokens
        c = ref.Codec(4, 4, 128, ref.Pairing())
        row["encode44_us"] = us(lambda: kernels.encode_groups(k, c))
        row["encode44_graph_us"] = graph_us(lambda: kernels.encode_groups(k, c))
        if B * T <= PREFILL_MAX_TOKENS:
            qp = torch.randn(B, Hq, T, D, device="cuda", dtype=dt)
            pre = [x for x in (dense_us(qp, k, v, "flash", True), dense_us(qp, k, v, "cudnn", True)) if x]
            row["prefill_best_us"] = min(pre)
            row["encode_frac_of_prefill"] = row["encode44_us"] / row["prefill_best_us"]
            if row["encode44_graph_us"]:  # (prefill's host cost is negligible next to its GPU time)
                row["encode_graph_frac_of_prefill"] = row["encode44_graph_us"] / row["prefill_best_us"]
    torch.cuda.empty_cache()  # the caches go when the function returns
    return row


TILE_SWEEP = [(64, 8), (32, 8), (32, 4), (16, 4), (16, 2), (8, 2)]  # (block_p, num_warps)


def sweep_tiles(H, D, B, T) -> dict:
    """GPU time (graph replay) of encode_groups over B*T tokens and of a one-token static write (a decode step,
    not at a group end, so replays are idempotent) into a cache of T tokens, per (block_p, num_warps)."""
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
    for cfg_name, cfg, fn in (
            ("encode", kernels.ENCODE_CONFIG, lambda: kernels.encode_groups(k, c)),
            ("write1", kernels.WRITE_CONFIG,
             lambda: kernels.static_write(codes, params, ring, length, new, positions, c, check=False))):
        saved = dict(cfg)
        try:
            for bp, w in TILE_SWEEP:
                cfg.update(block_p=bp, num_warps=w)
                row[f"{cfg_name}_p{bp}w{w}_us"] = graph_us(fn)
        finally:
            cfg.update(saved)
    print({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--sweep-encode", action="store_true")
    ap.add_argument("--alt-sub-byte", action="store_true",
                    help="let the tuner try per-pair byte loads for sub-byte codes (2+2; v7: correct on the H200, "
                         "never picked)")
    ap.add_argument("--shapes", choices=["all", "main", "extra", "none"], default="all",
                    help="which rows of the table (main: Hq 32 / Hkv 8 / D 128; extra: D 64 and D 256 MQA)")
    ap.add_argument("--bits", nargs="+", default=[f"{r}+{a}" for r, a in BITS],
                    help="polar widths timed per row (radius+angle), default: 4+4 3+3 2+2")
    ap.add_argument("--only", nargs="+", default=None,
                    help="rows to time, as BxTk (any head dim) or BxTk/Dd, e.g. 8x32k 1x32k/D256")
    ap.add_argument("--pair-chunks", action="store_true",
                    help="let the tuner try scoring blocks in chunks of pairs (4+4; v9, not yet run on a GPU)")
    ap.add_argument("--space", nargs="+", default=None, metavar="TUPLE",
                    help="replace the tuned space by these configs (A/B runs on little device time), e.g. "
                         "'(64, True, 6, 4, 3, False, 168, 2)' (chunked ones also need --pair-chunks)")
    ap.add_argument("--quick-check", action="store_true",
                    help="check only the first case (every tuned config); skips most cold compiles")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    bits = [tuple(int(x) for x in b.split("+")) for b in args.bits]
    logging.basicConfig(format="%(message)s")
    logging.getLogger("pqcompile.kernels.attend").setLevel(logging.INFO)  # the tuner's times, every config
    if args.space:
        kernels.ATTN_TUNE_SPACE[:] = [tuple(ast.literal_eval(c)) for c in args.space]
    import triton
    from tabulate import tabulate

    kernels.ATTN_CONFIG["tune_alt_sub_byte"] = DEFAULT_CONFIG["tune_alt_sub_byte"] = args.alt_sub_byte
    kernels.ATTN_CONFIG["tune_pair_chunks"] = DEFAULT_CONFIG["tune_pair_chunks"] = args.pair_chunks
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = {"script_version": SCRIPT_VERSION, "date": now, "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "attn_config": dict(kernels.ATTN_CONFIG),
            "tune_space": [str(c) for c in kernels.ATTN_TUNE_SPACE]}
    checks: list = []
    ok = check(checks, args.quick_check)
    bw = copy_bandwidth()
    meta["copy_bandwidth_TBps"] = bw * 1e-12
    print(f"copy bandwidth {bw * 1e-12:.2f} TB/s; correctness {'OK' if ok else 'FAILED'}", flush=True)
    rows = []
    sweeps: list = []
    os.makedirs(args.out, exist_ok=True)
    name = f"attention-{datetime.date.today().isoformat()}{'-tune' if args.tune else ''}.json"

    def save() -> None:  # after every row: a run cut short still leaves its numbers
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({"meta": meta, "checks": checks, "rows": rows, "tile_sweep": sweeps}, f, indent=1)

    if args.sweep_encode:
        for B, T in ((1, 4096), (1, 32768), (8, 32768)):
            sweeps.append(sweep_tiles(8, 128, B, T))
            save()
    if args.tune:
        base = {"autotune": False, "block_n": 64, "num_warps": 4, "num_stages": 3, "programs_per_sm": 2,
                "split_dot": True, "alt_code_load": False, "maxnreg": None, "pair_chunks": 1, "ablate": 0}
        variants = {"": {}, "_join": {"split_dot": False}, "_p4": {"programs_per_sm": 4},
                    "_n128": {"block_n": 128}, "_n32p4": {"block_n": 32, "programs_per_sm": 4},
                    "_n32p8w2": {"block_n": 32, "programs_per_sm": 8, "num_warps": 2, "num_stages": 4},
                    "_notrig": {"ablate": 1}, "_nocodes": {"ablate": 2}, "_noV": {"ablate": 3}}
        configs = {k: {**base, **v} for k, v in variants.items()}
        for B, T in [(1, 4096), (8, 32768), (32, 32768)]:
            rows.append(time_shape(32, 8, 128, B, T, bw, configs, bits=[(4, 4)], encode=False, graphs=B == 1))
            print({k: round(v, 1) if isinstance(v, float) else v for k, v in rows[-1].items()
                   if not k.endswith(("_TBps", "_floor_frac"))}, flush=True)
        rows.append(time_shape(32, 8, 128, 8, 32768, bw, {"": {**base}, "_join": {**base, "split_dot": False}},
                               bits=[(3, 3), (2, 2)], encode=True))
        rows.append(time_shape(32, 8, 128, 1, 4096, bw, None, bits=[], encode=True))
        print({k: round(v, 1) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
        cols = [k for k in rows[0] if k.endswith(("_us", "_ratio"))]
    else:
        shapes = ([(32, 8, 128, B, T) for B, T in MAIN] if args.shapes in ("all", "main") else []) + (
            EXTRA if args.shapes in ("all", "extra") else [])
        if args.only:
            def label(Hq, H, D, B, T):
                return {f"{B}x{T // 1024}k", f"{B}x{T // 1024}k/D{D}"}
            shapes = [s for s in shapes if label(*s) & set(args.only)]
        for Hq, H, D, B, T in shapes:
            rows.append(time_shape(Hq, H, D, B, T, bw, graphs=True, bits=bits))
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
            save()
        cols = ["dense_best_us", "polar44_us", "polar44_ratio", "polar44_floor_frac", "polar33_ratio", "polar22_ratio",
                "dense_graph_best_us", "polar44_graph_us", "polar44_graph_ratio", "polar44_graph_floor_frac",
                "polar44_host_us", "encode44_us", "encode44_graph_us", "encode_graph_frac_of_prefill"]
    if args.tune:
        cols = []
    table = [[f"{r['B']}x{r['T'] // 1024}k Hq{r['Hq']}/{r['Hkv']} D{r['D']}"]
             + [None if r.get(k) is None else round(r[k], 3 if not k.endswith("_us") else 1) for k in cols]
             for r in rows]
    if cols and rows:
        print(tabulate(table, headers=["shape"] + cols, tablefmt="github"))
    if sweeps:
        print(tabulate([[f"{r['B']}x{r['T'] // 1024}k", *(round(v, 1) for k, v in r.items() if k.endswith("_us"))]
                        for r in sweeps], headers=["tokens"] + [k for k in sweeps[0] if k.endswith("_us")]))
    save()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
