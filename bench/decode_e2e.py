"""End-to-end decode benchmark on a Llama-3-8B-shaped model (random weights): eager / inductor / polarquant with a
DynamicCache, and the static-cache + CUDA-graph contenders of issue 7.

Contenders (--contenders):
  eager, inductor, polarquant   DynamicCache; prefill and decode through the (compiled) model, teacher-forced tokens,
                                logits compared with eager
  inductor-static-graphs        transformers.StaticCache + torch.compile(model, mode="reduce-overhead")
  polar-static-graphs           PolarStaticCache + torch.compile(model, backend=polarquant, mode="reduce-overhead")
  polar-static                  the same without CUDA graphs (mode=None): greedy tokens must equal polar-static-graphs'
  hf-generate-polar             model.generate(past_key_values=PolarStaticCache(...), compile_config=CompileConfig(
                                backend=polarquant, mode="reduce-overhead")): its tokens must equal polar-static's
Static contenders prefill eagerly (generate compiles only the decode step, so do we) into an eagerly initialized cache
(every buffer marked a static address), then decode greedily: one token [B, 1], position_ids [B, 1] (and cache_position
where the installed transformers still takes it), the cache; the mask is built in the graph from the cache's device-side
length, so no shape changes from step to step.
Per contender and context: median decode step (CUDA events around each forward), tokens/s, key cache bytes held
(compressed vs the dense buffer of the same shape), max_memory_allocated during steady decode, dynamo graphs, and
whether CUDA graphs ran (inductor's counters, recorded cudagraph-tree nodes, the "skipping cudagraphs" messages).
Prints a table and writes JSON to bench/results/decode_e2e-<date>-<tag>.json.

    PYTHONPATH=. python bench/decode_e2e.py --layers 32 --contexts 4096 32768       # H200
    python bench/decode_e2e.py --tiny                                               # CPU smoke run, every contender
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import logging
import pathlib
import statistics
import time

import torch
import transformers
from tabulate import tabulate

import pqcompile
from pqcompile import counters
from pqcompile.backend import polarquant
from pqcompile.hf_compat import CACHE_KW
from pqcompile.static_cache import PolarStaticCache

VERSION = 5  # 3: static-cache + CUDA-graph contenders, prefill keeps only the last logits; 4: --interleave;
# 5: eager-flash / inductor-flash, the JSON written after every row

DYNAMIC = ("eager", "inductor", "polarquant", "eager-flash", "inductor-flash")
# *-flash: SDPA with the cuDNN backend off. With a DynamicCache every step has a new key length, and on the H200
# torch 2.11 picks cuDNN attention, which builds an execution plan per new shape: the dense dynamic steps then
# measure plan building. These contenders give the dense dynamic path its fastest SDPA (flash).
STATIC = ("inductor-static-graphs", "polar-static-graphs", "polar-static", "hf-generate-polar")
GRAPHED = ("inductor-static-graphs", "polar-static-graphs", "hf-generate-polar")  # mode="reduce-overhead"
_FORWARD = inspect.signature(transformers.LlamaModel.forward).parameters
TAKES_CACHE_POSITION = "cache_position" in _FORWARD  # removed from Llama's forward in 2026 (transformers PR 44181)
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


class CudagraphMessages(logging.Handler):
    """Collects the cudagraph warnings of inductor ("skipping cudagraphs due to ...", re-recording), whichever logger
    emits them: torch 2.13 logs skips on the `cudagraphs` artifact logger, older torch on `perf_hints`, which does not
    propagate unless TORCH_LOGS enables it, so the handler sits on those loggers directly too."""

    LOGGERS = ["torch._inductor"] + [f"torch._inductor.{mod}.__{art}" for mod in
                                     ("cudagraph_utils", "cudagraph_trees", "compile_fx", "output_code")
                                     for art in ("cudagraphs", "perf_hints")]

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "cudagraph" in msg.lower() and msg not in self.messages:
            self.messages.append(msg[:300])


CUDAGRAPH_LOG = CudagraphMessages()


def cudagraph_nodes_recorded() -> int | None:
    """Nodes (recorded CUDA graphs) in the cudagraph-trees manager of the current device; None off CUDA."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch._inductor import cudagraph_trees
        manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        if manager is None:
            return 0
        todo, n = [node for nodes in manager.roots.values() for node in nodes], 0
        while todo:
            node = todo.pop()
            n += 1
            todo.extend(child for children in node.children.values() for child in children)
        return n
    except (ImportError, AttributeError):  # private API: report unknown rather than guess
        return None


