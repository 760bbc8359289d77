"""Soak: N greedy decode steps on one compiled model, dynamic (DynamicCache) and static (PolarStaticCache) paths.

Every K steps it records: graphs compiled (pqcompile.counters and dynamo's unique graphs), process RSS, the bytes
the cache holds (CompressedTensor.nbytes_held plus dense tensors), drift against a dense shadow (the eager model
fed the same tokens with an uncompressed DynamicCache: logits cosine / top-1, keys' relative error), and whether
the compiled step's token equals the reference ops' token (HF's eager model over a copy of the same compressed
cache: its attention reads the keys the codes stand for). Prints a table, writes JSON as it goes and a plot of
memory vs step next to it.

    python bench/soak.py --steps 500 --tag smoke          # CPU, tiny Llama, both paths
    python bench/soak.py --steps 10000 --tag cpu-10k
    python bench/soak.py --cuda --path static --steps 131072 --every 4096 --tag h200-8b   # GPU: 8B shape, random
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import pathlib
import sys
import time

import torch
import transformers
from tabulate import tabulate

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pqcompile import counters
from pqcompile.compressed import CompressedTensor
from pqcompile.hf_compat import cache_kw
from pqcompile.models import tiny_llama
from pqcompile.static_cache import PolarStaticCache


def rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cache_bytes(cache) -> int:
    """Bytes the cache holds: compressed tensors' inner buffers, dense tensors' storage."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, CompressedTensor):
                total += t.nbytes_held()
            elif isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def dynamo_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"].get("unique_graphs", 0))


def build(args):
    if not args.cuda:
        model = tiny_llama(layers=args.layers, hidden=128, heads=4, kv_heads=2, qk_gain=3.0)
        model.config.max_position_embeddings = max(4096, args.prompt + args.steps + 8)
        return model
    sys.path.insert(0, str(ROOT / "bench"))
    import decode_e2e

    ns = argparse.Namespace(tiny=False, layers=args.layers, dtype=torch.bfloat16, device="cuda")
    return decode_e2e.build(ns)


def make_cache(model, path: str, args):
    if path == "dynamic":
        return transformers.DynamicCache(config=model.config)
    return PolarStaticCache(config=model.config, max_cache_len=args.prompt + args.steps + 8, group_size=args.group_size)


def keys_rel_error(cache, shadow) -> float | None:
    """Relative L2 of the cache's keys (dequantized) against the dense shadow's, over all layers."""
    num = den = 0.0
    for layer, dense in zip(cache.layers, shadow.layers):
        k = layer.keys
        if not isinstance(k, CompressedTensor):
            return None
        ref = dense.keys
        got = k.dequantize()[:, :, : ref.shape[2]].float()
        num += (got - ref.float()).pow(2).sum().item()
        den += ref.float().pow(2).sum().item()
    return (num / den) ** 0.5 if den else None


