"""Command line: `pqcompile demo | report DIR | eval | coverage`."""

from __future__ import annotations

import argparse
import sys

import torch
from tabulate import tabulate

from .hf_compat import cache_kw, cache_of


def _keys_demo(model, prompt_len: int) -> list[list]:
    """Codec compression and error on the model's real post-RoPE keys (read from HF's own cache)."""
    from . import codec
    from .codec import Codec, Pairing

    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len))
    with torch.no_grad():
        cache = cache_of(model(ids, use_cache=True))
    keys = torch.cat([layer.keys for layer in cache.layers], dim=1)  # [1, L*Hkv, T, D]
    rows = []
    for rb, ab in ((4, 4), (3, 3), (2, 2)):
        c = Codec(rb, ab, 128, Pairing())
        data = codec.encode(keys.half(), c)
        rec = codec.decode(data, keys.shape[2], c).float()
        n = data.codes.shape[2]
        err = ((rec - keys)[:, :, :n].norm() / keys[:, :, :n].norm()).item()
        bits = codec.steady_bits_per_element(c, keys.shape[-1])
        rows.append([f"{rb}+{ab}", f"{bits:.2f}", f"{bits / 16:.3f}x",
                     f"{codec.nbytes(data) / (keys.numel() * 2):.3f}x", f"{err:.4f}"])
    return rows


def _generate_demo(args: argparse.Namespace) -> list[list]:
    """Compile a tiny GQA Llama with the polarquant backend, decode teacher-forced, compare with eager."""
    import transformers

    from . import counters
    from .cache import polar_keys_in
    from .models import tiny_llama

    model = tiny_llama(layers=2, hidden=256, heads=8, kv_heads=2, qk_gain=3.0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_len + args.steps))
    compiled = torch.compile(model, backend="polarquant", options=_options(args))
    logits = {}
    for name, fwd in (("eager", model), ("polarquant", compiled)):
        cache = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            fwd(ids[:, : args.prompt_len], **cache_kw(cache), use_cache=True)
            steps = [fwd(ids[:, t : t + 1], **cache_kw(cache), use_cache=True).logits[0, -1]
                     for t in range(args.prompt_len, args.prompt_len + args.steps)]
        logits[name] = torch.stack(steps)
    keys = polar_keys_in(cache)
    cos = torch.nn.functional.cosine_similarity(logits["eager"], logits["polarquant"], dim=-1).mean().item()
    top1 = (logits["eager"].argmax(-1) == logits["polarquant"].argmax(-1)).float().mean().item()
    held = sum(k.nbytes_held() for k in keys)
    dense = sum(k.numel() * k.element_size() for k in keys)  # the model's own dense keys (fp32 here)
    return [["attention sites rewritten", (f"{counters.totals['sites_rewritten']} "
             f"({counters.totals['rewritten_prefill']} prefill, {counters.totals['rewritten_decode']} decode) "
             f"in {counters.totals['graphs']} graphs, {counters.totals['sites_declined']} declined")],
            ["cache key type", type(cache.layers[0].keys).__name__ + f" x{len(keys)} layers"],
            [f"key bytes held vs dense {keys[0].dtype}", (f"{held / dense:.3f}x ({held} B vs {dense} B at "
                                                      f"T={keys[0].shape[2]}; the tail stays {keys[0].dtype})")],
            ["logits cosine vs eager", f"{cos:.4f} ({args.steps} teacher-forced decode steps)"],
            ["top-1 agreement vs eager", f"{top1:.1%}"]]


def _options(args: argparse.Namespace) -> dict:
    return {"radius_bits": args.radius_bits, "angle_bits": args.angle_bits, "verify": args.verify,
            "report": args.report}