def build(args) -> transformers.PreTrainedModel:
    if args.tiny:
        cfg = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
               "vocab_size": 512}
    else:  # Llama-3-8B shape
        cfg = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
               "vocab_size": 128256, "rope_theta": 500000.0}
    config = transformers.LlamaConfig(num_hidden_layers=args.layers, max_position_embeddings=131072,
                                      attn_implementation="sdpa", eos_token_id=None, **cfg)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)  # no fp32 copy of 8B parameters on the way
    try:
        with torch.device(args.device):
            model = transformers.LlamaForCausalLM(config).to(args.dtype).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None  # random weights: never stop early, never mask a token
    return model


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def no_cudnn_sdpa(on: bool = True):
    """SDPA without its cuDNN backend inside the block (flash first; a no-op with on=False): with a growing
    DynamicCache every step has a new key length, and on the H200 cuDNN builds a plan for each (see *-flash)."""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    if on:
        torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def make_cache(model, contender: str, ctx: int, args):
    if contender in DYNAMIC:
        return transformers.DynamicCache(config=model.config)
    max_len = ctx + args.warmup + args.steps + 8
    if contender == "inductor-static-graphs":
        cache = transformers.StaticCache(config=model.config, max_cache_len=max_len)
    else:
        cache = PolarStaticCache(config=model.config, max_cache_len=max_len, group_size=args.group_size,
                                 value_bits=args.value_bits, value_group=args.value_group)
    # allocate (and mark static) every buffer now, outside any compiled region: lazy initialization inside a compiled
    # call skips mark_static_address, and CUDA graphs would then copy or skip on the mutated cache buffers
    cfg = model.config
    try:  # signature of transformers 5.24; the eager prefill initializes (and marks) the buffers too if this fails
        cache.early_initialization(args.batch, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                                   args.dtype, torch.device(args.device))
    except (AttributeError, TypeError) as e:
        say(f"early_initialization unavailable ({type(e).__name__}: {e}); buffers allocated by the eager prefill")
    return cache


def compiled_forward(model, contender: str, args):
    if contender in ("eager", "eager-flash"):
        return model
    if contender in ("inductor", "inductor-flash"):
        return torch.compile(model)
    if contender == "inductor-static-graphs":
        return torch.compile(model, mode="reduce-overhead")
    mode = "reduce-overhead" if contender in GRAPHED else None
    options = {"value_bits": args.value_bits, "value_group": args.value_group, "mode": mode}  # (mode= and options=
    return torch.compile(model, backend=polarquant, options=options)  # cannot both be given; the callable: no install)


def cache_bytes(cache) -> dict:
    """Bytes the key and value buffers hold; for compressed keys also the dense buffer of the same shape and dtype."""
    held = dense = values = values_dense = 0
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        dense += k.numel() * k.element_size()
        held += k.nbytes_held() if hasattr(k, "nbytes_held") else k.numel() * k.element_size()
        values_dense += v.numel() * v.element_size()
        values += v.nbytes_held() if hasattr(v, "nbytes_held") else v.numel() * v.element_size()
    return {"key_cache_bytes": held, "key_cache_bytes_dense": dense, "key_ratio": held / dense,
            "value_cache_bytes": values, "value_cache_bytes_dense": values_dense,
            "kv_ratio": (held + values) / (dense + values_dense)}


def decode_kwargs(cache, position: int, args) -> dict:
    """Everything HF's static decoding passes besides input_ids, built before the timed region."""
    pos = torch.full((args.batch, 1), position, dtype=torch.long, device=args.device)
    kwargs = {CACHE_KW: cache, "use_cache": True, "position_ids": pos}
    if TAKES_CACHE_POSITION:
        kwargs["cache_position"] = pos[0]
    return kwargs


def reset_counters():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counters.clear()
    CUDAGRAPH_LOG.messages.clear()


def graph_facts(contender: str, args) -> dict:
    inductor = dict(torch._dynamo.utils.counters["inductor"])
    facts = {"dynamo_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
             "polar_graphs": counters.totals["graphs"], "sites_rewritten": counters.totals["sites_rewritten"],
             "sites_declined": counters.totals["sites_declined"],
             "inductor_counters": {k: v for k, v in inductor.items() if "cudagraph" in k or "graph_break" in k},
             "cudagraph_skips": inductor.get("cudagraph_skips", 0), "cudagraph_nodes": cudagraph_nodes_recorded(),
             "cudagraph_messages": list(CUDAGRAPH_LOG.messages),
             # AOTAutograd's disk cache: a warm process should hit it for every graph (docs/design.md §8.22)
             "aot_autograd_cache": {k: v for k, v in torch._dynamo.utils.counters["aot_autograd"].items()
                                    if "autograd_cache" in k}}
    if contender not in GRAPHED:
        facts["cudagraphs"] = "off"
    elif not args.device.startswith("cuda"):
        facts["cudagraphs"] = "n/a (cpu)"
    elif facts["cudagraph_skips"] or not facts["cudagraph_nodes"]:
        facts["cudagraphs"] = f"NO ({facts['cudagraph_skips']} skips, {facts['cudagraph_nodes']} recorded)"
    else:
        facts["cudagraphs"] = f"yes ({facts['cudagraph_nodes']} recorded)"
    return facts


