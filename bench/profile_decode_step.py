"""Where one static decode step spends GPU time: dense StaticCache + inductor vs PolarStaticCache + polarquant,
per CUDA kernel (torch.profiler, no CUDA graphs so every launch is visible), on a few layers of the
Llama-3-8B shape at one context.

    PYTHONPATH=. python bench/profile_decode_step.py --layers 4 --context 4096
"""

import argparse

import torch
import transformers
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile

from pqcompile.backend import polarquant
from pqcompile.hf_compat import cache_kw
from pqcompile.static_cache import PolarStaticCache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=128256, num_hidden_layers=args.layers,
                                   max_position_embeddings=131072, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.context), device="cuda")
    cap = args.context + 64
    for name, make, backend in (("inductor + StaticCache", transformers.StaticCache, "inductor"),
                                ("polarquant + PolarStaticCache", PolarStaticCache, polarquant)):
        torch._dynamo.reset()
        cache = make(config=cfg, max_cache_len=cap)
        fwd = torch.compile(model, backend=backend)
        with torch.no_grad():
            model(ids, **cache_kw(cache), use_cache=True)  # eager prefill, as generate does
            tok = ids[:, -1:]
            for i in range(3 + args.steps):
                if i == 3:
                    torch.cuda.synchronize()
                    prof = profile(activities=[ProfilerActivity.CUDA])
                    prof.__enter__()
                pos = torch.full((1, 1), args.context + i, device="cuda", dtype=torch.long)
                tok = fwd(tok, **cache_kw(cache), position_ids=pos, use_cache=True).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            prof.__exit__(None, None, None)
        rows = []
        total = 0.0
        for e in prof.key_averages():
            t = e.device_time_total / args.steps
            if t <= 0:
                continue
            total += t
            rows.append((e.key[:90], e.count // args.steps, round(t, 1)))
        rows.sort(key=lambda r: -r[2])
        print(f"\n{name}: {args.layers} layers, context {args.context}: GPU time per step {total:.0f} us "
              f"(kernels listed per step)")
        print(tabulate(rows[: args.top], headers=["kernel", "launches/step", "us/step"]), flush=True)


if __name__ == "__main__":
    main()
