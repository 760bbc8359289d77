"""Command line: `pqcompile demo | report DIR`."""

from __future__ import annotations

import argparse
import sys

import torch
from tabulate import tabulate


def _keys_demo(model, prompt_len: int) -> list[list]:
    """Codec compression and error on the model's real post-RoPE keys (read from HF's own cache)."""
    from . import codec
    from .codec import Codec, Pairing

    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
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


def demo(args: argparse.Namespace) -> int:
    from .models import tiny_llama

    model = tiny_llama(layers=2, qk_gain=4.0)
    rows = _keys_demo(model, args.prompt_len)
    print(f"PolarQuant on the post-RoPE keys of a tiny random Llama ({args.prompt_len} tokens, g128):")
    print(tabulate(rows, headers=["bits r+a", "bits/elem", "vs fp16 (steady)", f"held vs fp16 @T={args.prompt_len}",
                                  "rel. L2 error (encoded groups)"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pqcompile")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compile a tiny embedded Llama with the polarquant backend")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
