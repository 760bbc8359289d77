"""Compile the Triton kernels for an H200 (sm_90) on any machine, no GPU needed: what the interpreter accepts
and a GPU compile rejects shows here, and the SASS can be read without device time.

    python bench/compile_kernels.py                          # every group, one line per launch variant
    python bench/compile_kernels.py --group attention --sass # + SASS counts of each kernel's hottest loop
    python bench/compile_kernels.py --hash                   # + a hash of each SASS: did a refactor change it?

The host wrappers run on CPU tensors of real shapes with the kernel launches recorded instead of executed
(the wrappers believe they are on a GPU: fast trig, tensor-core dtypes, 132 SMs); each recorded launch is
specialized exactly as Triton's JIT would specialize it (argument types, ints equal to 1, 16-byte alignment)
and compiled by Triton's own nvidia backend (ptxas is bundled). Exit status 1 if any variant fails. The local
triton may be newer than the GPU machine's.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JIT functions here
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

from pqcompile import codec as ref
from pqcompile import kernels
from pqcompile import value_codec as vref
from pqcompile.kernels import LaunchConfig, common, settings

# the host modules that launch, by name (`kernels.attention` is the function)
HOST = {name: importlib.import_module(f"pqcompile.kernels.{name}")
        for name in ("attention_launch", "encode", "static_write")}
# bench/attention.py (this script's folder): tuned configs not yet in the product space
PAIR_CHUNK_SPACE = importlib.import_module("attention").PAIR_CHUNK_SPACE

TARGET = GPUTarget("cuda", 90, 32)
SMS = 132  # H200
B16 = torch.bfloat16


class Recorder:
    """Stands in for a JIT kernel: `rec[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, launches: list, grids: list | None = None):
        self.fn, self.launches, self.grids = fn, launches, grids

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((self.fn, args, kwargs))
            if self.grids is not None:
                self.grids.append(grid)
        return record


@contextlib.contextmanager
def recording(grids: list | None = None):
    """Host wrappers run on CPU as if on the GPU; their launches land in the yielded list (and each launch's grid
    in `grids`, when given: bench/sass_floors.py counts programs and loop iterations)."""
    launches: list = []
    saved = {}
    for mod, name in (("attention_launch", "polar_attn_fwd_kernel"), ("attention_launch", "polar_attn_reduce_kernel"),
                      ("encode", "polar_encode_kernel"), ("static_write", "polar_static_write_kernel"),
                      ("encode", "value_encode_kernel"), ("static_write", "value_static_write_kernel")):
        saved[HOST[mod], name] = getattr(HOST[mod], name)
        setattr(HOST[mod], name, Recorder(saved[HOST[mod], name], launches, grids))
    patches = {(common, "on_gpu"): lambda t: True, (common, "interpret"): lambda: True,
               (common, "sm_count"): lambda device: SMS}
    for (mod, name), f in patches.items():
        saved[mod, name] = getattr(mod, name)
        setattr(mod, name, f)
    try:
        with settings.override(autotune=False):  # the tuner times on a GPU; configs are set explicitly here
            yield launches
    finally:
        for (mod, name), f in saved.items():
            setattr(mod, name, f)


def compile_launch(fn, args, kwargs):
    """Specialize one recorded launch the way Triton's JIT does, then compile it for sm_90."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    values = list(args) + [kwargs.get(p.name, p.default) for p in fn.params[len(args):]]
    signature, constexprs, attrs = {}, {}, {}
    for i, (p, v) in enumerate(zip(fn.params, values)):
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", v
            continue
        ty, attr = native_specialize_impl(BaseBackend, v, p.is_const, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = v
        elif isinstance(attr, str):
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options)


# --------------------------------------------------------------------------- launch variants (host calls)


def codec(bits=(4, 4), pairing="half", kind="polar"):
    return ref.Codec(*bits, 128, ref.Pairing.parse(pairing), kind)


def attention_calls():
    """(name, call) pairs; each call runs kernels.attention / static_attention on CPU tensors."""
    def dense_call(bits=(4, 4), B=1, Hq=32, H=8, T=4096 + 77, D=128, S=1, dtype=B16, mask=None, softcap=None,
                   causal=False, config=None, values=None, Dv=None, form=None, kind="polar"):
        """values: (bits, channel group) of packed values (Dv: their head dim, default D), None: dense V; form:
        settings.value_form (default: the product's)."""
        def call():
            c = codec(bits, kind=kind)
            codes = torch.zeros(B, H, T // 128 * 128, c.code_bytes(D), dtype=torch.uint8)
            params = torch.zeros(B, H, T // 128, 4, D // 2, dtype=B16)
            tail = torch.zeros(B, H, T % 128 + ref.TAIL_PAD, D, dtype=dtype)
            q, v = torch.zeros(B, Hq, S, D, dtype=dtype), torch.zeros(B, H, T, D, dtype=dtype)
            vc = None if values is None else vref.ValueCodec(*values, 128)
            if vc is not None:
                dv, tc = Dv or D, T // 128 * 128
                v = vref.ValueData(torch.zeros(B, H, tc, vc.code_bytes(dv), dtype=torch.uint8),
                                   torch.zeros(B, H, tc, vc.num_groups(dv), 2, dtype=B16),
                                   torch.zeros(B, H, T - tc + ref.TAIL_PAD, dv, dtype=dtype))
            m = None if mask is None else (torch.ones(B, 1, S, T, dtype=torch.bool) if mask == "bool"
                                            else torch.zeros(B, Hq, S, T, dtype=torch.float32))
            with settings.override(attention=config or settings.attention, value_form=form or settings.value_form):
                kernels.attention(q, ref.PolarData(codes, params, tail), T, v, c, vcodec=vc, mask=m, softcap=softcap,
                                  is_causal=causal)
        return call

    def static_call(B=1, Hq=32, H=8, cap=8192, D=128, S=1, values=None, kind="polar"):
        def call():
            c = codec(kind=kind)
            codes = torch.zeros(B, H, cap, c.code_bytes(D), dtype=torch.uint8)
            params, ring = torch.zeros(B, H, cap // 128, 4, D // 2, dtype=B16), torch.zeros(B, H, 128, D, dtype=B16)
            v, vc, mask = torch.zeros(B, H, cap, D, dtype=B16), None, None
            if values is not None:  # HF's static mask over max_cache_len (here the capacity less 5)
                vc = vref.ValueCodec(*values, 128)
                v = vref.ValueData(torch.zeros(B, H, cap, vc.code_bytes(D), dtype=torch.uint8),
                                   torch.zeros(B, H, cap, vc.num_groups(D), 2, dtype=B16),
                                   torch.zeros(B, H, 128, D, dtype=B16))
                mask = torch.ones(B, 1, S, cap - 5, dtype=torch.bool)
            kernels.static_attention(torch.zeros(B, Hq, S, D, dtype=B16), codes, params, ring, torch.tensor([1000]),
                                     v, c, vcodec=vc, mask=mask, is_causal=S > 1)
        return call

    yield "4+4 bf16 D128 (default config)", dense_call()
    for config in settings.tuned_space:
        yield f"4+4 tuned {tuple(config)}", dense_call(config=config)
    for config in PAIR_CHUNK_SPACE:
        yield f"4+4 bench-only {tuple(config)}", dense_call(config=config)
    for bits in ((3, 3), (2, 2), (4, 3), (2, 3), (1, 1)):
        for alt in (False, True):
            config = settings.attention._replace(alt_code_load=alt)
            yield f"{bits[0]}+{bits[1]} alt={alt}", dense_call(bits, config=config)
    yield "fp16, bool mask, q_len 4 causal", dense_call(dtype=torch.float16, mask="bool", S=4, causal=True)
    yield "fp32 (ieee dots)", dense_call(dtype=torch.float32)
    yield "float mask + softcap, D64 Hq9/Hkv3", dense_call(Hq=9, H=3, D=64, mask="float", softcap=30.0)
    yield "D256 MQA", dense_call(Hq=8, H=1, D=256)
    yield "D96, q_len 16 causal", dense_call(Hq=12, H=4, D=96, S=16, causal=True)
    yield "D16 (8 pairs: tl.dot needs K >= 16)", dense_call(Hq=4, H=2, D=16)
    yield "static (length on the device)", static_call()
    yield "static, prompt of 37", static_call(S=37)
    # packed values (VB > 0); the launches above keep dense V (VB = 0) and their SASS
    for vb in (4, 2, 8):
        yield f"4+4 V{vb} c64 bf16 D128", dense_call(values=(vb, 64))
    for config in settings.tuned_space:
        yield f"4+4 V4 c64 tuned {tuple(config)}", dense_call(config=config, values=(4, 64))
    yield "4+4 V2 c32 fp16, bool mask, q_len 4 causal", dense_call(dtype=torch.float16, mask="bool", S=4, causal=True,
                                                                   values=(2, 32))
    yield "4+4 V8 c128 fp32 (ieee dots)", dense_call(dtype=torch.float32, values=(8, 128))
    yield "4+4 V4 c64 float mask + softcap, D64 Hq9/Hkv3", dense_call(Hq=9, H=3, D=64, mask="float", softcap=30.0,
                                                                      values=(4, 64))
    yield "4+4 V4 c64 D256 MQA", dense_call(Hq=8, H=1, D=256, values=(4, 64))
    yield "4+4 V4 c32 D96 Dv96, q_len 16 causal", dense_call(Hq=12, H=4, D=96, S=16, causal=True, values=(4, 32))
    yield "4+4 V4 c32 D128 Dv64", dense_call(values=(4, 32), Dv=64)
    yield "3+3 V4 alt=True", dense_call((3, 3), config=settings.attention._replace(alt_code_load=True), values=(4, 64))
    yield "static V4 c64 (length on the device)", static_call(values=(4, 64))
    yield "static V2 c64, prompt of 37", static_call(S=37, values=(2, 64))
    # the other ways to read packed values (settings.value_form), for A/B runs on the GPU
    for form in ("dot-bytes", "dequant"):
        for vb in (4, 2):
            yield f"4+4 V{vb} c64 bf16 D128 form={form}", dense_call(values=(vb, 64), form=form)
        yield f"4+4 V4 c64 form={form} tuned (32, True, 4, 4, 3, False, None, 1)", dense_call(
            config=LaunchConfig(32, True, 4, 4, 3), values=(4, 64), form=form)
    # the key codecs' own decode (KIND; polar-circ launches the polar code)
    for kind in ("polar-hybrid", "channel"):
        yield f"{kind} 4+4 bf16 D128", dense_call(kind=kind)
        yield f"{kind} 4+4 pair chunks {tuple(PAIR_CHUNK_SPACE[0])}", dense_call(config=PAIR_CHUNK_SPACE[0], kind=kind)
        yield f"{kind} 3+3 alt=True", dense_call((3, 3), config=settings.attention._replace(alt_code_load=True),
                                                 kind=kind)
        yield f"{kind} 4+4 V4 c64", dense_call(values=(4, 64), kind=kind)
        yield f"{kind} static", static_call(kind=kind)


def encode_calls():
    for bits in ((4, 4), (3, 3), (2, 2)):
        for pairing in ("half", "interleaved", "half@64"):
            yield f"encode {bits[0]}+{bits[1]} {pairing}", lambda bits=bits, pairing=pairing: kernels.encode_groups(
                torch.zeros(1, 8, 1024, 128, dtype=B16), codec(bits, pairing))
    yield "encode fp32 keys", lambda: kernels.encode_groups(torch.zeros(1, 8, 256, 128), codec())
    for kind in ("polar-circ", "polar-hybrid", "channel"):
        for bits, pairing in (((4, 4), "half"), ((3, 3), "interleaved")):
            yield f"encode {kind} {bits[0]}+{bits[1]} {pairing}", lambda kind=kind, bits=bits, pairing=pairing: \
                kernels.encode_groups(torch.zeros(1, 8, 1024, 128, dtype=B16), codec(bits, pairing, kind))
    for vb, cg, D, dtype in ((4, 64, 128, B16), (2, 32, 128, B16), (8, 128, 128, torch.float32), (4, 32, 96, B16),
                             (4, 64, 256, torch.float16)):
        yield f"value encode V{vb} c{cg} D{D} {str(dtype)[6:]}", lambda vb=vb, cg=cg, D=D, dtype=dtype: \
            kernels.encode_value_groups(torch.zeros(1, 8, 1024, D, dtype=dtype), vref.ValueCodec(vb, cg, 128))


def write_calls():
    def call(S, bits=(4, 4), dtype=B16, kind="polar"):
        def run():
            c, cap = codec(bits, kind=kind), 1024
            codes = torch.zeros(1, 8, cap, c.code_bytes(128), dtype=torch.uint8)
            params, ring = torch.zeros(1, 8, cap // 128, 4, 64, dtype=B16), torch.zeros(1, 8, 128, 128, dtype=dtype)
            kernels.static_write(codes, params, ring, torch.tensor([300]), torch.zeros(1, 8, S, 128, dtype=dtype),
                                 torch.arange(300, 300 + S), c)
        return run
    def value_call(S, vb=4, cg=64, dtype=B16, D=128):
        def run():
            vc, cap = vref.ValueCodec(vb, cg, 128), 1024
            codes = torch.zeros(1, 8, cap, vc.code_bytes(D), dtype=torch.uint8)
            params = torch.zeros(1, 8, cap, vc.num_groups(D), 2, dtype=B16)
            ring = torch.zeros(1, 8, 128, D, dtype=dtype)
            kernels.static_write_values(codes, params, ring, torch.tensor([300]), torch.zeros(1, 8, S, D, dtype=dtype),
                                        torch.arange(300, 300 + S), vc)
        return run
    yield "static write, one token", call(1)
    yield "static write, 300 tokens, 3+3", call(300, (3, 3))
    yield "static write, fp32 ring", call(5, dtype=torch.float32)
    for kind in ("polar-circ", "polar-hybrid", "channel"):
        yield f"static write {kind}, 300 tokens", call(300, kind=kind)
    yield "value static write V4 c64, one token", value_call(1)
    yield "value static write V2 c32, 300 tokens", value_call(300, 2, 32)
    yield "value static write V8 c128, fp32 ring, D256", value_call(5, 8, 128, torch.float32, 256)
    yield "value static write V4 c64, fp16 ring, D96 c32", value_call(3, 4, 32, torch.float16, 96)


GROUPS = {"attention": attention_calls, "encode": encode_calls, "write": write_calls}


# --------------------------------------------------------------------------- SASS


def sass(cubin: bytes) -> list[tuple[int, str, str]]:
    """(address, mnemonic, instruction) of a cubin, through the bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(3).split(".")[0], m.group(2))
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)[^;]*);", text)]


def registers(cubin: bytes) -> int:
    """Registers per thread of a cubin's kernel (what sets how many programs fit an SM)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", text).group(1))


def hottest_loop_range(ins) -> tuple[int, int]:
    """(first index, instruction count) of the largest backward-branch loop (the per-block loop of a kernel);
    (0, 0) when it has no loop of 64 instructions or more."""
    at = {a: i for i, (a, _, _) in enumerate(ins)}
    best = (0, 0)
    for i, (a, op, text) in enumerate(ins):
        target = re.search(r"0x([0-9a-f]+)", text) if op == "BRA" else None
        if target and int(target.group(1), 16) < a and int(target.group(1), 16) in at:
            best = max(best, (i + 1 - at[int(target.group(1), 16)], at[int(target.group(1), 16)]))
    n, start = best if best[0] >= 64 else (0, 0)
    return start, n


def hottest_loop(ins) -> dict:
    """Instruction classes of the largest backward-branch loop (hottest_loop_range); the whole kernel (loop 0)
    when it has no loop of 64 instructions or more."""
    start, n = hottest_loop_range(ins)
    ops = collections.Counter(op for _, op, _ in (ins[start:start + n] if n else ins))
    return {"loop": n, "MUFU": ops["MUFU"], "HMMA": ops["HMMA"], "LDG": ops["LDG"] + ops["LDGSTS"],
            "STS+LDS": ops["STS"] + ops["LDS"] + ops["LDSM"], "LDL+STL": ops["LDL"] + ops["STL"],
            "int ALU": sum(ops[k] for k in ("IMAD", "IADD3", "LEA", "LOP3", "SHF", "PRMT", "VIADD", "ISETP", "SEL",
                                            "IMNMX")),
            "fp ALU": sum(ops[k] for k in ("FFMA", "FMUL", "FADD", "FSETP", "FSEL", "FMNMX", "F2FP"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", choices=list(GROUPS), action="append", help="default: all")
    ap.add_argument("--sass", action="store_true", help="count the SASS of each kernel's hottest loop")
    ap.add_argument("--hash", action="store_true", help="sha1 of each launch's SASS (compare two revisions)")
    args = ap.parse_args()
    failed = 0
    for group in args.group or list(GROUPS):
        for name, call in GROUPS[group]():
            with recording() as launches:
                call()
            for fn, a, kw in launches:
                row = {"group": group, "variant": name, "kernel": fn.fn.__name__}
                t = time.perf_counter()
                try:
                    c = compile_launch(fn, a, kw)
                    row.update(ok=True, seconds=round(time.perf_counter() - t, 1), shared_bytes=c.metadata.shared,
                               registers=registers(c.asm["cubin"]), maxnreg=kw.get("maxnreg"))
                    if args.sass or args.hash:
                        ins = sass(c.asm["cubin"])
                        if args.sass:
                            row.update(hottest_loop(ins))
                        if args.hash:
                            row["sass_sha1"] = hashlib.sha1("\n".join(t for _, _, t in ins).encode()).hexdigest()[:12]
                except Exception as e:  # noqa: BLE001 (report every variant, then fail)
                    failed += 1
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                print(json.dumps(row), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
