"""`pqcompile eval`: run the methods, then write the table, a JSON file and a PNG plot."""

from __future__ import annotations

import datetime
import json
import logging
import math
import platform
import time
from pathlib import Path

import torch
from tabulate import tabulate

from .. import counters
from . import data, evaluate
from .methods import select

log = logging.getLogger(__name__)
HEADERS = ["method", "path", "K bits/elem", "V bits/elem", "KV bits/elem", "tokens", "ppl", "Δppl vs fp (same windows)",
           "95% CI (windows)", "attn err (mean over layers)", "key err", "seconds"]
VALUE_HEADERS = ["method", "keys only", "value cost (Δppl points)", "95% CI (windows)"]
RESAMPLES = 10_000


def run(method_names: list[str], *, text: str = "wiki", tokens: int = 16384, compiled_tokens: int | None = None,
        window: int = 1024, error_windows: int = 2, inner: str = "aot_eager", batch: int = 4,
        progress: bool = True, partial: Path | None = None) -> dict:
    """Evaluate every method on `tokens // window` windows of `text` (product methods on the first
    `compiled_tokens // window` of them; all when None). fp always runs."""
    names = list(dict.fromkeys(["fp", *method_names]))
    select(names)  # unknown names fail before the model loads
    data.require("gguf", "accelerate", "gensim", "matplotlib", data.GGUF_PACKAGE)
    model, tok = data.load_model()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    methods = select(names, head_dim=head_dim)
    n = max(tokens // window, 1)
    windows = data.token_windows(tok, text, n, window)
    n_compiled = n if compiled_tokens is None else min(max(compiled_tokens // window, 1), n)
    rows, t0 = {}, time.perf_counter()
    for m in methods:
        w = windows[:n_compiled] if m.kind == "product" else windows
        counters.clear()
        res = evaluate.perplexity(model, w, m, inner=inner, batch=batch, progress=progress)
        res.update(kind=m.kind, label=m.label, bits=m.bits, value_bits=m.value_bits, kv_bits=m.kv_bits,
                   windows=w.shape[0])
        if m.kind == "product":
            res["compile"] = {k: v for k, v in counters.totals.items()}
            res["inner_backend"] = inner
        rows[m.name] = res
        log.info("%s: ppl %.4f over %d tokens (%.0f s)", m.name, res["ppl"], res["tokens"], res["seconds"])
        if partial is not None:  # long runs: keep what is done
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(rows, indent=1) + "\n")
    fp = rows["fp"]["window_nll"]
    for res in rows.values():
        k = res["windows"]
        base = sum(fp[:k]) / k
        res["fp_ppl_same_windows"] = math.exp(base)
        res["delta_ppl_pct"] = 100 * (math.exp(res["nll"] - base) - 1)
    add_intervals({"methods": rows})
    err_methods = [m for m in methods if m.kind != "fp"
                   and not (m.kind == "product" and f"{m.name}-deq" in rows)]
    errors = (evaluate.layer_errors(model, windows[:error_windows], err_methods, progress=progress)
              if err_methods and error_windows > 0 else {})  # no windows: no errors (not zeros)
    for name, e in errors.items():
        rows[name]["layer_errors"] = e
    for m in methods:  # a product method shares the errors of its dequantized twin (same reconstruction)
        twin = rows.get(f"{m.name}-deq", {}).get("layer_errors")
        if m.kind == "product" and twin:
            rows[m.name]["layer_errors"] = twin
    return {
        "model": data.MODEL_NAME, "text": text, "window": window, "windows": n, "group_size": 128, "tail": 127,
        "error_windows": min(error_windows, n), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "seconds": time.perf_counter() - t0,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "methods": rows,
    }


def keys_twin(name: str) -> str | None:
    """The keys-only method of a keys + values method (`...-vB` or `...-vBcC`), else None."""
    keys, sep, vbits = name.rpartition("-v")
    return keys if sep and vbits.split("c")[0].isdigit() else None


def _delta_pct(nll: torch.Tensor, fp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Δppl vs fp (%) of each resample (rows of idx: window indices drawn with replacement)."""
    return 100 * torch.expm1(nll[idx].mean(-1) - fp[idx].mean(-1))


def add_intervals(result: dict, *, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """95% intervals by resampling whole windows (paired: every method on the same draws; tokens within a window
    are not independent, windows are). Each method gets `delta_ppl_ci95`; a keys + values method whose keys-only
    twin ran gets `value_cost`: its Δppl minus the twin's, in points, with the interval of that difference.
    Rows without per-window NLLs (older results) are left as they are."""
    rows = result["methods"]
    fp_nll = rows.get("fp", {}).get("window_nll")
    if fp_nll is None:
        return result
    gen = torch.Generator().manual_seed(seed)
    draws: dict[int, torch.Tensor] = {}  # per window count: one set of draws for every method with that count

    def idx(k: int) -> torch.Tensor:
        if k not in draws:
            draws[k] = torch.randint(0, k, (resamples, k), generator=gen)
        return draws[k]

    def nll(name: str, k: int) -> torch.Tensor:
        return torch.tensor(rows[name]["window_nll"][:k], dtype=torch.float64)

    for name, r in rows.items():
        if name == "fp" or "window_nll" not in r:
            continue
        k = len(r["window_nll"])
        lo, hi = torch.quantile(_delta_pct(nll(name, k), nll("fp", k), idx(k)),
                                torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        r["delta_ppl_ci95"] = [lo, hi]
        twin = keys_twin(name)
        if twin in rows and "window_nll" in rows[twin]:
            k = min(k, len(rows[twin]["window_nll"]))
            fp, i = nll("fp", k), idx(k)
            diff = _delta_pct(nll(name, k), fp, i) - _delta_pct(nll(twin, k), fp, i)
            point = 100 * (math.exp(nll(name, k).mean().item() - fp.mean().item())
                           - math.exp(nll(twin, k).mean().item() - fp.mean().item()))
            lo, hi = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
            r["value_cost"] = {"keys_only": twin, "points": point, "ci95": [lo, hi], "windows": k,
                               "resamples": resamples}
    return result


def value_table(result: dict, fmt: str = "simple") -> str:
    """What compressing the values costs over the same keys alone (methods with `value_cost`); "" if none."""
    rows = [[n, r["value_cost"]["keys_only"], f"{r['value_cost']['points']:+.2f}",
             "[{:+.2f}, {:+.2f}]".format(*r["value_cost"]["ci95"])]
            for n, r in result["methods"].items() if "value_cost" in r]
    return tabulate(rows, headers=VALUE_HEADERS, tablefmt=fmt, disable_numparse=True) if rows else ""


def add_arguments(p) -> None:
    """The options of `pqcompile eval` (argparse subparser)."""
    from .methods import DEFAULT, PATTERNS

    p.add_argument("--methods", default=",".join(DEFAULT),
                   help="comma-separated; patterns: " + "; ".join(f"{k}: {v}" for k, v in PATTERNS.items()))
    p.add_argument("--text", default="wiki", choices=data.TEXTS, help="wiki: report; lee: choose settings")
    p.add_argument("--tokens", type=int, default=16384, help="tokens (whole 1024-token windows) per method")
    p.add_argument("--compiled-tokens", type=int, default=None,
                   help="tokens for the compiled polar methods (default: --tokens, every window); each compiled "
                        "method also spends ~1.5 min compiling its 3 graphs on 2 CPU cores")
    p.add_argument("--error-windows", type=int, default=2, help="windows for the per-layer errors")
    p.add_argument("--inner", default="aot_eager", choices=["inductor", "aot_eager", "eager"],
                   help="what compiles the rewritten graph (polarquant option 'backend'); the polar ops are the "
                        "same opaque custom ops either way, inductor only fuses the dense rest (and takes minutes "
                        "to compile 30 layers on CPU)")
    p.add_argument("--batch", type=int, default=4, help="windows per forward")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--summarize", default=None, metavar="JSON",
                   help="print the tables of an earlier result (intervals recomputed) and exit")
    p.add_argument("--out", default=f"bench/results/quality-{datetime.date.today().isoformat()}",
                   help="output stem: writes OUT.json and OUT.png")


def table_rows(result: dict) -> list[list]:
    out = []
    for name, r in result["methods"].items():
        e = r.get("layer_errors")
        path = {"fp": "eager", "reference": "fake quant", "product": f"compiled ({r.get('inner_backend')})"}[r["kind"]]
        vb = r.get("value_bits", 16.0)  # results written before values were quantized: dense values
        out.append([name, path, f"{r['bits']:.2f}", f"{vb:.2f}", f"{r.get('kv_bits', (r['bits'] + vb) / 2):.2f}",
                    r["tokens"], f"{r['ppl']:.3f}",
                    "" if name == "fp" else f"{r['delta_ppl_pct']:+.2f}%",
                    "[{:+.2f}, {:+.2f}]%".format(*r["delta_ppl_ci95"]) if "delta_ppl_ci95" in r else "",
                    f"{sum(e['attn_rel_err']) / len(e['attn_rel_err']):.4f}" if e else "",
                    f"{sum(e['key_rel_err']) / len(e['key_rel_err']):.4f}" if e else "", f"{r['seconds']:.0f}"])
    return out


def table(result: dict, fmt: str = "simple") -> str:
    return tabulate(table_rows(result), headers=HEADERS, tablefmt=fmt, disable_numparse=True)


def _family(name: str) -> str:
    keys, sep, vbits = name.rpartition("-v")
    if sep and vbits.split("c")[0].isdigit():  # keys + quantized values (-vB or -vBcC): its own line
        return f"{_family(keys)} + V{vbits}"
    for prefix in ("polar-circ", "polar-hybrid", "channel", "polar", "kivi-ch", "kivi-tok"):
        if name.startswith(prefix):
            return prefix if name.endswith("-deq") or prefix.startswith("kivi") else f"{prefix} (compiled)"
    return name


def plot(result: dict, path: Path) -> None:
    """Left: perplexity increase vs bits per key element, one line per family. Middle: the same vs bits per
    cached element, keys and values averaged (dense values count 16). Right: per-layer attention error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axkv, ax2) = plt.subplots(1, 3, figsize=(19, 5))
    fp = result["methods"]["fp"]
    for axis, key, xlabel in (
            (ax, "bits", "bits per key element (codes + bf16 group params; fp = 16)"),
            (axkv, "kv_bits", "total KV bits per element ((key bits + value bits) / 2; dense values = 16)")):
        families: dict[str, list] = {}
        for name, r in result["methods"].items():
            if name != "fp":
                x = r.get(key, (r["bits"] + 16) / 2 if key == "kv_bits" else r["bits"])
                families.setdefault(_family(name), []).append((x, r["delta_ppl_pct"], name, r["tokens"]))
        for fam, pts in families.items():
            pts.sort()
            compiled = fam == "polar (compiled)"
            axis.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], "o--" if compiled else "o-",
                      mfc="none" if compiled else None, label=f"{fam} ({pts[0][3]} tokens)", ms=8 if compiled else 5)
            for b, d, name, _ in pts:  # compiled labels left of the point: their -deq twins sit on top of them
                axis.annotate(name.split("-", 1)[-1], (b, max(d, 1e-3)), textcoords="offset points", fontsize=7,
                              xytext=(-7, -2) if compiled else (4, 4), ha="right" if compiled else "left")
        axis.set_yscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("perplexity increase vs fp (%)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    ax.set_title(f"{result['model']}, {result['text']}: fp ppl {fp['ppl']:.2f} on {fp['tokens']} tokens")
    axkv.set_title("vs total KV-cache bits (keys and values)")
    for name, r in result["methods"].items():
        e = r.get("layer_errors")
        if e and r["kind"] != "product":
            ax2.plot(e["attn_rel_err"], label=name)
    ax2.set_yscale("log")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("attention-output relative error")
    ax2.set_title(f"per layer, decode schedule, teacher-forced ({result['error_windows']} windows)")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out: Path) -> tuple[Path, Path]:
    """out: a path stem; writes <out>.json and <out>.png."""
    out.parent.mkdir(parents=True, exist_ok=True)
    js, png = out.with_suffix(".json"), out.with_suffix(".png")
    js.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, png)
    return js, png
