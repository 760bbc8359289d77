"""Capacity at a fixed memory budget (issue 17, item 4): the longest context at batch 1 and the largest batch at a
fixed context that fit, found by actually running decode steps, for dense HF caches and the polarquant caches.

Contenders (--contenders):
  dense-dynamic      transformers.DynamicCache, the model eager (--dense inductor: torch.compile(model))
  dense-static       transformers.StaticCache, the model eager (--dense inductor: torch.compile(model))
  polar-dynamic      DynamicCache + torch.compile(model, backend="polarquant"): keys compressed, values dense
  polar-dynamic-v4   the same with options value_bits=4 (values compressed too)
  polar-static       pqcompile.PolarStaticCache + torch.compile(model, backend="polarquant") (no CUDA graphs)
  polar-static-v4    PolarStaticCache(value_bits=4), the same compile with value_bits=4

Budget: --budgets in GB (10^9 bytes), enforced with torch.cuda.set_per_process_memory_fraction(budget / total
memory). The fraction caps the caching allocator (its reserved bytes, weights included); the CUDA context and
anything allocated outside the allocator are not counted. torch.cuda.empty_cache() and reset_peak_memory_stats()
run between probes. --tiny (CPU): no allocator to cap, so the budget is a fake byte counter: weights + the bytes the
cache holds, checked after every fill chunk and decode step, and a torch.OutOfMemoryError is raised when it is
exceeded. Everything from a --tiny run is labelled SIMULATED (activations are not counted at all).

A probe (one size): build the cache, fill it to the context, run --warmup + --steps decode steps (random tokens).
torch.OutOfMemoryError (or a CUDA/cuDNN/cuBLAS allocation failure, also wrapped in a compile error) anywhere in the
probe = does not fit: the phase is recorded, everything is freed (del, gc.collect, empty_cache) and the search goes on.
  --fill reserved (default): dynamic caches get the first --model-tokens (16) tokens through the (compiled) model,
      which creates the cache tensors (PolarKeys / PolarValues for polar-dynamic); every remaining token is random
      bf16 K/V written in chunks of --write-chunk tokens (all sequences together) into buffers allocated once for
      the whole context, as a prompt of that length leaves them: polar-dynamic through pqcompile.reserve(cache, ctx)
      and the cache's own update(k, v, layer_idx, {"cache_position": ...}) (DynamicLayer's cat, appending in place),
      then pqcompile.reserve(cache, ctx + G), the growth the first group flush after the prompt makes (one tensor
      at a time; its transient counts in the peak); dense-dynamic into one [B, H, ctx, D] tensor per layer for K
      and V, set as the layer's keys / values. Static caches: StaticLayer's index_copy_ (which encodes on
      PolarStaticCache's buffers), written only (no model prefill: HF's eager prefill into a PolarStaticCache would
      attend over dequantized keys). The state the decode steps see has the shapes and bytes of a real prefill; no
      prompt attention is run, so the prefill's own activations (and its quadratic time, estimated ~30 s per 200k
      tokens at 32 layers on the H200) never decide the answer.
  --fill write: the same chunks through update() for every cache, so dynamic caches regrow chunk by chunk (every
      layer's buffer reallocated per chunk). The 2026-12-02 runs used it: every OOM of the 32-layer dense and
      keys-only searches happened in that fill, with 0.2-0.4 GB (dense) and 1.6-2.2 GB (keys-only) reserved by
      the allocator but unusable, a cost of the chunked regrowth rather than of decoding.
  --fill prefill: every token through the model (dynamic: the compiled forward; static: eager, as generate does),
      --prefill-chunk tokens per forward over the whole batch; the chunk's activations count against the budget.
  --growth-in-decode (polar dynamic contenders): the fill stops at the prompt's allocation (no reserve(ctx + G))
      and the warm-up runs G more decode steps, so the first flush grows every buffer where generate grows it:
      after a compiled step, by the backend (reserve_all), with the decode graph's compile just before. The probe
      records how many tensors grew ("decode_growths").
Peak memory reported = max_memory_allocated over the probe (fill + decode) and over the decode steps alone; an OOM
line also gives max_memory_reserved, whose excess over the allocated peak is what the allocator held but could
not hand out (fragmentation: 1.6-2.2 GB for polar-dynamic's growing dense values at 32 layers, 2026-12-02).
pqcompile's dense-fallback warnings raised in the timed steps are recorded per probe ("dense_fallbacks", flagged
FALLBACK in the table): a compressed cache tensor dequantized there means the memory is not the polar path's.

Search per contender, budget and kind (--search context|batch|both), sizes multiples of --resolution:
  context: batch 1, from --start-context up to --max-context;  batch: context --batch-context, from 1 up to
  --max-batch. --search-mode grow: double until the first OOM (or the cap), then bisect to the resolution.
  --search-mode predict (default): the same, except that once two sizes fit, the boundary is predicted from them
  (max_memory_allocated linear in the size between the smallest and the largest fit, the allocator's reserved -
  allocated slack off the budget) and the next probe aims just below it (1 - margin), then just above
  (1 + margin); a surprise widens the margin (x4 down, x2 up); a wide bracket is cut at the prediction when it
  lies in its middle half, else bisected. Sizes that fit under a smaller budget are inherited as fits (lo) by the
  larger budgets of the same contender and kind, and their peaks feed the prediction. Every probe is run; the
  prediction only chooses where.
--time-limit seconds per contender (split evenly over its remaining searches; --total-time caps the whole run):
when hit, the search stops and reports its largest fit so far, marked "time-limited". A probe is never
interrupted: a search stops before a probe it expects to overrun (the shorter of its last two probes' durations).

--layers N < 32 with --scale-budget:
  none     the budget as given (fewer layers hold much more context than the 8B model would)
  weights  budget - the weight bytes of the (32 - N) missing layers (the KV bytes per token are N/32 of the 8B
           model's, so contexts come out ~32/N times longer)
  kv       weights(N layers) + (budget - weights(32 layers)) * N / 32: the memory left for cache and activations
           scaled like the cache itself, so the sizes found estimate the 32-layer model's (per-layer transients,
           e.g. one layer's cat copy in an eager DynamicCache step, then weigh 32/N times more than at 32 layers)
The layer count, both budgets and the rule are in every row and in the JSON.

Output: bench/results/capacity-<date>-<tag>.json rewritten after every probe (and copied to $OUT when set), a
table at the end, and capacity-<date>-<tag>.png (max context and max batch vs budget per contender) next to it.

    PYTHONPATH=. python bench/capacity.py --layers 4 --scale-budget kv --budgets 40 --total-time 400   # H200
    python bench/capacity.py --tiny                                                   # CPU smoke, SIMULATED
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import pathlib
import shutil
import statistics
import sys
import time
import types
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # decode_e2e, run as a script or imported

import torch
import transformers
from decode_e2e import CACHE_KW, build, cache_bytes, decode_kwargs, make_cache, no_cudnn_sdpa, say, sync, timed
from tabulate import tabulate

import pqcompile
from pqcompile import counters
from pqcompile.backend import polarquant
from pqcompile.cache import reset_fallback_warnings
from pqcompile.dynamic import appends_in_place

VERSION = 3  # 2: --dense-sdpa flash (default) for the dense contenders; 3: --growth-in-decode
GB = 1e9
UNIT = [GB, "GB"]  # what the log and the table print memory in (--tiny: MB)


def mem(nbytes: float) -> str:
    return f"{nbytes / UNIT[0]:.4g} {UNIT[1]}"


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    static: bool
    polar: bool
    value_bits: int | None = None


SPECS = {s.name: s for s in (Spec("dense-dynamic", False, False), Spec("dense-static", True, False),
                             Spec("polar-dynamic", False, True), Spec("polar-dynamic-v4", False, True, 4),
                             Spec("polar-static", True, True), Spec("polar-static-v4", True, True, 4))}
BASELINE = "dense-dynamic"


# --------------------------------------------------------------------------- memory: the real allocator or a counter


def held_bytes(cache) -> int:
    """Bytes the cache's key and value tensors hold (nbytes_held() for pqcompile's compressed tensors)."""
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.nbytes_held() if hasattr(t, "nbytes_held") else t.untyped_storage().nbytes()  # (views)
    return total


class CudaMeter:
    """The budget as the caching allocator's cap; peaks from its statistics."""

    simulated = False

    def __init__(self, budget: float):
        torch.cuda.empty_cache()
        self.total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        self.fraction = min(1.0, budget / self.total)
        torch.cuda.set_per_process_memory_fraction(self.fraction)
        self.budget = budget

    def free(self) -> None:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def check(self, cache) -> None:  # the allocator raises by itself
        pass

    def reset_peak(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> dict:
        return {"max_memory_allocated": torch.cuda.max_memory_allocated(),
                "max_memory_reserved": torch.cuda.max_memory_reserved()}

    def allocated(self) -> int:
        return torch.cuda.memory_allocated()

    @staticmethod
    def release() -> None:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)


