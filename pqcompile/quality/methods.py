"""The key-cache quantizers compared by the quality eval, and their true bits per key element.

Two kinds of method:
  - product: the polarquant backend itself (`torch.compile(model, backend="polarquant", options=...)`);
    the compressed cache lives in HF's DynamicCache and attention reads the codes.
  - reference (fake quantization, eval only, not a product path): complete groups of cached keys are
    quantized and dequantized once, when the group completes; the tail stays exact. Dense SDPA follows.
Every scalar quantizer here is the codec's own (per-group min / scale in bf16, min rounded down and scale up,
code = floor((v - min) / scale), reconstruction at the bin midpoint), so the methods differ only in what
they quantize: (radius, angle) pairs, x/y channels (KIVI-style per-channel), or tokens (KIVI-style per-token).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch

from .. import codec
from .. import value_codec as vc
from ..codec import Codec, Pairing

PARAM_BITS = 16  # every method stores its group min and scale in bf16


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str
    kind: str  # "fp" | "product" | "reference"
    bits: float  # steady-state bits per key element (codes + group parameters, tail amortized away)
    quantize: Callable[[torch.Tensor], torch.Tensor] | None = None  # keys [B, H, n*G, D] -> same, dequantized
    options: dict | None = None  # polarquant options (product methods)
    group_size: int = 128
    value_bits: float = 16.0  # steady-state bits per value element (16: values kept dense)
    quantize_values: Callable[[torch.Tensor], torch.Tensor] | None = None  # values [B, H, n*G, Dv] -> same

    @property
    def kv_bits(self) -> float:
        """Bits per cached element, keys and values averaged (equal head_dims, as in every model here)."""
        return (self.bits + self.value_bits) / 2


# --------------------------------------------------------------------------- quantizers (complete groups)


def _uniform(v: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Quantize-dequantize v with one (min, scale) per slice along `dim` (the codec's quantizer)."""
    v = v.float().movedim(dim, -2)
    vmin, scale = codec.group_params(v, bits)  # [..., P] bf16
    vmin, scale = vmin.float().unsqueeze(-2), scale.float().unsqueeze(-2)
    return codec.bin_center(codec.bin_index(v, vmin, scale, bits), vmin, scale).movedim(-2, dim)


