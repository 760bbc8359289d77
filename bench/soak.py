"""Soak: N greedy decode steps on one compiled model, dynamic (DynamicCache) and static (PolarStaticCache) paths.

Every K steps it records: graphs compiled (pqcompile.counters and dynamo's unique graphs), process RSS, the bytes
the cache holds (CompressedTensor.nbytes_held plus dense tensors), drift against a dense shadow (the eager model
fed the same tokens with an uncompressed DynamicCache: logits cosine / top-1, keys' relative error), and whether
the compiled step's token equals the reference ops' token (HF's eager model over a copy of the same compressed
cache: its attention reads the keys the codes stand for). Prints a table, writes JSON as it goes and a plot of
memory vs step next to it.

Memory (the target: growth <= the cache's own bytes + 1%). Raw RSS also counts what glibc's malloc keeps of
freed memory: the CPU reference ops make per-step temporaries that grow with the length, and once such a block
is freed glibc raises its mmap threshold and serves the next ones from the heap, whose free space it keeps
(docs/reliability.md, finding 9). So each checkpoint also records malloc's bytes in use and free (mallinfo2:
torch's CPU tensors and every C/C++ allocation), pymalloc's blocks in use (Python objects), anonymous vs
file-backed RSS, and at the warm-up row and the last row the RSS after malloc_trim(0) (every free page handed
back: what the process holds). The verdict (`memory_over_cache_pct`) compares that trimmed RSS growth with the
cache's growth; "cache" counts each storage the cache's tensors own once, in full (the reserved capacity of the
in-place buffers included). `--no-trim` leaves the allocator alone (raw RSS only, as results before 2026-12-02's
issue 19 work); `--summarize FILE` prints the summary of any earlier result.

    python bench/soak.py --steps 500 --tag smoke          # CPU, tiny Llama, both paths
    python bench/soak.py --steps 10000 --tag cpu-10k
    python bench/soak.py --cuda --path static --layers 32 --group-size 128 --fill write --prompt 126976 \
        --steps 4096 --every 512 --tag h200-8b-128k  # GPU
"""

from __future__ import annotations

import argparse
import copy
import ctypes
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
sys.path.insert(0, str(ROOT / "bench"))

from decode_e2e import no_cudnn_sdpa, sync

