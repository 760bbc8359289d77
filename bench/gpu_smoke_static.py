"""GPU smoke run of the static path (issue 7): PolarStaticCache with the polarquant backend, without and with
CUDA graphs, greedy tokens compared between the runs, CUDA-graph skips read from inductor's counters.

    PYTHONPATH=. python bench/gpu_smoke_static.py

Paths: eager (dispatch-level ops on the compressed cache), torch.compile(model, backend=polarquant) without
graphs, the same with mode="reduce-overhead" (inductor CUDA graphs), and HF's generate with
CompileConfig(backend=polarquant) (its default mode is "reduce-overhead").
"""

import time

import torch
import transformers
from torch._dynamo.utils import counters as dynamo_counters

from pqcompile import counters
from pqcompile.backend import polarquant
from pqcompile.hf_compat import cache_kw
from pqcompile.static_cache import PolarStaticCache

PROMPT, NEW, CAP = 300, 48, 512


def greedy(forward, model, ids, warm: int = 0):
    """Prefill + NEW greedy steps calling forward directly (position ids passed as a device tensor)."""
    cache = PolarStaticCache(config=model.config, max_cache_len=CAP)
    cfg = model.config
    cache.early_initialization(ids.shape[0], cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                               torch.bfloat16, ids.device)
    out = forward(ids, **cache_kw(cache), use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    toks, times = [tok], []
    for i in range(NEW - 1):
        pos = torch.full((1, 1), PROMPT + i, device=ids.device, dtype=torch.long)
        t0 = time.perf_counter()
        out = forward(tok, **cache_kw(cache), position_ids=pos, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        toks.append(tok)
    return torch.cat(toks, 1), cache, sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2048, num_attention_heads=16,
                                   num_key_value_heads=4, num_hidden_layers=2, vocab_size=1024,
                                   attn_implementation="sdpa")
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 1024, (1, PROMPT), device="cuda")
    results = {}
    with torch.no_grad():
        results["eager"] = greedy(model, model, ids)
        for name, mode in (("compiled", None), ("compiled+graphs", "reduce-overhead")):
            torch._dynamo.reset()
            counters.clear()
            dynamo_counters.clear()
            fwd = torch.compile(model, backend=polarquant, mode=mode)
            for _ in range(3):  # cudagraph trees: warm-up, record, replay
                results[name] = greedy(fwd, model, ids)
            skips = {k: v for k, v in dynamo_counters["inductor"].items() if "cudagraph" in k}
            print(f"{name}: graphs {counters.totals['graphs']} rewritten_static {counters.totals['rewritten_static']}"
                  f" declined {counters.totals['sites_declined']} median step {results[name][2]:.2f} ms; "
                  f"inductor cudagraph counters {skips}", flush=True)
        torch._dynamo.reset()
        counters.clear()
        dynamo_counters.clear()
        try:
            cc = transformers.CompileConfig(backend=polarquant)
            for _ in range(3):
                cache = PolarStaticCache(config=cfg, max_cache_len=CAP)
                out = model.generate(ids, **cache_kw(cache), max_new_tokens=NEW, min_new_tokens=NEW,
                                     do_sample=False, compile_config=cc)
            results["generate+CompileConfig"] = (out[:, PROMPT:], cache, float("nan"))
            print(f"generate+CompileConfig: graphs {counters.totals['graphs']} rewritten_static "
                  f"{counters.totals['rewritten_static']}; inductor cudagraph counters "
                  f"{ {k: v for k, v in dynamo_counters['inductor'].items() if 'cudagraph' in k} }")
        except Exception as e:  # noqa: BLE001 (a smoke run reports every path)
            print("generate+CompileConfig FAILED:", type(e).__name__, str(e)[:800])
    base = results["compiled"][0]
    for name, (toks, cache, _) in results.items():
        agree = (toks == base).float().mean().item()
        print(f"tokens {name} vs compiled (no graphs): {agree:.3f} agreement, exact={torch.equal(toks, base)}")
    keys = results["compiled"][1].layers[0].keys
    print("static: key bytes held per layer", keys.nbytes_held(), "vs dense bf16", keys.numel() * 2)


if __name__ == "__main__":
    main()
