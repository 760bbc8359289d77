"""Compute floors of the decode attention's hot loop on the H200, from sm_90 SASS compiled on this CPU (issue 16).

    python bench/sass_floors.py            # table + bench/results/sass-floors-2026-12-02.json

For each variant (key codec kind x value path) and shape (8x32k, 32x32k; Hq 32, Hkv 8, D 128, q_len 1, bf16,
G 128, value channel group 64) the product's launch is recorded on CPU tensors (bench/compile_kernels.py) under
two launch configs: "default" (what settings.attention gives with autotune off) and "tuned" (the H200 tuner's
pick in bench/results/attention-2026-12-02-codecs-v13.json, where it has one). The per-block loop's instructions
are classified; per warp and iteration they are exact (static count of the loop body; predicated-off or
branched-around instructions are counted as issued). The floors below ignore the prologue/epilogue and the
split reduction kernel (their bytes are counted).

Model (per SM per clock; 132 SMs at 1.98 GHz: NVIDIA's H100/H200 SXM peaks FP32 66.9 TFLOPS = 132 x 128 x 2 x
1.98 GHz, INT32 33.5 TOPS = 132 x 64 x 1.98 GHz, BF16 tensor 989.4 TFLOPS = 132 x 4096 x 1.83 GHz, as tabulated at
glennklockwood.com/garden/processors/h100; MUFU and conversion rates: CUDA C++ Programming Guide, "Throughput of
native arithmetic instructions", compute capability 9.0, as quoted in issue 16, not re-read here):
  issue   4 warp-instructions (4 schedulers x 1)        every SASS instruction
  MUFU    16 lanes  (4 a clock per scheduler: a warp MUFU holds its scheduler's unit 8 clocks)
  FP32    128 lanes (FFMA/FMUL/FADD/FMNMX/FSEL/FSETP and packed HADD2/HFMA2/HMUL2: one warp-instr/clk/scheduler)
  INT     64 lanes  (IADD3 LOP3 SHF PRMT LEA ISETP SEL VIADD and IMAD*, which ptxas also uses for moves/shifts)
  CONV    16 lanes  ("all other type conversions": F2F I2F F2I F2FP; F2FP.PACK_AB may be faster, see JSON note)
  shared  128 B (one wavefront; LDS.64 = 2, LDS/STS.128, LDSM.x4, LDGSTS.128 = 4 wavefronts, no bank conflicts)
  tensor  4096 dense bf16 flop at 1.83 GHz (989.4 TFLOPS, wgmma peak; HMMA.16816 = 4096 flop, mma.sync is slower)
  HBM     4.8 TB/s (H200 spec): key codes + key params + V (dense, or packed codes + params) + q + out + partials
Per-SM floors take the busiest SM: ceil(programs / 132) programs of the shortest split (a lower bound whatever
the scheduling), then the floor of a variant is the largest of them.
"""

from __future__ import annotations

import ast
import collections
import hashlib
import inspect
import json
import linecache
import math
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compile_kernels as ck  # first: it sets Triton's environment and puts the repository on sys.path
import torch
import triton
from tabulate import tabulate

from pqcompile import codec as ref
from pqcompile import kernels
from pqcompile import value_codec as vref
from pqcompile.kernels import LaunchConfig, settings
from pqcompile.kernels.jit import attention as jit_attention
from pqcompile.kernels.jit import key_decode

