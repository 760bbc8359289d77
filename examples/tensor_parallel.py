"""Tensor-parallel decoding with the polarquant backend: each rank compresses only its own shard of KV heads.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py               # tiny random GQA Llama (8 q / 4 kv heads)
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --model DIR --dtype bfloat16 --prompt-len 4096 --bench
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --model DIR --dtype bfloat16 --bench --backend inductor
    python examples/tensor_parallel.py --model DIR                        # one process, no TP: the reference

(--backend inductor / eager: the dense TP baselines.)

Hugging Face's tensor parallelism (`tp_plan="auto"`, the model's `base_model_tp_plan`) shards q/k/v_proj by
output columns (whole heads) and o_proj by input rows (an all-reduce after attention). The graph dynamo hands
the backend on each rank therefore holds attention over the local heads only: q [B, Hq/tp, S, D] and the
DynamicCache append cat([past, new], -2) over [B, Hkv/tp, T, D]. The passes rewrite those local sites like
any other, and each rank's cache holds PolarKeys [B, Hkv/tp, T, D]: the compressed state is sharded exactly
like the dense cache would be, with no extra communication.

Backends: gloo on CPU, nccl on CUDA (one GPU per rank, LOCAL_RANK). Every rank gets the same prompt.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from pqcompile import counters
from pqcompile.cache import polar_keys_in
from pqcompile.hf_compat import cache_of
from pqcompile.models import tiny_llama


def save_tiny_llama(path: str | os.PathLike) -> str:
    """A tiny random GQA Llama checkpoint (2 layers, hidden 256, 8 q heads / 4 kv heads, head_dim 32)."""
    tiny_llama(layers=2, hidden=256, heads=8, kv_heads=4, qk_gain=3.0).save_pretrained(path)
    return str(path)


def init_distributed(timeout_s: float) -> tuple[int, int, torch.device]:
    """Join the torchrun process group (bounded timeout: a lost rank fails instead of hanging)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if world == 1:
        return 0, 1, device
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # transformers would initialize it too, but with a 2-hour timeout
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def load(path: str, world: int, dtype: torch.dtype, device: torch.device):
    """from_pretrained, tensor-parallel over all ranks when there are several."""
    if world == 1:
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    config_cls = getattr(transformers, "DistributedConfig", None)
    # newer transformers: DistributedConfig(tp_plan=...) (tp_plan= alone is deprecated); older: tp_plan= only
    if config_cls is not None and "tp_plan" in inspect.signature(config_cls).parameters:
        tp = {"distributed_config": config_cls(tp_plan="auto")}
    else:
        tp = {"tp_plan": "auto"}
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **tp).eval()


def shard_summary(cache) -> list[dict]:
    """What this rank's cache holds, per layer: logical shape, inner tensors, bytes held vs dense keys."""
    rows = []
    for k in polar_keys_in(cache):
        rows.append({"shape": list(k.shape), "codes": list(k.codes.shape), "params": list(k.params.shape),
                     "tail": list(k.tail.shape), "inner_types": sorted({type(t).__name__ for t in
                                                                        (k.codes, k.params, k.tail)}),
                     "codec": str(k.codec), "nbytes_held": k.nbytes_held(),
                     "dense_bytes": k.numel() * k.element_size()})
    return rows


def generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], object, float]:
    """Greedy decoding of exactly `new_tokens` tokens -> (tokens, cache, seconds)."""
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out.sequences[0, ids.shape[1]:].tolist(), cache_of(out), time.perf_counter() - start


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a Hugging Face checkpoint folder (default: a tiny random GQA Llama)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--prompt-len", type=int, default=240)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--backend", default="polarquant", choices=("polarquant", "inductor", "eager"),
                   help="torch.compile backend (inductor / eager: the dense baselines)")
    p.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"),
                   help="the compiler that runs after the passes (options['backend'])")
    p.add_argument("--bench", action="store_true", help="time a second, compiled generate (tok/s)")
    p.add_argument("--report", help="write graph-diff reports to REPORT/rank<r>")
    p.add_argument("--out", help="write rank<r>.json (summary) and rank<r>.pt (dequantized keys) to OUT")
    p.add_argument("--timeout", type=float, default=300.0, help="process-group timeout, seconds")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    path, tmp = args.model, None
    if path is None:  # each rank writes the same seeded checkpoint, before joining the group (in a group,
        tmp = tempfile.TemporaryDirectory()  # save_pretrained writes on rank 0 only)
        path = save_tiny_llama(tmp.name)
    rank, world, device = init_distributed(args.timeout)
    model = load(path, world, getattr(torch, args.dtype), device)
    gen = torch.Generator().manual_seed(0)  # the same prompt on every rank
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=gen).to(device)
    if args.backend == "polarquant":
        options = {"backend": args.inner}
        if args.report:
            options["report"] = str(Path(args.report) / f"rank{rank}")
        model.compile(backend="polarquant", options=options)
    elif args.backend == "inductor":
        model.compile()
    counters.clear()
    tokens, cache, first_s = generate(model, ids, args.new_tokens)  # includes compiling
    bench_s = generate(model, ids, args.new_tokens)[2] if args.bench else None
    summary = {"rank": rank, "world": world, "backend": args.backend, "tokens": tokens, "first_generate_s": first_s,
               "tok_per_s": args.new_tokens / bench_s if bench_s else None, "counters": dict(counters.totals),
               "sites": [list(s) for g in counters.graphs for s in g["sites"]], "keys": shard_summary(cache)}
    line = f"rank {rank}/{world}: {args.new_tokens} tokens, first generate {first_s:.2f} s"
    if bench_s:
        line += f", then {summary['tok_per_s']:.1f} tok/s"
    if summary["keys"]:
        held, dense = (sum(k[f] for k in summary["keys"]) for f in ("nbytes_held", "dense_bytes"))
        line += (f"; {counters.totals['sites_rewritten']} attention sites rewritten in {counters.totals['graphs']}"
                 f" graphs, {counters.totals['sites_declined']} declined; keys per layer "
                 f"{summary['keys'][0]['shape']} held {held} B vs dense {dense} B ({held / dense:.3f}x)")
    print(line, flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, f"rank{rank}.json").write_text(json.dumps(summary, indent=1))
        torch.save([k.dequantize().cpu() for k in polar_keys_in(cache)], Path(args.out, f"rank{rank}.pt"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
