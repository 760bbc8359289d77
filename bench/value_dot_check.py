"""Split the one failing GPU case of the "dot" value form (issue 16; bench/NOTES.md session 6) by what only the GPU's
bf16 path runs: B1 Hq4 Hkv2 T53 D128 Dv64, q_len 4 causal, additive float mask, V2 in channel groups of 32, G 16.

    python bench/value_dot_check.py    # one line per variant: relative error vs value_codec.attention

Variants: the case as the test runs it, with the dot's operands forced to fp32 (the bf16 code construction and the
bf16 dot out of the way), the other value load, V4, Dv 128, no mask, not causal, q_len 1, fp32 inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton.language as tl

from pqcompile import codec as ref
from pqcompile import kernels
from pqcompile import value_codec as vref
from pqcompile.kernels import attention_launch as host
from pqcompile.kernels import settings
from pqcompile.value_codec import ValueCodec


class _Fp32Units:
    """triton.language with bfloat16 read as float32: the host wrapper then picks fp32 dot operands (UT)."""

    def __getattr__(self, name):
        return tl.float32 if name == "bfloat16" else getattr(tl, name)


@contextlib.contextmanager
def fp32_units():
    host.tl = _Fp32Units()
    try:
        yield
    finally:
        host.tl = tl


def case(T=53, D=128, Dv=64, S=4, vbits=2, cg=32, G=16, mask=True, causal=True, dtype=torch.bfloat16, seed=83):
    torch.manual_seed(seed)
    c, vc = ref.Codec(4, 4, G, ref.Pairing()), ValueCodec(vbits, cg, G)
    kd = ref.encode((torch.randn(1, 2, T, D, device="cuda") * 2).to(dtype), c)
    vd = vref.encode((torch.randn(1, 2, T, Dv, device="cuda") * 3 + 1).to(dtype), vc)
    q = torch.randn(1, 4, S, D, device="cuda").to(dtype)
    m = torch.randn(1, 4, S, T, device="cuda") if mask else None
    out = kernels.attention(q, kd, T, vd, c, vcodec=vc, num_splits=2, mask=m, is_causal=causal)
    want = vref.attention(q, kd, T, vd, c, vc, mask=m, is_causal=causal)
    return ((out.float() - want.float()).norm() / want.float().norm()).item()


def main() -> None:
    variants = {
        "as tested": {}, "V4": {"vbits": 4}, "Dv 128": {"Dv": 128}, "no mask": {"mask": False},
        "not causal": {"causal": False}, "q_len 1": {"S": 1, "causal": False}, "fp32 inputs": {"dtype": torch.float32},
        "G 128, T 300": {"G": 128, "T": 300},
    }
    results = {}
    with settings.override(autotune=False):
        for form in ("dot", "dot-bytes", "dequant"):
            for units in ("auto", "fp32"):
                if units == "fp32" and form == "dequant":
                    continue
                for name, kw in variants.items():
                    with settings.override(value_form=form), (fp32_units() if units == "fp32" else
                                                              contextlib.nullcontext()):
                        err = case(**kw)
                    key = f"{form} units={units} {name}"
                    results[key] = err
                    print(f"{'BAD ' if err > 2e-2 else 'ok  '}{key}: rel. error {err:.2e}", flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "value_dot_check.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