class SimMeter:
    """--tiny: a fake byte counter, weights + cache bytes held, checked at fixed points. SIMULATED OOM."""

    simulated = True

    def __init__(self, budget: float, weights: int):
        self.budget, self.weights, self.fraction = budget, weights, None
        self.now = self.top = weights

    def free(self) -> None:
        gc.collect()
        self.now = self.top = self.weights

    def check(self, cache) -> None:
        self.now = self.weights + held_bytes(cache)
        self.top = max(self.top, self.now)
        if self.now > self.budget:
            raise torch.OutOfMemoryError(f"SIMULATED OOM: weights + cache {self.now} B > budget {self.budget:.0f} B")

    def reset_peak(self) -> None:
        self.top = self.now

    def peak(self) -> dict:
        return {"max_memory_allocated": self.top, "max_memory_reserved": self.top}

    def allocated(self) -> int:
        return self.now

    @staticmethod
    def release() -> None:
        pass


def is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError, or an allocation failure another library reports, possibly wrapped (compile errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        msg = str(exc)
        if isinstance(exc, RuntimeError) and ("out of memory" in msg.lower() or "ALLOC_FAILED" in msg):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# --------------------------------------------------------------------------- one probe


def compiled(model, spec: Spec, args):
    dynamic = True if args.dynamic else None  # None: torch's automatic dynamic shapes (recompile on a new size)
    if not spec.polar:
        return torch.compile(model, dynamic=dynamic) if args.dense == "inductor" else model
    options = {"value_bits": spec.value_bits, "value_group": args.value_group, "backend": args.polar_after,
               "group_size": args.group_size}
    return torch.compile(model, backend=polarquant, options=options, dynamic=dynamic)


def cache_for(model, spec: Spec, batch: int, ctx: int, args):
    if not spec.static:
        return transformers.DynamicCache(config=model.config)
    ns = types.SimpleNamespace(batch=batch, warmup=args.warmup, steps=args.steps, dtype=args.dtype,
                               device=args.device, group_size=args.group_size, value_bits=spec.value_bits,
                               value_group=args.value_group)
    return make_cache(model, "polar-static" if spec.polar else "inductor-static-graphs", ctx, ns)


def fill(model, fwd, cache, spec: Spec, batch: int, ctx: int, args, meter, timing: dict) -> None:
    """Bring the cache to ctx tokens per sequence (module docstring: --fill)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(ctx * 1000 + batch)
    pos = 0
    if args.fill == "prefill" or not spec.static:
        run = model if spec.static else fwd  # static: eager prefill, as generate does
        n_model = ctx if args.fill == "prefill" else min(ctx, args.model_tokens)
        per = max(1, args.prefill_chunk // batch) if args.fill == "prefill" else n_model
        while pos < n_model:
            n = min(per, n_model - pos)
            ids = torch.randint(0, cfg.vocab_size, (batch, n), generator=gen).to(args.device)
            kw = {CACHE_KW: cache, "use_cache": True, "logits_to_keep": 1}
            if spec.static:
                kw.update(decode_kwargs(cache, pos, types.SimpleNamespace(batch=batch, device=args.device)))
                kw["position_ids"] = kw["position_ids"] + torch.arange(n, device=args.device)
                if "cache_position" in kw:
                    kw["cache_position"] = kw["position_ids"][0]
            out = run(ids, **kw)
            del out
            pos += n
            meter.check(cache)
        timing["model_tokens"] = pos
    if pos >= ctx:
        return
    hkv = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = args.group_size
    per = max(g, args.write_chunk // batch // g * g)  # tokens per sequence per write, whole groups
    dgen = torch.Generator(device=args.device).manual_seed(ctx * 1000 + batch)
    k = torch.randn(batch, hkv, per, d, generator=dgen, device=args.device, dtype=args.dtype)
    v = torch.randn(batch, hkv, per, d, generator=dgen, device=args.device, dtype=args.dtype)
    once = args.fill == "reserved" and not spec.static
    if once and spec.polar:  # the one allocation a prompt of ctx tokens makes (capacity_for(ctx, 0, G))
        pqcompile.reserve(cache, ctx)
    if once and not spec.polar:  # what HF's first update of a ctx-token prompt leaves: one tensor per layer
        full = []
        for layer in cache.layers:
            kf, vf = layer.keys.new_empty(batch, hkv, ctx, d), layer.values.new_empty(batch, hkv, ctx, d)
            kf[:, :, :pos], vf[:, :, :pos] = layer.keys, layer.values
            layer.keys, layer.values = kf[:, :, :pos], vf[:, :, :pos]  # (the old tensors freed layer by layer)
            full.append((kf, vf))
    while pos < ctx:
        n = min(per, ctx - pos)
        kn, vn = (k, v) if n == per else (k[:, :, :n].contiguous(), v[:, :, :n].contiguous())
        positions = torch.arange(pos, pos + n, device=args.device)
        for i in range(cfg.num_hidden_layers):
            if once and not spec.polar:
                full[i][0][:, :, pos:pos + n], full[i][1][:, :, pos:pos + n] = kn, vn
            else:
                cache.update(kn, vn, i, {"cache_position": positions})  # 5.17: cache_kwargs; 5.2x: ignored (*args)
        pos += n
        meter.check(cache)
    if once and not spec.polar:
        for layer, (kf, vf) in zip(cache.layers, full):
            layer.keys, layer.values = kf, vf
        del full, kf, vf
    if once and spec.polar and not args.growth_in_decode:  # the growth the first group flush after the prompt
        pqcompile.reserve(cache, ctx + args.group_size)  # makes: its transient counts
    del k, v, kn, vn


def probe(model, fwd, spec: Spec, batch: int, ctx: int, args, meter) -> dict:
    """One size: fit (with the decode numbers) or OOM (with the phase). Never raises an OOM."""
    rec = {"batch": batch, "context": ctx, "fit": False, "phase": "cache"}
    timing = {}
    graphs0 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    meter.reset_peak()  # the previous probe ended with free()
    try:
        # --dense-sdpa flash: cuDNN's plan per key length made dynamic dense steps ~2.5x slower at batch 1 (H200);
        # the polar contenders rewrite their SDPA
        flash = not spec.polar and args.device == "cuda" and args.dense_sdpa == "flash"
        with torch.no_grad(), no_cudnn_sdpa(flash):
            _probe_body(model, fwd, spec, batch, ctx, args, meter, rec, timing)
        rec["fit"] = True
    except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else is recorded and ends the search
        if is_oom(e):
            rec["oom"] = f"{type(e).__name__}: {str(e).splitlines()[0][:240] if str(e) else ''}"
        else:
            rec["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        rec.update(meter.peak())
    finally:
        meter.free()
    rec.update(timing)
    rec["seconds"] = time.perf_counter() - t0
    rec["new_dynamo_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs0
    if meter.simulated:
        rec["simulated"] = True
    return rec


def growing_capacities(cache) -> list[int]:
    """The capacity of every cache tensor that appends in place (polar dynamic contenders; empty for the others)."""
    return [t.capacity for layer in getattr(cache, "layers", None) or []
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if appends_in_place(t)]


def _probe_body(model, fwd, spec, batch, ctx, args, meter, rec, timing) -> None:
    t = time.perf_counter()
    cache = cache_for(model, spec, batch, ctx, args)
    meter.check(cache)
    rec["phase"] = "fill"
    fill(model, fwd, cache, spec, batch, ctx, args, meter, timing)
    sync(args.device)
    timing["fill_s"] = time.perf_counter() - t
    rec["allocated_after_fill"] = meter.allocated()
    fill_peak = meter.peak()
    meter.reset_peak()
    rec["phase"] = "decode"
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=args.device)
    times, steady_peak = [], None
    # --growth-in-decode: the first group flush grows the buffers after a compiled step (the backend's reserve_all)
    warmup = args.warmup + (args.group_size if args.growth_in_decode and spec.polar and not spec.static else 0)
    capacities = growing_capacities(cache)
    with warnings.catch_warnings(record=True) as caught:
        for i in range(warmup + args.steps):
            if i == warmup:
                decode_peak_warm = meter.peak()
                meter.reset_peak()
                reset_fallback_warnings()  # pqcompile warns once per op and process: again in the timed steps
                warnings.simplefilter("always")
                caught.clear()
            kw = (decode_kwargs(cache, ctx + i, types.SimpleNamespace(batch=batch, device=args.device))
                  if spec.static else {CACHE_KW: cache, "use_cache": True})
            out, ms = timed(args.device, fwd, tok, **kw)
            meter.check(cache)
            tok = out.logits[:, -1:].argmax(-1)
            del out
            times.append(ms)
            if i == 0:
                timing["first_step_s"] = ms / 1e3
    fallbacks = sorted({str(w.message)[:200] for w in caught if "no compressed implementation" in str(w.message)})
    if fallbacks:  # a compressed cache tensor was dequantized in a timed step: its memory is not the polar path's
        rec["dense_fallbacks"] = fallbacks
    steady_peak = meter.peak()
    rec["decode_growths"] = sum(a != b for a, b in zip(capacities, growing_capacities(cache)))
    steady = times[warmup:] or times
    median = statistics.median(steady)
    held = cache_bytes(cache)
    rec.update(step_ms_median=median, step_ms=[round(x, 3) for x in steady], tokens_per_s=batch * 1e3 / median,
               cache_bytes_held=held["key_cache_bytes"] + held["value_cache_bytes"], **held,
               fill_max_memory_allocated=fill_peak["max_memory_allocated"],
               max_memory_allocated=max(fill_peak["max_memory_allocated"],
                                        decode_peak_warm["max_memory_allocated"] if warmup else 0,
                                        steady_peak["max_memory_allocated"]),
               max_memory_reserved=max(fill_peak["max_memory_reserved"],
                                       decode_peak_warm["max_memory_reserved"] if warmup else 0,
                                       steady_peak["max_memory_reserved"]),
               decode_max_memory_allocated=steady_peak["max_memory_allocated"])
    if warmup:
        rec["warmup_max_memory_allocated"] = decode_peak_warm["max_memory_allocated"]
    del cache, tok


# --------------------------------------------------------------------------- the search


def oom_memory(rec: dict) -> str:
    """Reserved vs allocated at an OOM: what the allocator held but could not hand out (fragmentation)."""
    if rec.get("max_memory_reserved") is None:
        return ""
    return (f"reserved {mem(rec['max_memory_reserved'])}, peak allocated {mem(rec['max_memory_allocated'])}: "
            f"{mem(rec['max_memory_reserved'] - rec['max_memory_allocated'])} unusable; ")


def round_down(x: float, res: int) -> int:
    return int(x // res) * res


def round_up(x: float, res: int) -> int:
    return -int(-x // res) * res


def predict(fits: list[tuple[int, int, int]], budget: float) -> float | None:
    """Size where the peak reaches the budget: the slope of max_memory_allocated (exact bytes) between the smallest
    and the largest fitting size (the widest spread: per-group granularity of the polar caches makes near sizes
    noisy), the allocator's slack (reserved - allocated) of the largest one taken off the budget."""
    by_size = {}
    for size, alloc, reserved in fits:
        by_size[size] = (alloc, reserved)
    if len(by_size) < 2:
        return None
    x0, x1 = min(by_size), max(by_size)
    (a0, _), (a1, r1) = by_size[x0], by_size[x1]
    slope = (a1 - a0) / (x1 - x0)
    if slope <= 0:
        return None
    return x1 + (budget - (r1 - a1) - a1) / slope


def search(model, fwd, spec: Spec, kind: str, budget: dict, args, meter, inherited: list[dict], deadline: float,
           on_probe) -> dict:
    """Largest size (context or batch) that fits; the result row with its probe log."""
    if kind == "context":
        res, cap, start = args.resolution, args.max_context, args.start_context
        shape = lambda size: (1, size)
    else:
        res, cap, start = 1, args.max_batch, 1
        shape = lambda size: (size, args.batch_context)
    row = {"contender": spec.name, "kind": kind, "budget_gb": budget["nominal"] / GB,
           "effective_budget_gb": budget["effective"] / GB, "layers": args.layers, "status": "running",
           "probes": [], "inherited": []}
    lo, hi, at = 0, None, None
    fits = []  # (size, peak allocated, peak reserved) for the prediction
    for rec in inherited:  # fits at a smaller budget of the same contender and kind
        row["inherited"].append({k: rec[k] for k in ("size", "max_memory_allocated", "max_memory_reserved")})
        fits.append((rec["size"], rec["max_memory_allocated"], rec["max_memory_reserved"]))
        if rec["size"] > lo:
            lo, at = rec["size"], rec
    margin = args.margin
    x = start if lo == 0 else None
    while True:
        if x is None:  # plan the next size
            if hi is not None and hi - lo <= res:
                row["status"] = "converged"
                break
            if hi is None and lo >= cap:
                row["status"] = "capped"
                break
            p = predict(fits, budget["effective"]) if args.search_mode == "predict" else None
            if hi is None:
                if p is None:
                    x = max(lo * 2, start)
                else:
                    x = round_down(p * (1 - margin), res)
                    if x <= lo:
                        x = round_up(max(p, lo) * (1 + margin), res)
                    x = max(x, lo + res)
                x = min(x, cap)
            else:
                mid = round_down((lo + hi) / 2, res)
                x = mid
                if p is not None and hi - lo > 4 * margin * p:
                    aim = round_down(p * (1 - margin), res)
                    quarter = (hi - lo) / 4
                    if lo + quarter <= aim <= hi - quarter:
                        x = aim
                if not lo < x < hi:
                    x = lo + res
            if x <= lo or (hi is not None and x >= hi):
                row["status"] = "converged"
                break
        if x <= 0:
            row["status"] = "none fits"
            break
        left = deadline - time.perf_counter()
        durations = [q["seconds"] for q in row["probes"][-2:]]
        if left <= 0 or (durations and min(durations) > left):
            row["status"] = "time-limited"
            break
        batch, ctx = shape(x)
        rec = probe(model, fwd, spec, batch, ctx, args, meter)
        rec["size"] = x
        row["probes"].append(rec)
        if "error" in rec:
            row["status"] = "error"
            row["error"] = rec["error"]
            say(f"{spec.name} {kind} @ {mem(budget['nominal'])}: size {x}: ERROR {rec['error'][:300]}")
            on_probe(row)
            break
        p = predict(fits, budget["effective"])
        if rec["fit"]:
            if args.search_mode == "predict" and p is not None and x >= p:
                margin *= 2  # the prediction was pessimistic: step out further next time
            lo, at = max(lo, x), (rec if x >= lo else at)
            fits.append((x, rec["max_memory_allocated"], rec["max_memory_reserved"]))
        else:
            if args.search_mode == "predict" and p is not None and x <= p:
                margin *= 4  # optimistic: aim lower
            hi = x if hi is None else min(hi, x)
        say(f"{spec.name} {kind} @ {mem(budget['nominal'])}: {kind} {x}: "
            + (f"fit, peak {mem(rec['max_memory_allocated'])}, {rec['step_ms_median']:.1f} ms/step, "
               f"{rec['tokens_per_s']:.1f} tok/s" if rec["fit"] else f"OOM in {rec['phase']} ({oom_memory(rec)}{rec['oom'][:120]})")
            + f"; {rec['seconds']:.1f} s (fill {rec.get('fill_s', 0):.1f}, first step {rec.get('first_step_s', 0):.1f})"
            + (f", {rec['new_dynamo_graphs']} new graphs" if rec["new_dynamo_graphs"] else "")
            + (f"; DENSE FALLBACK in timed steps: {rec['dense_fallbacks']}" if rec.get("dense_fallbacks") else ""))
        on_probe(row)
        if not rec["fit"] and lo == 0:  # the smallest size tried does not fit: halve
            x = round_down(x / 2, res)
            if x <= 0:
                row["status"] = "none fits"
                break
            continue
        x = None
    row["max"] = lo
    row["oom_at"] = hi
    if at is not None:
        row["at_max"] = {k: at.get(k) for k in ("batch", "context", "step_ms_median", "tokens_per_s",
                                                 "max_memory_allocated", "max_memory_reserved",
                                                 "decode_max_memory_allocated", "cache_bytes_held",
                                                 "key_cache_bytes", "value_cache_bytes", "kv_ratio")}
        row["at_max"]["inherited"] = not any(at is q for q in row["probes"])
        if at.get("dense_fallbacks"):
            row["at_max"]["dense_fallbacks"] = at["dense_fallbacks"]
    row["seconds"] = sum(q["seconds"] for q in row["probes"])
    return row


# --------------------------------------------------------------------------- budgets, output


def weights_bytes(model) -> tuple[int, int]:
    """All parameter (+ buffer) bytes, and one decoder layer's."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    return total, layer


def effective_budget(nominal: float, args, weights: int, layer: int) -> float:
    missing = max(0, args.ref_layers - args.layers) * layer
    if args.scale_budget == "weights":
        return nominal - missing
    if args.scale_budget == "kv":
        return weights + (nominal - (weights + missing)) * args.layers / args.ref_layers
    return nominal


def add_ratios(rows: list[dict]) -> None:
    base = {(r["kind"], r["budget_gb"]): r.get("max") for r in rows if r["contender"] == BASELINE}
    for r in rows:
        b = base.get((r["kind"], r["budget_gb"]))
        if b and r.get("max") is not None:
            r["ratio_vs_dense_dynamic"] = r["max"] / b


def table(rows: list[dict], simulated: bool) -> str:
    out = []
    for (name, budget) in dict.fromkeys((r["contender"], r["budget_gb"]) for r in rows):
        eff = next(r["effective_budget_gb"] for r in rows if (r["contender"], r["budget_gb"]) == (name, budget))
        line = [name, f"{budget * GB / UNIT[0]:.4g}" + ("" if eff == budget else f" (eff. {eff * GB / UNIT[0]:.4g})")]
        for kind in ("context", "batch"):
            r = next((r for r in rows if (r["contender"], r["budget_gb"], r["kind"]) == (name, budget, kind)), None)
            if r is None:
                line += ["", "", "", ""]
                continue
            flag = "" if r["status"] in ("converged",) else f" ({r['status']})"
            at = r.get("at_max") or {}
            if at.get("dense_fallbacks"):
                flag += " FALLBACK"
            line += [f"{r.get('max')}{flag}", f"{r['ratio_vs_dense_dynamic']:.2f}x" if "ratio_vs_dense_dynamic" in r
                     else "", f"{at['tokens_per_s']:.1f}" if at.get("tokens_per_s") else "",
                     f"{at['max_memory_allocated'] / UNIT[0]:.4g}" if at.get("max_memory_allocated") else ""]
        out.append(line)
    u = UNIT[1]
    head = ["contender", f"budget {u}", "max context (b1)", "vs dense-dyn", "tok/s", f"peak {u}",
            "max batch", "vs dense-dyn", "tok/s", f"peak {u}"]
    title = "SIMULATED (CPU byte counter: weights + cache bytes, no activations)\n" if simulated else ""
    return title + tabulate(out, headers=head)


def plot(rows: list[dict], path: pathlib.Path, meta: dict) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: {e}"
    kinds = [k for k in ("context", "batch") if any(r["kind"] == k for r in rows)]
    one_budget = len({r["budget_gb"] for r in rows}) == 1
    probed = [k for k in kinds if one_budget and any(r["kind"] == k and r["probes"] for r in rows)]
    rows_of_axes = 2 if probed else 1
    fig, axes = plt.subplots(rows_of_axes, len(kinds), figsize=(6.5 * len(kinds), 4.5 * rows_of_axes),
                             squeeze=False)
    for ax, kind in zip(axes[-1], probed):  # second row: memory against size, every probe run
        for name in dict.fromkeys(r["contender"] for r in rows if r["kind"] == kind):
            probes = sorted((q["size"], q["max_memory_allocated"] / UNIT[0], q["fit"]) for r in rows
                            if r["contender"] == name and r["kind"] == kind for q in r["probes"]
                            if q.get("max_memory_allocated") is not None)
            fits = [q for q in probes if q[2]]
            line, = ax.plot([q[0] for q in fits], [q[1] for q in fits], marker="o", label=f"{name} (fits)")
            ax.scatter([q[0] for q in probes if not q[2]], [q[1] for q in probes if not q[2]], marker="x",
                       color=line.get_color(), label=f"{name} (out of memory: peak before it)")
        ax.axhline(rows[0]["budget_gb"] * GB / UNIT[0], color="k", linewidth=0.8, linestyle=":")
        ax.set_xlabel("context, batch 1 (tokens)" if kind == "context"
                      else f"batch at context {meta['args']['batch_context']}")
        ax.set_ylabel(f"peak memory allocated ({UNIT[1]})")
        ax.set_title("every probe: peak allocated vs size (dotted: the budget)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if one_budget:  # a bar per contender
        for ax, kind in zip(axes[0], kinds):
            got = [(r["contender"], r.get("max") or 0) for r in rows if r["kind"] == kind]
            ax.bar([g[0] for g in got], [g[1] for g in got], color=["#888" if g[0].startswith("dense") else "#3a7"
                                                                    for g in got])
            for i, (_, v) in enumerate(got):
                ax.annotate(f"{v:,}", (i, v), ha="center", va="bottom", fontsize=8)
            ax.set_ylabel("max context, batch 1 (tokens)" if kind == "context"
                          else f"max batch at context {meta['args']['batch_context']}")
            ax.tick_params(axis="x", labelrotation=20, labelsize=8)
            ax.set_title(f"budget {rows[0]['budget_gb'] * GB / UNIT[0]:g} {UNIT[1]} (nominal)", fontsize=9)
        kinds = []
    for ax, kind in zip(axes[0], kinds):
        for name in dict.fromkeys(r["contender"] for r in rows):
            pts = sorted((r["budget_gb"] * GB / UNIT[0], r.get("max") or 0, r["status"]) for r in rows
                         if r["contender"] == name and r["kind"] == kind)
            if not pts:
                continue
            static = SPECS[name].static
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s" if static else "o",
                            linestyle="--" if static else "-", label=name, alpha=0.85)
            for bx, by, st in pts:
                if st not in ("converged",):
                    ax.annotate(st, (bx, by), fontsize=7, color=line.get_color())
        ax.set_xlabel(f"memory budget ({UNIT[1]}, nominal)" + (" [SIMULATED]" if meta["simulated"] else ""))
        ax.set_ylabel("max context, batch 1 (tokens)" if kind == "context"
                      else f"max batch at context {meta['args']['batch_context']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(("SIMULATED: " if meta["simulated"] else "")
                 + f"capacity, {meta['args']['layers']} layers, scale-budget {meta['args']['scale_budget']}, "
                 f"fill {meta['args']['fill']}, {meta['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(rows: list[dict], meta: dict, path: pathlib.Path) -> None:
    add_ratios(rows)
    text = json.dumps({"meta": meta, "rows": rows}, indent=1, default=str)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    if os.environ.get("OUT"):
        out = pathlib.Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / path.name).write_text(text)


# --------------------------------------------------------------------------- main


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contenders", nargs="+", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--budgets", type=float, nargs="+", default=None, help="GB (10^9 B); default 40 80 (--tiny: "
                   "weights + 0.75 MB and + 1.5 MB)")
    p.add_argument("--search", choices=["context", "batch", "both"], default="both")
    p.add_argument("--search-mode", choices=["predict", "grow"], default="predict")
    p.add_argument("--layers", type=int, default=None, help="default 32 (--tiny: 2)")
    p.add_argument("--ref-layers", type=int, default=32, help="the model --scale-budget scales to")
    p.add_argument("--scale-budget", choices=["none", "weights", "kv"], default="none")
    p.add_argument("--dense", choices=["eager", "inductor"], default="eager", help="how the dense contenders run")
    p.add_argument("--dense-sdpa", choices=["flash", "default"], default="flash",
                   help="SDPA backends of the dense contenders on CUDA: flash (no cuDNN) or torch's default")
    p.add_argument("--polar-after", choices=["inductor", "aot_eager", "eager"], default="inductor",
                   help="polarquant's inner backend (options backend=); --tiny default eager (fast CPU compile)")
    p.add_argument("--dynamic", action="store_true", help="torch.compile(..., dynamic=True): symbolic sizes from the "
                   "first call, one recompile fewer per contender (default: torch's automatic dynamic shapes). "
                   "Seen on CPU: polar-static-v4 then dequantizes its values every step (flagged FALLBACK)")
    p.add_argument("--fill", choices=["reserved", "write", "prefill"], default="reserved")
    p.add_argument("--model-tokens", type=int, default=16, help="--fill reserved|write: tokens per sequence through the "
                   "model first (dynamic caches; few, so that the prefill's activations stay small at large batch)")
    p.add_argument("--write-chunk", type=int, default=16384, help="--fill reserved|write: tokens per write, whole batch")
    p.add_argument("--prefill-chunk", type=int, default=4096, help="--fill prefill: tokens per forward, whole batch")
    p.add_argument("--steps", type=int, default=4, help="timed decode steps per probe")
    p.add_argument("--growth-in-decode", action="store_true", help="polar dynamic contenders: the fill stops at the "
                   "prompt's allocation and --group-size more warm-up steps run, so the first flush grows the buffers "
                   "between compiled steps (reserve_all after the decode graph's compile) instead of in the fill")
    p.add_argument("--warmup", type=int, default=2, help="decode steps before the timed ones (compile, the "
                   "dynamic-shape recompile of a growing DynamicCache, tuning)")
    p.add_argument("--resolution", type=int, default=None, help="context resolution, tokens (default 1024; "
                   "--tiny 64); batch resolution is 1")
    p.add_argument("--start-context", type=int, default=None, help="default 4096 (--tiny 128)")
    p.add_argument("--max-context", type=int, default=None, help="default 1048576 (--tiny 8192)")
    p.add_argument("--batch-context", type=int, default=None, help="context of the batch search; default 32768 "
                   "(--tiny 256)")
    p.add_argument("--max-batch", type=int, default=None, help="default 256 (--tiny 16)")
    p.add_argument("--margin", type=float, default=0.02, help="predict mode: aim at prediction * (1 -+ margin)")
    p.add_argument("--group-size", type=int, default=128, help="the polar contenders' group size")
    p.add_argument("--value-group", type=int, default=None, help="channels per value group of the -v4 contenders "
                   "(default 64; --tiny 32, its head_dim)")
    p.add_argument("--time-limit", type=float, default=240.0, help="seconds per contender")
    p.add_argument("--total-time", type=float, default=None, help="seconds for the whole run (split over contenders)")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU, SIMULATED budgets (smoke test)")
    p.add_argument("--tag", default=None)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    t = args.tiny
    args.layers = args.layers or (2 if t else 32)
    args.resolution = args.resolution or (64 if t else 1024)
    args.start_context = args.start_context or (128 if t else 4096)
    args.max_context = args.max_context or (8192 if t else 1 << 20)
    args.batch_context = args.batch_context or (256 if t else 32768)
    args.max_batch = args.max_batch or (16 if t else 256)
    args.value_group = args.value_group or (32 if t else 64)
    if t and "--polar-after" not in (argv if argv is not None else sys.argv):
        args.polar_after = "eager"
    for name in ("start_context", "max_context"):
        setattr(args, name, max(args.resolution, round_down(getattr(args, name), args.resolution)))
    return args


def merge(paths: list[str], out: pathlib.Path) -> None:
    """Rows of several runs (same model and rules) in one JSON, table and plot: a later converged row replaces an
    earlier time-limited one of the same contender, search and budget (runs split to fit a device call)."""
    rows: dict = {}
    metas = []
    for p in paths:
        data = json.loads(pathlib.Path(p).read_text())
        metas.append(data["meta"])
        for r in data["rows"]:
            key = (r["contender"], r["kind"], r["budget_gb"])
            if key not in rows or rows[key]["status"] != "converged":
                rows[key] = r
    meta = {**metas[0], "merged_from": [str(p) for p in paths]}
    merged = list(rows.values())
    write(merged, meta, out)
    print(table(merged, meta["simulated"]), flush=True)
    msg = plot(merged, out.with_suffix(".png"), meta)
    say(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if msg is None else f"; {msg}"))


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--merge":  # --merge OUT.json IN.json ...
        merge(sys.argv[3:], pathlib.Path(sys.argv[2]))
        return {}
    args = parse(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    args.device = "cuda" if cuda else "cpu"
    args.dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA device: budgets are enforced by the CUDA allocator; use --tiny for a CPU smoke run")
    for name in ("recompile_limit", "cache_size_limit"):  # a probe per size: never fall back to eager silently
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    say(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.device}; {args.layers} layers")
    if args.tiny:
        UNIT[:] = [1e6, "MB"]
    model = build(args)
    weights, layer = weights_bytes(model)
    if args.budgets is None:
        args.budgets = [(weights + 0.75e6) / GB, (weights + 1.5e6) / GB] if args.tiny else [40.0, 80.0]
    budgets = [{"nominal": b * GB, "effective": effective_budget(b * GB, args, weights, layer)}
               for b in sorted(args.budgets)]
    say(f"model built: weights {mem(weights)} ({mem(layer)} per layer); budgets "
        + ", ".join(f"{mem(b['nominal'])} -> {mem(b['effective'])}" for b in budgets)
        + f" (scale-budget {args.scale_budget})")
    say(f"fill {args.fill}: " + (f"first {args.model_tokens} tokens through the model (dynamic caches), the rest "
                                 "written as random K/V" + (" into buffers sized once for the context"
                                                            if args.fill == "reserved" else " through cache.update")
                                 + "; no prompt attention is run" if args.fill != "prefill" else
                                 f"every token through the model, {args.prefill_chunk} tokens per forward"))
    if args.tiny:
        say("SIMULATED budgets: a CPU byte counter (weights + cache bytes held), not the CUDA allocator")
    kinds = ["context", "batch"] if args.search == "both" else [args.search]
    stamp = datetime.date.today().isoformat()
    tag = args.tag or ("tiny" if args.tiny else f"{args.layers}layers")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"capacity-{stamp}-{tag}.json"
    meta = {"script": "bench/capacity.py", "version": VERSION, "torch": torch.__version__,
            "transformers": transformers.__version__, "pqcompile": pqcompile.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "device_total_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
            "simulated": args.tiny, "weights_bytes": weights, "layer_weights_bytes": layer,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "command": " ".join(sys.argv),
            "budget_rule": {"none": "budget as given",
                            "weights": "budget - (ref_layers - layers) * layer weights",
                            "kv": "weights + (budget - weights at ref_layers) * layers / ref_layers"}[
                                args.scale_budget],
            "fill_rule": ("write: dynamic caches get model_tokens through the model, the rest random K/V via "
                          "cache.update; static caches written only" if args.fill == "write"
                          else "prefill: every token through the model in chunks"),
            "args": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(args).items()}}
    rows: list[dict] = []
    t_start = time.perf_counter()
    for ci, name in enumerate(args.contenders):
        spec = SPECS[name]
        left_total = None if args.total_time is None else args.total_time - (time.perf_counter() - t_start)
        share = args.time_limit if left_total is None else min(args.time_limit,
                                                                left_total / (len(args.contenders) - ci))
        t_contender = time.perf_counter()
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        counters.clear()
        fwd = compiled(model, spec, args)
        say(f"{name}: start ({share:.0f} s)")
        inherited = {k: [] for k in kinds}
        n_search, done = len(budgets) * len(kinds), 0
        for budget in budgets:
            meter = SimMeter(budget["effective"], weights) if args.tiny else CudaMeter(budget["effective"])
            for kind in kinds:
                left = share - (time.perf_counter() - t_contender)
                deadline = time.perf_counter() + max(0.0, left) / (n_search - done)
                row = search(model, fwd, spec, kind, budget, args, meter, inherited[kind], deadline,
                             lambda running: write(rows + [running], meta, path))
                done += 1
                row["simulated"] = args.tiny
                row["compile"] = (f"polarquant(after={args.polar_after})" if spec.polar else args.dense)
                rows.append(row)
                inherited[kind] = inherited[kind] + [q for q in row["probes"] if q["fit"]]
                write(rows, meta, path)
                say(f"{name} {kind} @ {mem(budget['nominal'])}: max {row['max']} ({row['status']}), "
                    f"{len(row['probes'])} probes, {row['seconds']:.1f} s")
            meter.release()
        facts = {"polar_graphs": counters.totals["graphs"], "sites_rewritten": counters.totals["sites_rewritten"],
                 "sites_declined": counters.totals["sites_declined"],
                 "dynamo_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
                 "seconds": time.perf_counter() - t_contender}
        for row in rows:
            if row["contender"] == name:
                row["contender_facts"] = facts
        write(rows, meta, path)
        del fwd
    print(table(rows, args.tiny), flush=True)
    msg = plot(rows, path.with_suffix(".png"), meta)
    copy = pathlib.Path(os.environ.get("OUT", "")) / path.with_suffix(".png").name
    if msg is None and os.environ.get("OUT") and copy.resolve() != path.with_suffix(".png").resolve():
        shutil.copy(path.with_suffix(".png"), copy)
    say(f"wrote {path}" + (f" and {path.with_suffix('.png')}" if msg is None else f"; {msg}")
        + (f" (copies in {os.environ['OUT']})" if os.environ.get("OUT") else ""))
    return {"meta": meta, "rows": rows, "path": str(path)}


if __name__ == "__main__":
    main()