from pqcompile import counters
from pqcompile.backend import polarquant  # the callable: works without the package installed (PYTHONPATH)
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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _glibc():
    """glibc's malloc (mallinfo2, malloc_trim: glibc >= 2.33), or None (another libc: RSS only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _glibc()


def _proc_status_mb(*keys: str) -> dict[str, float]:
    try:
        with open("/proc/self/status") as f:
            lines = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return {}
    return {k: int(lines[k].split()[0]) / 1024 for k in keys if k in lines}  # kB


def memory(trim: bool = False) -> dict:
    """Process memory now: RSS (and its anonymous / file-backed parts), malloc's bytes in use (handed out and not
    freed, mmapped blocks included) and free (kept by the allocator), pymalloc's blocks in use; with `trim`, the
    RSS after malloc_trim(0) as well (the allocator's free pages returned to the OS)."""
    status = _proc_status_mb("RssAnon", "RssFile")
    row = {"rss_mb": rss_bytes() / 2**20, "rss_anon_mb": status.get("RssAnon"), "rss_file_mb": status.get("RssFile")}
    if LIBC is not None:
        m = LIBC.mallinfo2()
        row.update(heap_in_use_mb=(m.uordblks + m.hblkhd) / 2**20, heap_free_mb=m.fordblks / 2**20)
    row["py_blocks"] = sys.getallocatedblocks()  # pymalloc's (its arenas are mmapped, not malloc's); no allocation
    if trim and LIBC is not None:
        LIBC.malloc_trim(0)
        row["rss_trimmed_mb"] = rss_bytes() / 2**20
    return row


def cache_bytes(cache, device: str | None = None) -> int:
    """Bytes the cache holds (on `device`, or anywhere): every storage its tensors own (compressed tensors' inner
    buffers, dense tensors), each counted once and in full: the reserved capacity of a buffer that appends in
    place is held as much as its written rows."""
    storages = {}
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if not isinstance(t, torch.Tensor):
                continue
            for x in t.inner_tensors() if isinstance(t, CompressedTensor) else (t,):
                if device is None or x.device.type == device:
                    s = x.untyped_storage()
                    storages[(x.device, s.data_ptr())] = s.nbytes()
    return sum(storages.values())


def dynamo_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"].get("unique_graphs", 0))


def build(args):
    if not args.cuda:
        model = tiny_llama(layers=args.layers, hidden=128, heads=4, kv_heads=2, qk_gain=3.0)
        model.config.max_position_embeddings = max(4096, args.prompt + args.steps + 8)
        return model
    import decode_e2e

    ns = argparse.Namespace(tiny=False, layers=args.layers, dtype=torch.bfloat16, device="cuda")
    return decode_e2e.build(ns)


def make_cache(model, path: str, args):
    if path == "dynamic":
        return transformers.DynamicCache(config=model.config)
    cache = PolarStaticCache(config=model.config, max_cache_len=args.prompt + args.steps + 8, group_size=args.group_size)
    # buffers allocated (and marked static) before the compiled prefill: a static cache initialized inside a compiled
    # CUDA-graph prefill crashes plain inductor too (docs/reliability.md, finding 16)
    cache.early_initialization(1, model.config.num_key_value_heads, head_dim(model.config), model.dtype, model.device)
    return cache


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


@torch.no_grad()
def write_random(model, caches, start: int, end: int, args, chunk: int = 8192) -> None:
    """--fill write: positions start..end get random K/V (randn, the model's dtype and head shape), the same into
    each cache through its own update(): PolarStaticCache encodes them in place, the shadow DynamicCache appends.
    A 128k-token prompt through the static path's attention op did not finish in a 380 s call on the H200 (finding
    14 of docs/reliability.md): the decode steps, not the prefill, are what the soak is for."""
    cfg, d = model.config, head_dim(model.config)
    gen = torch.Generator(device=model.device).manual_seed(args.seed + 1)
    for pos in range(start, end, chunk):
        n = min(chunk, end - pos)
        positions = torch.arange(pos, pos + n, device=model.device)
        for i in range(cfg.num_hidden_layers):
            k, v = (torch.randn(1, cfg.num_key_value_heads, n, d, generator=gen, device=model.device,
                                dtype=model.dtype) for _ in range(2))
            for cache in caches:
                cache.update(k, v, i, {"cache_position": positions})  # 5.17: cache_kwargs; 5.2x: ignored


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
    # torch.compile takes mode or options, not both: the GPU run keeps the defaults (group 128, inductor after)
    options = {"group_size": args.group_size, "backend": args.inner}
    compiled = (torch.compile(model, backend=polarquant, mode="reduce-overhead") if args.cuda else
                torch.compile(model, backend=polarquant, options=options))
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=g).to(device)
    cache = make_cache(model, path, args)
    shadow = transformers.DynamicCache(config=model.config) if args.shadow else None
    t_fill = time.perf_counter()
    n_model = args.prompt if args.fill == "prefill" else min(args.prompt, args.model_tokens)
    # (logits of the last position only: a 128k-token prompt's full logits would be ~31 GB on the 8B shape)
    prefill = model if args.eager_prefill else compiled
    logits = prefill(ids[:, :n_model], **cache_kw(cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    if shadow is not None:
        model(ids[:, :n_model], **cache_kw(shadow), use_cache=True, logits_to_keep=1)
    if n_model < args.prompt:
        write_random(model, [c for c in (cache, shadow) if c is not None], n_model, args.prompt, args)
    sync(device)
    out["runs"][path] = {"fill_s": time.perf_counter() - t_fill, "rows": []}
    print(f"{path}: {args.prompt} tokens in the cache ({args.fill}) in {out['runs'][path]['fill_s']:.1f} s",
          flush=True)
    rows, mismatches, warm = [], 0, None
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        token = logits.argmax(-1, keepdim=True)
        check = step % args.every == 0 or step == 1 or step == args.steps
        reference = copy.deepcopy(cache) if check and args.reference else None
        logits = compiled(token, **cache_kw(cache), use_cache=True).logits[:, -1]
        if shadow is not None:
            with no_cudnn_sdpa(args.cuda):  # cuDNN SDPA would build a plan for every new key length of the shadow
                dense_logits = model(token, **cache_kw(shadow), use_cache=True).logits[:, -1]
        if not check:
            continue
        row = {"path": path, "step": step, "tokens": args.prompt + step, "graphs": counters.totals["graphs"],
               "dynamo_graphs": dynamo_graphs(), "s_per_step": (time.perf_counter() - t0) / step}
        if reference is not None:
            ref_logits = model(token, **cache_kw(reference), use_cache=True).logits[:, -1]
            same = bool((ref_logits.argmax(-1) == logits.argmax(-1)).all())
            mismatches += not same
            row["token_vs_reference"] = same
            del reference, ref_logits
        if shadow is not None:
            row["logits_cos_vs_dense"] = torch.nn.functional.cosine_similarity(
                logits.float(), dense_logits.float(), dim=-1).min().item()
            row["top1_vs_dense"] = bool((logits.argmax(-1) == dense_logits.argmax(-1)).all())
            row["keys_rel_err"] = keys_rel_error(cache, shadow)
            row["shadow_mb"] = cache_bytes(shadow) / 2**20  # the dense shadow's cache: the soak's, not the model's
        # memory last, the checks' copies freed: the cache, the shadow and the model are all that should remain
        warm_now = warm is None and step >= args.warmup
        row.update(memory(trim=args.trim and (warm_now or step == args.steps)), cache_mb=cache_bytes(cache) / 2**20,
                   cache_host_mb=cache_bytes(cache, "cpu") / 2**20)
        if args.cuda:
            row["device_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
        if warm_now:
            warm = row
        rows.append(row)
        print(f"{path} step {step}: graphs {row['graphs']}, rss {row['rss_mb']:.1f} MB, malloc in use "
              f"{row.get('heap_in_use_mb') or 0:.2f} MB, cache {row['cache_mb']:.2f} MB", flush=True)
        out["runs"][path].update(rows=rows, token_mismatches=mismatches)
        save()
    last = rows[-1]
    summary = {"token_mismatches": mismatches, "checks": sum("token_vs_reference" in r for r in rows)}
    if warm is not None:
        summary.update(memory_summary(warm, last))
    out["runs"][path]["summary"] = summary
    save()


def memory_summary(warm: dict, last: dict) -> dict:
    """Growth from the warm-up row to the last. Raw RSS (the keys of the first results) against the cache's
    bytes; then what the process holds: malloc's bytes in use (its free space apart), pymalloc's blocks, and the
    RSS after malloc_trim(0), whose growth minus the growth of the cache's host bytes (and of the dense shadow's,
    where the run keeps one) is the target's number (`memory_over_cache_pct`, <= 1% of the warm-up RSS; the raw
    RSS where trimming is not available). "minus_cache" keys subtract the same (the raw RSS ones: the cache)."""
    s = {"new_graphs_after_warmup": last["graphs"] - warm["graphs"], "rss_growth_mb": last["rss_mb"] - warm["rss_mb"],
         "cache_growth_mb": last["cache_mb"] - warm["cache_mb"]}
    s["rss_growth_minus_cache_growth_mb"] = s["rss_growth_mb"] - s["cache_growth_mb"]
    s["rss_growth_minus_cache_growth_pct_of_rss"] = 100 * s["rss_growth_minus_cache_growth_mb"] / warm["rss_mb"]
    # what the soak itself keeps growing, on the host and on the device: the cache, and the dense shadow's cache
    host = last.get("cache_host_mb", last["cache_mb"]) - warm.get("cache_host_mb", warm["cache_mb"])
    device = s["cache_growth_mb"] - host
    if "shadow_mb" in last:  # on the model's device
        s["shadow_growth_mb"] = last["shadow_mb"] - warm["shadow_mb"]
        if last.get("device_allocated_mb") is None:
            host += s["shadow_growth_mb"]
        else:
            device += s["shadow_growth_mb"]
    for key in ("heap_in_use", "heap_free", "rss_anon", "rss_file", "rss_trimmed", "device_allocated"):
        if warm.get(f"{key}_mb") is not None and last.get(f"{key}_mb") is not None:
            s[f"{key}_growth_mb"] = last[f"{key}_mb"] - warm[f"{key}_mb"]
    if "heap_in_use_growth_mb" in s:
        s["heap_in_use_growth_minus_cache_growth_mb"] = s["heap_in_use_growth_mb"] - host
    if "device_allocated_growth_mb" in s:
        s["device_allocated_growth_minus_cache_growth_mb"] = s["device_allocated_growth_mb"] - device
    if "py_blocks" in warm:
        s["py_blocks_growth"] = last["py_blocks"] - warm["py_blocks"]
    held = "rss_trimmed" if "rss_trimmed_growth_mb" in s else "rss"
    s["memory_measure"] = held
    s["memory_over_cache_mb"] = s[f"{held}_growth_mb"] - host
    s["memory_over_cache_pct"] = 100 * s["memory_over_cache_mb"] / warm[f"{held}_mb"]
    s["memory_target_met"] = s["memory_over_cache_pct"] <= 1.0
    return s


def summarize(out: dict) -> None:
    """The memory summary of a result file, from its rows (files written before the trimmed RSS and malloc
    columns give the raw RSS numbers only)."""
    runs = {}
    for path, run in out["runs"].items():
        rows = run["rows"]
        warm = next((r for r in rows if r["step"] >= out["meta"].get("warmup", 0)), None)
        runs[path] = memory_summary(warm, rows[-1]) if warm is not None else {}
    print_summaries(runs)


def print_summaries(summaries: dict[str, dict]) -> None:
    """One column per path, one row per summary key."""
    keys = list(dict.fromkeys(k for s in summaries.values() for k in s))

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else v

    print(tabulate([[k, *(cell(s.get(k)) for s in summaries.values())] for k in keys], headers=["summary", *summaries]))


def plot(out: dict, png: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for (path, run), color in zip(out["runs"].items(), ("tab:blue", "tab:orange")):
        rows = run["rows"]
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["rss_mb"] for r in rows], color=color, label=f"{path}: process RSS")
        first = next((r for r in rows if r["step"] >= out["meta"].get("warmup", 0)), rows[0])
        for key, what, style in (("rss_mb", "RSS", "-"), ("heap_in_use_mb", "malloc in use", "--"),
                                 ("cache_mb", "cache", ":")):
            if first.get(key) is not None:
                axes[1].plot(steps, [r[key] - first[key] if r.get(key) is not None else None for r in rows], style,
                             color=color, label=f"{path}: {what}")
        trimmed = [(r["step"], r["rss_trimmed_mb"]) for r in rows if r.get("rss_trimmed_mb") is not None]
        if trimmed:
            axes[0].plot(*zip(*trimmed), "o", color=color, label=f"{path}: RSS after malloc_trim")
            axes[1].plot([t for t, _ in trimmed], [v - trimmed[0][1] for _, v in trimmed], "o", color=color,
                         label=f"{path}: RSS after malloc_trim")
        axes[2].plot(steps, [r["cache_mb"] for r in rows], color=color, label=f"{path}: cache bytes held")
    for ax, title in zip(axes, ("process RSS (MB)", "growth since the warm-up row (MB)", "cache held (MB)")):
        ax.set_xlabel("decode step")
        ax.set_title(title)
        ax.legend(fontsize=7)
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
    p.add_argument("--fill", choices=["prefill", "write"], default="prefill",
                   help="write: only the first --model-tokens of the prompt through the model, the rest random K/V "
                   "written into the cache and the shadow (the GPU run to 128k)")
    p.add_argument("--model-tokens", type=int, default=16)
    p.add_argument("--eager-prefill", action="store_true", help="the prompt through the eager model (as decode_e2e's "
                   "static contenders), not the compiled one")
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"], help="inner compiler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shadow", dest="shadow", action="store_false", help="skip the dense shadow (drift)")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the reference-ops token check at checkpoints")
    p.add_argument("--no-trim", dest="trim", action="store_false",
                   help="do not call malloc_trim(0) at the warm-up and last rows (no trimmed RSS)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cuda", action="store_true", help="GPU: Llama-3-8B shape, random bf16 weights (bench/decode_e2e)")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--summarize", type=pathlib.Path, metavar="JSON",
                   help="print the memory summary of an earlier result (any version of this script) and exit")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.summarize:
        summarize(json.loads(args.summarize.read_text()))
        return 0
    if args.cuda and args.path != "static":
        p.error("--cuda runs the static path only (--path static): the 8B shape to 128k needs the static cache")

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"soak-{datetime.date.today().isoformat()}-{args.tag}"
    js, png = args.out / f"{stem}.json", args.out / f"{stem}.png"
    out = {"meta": {"tag": args.tag, "steps": args.steps, "every": args.every, "warmup": args.warmup,
                    "prompt": args.prompt, "fill": args.fill, "eager_prefill": args.eager_prefill,
                    "model_tokens": args.model_tokens,
                    "layers": args.layers, "group_size": args.group_size, "inner": args.inner,
                    "seed": args.seed, "device": "cuda" if args.cuda else "cpu", "torch": torch.__version__,
                    "transformers": transformers.__version__, "threads": torch.get_num_threads(), "trim": args.trim,
                    "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}},
           "runs": {}}

    def save():
        tmp = js.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(js)

    model = build(args)
    for path in (["dynamic", "static"] if args.path == "both" else [args.path]):
        soak(model, path, args, out, save)
    plot(out, png)
    cols = ["path", "step", "graphs", "dynamo_graphs", "rss_mb", "rss_trimmed_mb", "heap_in_use_mb", "heap_free_mb",
            "py_blocks", "cache_mb", "logits_cos_vs_dense", "top1_vs_dense", "keys_rel_err", "token_vs_reference",
            "s_per_step"]
    rows = [[r.get(c) for c in cols] for run in out["runs"].values() for r in run["rows"]]
    print(tabulate(rows, headers=cols, floatfmt=".4g"))
    print_summaries({path: run["summary"] for path, run in out["runs"].items()})
    print(f"wrote {js} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
