"""End-to-end decode benchmark: eager vs inductor vs polarquant on a Llama-3-8B-shaped model (random weights).

Per contender and context: prefill, then timed decode steps (CUDA events, median), tokens/s, the bytes the
key cache holds, torch.cuda.max_memory_allocated during decode, and logits agreement with eager.
Prints a table and writes JSON to bench/results/decode_e2e-<date>.json.

    python bench/decode_e2e.py --layers 4 --contexts 4096 32768          # H200 (the lease's budget)
    python bench/decode_e2e.py --tiny --contexts 256 --steps 4           # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import time

import torch
import transformers
from tabulate import tabulate

import pqcompile
from pqcompile import counters
from pqcompile.backend import polarquant
from pqcompile.cache import polar_keys_in

VERSION = 2  # 2: peak memory measured after the warm-up (compiles) steps


def build(args) -> transformers.PreTrainedModel:
    if args.tiny:
        cfg = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                   vocab_size=512)
    else:  # Llama-3-8B shape
        cfg = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   vocab_size=128256, rope_theta=500000.0)
    config = transformers.LlamaConfig(num_hidden_layers=args.layers, max_position_embeddings=131072,
                                      attn_implementation="sdpa", **cfg)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = transformers.LlamaForCausalLM(config).to(args.dtype).eval()
    return model


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(model, contender: str, ctx: int, args) -> dict:
    torch._dynamo.reset()
    counters.clear()
    device = args.device
    gen = torch.Generator().manual_seed(ctx)  # the same tokens for every contender
    ids = torch.randint(0, model.config.vocab_size, (args.batch, ctx + args.steps + args.warmup), generator=gen)
    ids = ids.to(device)
    if contender == "eager":
        fwd = model
    elif contender == "inductor":
        fwd = torch.compile(model)
    else:
        fwd = torch.compile(model, backend=polarquant)  # the callable: no install needed on the GPU machine
    cache = transformers.DynamicCache(config=model.config)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fwd(ids[:, :ctx], past_key_values=cache, use_cache=True)
        sync(device)
        prefill_s = time.perf_counter() - t0
        logits = [out.logits[:, -1].float()]
        times = []
        for i in range(args.warmup + args.steps):
            if i == args.warmup and device.startswith("cuda"):  # peak of steady decode, not of compiling
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            tok = ids[:, ctx + i: ctx + i + 1]
            if device.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fwd(tok, past_key_values=cache, use_cache=True)
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
            else:
                t = time.perf_counter()
                out = fwd(tok, past_key_values=cache, use_cache=True)
                ms = (time.perf_counter() - t) * 1e3
            if i >= args.warmup:
                times.append(ms)
            if i < 4:
                logits.append(out.logits[:, -1].float())
    polar = polar_keys_in(cache)
    key_bytes = (sum(k.nbytes_held() for k in polar) if polar
                 else sum(layer.keys.numel() * layer.keys.element_size() for layer in cache.layers))
    row = {
        "contender": contender, "context": ctx, "batch": args.batch, "layers": args.layers,
        "step_ms_median": statistics.median(times), "step_ms_min": min(times),
        "tokens_per_s": args.batch * 1e3 / statistics.median(times), "prefill_s_incl_compile": prefill_s,
        "key_cache_bytes": key_bytes, "graphs": counters.totals["graphs"],
        "sites_rewritten": counters.totals["sites_rewritten"], "sites_declined": counters.totals["sites_declined"],
        "logits": torch.stack(logits).cpu(),
    }
    if device.startswith("cuda"):
        row["decode_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        row["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--contenders", nargs="+", default=["eager", "inductor", "polarquant"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build(args)
    rows = []
    for ctx in args.contexts:
        ref = None
        for contender in args.contenders:
            row = run(model, contender, ctx, args)
            if contender == "eager":
                ref = row["logits"]
            logits = row.pop("logits")
            if ref is not None:
                row["logits_cos_vs_eager"] = torch.nn.functional.cosine_similarity(logits, ref, dim=-1).mean().item()
                row["top1_vs_eager"] = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
            rows.append(row)
            print(f"{contender} @ {ctx}: {row['step_ms_median']:.2f} ms/step", flush=True)
    headers = ["contender", "context", "step_ms_median", "tokens_per_s", "key_cache_bytes", "decode_peak_extra_bytes",
               "graphs", "sites_rewritten", "logits_cos_vs_eager", "top1_vs_eager"]
    print(tabulate([[r.get(h, "") for h in headers] for r in rows], headers=headers, floatfmt=".3f"))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"decode_e2e-{datetime.date.today()}{'-tiny' if args.tiny else ''}.json"
    meta = {"script": "bench/decode_e2e.py", "version": VERSION, "torch": torch.__version__,
            "transformers": transformers.__version__, "pqcompile": pqcompile.__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "args": {
                k: str(v) for k, v in vars(args).items()}}
    (out / name).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
