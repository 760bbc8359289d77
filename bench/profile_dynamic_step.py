"""Where one decode step of the DynamicCache path spends host time: eager / inductor / polarquant on N layers of the
Llama-3-8B shape (random bf16 weights), batch B, one context. Per contender: the step's wall time with a sync after
every step, the host's enqueue time (no sync inside a burst of steps, divided by the steps: on a host-bound step the
two agree), then for polarquant a cProfile of a few steps (functions by own time and by cumulative time). Writes
JSON as it goes (bench/results/profile_dynamic_step-<date>-<tag>.json).

    PYTHONPATH=. python bench/profile_dynamic_step.py --layers 8 --context 4096      # H200
    python bench/profile_dynamic_step.py --tiny                                       # CPU smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pathlib
import pstats
import statistics
import subprocess
import time

import torch
import transformers
from decode_e2e import build  # the same model (8B shape, random bf16 weights; --tiny a small one)

from pqcompile.backend import polarquant

VERSION = 3  # 2: --py-spy; 3: the model from decode_e2e.build (weights initialized in bf16: other random values than v2)


def sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def profile_text(prof, key: str, n: int) -> str:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats(key).print_stats(n)
    return s.getvalue()


def run(model, contender: str, args) -> dict:
    torch._dynamo.reset()
    if contender == "eager":
        fwd = model
    else:
        options = {"value_bits": args.value_bits} if args.value_bits else None
        fwd = torch.compile(model, backend=polarquant if contender == "polarquant" else "inductor",
                            options=options if contender == "polarquant" else None)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.context), device=args.device)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        tok = fwd(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

        def step(tok):
            return fwd(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

        t0 = time.perf_counter()
        for _ in range(args.warmup):
            tok = step(tok)
        sync(args)
        warm = time.perf_counter() - t0
        walls = []
        for _ in range(args.steps):
            t = time.perf_counter()
            tok = step(tok)
            sync(args)
            walls.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        for _ in range(args.steps):
            tok = step(tok)
        host = (time.perf_counter() - t) * 1e3 / args.steps
        sync(args)
        row = {"contender": contender, "warmup_s": round(warm, 2), "step_ms": round(statistics.median(walls), 3),
               "host_enqueue_ms": round(host, 3)}
        if contender == "polarquant" and args.py_spy:
            row["py_spy"] = sample(step, tok, args)
        if contender == "polarquant" and args.profile_steps:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.profile_steps):
                tok = step(tok)
            prof.disable()
            sync(args)
            row["own_time"] = profile_text(prof, "tottime", args.top)
            row["cumulative"] = profile_text(prof, "cumulative", args.top)
    return row


def sample(step, tok, args) -> str:
    """py-spy (sampling; Python frames) attached to this process while it decodes for --py-spy seconds;
    the collapsed stacks go to a file beside the JSON (cProfile misattributes time across dynamo's eval-frame
    hooks and the dispatcher's C++ frames; sampling does not)."""
    path = pathlib.Path(args.out) / f"py_spy-{datetime.date.today()}-{args.layers}layers.txt"
    cmd = [os.environ.get("PY_SPY", "py-spy"), "record", "--pid", str(os.getpid()), "--format", "raw", "--rate", "1000",
           "--nonblocking", "--duration", str(args.py_spy), "-o", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    t0, n = time.perf_counter(), 0
    while proc.poll() is None and time.perf_counter() - t0 < args.py_spy + 30:
        tok = step(tok)
        n += 1
    sync(args)
    out = proc.communicate()[0]
    print(out[-2000:], flush=True)
    return f"{path.name}: {n} steps sampled; py-spy rc {proc.returncode}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--value-bits", type=int, default=None)
    ap.add_argument("--contenders", nargs="+", default=["eager", "inductor", "polarquant"])
    ap.add_argument("--py-spy", type=int, default=0, help="seconds of py-spy sampling of the polar steps")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = torch.bfloat16
    if args.tiny:
        args.layers, args.context = 2, 64
    tag = args.tag or f"{args.layers}layers-b{args.batch}-{args.context}"
    path = pathlib.Path(args.out) / f"profile_dynamic_step-{datetime.date.today()}-{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build(args)
    doc = {"version": VERSION, "args": {k: v for k, v in vars(args).items()}, "torch": torch.__version__,
           "transformers": transformers.__version__, "rows": []}
    for contender in args.contenders:
        row = run(model, contender, args)
        doc["rows"].append(row)
        path.write_text(json.dumps(doc, indent=1, default=str))
        print(f"{contender}: step {row['step_ms']} ms, host enqueue {row['host_enqueue_ms']} ms, "
              f"warm-up {row['warmup_s']} s", flush=True)
        for key in ("own_time", "cumulative"):
            if key in row:
                print(row[key], flush=True)
    print("wrote", path)


if __name__ == "__main__":
    main()