def timed(device, fn, *args, **kwargs) -> tuple[object, float]:
    """fn(...) and its time in ms: CUDA events on the GPU (host launch gaps included), perf_counter on CPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args, **kwargs)
        end.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(end)
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - t) * 1e3


def run(model, contender: str, ctx: int, args) -> dict:
    """Prefill ctx tokens, then warmup + steps decode steps; returns a row (with logits and tokens, popped later)."""
    reset_counters()
    device, n = args.device, args.warmup + args.steps
    gen = torch.Generator().manual_seed(ctx)  # the same tokens for every contender
    ids = torch.randint(0, model.config.vocab_size, (args.batch, ctx + n), generator=gen).to(device)
    cache = make_cache(model, contender, ctx, args)
    fwd = compiled_forward(model, contender, args)
    static = contender in STATIC
    t0 = time.perf_counter()
    with no_cudnn_sdpa(contender.endswith("-flash") and device.startswith("cuda")):
        return _run(model, contender, ctx, args, device, n, ids, cache, fwd, static, t0)


def _run(model, contender, ctx, args, device, n, ids, cache, fwd, static, t0) -> dict:
    with torch.no_grad():
        # static: eager prefill, as generate does; dynamic: through fwd (v2 behaviour)
        out = (model if static else fwd)(ids[:, :ctx], **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1)
        sync(device)
        prefill_s = time.perf_counter() - t0
        say(f"{contender} @ {ctx}: prefill {prefill_s:.1f} s")
        logits, tokens, times = [out.logits[:, -1].float()], [out.logits[:, -1:].argmax(-1)], []
        for i in range(n):
            if i == args.warmup and device.startswith("cuda"):  # peak of steady decode, not of compiling/recording
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            tok = tokens[-1] if static else ids[:, ctx + i: ctx + i + 1]  # greedy (static) or teacher-forced
            kwargs = decode_kwargs(cache, ctx + i, args) if static else {CACHE_KW: cache, "use_cache": True}
            torch.compiler.cudagraph_mark_step_begin()
            out, ms = timed(device, fwd, tok, **kwargs)
            times.append(ms)
            tokens.append(out.logits[:, -1:].argmax(-1))
            if i < 4:
                logits.append(out.logits[:, -1].float())
            if i < args.warmup:
                say(f"{contender} @ {ctx}: warm-up step {i} {ms / 1e3:.2f} s")
    steady = times[args.warmup:]
    row = {"contender": contender, "context": ctx, "batch": args.batch, "layers": args.layers,
           "step_ms_median": statistics.median(steady), "step_ms_min": min(steady),
           "tokens_per_s": args.batch * 1e3 / statistics.median(steady), "prefill_s": prefill_s,
           "warmup_ms": times[:args.warmup], **cache_bytes(cache), **graph_facts(contender, args),
           "logits": torch.stack(logits).cpu(), "tokens": torch.cat(tokens, dim=1).cpu()}
    if device.startswith("cuda"):
        row["decode_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        row["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    return row


def run_interleaved(model, contenders: list[str], ctx: int, args) -> list[dict]:
    """Static contenders side by side in one process: each prefilled and warmed up once (compiles, graph recording),
    then args.interleave rounds of args.burst timed steps per contender, the order alternating every round, so a
    drift of the machine (clocks, neighbours) hits every contender alike. Rows carry per-round medians."""
    reset_counters()
    device = args.device
    gen = torch.Generator().manual_seed(ctx)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, ctx), generator=gen).to(device)
    state = {}
    with torch.no_grad():
        for c in contenders:
            cache = make_cache(model, c, ctx, args)
            fwd = compiled_forward(model, c, args)
            out = model(ids, **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1)  # eager prefill
            state[c] = {"cache": cache, "fwd": fwd, "tok": out.logits[:, -1:].argmax(-1), "pos": ctx, "rounds": []}
            for i in range(args.warmup):
                say(f"{c} @ {ctx}: warm-up step {i} {step(state[c], args) / 1e3:.2f} s")
        for r in range(args.interleave):
            for c in (contenders if r % 2 == 0 else contenders[::-1]):
                state[c]["rounds"].append([step(state[c], args) for _ in range(args.burst)])
    facts = graph_facts(contenders[0], args)  # counters are shared by the contenders of this process
    rows = []
    for c in contenders:
        times = [t for rnd in state[c]["rounds"] for t in rnd]
        rows.append({"contender": c, "context": ctx, "batch": args.batch, "layers": args.layers,
                     "step_ms_median": statistics.median(times), "step_ms_min": min(times),
                     "tokens_per_s": args.batch * 1e3 / statistics.median(times),
                     "round_medians_ms": [statistics.median(rnd) for rnd in state[c]["rounds"]],
                     **cache_bytes(state[c]["cache"]), "cudagraphs": "on" if c in GRAPHED else "off",
                     "process_graph_facts": facts, "interleaved_with": [o for o in contenders if o != c]})
    base = rows[0]["round_medians_ms"]
    for row in rows[1:]:
        row["round_ratio_to_" + rows[0]["contender"]] = [b / m for b, m in zip(base, row["round_medians_ms"])]
    return rows


def step(st: dict, args) -> float:
    """One greedy decode step of an interleaved contender; its time in ms."""
    kwargs = decode_kwargs(st["cache"], st["pos"], args)
    torch.compiler.cudagraph_mark_step_begin()
    out, ms = timed(args.device, st["fwd"], st["tok"], **kwargs)
    st["tok"], st["pos"] = out.logits[:, -1:].argmax(-1), st["pos"] + 1
    return ms


def run_generate(model, ctx: int, args) -> dict:
    """HF's own recipe: generate with a PolarStaticCache and a CompileConfig (decode compiled, prefill eager).
    Tokens from a first (compiling) call; ms/step = (warm generate of 1 + steps tokens - warm generate of 1) / steps,
    each the best of two."""
    reset_counters()
    n = args.warmup + args.steps + 1
    gen = torch.Generator().manual_seed(ctx)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, ctx), generator=gen).to(args.device)
    cache = make_cache(model, "hf-generate-polar", ctx, args)
    compile_config = transformers.CompileConfig(backend=polarquant, mode="reduce-overhead")
    if not args.device.startswith("cuda"):
        compile_config._compile_all_devices = True  # private flag: generate compiles on CUDA only by default

    def generate(new: int) -> torch.Tensor:
        cache.reset()
        out = model.generate(ids, **{CACHE_KW: cache}, compile_config=compile_config, max_new_tokens=new,
                             min_new_tokens=new, do_sample=False)
        sync(args.device)
        return out

    with torch.no_grad():
        t = time.perf_counter()
        out = generate(n)
        say(f"hf-generate-polar @ {ctx}: first generate (compiles) {time.perf_counter() - t:.1f} s")
        row = {"contender": "hf-generate-polar", "context": ctx, "batch": args.batch, "layers": args.layers,
               **cache_bytes(cache), **graph_facts("hf-generate-polar", args), "tokens": out[:, ctx:].cpu()}
        wall = {1: float("inf"), args.steps + 1: float("inf")}
        for new in (1, args.steps + 1) * 2:  # best of two, each size
            t = time.perf_counter()
            generate(new)
            wall[new] = min(wall[new], time.perf_counter() - t)
    ms = (wall[args.steps + 1] - wall[1]) * 1e3 / args.steps
    row.update(step_ms_median=ms, tokens_per_s=args.batch * 1e3 / ms, prefill_s=wall[1],
               step_ms_note="wall time of generate, host loop included; not a median")
    row["recompiled_when_warm"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - row["dynamo_graphs"]
    return row


def compare(rows: list[dict]) -> None:
    """Logits vs eager (dynamic contenders, teacher-forced) and greedy tokens between static contenders."""
    ref = next((r["logits"] for r in rows if r["contender"] in ("eager", "eager-flash")), None)
    tokens = {(r["contender"], r["context"]): r["tokens"] for r in rows if r["contender"] in STATIC and "tokens" in r}
    pairs = {"polar-static-graphs": "polar-static", "hf-generate-polar": "polar-static",
             "polar-static": "inductor-static-graphs"}
    for row in rows:
        logits = row.pop("logits", None)
        if ref is not None and logits is not None and row["contender"] in DYNAMIC:
            row["logits_cos_vs_eager"] = torch.nn.functional.cosine_similarity(logits, ref, dim=-1).mean().item()
            row["top1_vs_eager"] = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        other = pairs.get(row["contender"])
        if (other, row["context"]) in tokens and (row["contender"], row["context"]) in tokens:
            a, b = row["tokens"], tokens[other, row["context"]]
            k = min(a.shape[1], b.shape[1])
            same = int((a[:, :k] == b[:, :k]).all(0).sum())
            first = next((i for i in range(k) if not bool((a[:, i] == b[:, i]).all())), None)
            row["tokens_vs"] = f"{other}: {same}/{k}" + ("" if first is None else f" (first diff @{first})")
            row["tokens_match"] = first is None and a.shape == b.shape
    for row in rows:
        if "tokens" in row:
            row["tokens"] = row["tokens"].tolist()


HEADERS = ["contender", "context", "step_ms_median", "tokens_per_s", "key_cache_bytes", "key_cache_bytes_dense",
           "decode_peak_extra_bytes", "max_memory_allocated", "dynamo_graphs", "sites_rewritten", "cudagraphs",
           "tokens_vs", "logits_cos_vs_eager", "top1_vs_eager"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=None, help="default 32 (2 with --tiny)")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="default 4096 32768 (200 with --tiny)")
    parser.add_argument("--contenders", nargs="+", default=list(STATIC), choices=DYNAMIC + STATIC)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps")
    parser.add_argument("--warmup", type=int, default=4, help="decode steps before timing (compile, graph recording)")
    parser.add_argument("--group-size", type=int, default=128, help="PolarStaticCache group size")
    parser.add_argument("--value-bits", type=int, choices=[2, 4, 8], default=None,
                        help="polar contenders also compress the values (default: dense values)")
    parser.add_argument("--value-group", type=int, default=64, help="channels per value group")
    parser.add_argument("--interleave", type=int, default=0,
                        help="R rounds of --burst steps per static contender, alternating in one process "
                             "(robust ratios)")
    parser.add_argument("--burst", type=int, default=8, help="timed steps per contender per interleaved round")
    parser.add_argument("--tiny", action="store_true", help="small model for a CPU smoke run")
    parser.add_argument("--tag", default=None, help="file name tag (default: tiny or <layers>layers)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    args.layers = args.layers or (2 if args.tiny else 32)
    args.contexts = args.contexts or ([200] if args.tiny else [4096, 32768])
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    say(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.device}, cache kwarg {CACHE_KW!r}, "
        f"cache_position {'passed' if TAKES_CACHE_POSITION else 'not taken'}; {args.layers} layers")
    model = build(args)
    say("model built")
    rows = []
    if args.interleave:  # the caches must hold warm-up + every round
        args.steps = args.interleave * args.burst
        picked = [c for c in args.contenders if c in STATIC and c != "hf-generate-polar"]
        for ctx in args.contexts:
            for row in run_interleaved(model, picked, ctx, args):
                rows.append(row)
                say(f"{row['contender']} @ {ctx}: {row['step_ms_median']:.2f} ms/step (interleaved), round medians "
                    f"{[round(m, 2) for m in row['round_medians_ms']]}")
        args.contexts = []
    for ctx in args.contexts:
        for contender in args.contenders:
            say(f"{contender} @ {ctx}: start")
            gen = contender == "hf-generate-polar"
            row = run_generate(model, ctx, args) if gen else run(model, contender, ctx, args)
            rows.append(row)
            say(f"{contender} @ {ctx}: {row['step_ms_median']:.2f} ms/step, cudagraphs {row['cudagraphs']}, "
                f"skips {row['cudagraph_messages'] or '-'}, tokens {row['tokens'][0, :8].tolist()}")
            write(rows, args, partial=True)  # a run cut off by a time limit still leaves its numbers
    compare(rows)
    print(tabulate([[r.get(h, "") for h in HEADERS] for r in rows], headers=HEADERS, floatfmt=".3f"), flush=True)
    write(rows, args)


def write(rows: list[dict], args, partial: bool = False) -> None:
    """The JSON of the rows so far (partial: without the logits and tokens compare() turns into numbers)."""
    if partial:
        rows = [{k: v for k, v in r.items() if not isinstance(v, torch.Tensor)} for r in rows]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("tiny" if args.tiny else f"{args.layers}layers")
    name = f"decode_e2e-{datetime.date.today()}-{tag}.json"
    meta = {"script": "bench/decode_e2e.py", "version": VERSION, "partial": partial, "torch": torch.__version__,
            "transformers": transformers.__version__, "pqcompile": pqcompile.__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "args": {
                k: str(v) for k, v in vars(args).items()}}
    (out / name).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    say(f"wrote {out / name}")


if __name__ == "__main__":
    main()