def demo(args: argparse.Namespace) -> int:
    from .models import tiny_llama

    torch.manual_seed(0)
    print(f"1. PolarQuant on the real post-RoPE keys of a tiny random Llama ({args.prompt_len} tokens, g128):")
    rows = _keys_demo(tiny_llama(layers=2, qk_gain=3.0), args.prompt_len)
    print(tabulate(rows, headers=["bits r+a", "bits/elem", "vs fp16 (steady)", f"held vs fp16 @T={args.prompt_len}",
                                  "rel. L2 error (encoded groups)"]))
    print(f"\n2. torch.compile(model, backend='polarquant', options={_options(args)}), prefill "
          f"{args.prompt_len} + {args.steps} decode steps with an unmodified DynamicCache:")
    print(tabulate(_generate_demo(args), tablefmt="plain"))
    print(f"\n3. Report (one folder per compiled graph: summary.txt, before.py/after.py, diff.html, report.json): "
          f"{args.report}/\n   print it with: pqcompile report {args.report}")
    return 0


def report(args: argparse.Namespace) -> int:
    """Print the summaries of a report folder (DIR of options={"report": DIR}, or one graph's folder)."""
    from .report import ReportError, latest_run, load, render_summary

    try:
        reports = load(args.dir)
    except ReportError as e:
        print(f"pqcompile report: error: {e}", file=sys.stderr)
        return 2
    shown = reports if args.all else latest_run(reports)
    print("\n".join(render_summary(d) for d in shown), end="")
    if len(shown) < len(reports):
        print(f"({len(reports) - len(shown)} graph report(s) from earlier runs in {args.dir} not shown: --all)")
    return 0


def eval_(args: argparse.Namespace) -> int:
    """Perplexity and per-layer errors of PolarQuant vs the alternatives on SmolLM2-135M + wiki (`make eval`)."""
    import pathlib

    from .quality import data, methods
    from .quality import summary as quality

    if args.summarize:
        import json

        result = quality.add_intervals(json.loads(pathlib.Path(args.summarize).read_text()))
        print(quality.table(result))
        print(quality.value_table(result))
        return 0
    try:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        methods.select(names)
        if args.threads:
            torch.set_num_threads(args.threads)
        result = quality.run(names, text=args.text, tokens=args.tokens, compiled_tokens=args.compiled_tokens,
                             error_windows=args.error_windows, inner=args.inner, batch=args.batch,
                             partial=pathlib.Path(args.out + ".partial.json"))
    except (data.MissingEvalExtra, ValueError) as e:
        print(f"pqcompile eval: error: {e}", file=sys.stderr)
        return 2
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command") and v is not None}
    result["command"] = "pqcompile eval " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items())
    print(quality.table(result))
    print(quality.value_table(result))
    js, png = quality.write(result, pathlib.Path(args.out))
    print(f"{result['seconds']:.0f} s; wrote {js} and {png}")
    return 0


def coverage(args: argparse.Namespace) -> int:
    from . import coverage as cov

    table, code = cov.run(args)
    print(table)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pqcompile")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compile a tiny embedded Llama with the polarquant backend")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--radius-bits", type=int, default=4)
    p.add_argument("--angle-bits", type=int, default=4)
    p.add_argument("--verify", default="first", help="off | first | every:N | shadow:N")
    p.add_argument("--report", default="pqcompile-report", help="folder for the graph-diff reports")
    p.set_defaults(func=demo)
    p = sub.add_parser("report", help="print the summary of a report folder written with options={'report': DIR}")
    p.add_argument("dir")
    p.add_argument("--all", action="store_true", help="also graphs from earlier runs into the same folder")
    p.set_defaults(func=report)
    p = sub.add_parser("eval", help="quality on SmolLM2-135M + wiki: perplexity and errors per method (make eval)")
    from .quality.summary import add_arguments
    add_arguments(p)
    p.set_defaults(func=eval_)
    p = sub.add_parser("coverage", help="run the HF decoder families (tiny random models) and print the support table")
    p.add_argument("--markdown", action="store_true", help="write the table into docs/models.md between the markers")
    p.add_argument("--file", "--readme", dest="readme", default="docs/models.md", help="the file --markdown writes")
    p.add_argument("--steps", type=int, default=64, help="greedy decode steps after the prompt")
    p.add_argument("--inner", default="aot_eager", help="inner backend of polarquant (inductor is slow on CPU)")
    p.add_argument("--families", nargs="*", help="subset of pqcompile.coverage.FAMILIES")
    p.set_defaults(func=coverage)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
