"""Sample inputs for every custom op in the `pqcompile` namespace (tests/reliability/test_opcheck.py).

A new op needs an entry in SAMPLES: a function `case -> [(args, kwargs), ...]`; test_opcheck fails with
"add samples for op X" until it has one. Cases cover, as a Latin square (each pair of dtype, key bits and
length appears once): fp32 / bf16 / fp16, key bits 4+4 / 3+3 / 2+2, lengths T < G, T = G, T = 2G + 1, value
bits 2 / 4 / 8, full, interleaved and partial-rotary pairings, MHA, GQA and MQA.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from pqcompile import codec as ref
from pqcompile import ops, value_ops
from pqcompile import value_codec as vref

G = 16  # group size of every case: small, so T = 2G + 1 is cheap
D = 16  # key head dim; pairings below include partial rotary (rotary_dim 4 and 8)
DV = 16  # value head dim
VGROUP = 8  # value channel group (bits * 8 is a multiple of 8 for 2, 4 and 8 bits)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KEY_BITS = ((4, 4), (3, 3), (2, 2))
VALUE_BITS = (2, 4, 8)
PAIRINGS = ("half", "interleaved@8", "half@4", "interleaved")
HEADS = ((2, 2), (4, 2), (4, 1))  # (Hq, Hkv): MHA, GQA 2, MQA


class Case(NamedTuple):
    dtype: torch.dtype
    bits: tuple[int, int]
    T: int
    pairing: str
    hq: int
    hkv: int
    vbits: int
    seed: int

    @property
    def codec(self) -> ref.Codec:
        return ref.Codec(*self.bits, G, ref.Pairing.parse(self.pairing))

    @property
    def vcodec(self) -> vref.ValueCodec:
        return vref.ValueCodec(self.vbits, VGROUP, G)

    @property
    def key_args(self) -> tuple:
        return ops.codec_args(self.codec)

    @property
    def value_args(self) -> tuple:
        return value_ops.vcodec_args(self.vcodec)

    def __str__(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        return f"{name}-k{self.bits[0]}+{self.bits[1]}-T{self.T}-{self.pairing}-h{self.hq}/{self.hkv}-v{self.vbits}"


def cases() -> list[Case]:
    """9 cases: every (dtype, length) pair once, key and value bits in a Latin square over them."""
    out = []
    for i, ((di, dtype), (ti, T)) in enumerate(itertools.product(enumerate(DTYPES), enumerate((G - 3, G, 2 * G + 1)))):
        hq, hkv = HEADS[(di + 2 * ti) % 3]
        out.append(Case(dtype, KEY_BITS[(di + ti) % 3], T, PAIRINGS[i % len(PAIRINGS)], hq, hkv,
                        VALUE_BITS[(di + 2 * ti + 1) % 3], seed=i))
    return out


# --------------------------------------------------------------------------- inputs


def _randn(*shape, dtype, seed: int) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)


def _dynamic(B: int, H: int, cap: int, code_bytes: int, param_shape: tuple, dim: int, dtype) -> list[torch.Tensor]:
    return [torch.zeros(B, H, cap, code_bytes, dtype=torch.uint8), torch.zeros(B, H, *param_shape,
            dtype=torch.bfloat16), torch.zeros(B, H, G, dim, dtype=dtype)]


def key_state(c: Case, T: int | None = None, B: int = 2, room: int = 0) -> list[torch.Tensor]:
    """[codes, params, tail] of a DynamicCache key state holding T random keys, as the ops receive them
    (ops.append_'s contract: codes [B, H, cap, NB], params [B, H, cap/G*4, P], tail the ring [B, H, G, D]),
    with room for `room` more tokens; filled through pqcompile::append_ itself."""
    T = c.T if T is None else T
    cap = (T + room) // G * G + G
    bufs = _dynamic(B, c.hkv, cap, c.codec.code_bytes(D), (cap // G * 4, D // 2), D, c.dtype)
    torch.ops.pqcompile.append_(*bufs, _randn(B, c.hkv, T, D, dtype=c.dtype, seed=c.seed), 0, *c.key_args)
    return bufs


def value_state(c: Case, T: int | None = None, B: int = 2, room: int = 0) -> list[torch.Tensor]:
    T = c.T if T is None else T
    cap, vc = (T + room) // G * G + G, c.vcodec
    bufs = _dynamic(B, c.hkv, cap, vc.code_bytes(DV), (cap, vc.num_groups(DV) * 2), DV, c.dtype)
    torch.ops.pqcompile.append_values_(*bufs, _randn(B, c.hkv, T, DV, dtype=c.dtype, seed=c.seed + 100), 0,
                                       *c.value_args)
    return bufs


def _cap(c: Case) -> int:
    return 3 * G  # Tcap: room for T = 2G + 1 plus a write of up to G - 1 tokens


def static_keys(c: Case, B: int = 2) -> list[torch.Tensor]:
    """[codes, params, ring, length] of a static key state holding the case's T tokens."""
    cap = _cap(c)
    bufs = [torch.zeros(B, c.hkv, cap, c.codec.code_bytes(D), dtype=torch.uint8),
            torch.zeros(B, c.hkv, cap // G * 4, D // 2, dtype=torch.bfloat16),
            torch.zeros(B, c.hkv, G, D, dtype=c.dtype), torch.zeros(1, dtype=torch.int64)]
    torch.ops.pqcompile.static_write_(*bufs, _randn(B, c.hkv, c.T, D, dtype=c.dtype, seed=c.seed),
                                      torch.arange(c.T), *c.key_args)
    return bufs


def static_values(c: Case, B: int = 2) -> list[torch.Tensor]:
    cap, vc = _cap(c), c.vcodec
    bufs = [torch.zeros(B, c.hkv, cap, vc.code_bytes(DV), dtype=torch.uint8),
            torch.zeros(B, c.hkv, cap, vc.num_groups(DV) * 2, dtype=torch.bfloat16),
            torch.zeros(B, c.hkv, G, DV, dtype=c.dtype), torch.zeros(1, dtype=torch.int64)]
    torch.ops.pqcompile.static_write_values_(*bufs, _randn(B, c.hkv, c.T, DV, dtype=c.dtype, seed=c.seed + 100),
                                             torch.arange(c.T), *c.value_args)
    return bufs


def _q(c: Case, S: int, B: int = 2) -> torch.Tensor:
    return _randn(B, c.hq, S, D, dtype=c.dtype, seed=c.seed + 200)


def _masks(c: Case, S: int, T: int, B: int = 2) -> list[torch.Tensor | None]:
    """No mask, a bool mask (one key hidden per row) and an additive one, broadcastable to [B, Hq, S, T]."""
    keep = torch.ones(B, 1, S, T, dtype=torch.bool)
    keep[..., 0] = False
    additive = torch.zeros(B, 1, S, T, dtype=c.dtype)
    additive[..., -1] = -5.0
    return [None, keep, additive]


def _attention_variants(c: Case):
    """(S, mask, softcap, is_causal) per sample: one query, a chunk with is_causal and a mask, softcap."""
    T = c.T
    none, _keep, additive = _masks(c, 1, T)
    chunk = _masks(c, 3, T)
    return [(1, none, 0.0, False), (1, additive, 20.0, False), (3, chunk[1], 0.0, True)]


# --------------------------------------------------------------------------- per op


def _append(c: Case):
    S = 1 if c.seed % 2 else G + 2  # one token, or a chunk that completes a group
    return [((*key_state(c, room=S), _randn(2, c.hkv, S, D, dtype=c.dtype, seed=c.seed + 1), c.T, *c.key_args),
             {})]


def _decode(c: Case):
    return [((*key_state(c), c.T, *c.key_args), {})]


def _attention(c: Case):
    v = _randn(2, c.hkv, c.T, DV, dtype=c.dtype, seed=c.seed + 3)
    return [((_q(c, S), *key_state(c), v, c.T, mask, 0.25, cap, causal, *c.key_args), {})
            for S, mask, cap, causal in _attention_variants(c)]


def _static_write(c: Case):
    """A write at the length, and a rewind into an encoded group (HF crop) when one exists."""
    S = 1 if c.seed % 2 else G - 1
    new = _randn(2, c.hkv, S, D, dtype=c.dtype, seed=c.seed + 4)
    out = [((*static_keys(c), new, torch.arange(c.T, c.T + S), *c.key_args), {})]
    if c.T >= G:
        out.append(((*static_keys(c), new, torch.arange(G - 2, G - 2 + S), *c.key_args), {}))
    return out


def _static_attention(c: Case):
    cap = _cap(c)
    v = _randn(2, c.hkv, cap, DV, dtype=c.dtype, seed=c.seed + 5)
    out = []
    for S, _mask, _cap_, causal in _attention_variants(c):
        mask = None if S == 1 and not causal else _masks(c, S, cap)[1]
        out.append(((_q(c, S), *static_keys(c), v, mask, 0.25, causal, *c.key_args), {}))
    return out


def _static_decode(c: Case):
    return [((*static_keys(c), *c.key_args, max_len), {}) for max_len in (_cap(c), max(c.T - 1, 1))]


def _append_values(c: Case):
    S = 1 if c.seed % 2 else G + 2
    return [((*value_state(c, room=S), _randn(2, c.hkv, S, DV, dtype=c.dtype, seed=c.seed + 6), c.T,
              *c.value_args), {})]


def _decode_values(c: Case):
    return [((*value_state(c), c.T, *c.value_args), {})]


def _attention_qv(c: Case):
    return [((_q(c, S), *key_state(c), *value_state(c), c.T, mask, 0.25, cap, causal, *c.key_args, *c.value_args),
             {}) for S, mask, cap, causal in _attention_variants(c)]


def _static_write_values(c: Case):
    S = 1 if c.seed % 2 else G - 1
    new = _randn(2, c.hkv, S, DV, dtype=c.dtype, seed=c.seed + 7)
    out = [((*static_values(c), new, torch.arange(c.T, c.T + S), *c.value_args), {})]
    if c.T >= G:
        out.append(((*static_values(c), new, torch.arange(G - 2, G - 2 + S), *c.value_args), {}))
    return out


def _static_attention_qv(c: Case):
    cap = _cap(c)
    out = []
    for S, _mask, _cap_, causal in _attention_variants(c):
        mask = None if S == 1 and not causal else _masks(c, S, cap)[1]
        out.append(((_q(c, S), *static_keys(c), *static_values(c)[:3], mask, 0.25, causal, *c.key_args,
                     *c.value_args), {}))
    return out


def _static_decode_values(c: Case):
    return [((*static_values(c), *c.value_args, max_len), {}) for max_len in (_cap(c), max(c.T - 1, 1))]


def _write_rows(c: Case):
    """DenseValues' buffer [B, H, capacity, Dv]: rows written after the first T (one row, or a chunk)."""
    S = 1 if c.seed % 2 else G + 2
    buf = _randn(2, c.hkv, c.T + S + G, DV, dtype=c.dtype, seed=c.seed + 8)
    return [((buf, _randn(2, c.hkv, S, DV, dtype=c.dtype, seed=c.seed + 9), c.T), {})]


SAMPLES = {
    "pqcompile::write_rows_": _write_rows,
    "pqcompile::append_": _append,
    "pqcompile::decode": _decode,
    "pqcompile::attention": _attention,
    "pqcompile::static_write_": _static_write,
    "pqcompile::static_attention": _static_attention,
    "pqcompile::static_decode": _static_decode,
    "pqcompile::append_values_": _append_values,
    "pqcompile::decode_values": _decode_values,
    "pqcompile::attention_qv": _attention_qv,
    "pqcompile::static_write_values_": _static_write_values,
    "pqcompile::static_attention_qv": _static_attention_qv,
    "pqcompile::static_decode_values": _static_decode_values,
}


def registered_ops() -> list[str]:
    """Every op in the pqcompile namespace the dispatcher knows (importing pqcompile registers them)."""
    import pqcompile.static_cache  # noqa: F401  (imports every module that defines ops)

    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pqcompile::"))


def op(name: str):
    """The OpOverload of 'pqcompile::x'."""
    return getattr(torch.ops.pqcompile, name.split("::", 1)[1]).default


def to(args, device: str):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