@torch.no_grad()
def soak(model, path: str, args, out: dict, save) -> None:
    device = "cuda" if args.cuda else "cpu"
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="polarquant", mode="reduce-overhead" if args.cuda else None,
                             options={"group_size": args.group_size, "backend": args.inner})
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=g).to(device)
    cache = make_cache(model, path, args)
    shadow = transformers.DynamicCache(config=model.config) if args.shadow else None
    logits = compiled(ids, **cache_kw(cache), use_cache=True).logits[:, -1]
    if shadow is not None:
        model(ids, **cache_kw(shadow), use_cache=True)
    rows, mismatches, warm = [], 0, None
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        token = logits.argmax(-1, keepdim=True)
        check = step % args.every == 0 or step == 1
        reference = copy.deepcopy(cache) if check and args.reference else None
        logits = compiled(token, **cache_kw(cache), use_cache=True).logits[:, -1]
        if shadow is not None:
            dense_logits = model(token, **cache_kw(shadow), use_cache=True).logits[:, -1]
        if not check:
            continue
        row = {"path": path, "step": step, "tokens": args.prompt + step, "graphs": counters.totals["graphs"],
               "dynamo_graphs": dynamo_graphs(), "rss_mb": rss_bytes() / 2**20, "cache_mb": cache_bytes(cache) / 2**20,
               "s_per_step": (time.perf_counter() - t0) / step}
        if reference is not None:
            ref_logits = model(token, **cache_kw(reference), use_cache=True).logits[:, -1]
            same = bool((ref_logits.argmax(-1) == logits.argmax(-1)).all())
            mismatches += not same
            row["token_vs_reference"] = same
            del reference
        if shadow is not None:
            row["logits_cos_vs_dense"] = torch.nn.functional.cosine_similarity(
                logits.float(), dense_logits.float(), dim=-1).min().item()
            row["top1_vs_dense"] = bool((logits.argmax(-1) == dense_logits.argmax(-1)).all())
            row["keys_rel_err"] = keys_rel_error(cache, shadow) if path == "dynamic" else None
        if warm is None and step >= args.warmup:
            warm = row
        rows.append(row)
        print(f"{path} step {step}: graphs {row['graphs']}, rss {row['rss_mb']:.1f} MB, cache {row['cache_mb']:.2f} MB",
              flush=True)
        out["runs"][path] = {"rows": rows, "token_mismatches": mismatches}
        save()
    last = rows[-1]
    summary = {"token_mismatches": mismatches, "checks": sum("token_vs_reference" in r for r in rows)}
    if warm is not None:
        summary.update(new_graphs_after_warmup=last["graphs"] - warm["graphs"],
                       rss_growth_mb=last["rss_mb"] - warm["rss_mb"], cache_growth_mb=last["cache_mb"] - warm["cache_mb"])
        summary["rss_growth_minus_cache_growth_mb"] = summary["rss_growth_mb"] - summary["cache_growth_mb"]
        summary["rss_growth_minus_cache_growth_pct_of_rss"] = 100 * summary["rss_growth_minus_cache_growth_mb"] / \
            warm["rss_mb"]
    out["runs"][path]["summary"] = summary
    save()


def plot(out: dict, png: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for path, run in out["runs"].items():
        steps = [r["step"] for r in run["rows"]]
        axes[0].plot(steps, [r["rss_mb"] for r in run["rows"]], label=f"{path}: process RSS")
        axes[1].plot(steps, [r["cache_mb"] for r in run["rows"]], label=f"{path}: cache bytes held")
    for ax, title in zip(axes, ("process RSS (MB)", "cache held (MB)")):
        ax.set_xlabel("decode step")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"soak {out['meta']['tag']}: {out['meta']['steps']} steps")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--every", type=int, default=250, help="record every K steps")
    p.add_argument("--warmup", type=int, default=250, help="graphs and memory are compared from this step on")
    p.add_argument("--path", choices=["dynamic", "static", "both"], default="both")
    p.add_argument("--prompt", type=int, default=37)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"], help="inner compiler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shadow", dest="shadow", action="store_false", help="skip the dense shadow (drift)")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the reference-ops token check at checkpoints")
    p.add_argument("--cuda", action="store_true", help="GPU: Llama-3-8B shape, random bf16 weights (bench/decode_e2e)")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.cuda and args.path != "static":
        p.error("--cuda runs the static path only (--path static): the 8B shape to 128k needs the static cache")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"soak-{datetime.date.today().isoformat()}-{args.tag}"
    js, png = args.out / f"{stem}.json", args.out / f"{stem}.png"
    out = {"meta": {"tag": args.tag, "steps": args.steps, "every": args.every, "warmup": args.warmup,
                    "prompt": args.prompt, "layers": args.layers, "group_size": args.group_size, "inner": args.inner,
                    "seed": args.seed, "device": "cuda" if args.cuda else "cpu", "torch": torch.__version__,
                    "transformers": transformers.__version__, "threads": torch.get_num_threads()},
           "runs": {}}

    def save():
        tmp = js.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(js)

    model = build(args)
    for path in (["dynamic", "static"] if args.path == "both" else [args.path]):
        soak(model, path, args, out, save)
    plot(out, png)
    cols = ["path", "step", "graphs", "dynamo_graphs", "rss_mb", "cache_mb", "logits_cos_vs_dense", "top1_vs_dense",
            "keys_rel_err", "token_vs_reference", "s_per_step"]
    rows = [[r.get(c) for c in cols] for run in out["runs"].values() for r in run["rows"]]
    print(tabulate(rows, headers=cols, floatfmt=".4g"))
    print(tabulate([[k, *v["summary"].values()] for k, v in out["runs"].items()],
                   headers=["path", *next(iter(out["runs"].values()))["summary"].keys()], floatfmt=".4g"))
    print(f"wrote {js} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
