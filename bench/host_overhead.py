"""Host cost of one eager call of the polar ops against dense SDPA, and where it goes (cProfile).

    PYTHONPATH=. python bench/host_overhead.py [--shape 1x4k] [--profile] [--out DIR]

Host time = CPU time to enqueue one call, averaged over many calls with no sync inside the loop (the GPU is never
the bottleneck at 1x4k: its kernels take ~10 us). Contenders: SDPA flash and cuDNN (enable_gqa), the kernel host
wrapper (pqcompile.kernels.attention), the custom op (torch.ops.pqcompile.attention: dispatcher + wrapper), and the
append op of one token. --profile prints the top functions of the polar call by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pstats
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attention import host_us  # bench/attention.py: CPU time to enqueue one call

from pqcompile import codec as ref
from pqcompile import kernels, ops

SCRIPT_VERSION = 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1x4k", help="BxTk")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    b, t = args.shape.lower().split("x")
    B, T, Hq, H, D = int(b), int(t.rstrip("k")) * 1024, 32, 8, 128
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt)
    k = torch.randn(B, H, T, D, device=dev, dtype=dt)
    v = torch.randn(B, H, T, D, device=dev, dtype=dt)
    c = ref.Codec(4, 4, 128, ref.Pairing())
    data = ref.encode(k, c)
    cargs = ops.codec_args(c)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(be):
        def fn():
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return fn

    params_flat = ops.flat(data.params)
    new = torch.randn(B, H, 1, D, device=dev, dtype=dt)
    contenders = {
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "polar_wrapper": lambda: kernels.attention(q, data, T, v, c),
        "polar_op": lambda: ops.attention(q, data.codes, params_flat, data.tail, v, T, None, D ** -0.5, 0.0, False,
                                          *cargs),
        "append_op": lambda: ops.append(data.codes, params_flat, data.tail, new, T, *cargs),
    }
    row = {"shape": args.shape, "B": B, "T": T}
    for name, fn in contenders.items():
        row[f"{name}_host_us"] = round(host_us(fn, n=500), 1)
        print(f"{name:14s} {row[f'{name}_host_us']:8.1f} us/call", flush=True)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            kernels.attention(q, data, T, v, c)
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        print(s.getvalue())
        row["profile_top"] = s.getvalue()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = {"script_version": SCRIPT_VERSION, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "device": torch.cuda.get_device_name(), "torch": torch.__version__}
        with open(os.path.join(args.out, f"host_overhead-{args.shape}.json"), "w") as f:
            json.dump({"meta": meta, "rows": [row]}, f, indent=1)


if __name__ == "__main__":
    main()