SCRIPT_VERSION = 1
HERE = os.path.dirname(os.path.abspath(__file__))
TUNED_JSON = os.path.join(HERE, "results", "attention-2026-12-02-codecs-v13.json")
OUT_JSON = os.path.join(HERE, "results", "sass-floors-2026-12-02.json")
JIT = os.path.dirname(jit_attention.__file__)
SMS, CLOCK, TENSOR_CLOCK, HBM = 132, 1.98e9, 1.83e9, 4.8e12
RATE = {"MUFU": 16, "FP32": 128, "INT": 64, "CONV": 16}  # lanes per clock per SM
T, HQ, HKV, D, G, VCG = 32768, 32, 8, 128, 128, 64
SHAPES = {"8x32k": 8, "32x32k": 32}
# variant: (key kind, value bits or None for dense V, value form, json key prefix of its tuned config / timing)
VARIANTS = {
    "polar K-only": ("polar", None, None, "polar44"),
    "polar-hybrid K-only": ("polar-hybrid", None, None, "polar_hybrid44"),
    "channel K-only": ("channel", None, None, "channel44"),
    "polar + V4 dot": ("polar", 4, "dot", "polar44_v4"),
    "channel + V4 dot": ("channel", 4, "dot", "channel44_v4"),
    "polar + V4 dequant": ("polar", 4, "dequant", "polar44_v4_dequant"),
    "polar + V2 dot": ("polar", 2, "dot", None),  # not timed with this kernel: no tuned config, no time
}
# CUDA-graph GPU time (us) as given in issue 16's brief (bench/results/attention-2026-12-02-{values,codecs-v13}.json);
# the dequant rows are polar44_v4_dequant_graph_us of codecs-v13.json
MEASURED = {
    ("polar K-only", "8x32k"): 284.7, ("polar-hybrid K-only", "8x32k"): 305.0, ("channel K-only", "8x32k"): 254.8,
    ("polar + V4 dot", "8x32k"): 523.5, ("channel + V4 dot", "8x32k"): 497.6, ("polar + V4 dequant", "8x32k"): 937.7,
    ("polar K-only", "32x32k"): 976.4, ("polar-hybrid K-only", "32x32k"): 1070.6, ("channel K-only", "32x32k"): 801.9,
    ("polar + V4 dot", "32x32k"): 1815.7, ("channel + V4 dot", "32x32k"): 1735.7,
    ("polar + V4 dequant", "32x32k"): 2884.1,
}
DENSE_SDPA = {"8x32k": 246.5, "32x32k": 953.6}
PARTS = {  # jit functions (line_profile) by role; the kernel body itself (addressing, key params, dots) is "body"
    "key decode": ("bin_unit", "cos_sin", "load_codes", "decode_codes", "cell_halves"),
    "body": ("polar_attn_fwd_kernel",),
    "softmax+PV (dense)": ("block_update",),
    "packed softmax+PV": ("packed_block_update",),
    "value unpack": ("value_units", "load_values"),
}

INT_OPS = {"IADD3", "IMAD", "LOP3", "SHF", "PRMT", "LEA", "ISETP", "SEL", "IMNMX", "VIADD", "VIMNMX", "IABS", "POPC",
           "FLO", "BREV", "BMSK", "SGXT", "IADD", "ISCADD", "LOP", "SHL", "SHR", "IDP", "IMUL"}