def _groups(keys: torch.Tensor, G: int) -> torch.Tensor:
    B, H, T, D = keys.shape
    if T % G:
        raise ValueError(f"keys length {T} is not a multiple of the group size {G}")
    return keys.reshape(B, H, T // G, G, D)


def per_channel(bits: int, G: int = 128):
    """KIVI-style keys: per channel, one (min, scale) per group of G tokens."""
    def quantize(keys: torch.Tensor) -> torch.Tensor:
        return _uniform(_groups(keys, G), bits, dim=-2).reshape(keys.shape).to(keys.dtype)

    return quantize


def per_token(bits: int):
    """KIVI-style per-token keys: one (min, scale) per token over its head_dim channels."""
    def quantize(keys: torch.Tensor) -> torch.Tensor:
        return _uniform(keys.unsqueeze(-1), bits, dim=-2).squeeze(-1).to(keys.dtype)

    return quantize


def polar(radius_bits: int, angle_bits: int, G: int = 128, pairing: Pairing | None = None, kind: str = "polar"):
    """A product codec (any kind of key_cells.py), decoded densely (equals the kernels' attention up to float
    rounding)."""
    c = Codec(radius_bits, angle_bits, G, pairing or Pairing(), kind)

    def quantize(keys: torch.Tensor) -> torch.Tensor:
        return codec.decode(codec.encode(keys, c), keys.shape[2], c)

    return quantize


def values(bits: int, channel_group: int = 64, G: int = 128):
    """Per-token values through the reference value codec (pqcompile.value_codec): encode, then decode."""
    c = vc.ValueCodec(bits, channel_group, G)

    def quantize(v: torch.Tensor) -> torch.Tensor:
        return vc.decode(vc.encode(v, c), v.shape[2], c)

    return quantize


# --------------------------------------------------------------------------- registry

PATTERNS = {  # name pattern -> what it is (R, A, B: bits)
    "fp": "no quantization (the baseline)",
    "CODEC-R+A": "the product: polarquant-compiled model with options codec=CODEC (polar, polar-circ, "
                 "polar-hybrid, channel), R + A bits per pair (R + A <= 8)",
    "CODEC-R+A-deq": "the same codec decoded densely inside a fake-quant cache (reference, cheap on CPU)",
    "kivi-ch-intB": "KIVI-style per-channel keys, B bits, groups of G tokens (reference)",
    "kivi-tok-intB": "KIVI-style per-token keys, B bits, one group of head_dim channels (reference)",
    "KEYS-vB[cC]": "any reference keys method above, plus values through value_codec: B in {2, 4, 8} bits per "
                   "token and group of C channels (default 64), encoded when their group of G tokens completes "
                   "(reference)",
}
_NAME = re.compile(r"^(?:(fp)|(polar|polar-circ|polar-hybrid|channel)-([1-7])\+([1-7])(-deq)?|kivi-(ch|tok)-int([1-8]))"
                   r"(?:-v([248])(?:c(\d+))?)?$")
VALUE_GROUP = 64  # channels per value (min, scale), HF QuantizedCache's default and the product's

DEFAULT = ("fp", "polar-4+4", "polar-3+3", "polar-2+2", "polar-4+4-deq", "polar-3+3-deq", "polar-2+2-deq",
           "polar-circ-4+4-deq", "polar-circ-3+3-deq", "polar-circ-2+2-deq", "polar-hybrid-4+4-deq",
           "polar-hybrid-3+3-deq", "polar-hybrid-2+2-deq", "kivi-ch-int4", "kivi-ch-int3", "kivi-ch-int2",
           "kivi-tok-int4", "polar-4+4-deq-v4", "polar-4+4-deq-v2", "polar-hybrid-4+4-deq-v4", "kivi-ch-int4-v4")


def method(name: str, head_dim: int = 64, G: int = 128) -> Method:
    """A method by name (see PATTERNS). bits: codes + bf16 group parameters per key element; value_bits the
    same per value element (16 when the values stay dense)."""
    m = _NAME.match(name)
    bad = m is None or (m.group(3) and int(m.group(3)) + int(m.group(4)) > 8)
    if not bad and m.group(8) and (m.group(1) or (m.group(3) and not m.group(5))):
        bad = True  # values only on the fake-quant references (not fp, not the compiled product)
    if bad:
        patterns = "; ".join(f"{k} ({v})" for k, v in PATTERNS.items())
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(DEFAULT)}; or any of the patterns: {patterns}")
    vb = m.group(8)
    keys = _keys_method(name[: m.start(8) - 2] if vb else name, head_dim, G, m.groups()[:7])
    if not vb:
        return keys
    group = int(m.group(9) or VALUE_GROUP)
    c = vc.ValueCodec(int(vb), group, G)
    error = c.fit_error(head_dim)
    if error:
        raise ValueError(f"method {name!r}: values cannot be encoded: {error}")
    return dataclasses.replace(keys, name=name, label=f"{keys.label} + V{vb} c{group}",
                               value_bits=vc.steady_bits_per_element(c, head_dim),
                               quantize_values=values(int(vb), group, G))


def _keys_method(name: str, head_dim: int, G: int, groups: tuple) -> Method:
    fp, kind, rb, ab, deq, axis, b = groups
    if fp:
        return Method("fp", "fp baseline", "fp", 16.0)
    if rb:
        rb, ab = int(rb), int(ab)
        bits = codec.steady_bits_per_element(Codec(rb, ab, G, kind=kind), head_dim)
        if deq:
            return Method(name, f"{kind} {rb}+{ab} dequantized", "reference", bits, polar(rb, ab, G, kind=kind),
                          group_size=G)
        return Method(name, f"{kind} {rb}+{ab} compiled", "product", bits,
                      options={"radius_bits": rb, "angle_bits": ab, "group_size": G, "codec": kind}, group_size=G)
    b = int(b)
    if axis == "ch":
        return Method(name, f"per-channel int{b} g{G}", "reference", b + 2 * PARAM_BITS / G, per_channel(b, G),
                      group_size=G)
    return Method(name, f"per-token int{b} g{head_dim}", "reference", b + 2 * PARAM_BITS / head_dim, per_token(b),
                  group_size=G)


def select(names, head_dim: int = 64, G: int = 128) -> list[Method]:
    """Methods by name, in order; an unknown name raises listing the valid ones."""
    return [method(n, head_dim, G) for n in names]
