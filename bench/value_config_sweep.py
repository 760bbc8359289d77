"""Launch configs for the packed-value (V4) attention, outside the tuned space (issue 16): does a register cap or
another warp count lift the V4 loop's issue rate? bench/sass_floors.py read the V4 kernel as issue-bound at 1.4
instructions a clock (K-only 1.9), with 243 registers a thread (2 warps a scheduler). Each config is checked on a
small case against value_codec.attention, then timed at 8x32k as CUDA-graph replays beside dense SDPA (flash and
cuDNN) of the same shape, the K-only kernel and the tuner's own pick. JSON after every row.

    PYTHONPATH=. python bench/value_config_sweep.py [--codec polar-hybrid] [--shape 8x32k]      # H200
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import attention_inputs, copy_bandwidth, graph_us, time_dense, value_codec_for

from pqcompile import codec as ref
from pqcompile import kernels
from pqcompile import value_codec as vref
from pqcompile.kernels import LaunchConfig, settings, tuner

VERSION = 2  # 2: the dense rows from bench/attention.py's time_dense (eager, graph, byte floor)
DEVICE, DTYPE = "cuda", torch.bfloat16  # (a CPU smoke run under the interpreter patches these)
EXTRA = [  # block_n, split_dot, programs_per_sm, num_warps, num_stages, alt_code_load, maxnreg
    LaunchConfig(32, True, 8, 2, 4, False, 168), LaunchConfig(32, True, 8, 2, 4, False, 128),
    LaunchConfig(32, True, 12, 2, 4, False, 128), LaunchConfig(32, True, 16, 2, 4, False, 96),
    LaunchConfig(32, True, 6, 2, 4, False, 128), LaunchConfig(32, True, 4, 4, 3, False, 168),
    LaunchConfig(64, True, 8, 4, 3, False, 168), LaunchConfig(64, True, 6, 4, 3, False, 128),
    LaunchConfig(32, True, 8, 2, 3), LaunchConfig(32, True, 8, 2, 2),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--codec", default="polar-hybrid")
    ap.add_argument("--shape", default="8x32k")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    B, T = int(args.shape.split("x")[0]), int(args.shape.split("x")[1].rstrip("k")) * 1024 + 77
    Hq, H, D, dt = 32, 8, 128, DTYPE
    path = os.path.join(args.out, f"value_config_sweep-{datetime.date.today()}-{args.codec}-{args.shape}.json")
    doc = {"version": VERSION, "torch": torch.__version__, "device": torch.cuda.get_device_name(),
           "codec": args.codec, "shape": args.shape, "rows": []}

    def emit(row):
        doc["rows"].append(row)
        print(row, flush=True)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)

    c = ref.Codec(4, 4, 128, ref.Pairing(), args.codec)
    vc = value_codec_for(4, 64, D)
    torch.manual_seed(0)
    # the check case: small, with a tail, against the reference
    cq, cv, _ = attention_inputs(2, Hq, H, 2048 + 5, D, 1, H, None, dt)
    ckd = ref.encode(torch.randn(2, H, 2048 + 5, D, device=DEVICE, dtype=dt), c)
    cvd = vref.encode(cv, vc)
    want = vref.attention(cq, ckd, 2048 + 5, cvd, c, vc).float()
    # the timed shape
    q, v, _ = attention_inputs(B, Hq, H, T, D, 1, H, None, dt)
    keys = torch.randn(B, H, T, D, device=DEVICE, dtype=dt)
    kd, vd = ref.encode(keys, c), vref.encode(v, vc)
    dense = {"what": "sdpa flash / cudnn (bench/attention.py time_dense)"}
    time_dense(dense, q, keys, v, copy_bandwidth(), graphs=True)
    emit(dense)
    emit({"what": "K-only, tuned", "us": graph_us(lambda: kernels.attention(q, kd, T, v, c)),
          "config": str(tuner.last_config())})
    emit({"what": "K + V4, tuned", "us": graph_us(lambda: kernels.attention(q, kd, T, vd, c, vcodec=vc)),
          "config": str(tuner.last_config())})
    # the tuned space's configs that won a V4 shape on the H200 (attention-2026-12-0*.json), then the extras
    space = list(dict.fromkeys((LaunchConfig(32, True, 8, 2, 4), LaunchConfig(64, True, 8, 4, 3),
                                LaunchConfig(128, True, 2, 4, 3), *EXTRA)))
    for cfg in space:
        row = {"what": "K + V4, fixed", "config": str(tuple(cfg)), "extra": cfg in EXTRA}
        try:
            with settings.override(autotune=False, attention=cfg):
                got = kernels.attention(cq, ckd, 2048 + 5, cvd, c, vcodec=vc).float()
                row["check_rel_err"] = ((got - want).norm() / want.norm()).item()
                row["us"] = graph_us(lambda: kernels.attention(q, kd, T, vd, c, vcodec=vc))
        except Exception as e:  # noqa: BLE001 (a config that does not compile or fit: reported)
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        emit(row)
    print("wrote", path)


if __name__ == "__main__":
    main()