CLASSES = [  # (class, test on the base mnemonic); first match wins
    ("tensor", lambda b: b in ("HMMA", "HGMMA", "IMMA", "WGMMA")),
    ("MUFU", lambda b: b == "MUFU"),
    ("FP32", lambda b: b in ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FSET", "FCHK")),
    ("half2", lambda b: b in ("HFMA2", "HADD2", "HMUL2", "HMNMX2", "HSETP2", "HSET2")),
    ("INT", lambda b: b in INT_OPS),
    ("CONV", lambda b: b in ("F2F", "F2I", "I2F", "F2FP", "I2FP", "F2IP", "FRND", "I2I")),
    ("ld/st", lambda b: b in ("LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "LDL", "STL", "LDC", "LD", "ST",
                              "ATOM", "ATOMS", "RED")),
    ("shfl/bar", lambda b: b in ("SHFL", "BAR", "WARPSYNC", "BSSY", "BSYNC", "DEPBAR", "LDGDEPBAR", "MEMBAR", "VOTE")),
    ("uniform", lambda b: b.startswith("U") or b in ("R2UR", "S2UR")),
    ("other", lambda b: True),
]


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def wavefronts(op: str) -> int:
    """Shared-memory wavefronts (128 B each) of one warp instruction, without bank conflicts."""
    base = op.split(".")[0]
    if base in ("LDSM", "STSM"):
        return int(op.rsplit(".", 1)[1])  # .1/.2/.4 8x8 b16 matrices of 128 B each
    if base in ("LDS", "STS", "LDGSTS"):
        return 4 if ".128" in op else 2 if ".64" in op else 1
    return 0


def classify(loop) -> dict:
    """Per warp and loop iteration: instructions by class, MUFU by kind, ld/st by kind, shared wavefronts."""
    ops = [opcode(t) for _, _, t in loop]
    out = collections.Counter()
    for op in ops:
        base = op.split(".")[0]
        cls = next(c for c, test in CLASSES if test(base))
        out[cls] += 1
        if cls == "MUFU":
            out["MUFU." + op.split(".")[1]] += 1
        elif cls == "ld/st":
            out[base] += 1
        elif cls == "shfl/bar" and base == "BAR":
            out["BAR"] += 1
        elif cls == "INT" and base == "IMAD":
            out["INT.IMAD*"] += 1
        elif op.startswith("F2FP"):
            out["CONV.F2FP"] += 1
    out["total"] = len(ops)
    out["shared_wavefronts"] = sum(wavefronts(op) for op in ops)
    out["ops"] = dict(collections.Counter(ops).most_common())
    return dict(out)


def record(kind: str, vbits, form, B: int, config: LaunchConfig):
    """The forward launch (fn, args, kwargs, grid) of kernels.attention at the real shape, and its HBM bytes."""
    c = ref.Codec(4, 4, G, ref.Pairing.parse("half"), kind)
    e = torch.empty  # (uninitialized CPU tensors: nothing is touched, 2 GiB of dense V costs nothing)
    codes, params = e(B, HKV, T, c.code_bytes(D), dtype=torch.uint8), e(B, HKV, T // G, 4, D // 2, dtype=torch.bfloat16)
    tail, q = e(B, HKV, ref.TAIL_PAD, D, dtype=torch.bfloat16), e(B, HQ, 1, D, dtype=torch.bfloat16)
    vc = None if vbits is None else vref.ValueCodec(vbits, VCG, G)
    if vc is None:
        v = e(B, HKV, T, D, dtype=torch.bfloat16)
        vbytes = v.nbytes
    else:
        v = vref.ValueData(e(B, HKV, T, vc.code_bytes(D), dtype=torch.uint8),
                           e(B, HKV, T, vc.num_groups(D), 2, dtype=torch.bfloat16),
                           e(B, HKV, ref.TAIL_PAD, D, dtype=torch.bfloat16))
        vbytes = v[0].nbytes + v[1].nbytes
    grids: list = []
    with ck.recording(grids) as launches, settings.override(attention=config, value_form=form or settings.value_form):
        kernels.attention(q, ref.PolarData(codes, params, tail), T, v, c, vcodec=vc)
    (fn, args, kw), grid = launches[0], grids[0]
    assert fn.fn.__name__ == "polar_attn_fwd_kernel"
    programs = grid[0] * grid[1] * grid[2]
    partials = 0 if grid[1] == 1 else 2 * programs * kw["BLOCK_M"] * (kw["BLOCK_DV"] + 2) * 4  # written + read
    hbm = codes.nbytes + params.nbytes + vbytes + 2 * q.nbytes + partials  # (+ the output, q's size)
    return fn, args, kw, grid, hbm


def jit_functions() -> list:
    """(file, first line, last line, name) of every @triton.jit function of kernels/jit/attention.py, key_decode.py."""
    spans = []
    for mod in (jit_attention, key_decode):
        for name, obj in vars(mod).items():
            if getattr(getattr(obj, "fn", None), "__module__", None) == mod.__name__:
                src, first = inspect.getsourcelines(obj.fn)
                spans.append((os.path.basename(mod.__file__), first, first + len(src) - 1, name))
    return spans


def line_profile(cubin: bytes, lo: int, hi: int) -> tuple[dict, dict]:
    """Loop instructions [lo, hi] (addresses) by jit function and by source line (ptxas line info, nvdisasm -g):
    which part of the kernel body the instructions come from (layout conversions land on the op that needs them)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-g", "-c", f.name], capture_output=True, text=True, check=True).stdout
    spans, where, by_fn, by_line = jit_functions(), None, collections.Counter(), collections.defaultdict(collections.Counter)
    for line in text.splitlines():
        m = re.match(r'\s*//## File "(.*)", line (\d+)', line)
        if m:
            where = (os.path.basename(m.group(1)), int(m.group(2)))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*);", line)
        if m and where and lo <= int(m.group(1), 16) <= hi:
            fn = next((n for f, a, b, n in spans if f == where[0] and a <= where[1] <= b), where[0])
            by_fn[fn] += 1
            by_line[f"{where[0]}:{where[1]}"][opcode(m.group(2))] += 1
    top = sorted(by_line.items(), key=lambda kv: -sum(kv[1].values()))[:12]
    lines = {k: {"n": sum(c.values()), "source": linecache.getline(os.path.join(JIT, k.split(":")[0]),
                                                                   int(k.split(":")[1])).strip()[:100],
                 "ops": dict(c.most_common(6))} for k, c in top}
    return dict(by_fn.most_common()), lines


def compile_loop(fn, args, kw):
    c = ck.compile_launch(fn, args, kw)
    ins = ck.sass(c.asm["cubin"])
    start, n = ck.hottest_loop_range(ins)
    cnt = classify(ins[start:start + n])
    cnt["sass_sha1"] = hashlib.sha1("\n".join(t for _, _, t in ins).encode()).hexdigest()[:12]
    cnt["by_function"], cnt["top_lines"] = line_profile(c.asm["cubin"], ins[start][0], ins[start + n - 1][0])
    return cnt, ck.registers(c.asm["cubin"]), c.metadata.shared


def resident(regs: int, shared: int, warps: int) -> int:
    """Programs an SM holds at once: registers (256 per warp granule, 16K per scheduler), shared memory, warps."""
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = 4 * (16384 // per_warp) // warps
    return min(by_regs, 233472 // (shared + 1024), 32, 64 // warps)


def floors(cnt: dict, kw: dict, grid, hbm: int) -> dict:
    """Time floors (us) per resource; per-SM ones for the busiest SM."""
    warps, block_n = kw["num_warps"], kw["BLOCK_N"]
    n_blocks, splits = T // block_n, grid[1]
    per = math.ceil(n_blocks / splits)
    shortest = n_blocks - (splits - 1) * per
    programs = grid[0] * grid[1] * grid[2]
    # warp-iterations on the busiest SM: max of the balanced share and ceil(programs / SMs) shortest programs
    wi = max(programs // grid[1] * n_blocks / SMS, math.ceil(programs / SMS) * shortest) * warps

    def us(clocks, clock=CLOCK):
        return 1e6 * clocks / clock

    f = {"issue": us(wi * cnt["total"] / 4),
         "MUFU": us(wi * cnt.get("MUFU", 0) * 32 / RATE["MUFU"]),
         "FP32": us(wi * (cnt.get("FP32", 0) + cnt.get("half2", 0)) * 32 / RATE["FP32"]),
         "INT": us(wi * cnt.get("INT", 0) * 32 / RATE["INT"]),
         "CONV": us(wi * cnt.get("CONV", 0) * 32 / RATE["CONV"]),
         "shared": us(wi * cnt["shared_wavefronts"]),
         "tensor": us(wi * cnt.get("tensor", 0) * 4096 / 4096, TENSOR_CLOCK),
         "HBM": 1e6 * hbm / HBM}
    bound = max(f, key=f.get)
    return {"floors_us": {k: round(v, 1) for k, v in f.items()}, "bound": bound, "floor_us": round(f[bound], 1),
            "iterations_per_program": per, "shortest_program": shortest, "programs": programs,
            "busy_sm_programs": math.ceil(programs / SMS)}


def tuned_configs() -> dict:
    with open(TUNED_JSON) as f:
        rows = {f"{r['B']}x{r['T'] // 1024}k": r for r in json.load(f)["rows"]}
    return {(v, s): LaunchConfig(*ast.literal_eval(rows[s][p + "_config"]))
            for v, (_, _, _, p) in VARIANTS.items() if p for s in SHAPES}


def main() -> None:
    tuned, results, cache, table, parts = tuned_configs(), [], {}, [], {}
    for (name, (kind, vbits, form, _)), (shape, B) in ((v, s) for v in VARIANTS.items() for s in SHAPES.items()):
        for which, config in (("default", settings.attention), ("tuned", tuned.get((name, shape)))):
            if config is None:
                continue
            try:
                fn, args, kw, grid, hbm = record(kind, vbits, form, B, config)
                key = (name, tuple(config))  # the SASS does not depend on B (strides keep their alignment)
                if key not in cache:
                    cache[key] = compile_loop(fn, args, kw)
                cnt, regs, shared = cache[key]
            except Exception as e:  # noqa: BLE001 (report and go on)
                results.append({"variant": name, "shape": shape, "config_kind": which, "error": repr(e)[:300]})
                print(f"FAILED {name} {shape} {which}: {e!r}"[:300], file=sys.stderr)
                continue
            warps, block_n = kw["num_warps"], kw["BLOCK_N"]
            per_tok = {k: round(v * warps / block_n, 2) for k, v in cnt.items() if isinstance(v, int)}
            fl = floors(cnt, kw, grid, hbm)
            measured = MEASURED.get((name, shape)) if which == "tuned" else None
            ipc = round(4 * fl["floors_us"]["issue"] / measured, 2) if measured else None  # warp-instr/clk/SM achieved
            res = resident(regs, shared, warps)
            row = {"variant": name, "shape": shape, "config_kind": which, "config": list(config),
                   "block_n": block_n, "num_warps": warps, "grid": list(grid), "registers": regs,
                   "shared_bytes": shared, "resident_programs_per_sm": res, "warps_per_scheduler": res * warps / 4,
                   "loop_per_warp_iteration": cnt, "warp_instr_per_token_per_kv_head": per_tok, "hbm_bytes": hbm,
                   **fl, "measured_us": measured,
                   "measured_over_floor": round(measured / fl["floor_us"], 2) if measured else None,
                   "implied_ipc_per_sm": ipc}
            results.append(row)
            table.append([name, shape, which, f"{block_n}/{warps}w/{res}r", cnt["total"], per_tok["total"],
                          per_tok.get("MUFU", 0), per_tok.get("INT", 0), per_tok.get("FP32", 0) + per_tok.get("half2", 0),
                          per_tok.get("CONV", 0), per_tok.get("ld/st", 0), per_tok.get("BAR", 0),
                          *fl["floors_us"].values(), fl["bound"], measured or "", row["measured_over_floor"] or "",
                          ipc or ""])
            if (name, cnt["sass_sha1"]) not in parts:  # where the loop's instructions come from, per token per kv head
                fns = {k: v * warps / block_n for k, v in cnt["by_function"].items()}
                split = [sum(fns.get(f, 0) for f in fs) for fs in PARTS.values()]
                parts[name, cnt["sass_sha1"]] = [name, f"{block_n}/{warps}w/{config.maxnreg}", per_tok["total"],
                                                 *split, sum(fns.values()) - sum(split)]
    print("SASS of the hot loop per token per kv head (warp-instructions; MUFU..BAR by class), and floors (us)")
    print(tabulate(table, headers=["variant", "shape", "config", "bn/warps/res", "loop", "wi/tok", "MUFU", "INT",
                                   "FP", "CONV", "ld/st", "BAR", "issue", "MUFU us", "FP32 us", "INT us", "CONV us",
                                   "shared us", "tensor us", "HBM us", "bound", "measured", "meas/floor", "IPC"],
                   floatfmt=".1f"))
    print("\nThe same loops by source (ptxas line info), warp-instructions per token per kv head")
    print(tabulate(parts.values(), headers=["variant", "bn/warps/maxnreg", "total", *PARTS, "other"], floatfmt=".1f"))
    meta = {"script_version": SCRIPT_VERSION, "torch": torch.__version__, "triton": triton.__version__,
            "target": "sm_90 (Triton's bundled ptxas, this CPU)",
            "shape": {"Hq": HQ, "Hkv": HKV, "D": D, "T": T, "q_len": 1, "dtype": "bfloat16", "G": G, "value_group": VCG},
            "default_config": list(settings.attention), "tuned_configs_from": os.path.relpath(TUNED_JSON, HERE + "/.."),
            "model": {"SMs": SMS, "clock_GHz": CLOCK / 1e9, "issue_warp_instr_per_clk_per_sm": 4,
                      "lanes_per_clk_per_sm": RATE, "shared_bytes_per_clk_per_sm": 128,
                      "tensor": "4096 bf16 flop/clk/SM at 1.83 GHz (989.4 TFLOPS dense)", "HBM_TBps": HBM / 1e12,
                      "busiest_sm": "ceil(programs/132) programs of the shortest split, or the balanced share"},
            "notes": ["counts: per warp per loop iteration (static loop body); per token per kv head = x warps / block_n",
                      ("F2FP.BF16.F32.PACK_AB is costed as a 16-lane conversion; if it is faster the CONV floor is "
                       "too high"),
                      ("implied_ipc_per_sm: 4 x issue floor / measured (warp-instructions issued per clock per SM, "
                       "busiest SM)"),
                      ("measured: CUDA-graph replays on the H200 (triton 3.6.0, tuned config); this SASS is the "
                       "local triton's, which may differ")],
            "dense_sdpa_best_us": DENSE_SDPA}
    with open(OUT_JSON, "w") as f:
        json.dump({"meta": meta, "rows": results}, f, indent=1)
    print(f"\nwrote {os.path.relpath(OUT_JSON)}")


if __name__ == "__main__":
    main()
