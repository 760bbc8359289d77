"""Reference value codec in pure PyTorch: KIVI-style per-token asymmetric quantization, the ground truth for
quantized values as codec.py is for keys.

Each value vector (one token of one kv-head) is cut along head_dim into Dv/cg groups of cg = channel_group
channels (the option value_group, 64 by default as in HF's QuantizedCache); each group keeps its own bf16
(min, scale) and every channel a `bits`-bit code, bits in {2, 4, 8}.

Layout of a compressed value state of logical shape [B, H, T, Dv] (G = group_size tokens, NB = Dv*bits/8):
  codes  uint8 [B, H, (T//G)*G, NB]          channel c of a token at bits [c*bits, (c+1)*bits) of its NB bytes,
                                             little-endian like the keys (4-bit: channel 2i in the low nibble of
                                             byte i); channel group j owns bytes [j*cg*bits/8, (j+1)*cg*bits/8)
  params bf16  [B, H, (T//G)*G, Dv/cg, 2]    per token and channel group: (min, scale), the last dim unit-stride,
                                             so a decode kernel loads codes [N, NB] and params [N, Dv/cg, 2] per
                                             BLOCK_N tokens, both contiguous rows
  tail   dtype [B, H, T%G + TAIL_PAD, Dv]    the newest T % G tokens in full precision, then TAIL_PAD zero slots
The quantization is per token, but tokens are encoded when their group of G completes, exactly when the keys'
are: keys and values then share seq_len, tail length and flush step, and every shape is a function of T alone
(the tail's length is never 0 or 1, sizes dynamo would specialize on).

Quantizer: the keys' own (codec.group_params / bin_index / bin_center): min rounded down to bf16, scale =
(max - min) / 2^bits rounded up, code = clamp(floor((v - min) / scale), 0, 2^bits - 1), reconstruction at the
bin midpoint v_hat = min + (c + 0.5) * scale. So every v lies in [min, min + 2^bits * scale] and
|v - v_hat| <= scale / 2 (plus the fp32 rounding of that arithmetic), with the stored
scale <= (1 + 2^-7)(1 + 2^-24)(max - min + 2^-7 |min|) / 2^bits (min moves down by under one bf16 ulp, the
fp32 range rounds, scale moves up by under one ulp): bf16 rounding costs about 1% of a bin.
Midpoint rather than the integer grid of KIVI / HF QuantizedCache (scale = range / (2^bits - 1), round to
nearest, endpoints exact): one quantizer and one dequant expression for keys and values in every path
(reference, kernels), and a smaller worst case, range / 2^(bits+1) against range / (2 (2^bits - 1)): 1/32 vs
1/30 of the range at 4 bits, 1/8 vs 1/6 at 2 bits. The cost: a group's extreme values are not reproduced
exactly (the grid's are), and the stored codes are not interchangeable with HF's. A group of equal values
stores scale 0 and decodes exactly when the value is a bf16 number (else to within its bf16 rounding gap).

Size: bits + 32 / cg bits per element once the tail amortizes away (steady_bits_per_element): 4.5 for
4-bit / cg 64, 2.5 for 2-bit, 8.5 for 8-bit.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from . import codec as C
from .config import PolarQuantConfig, value_options_error

VALUE_DTYPES = C.KEY_DTYPES


@dataclasses.dataclass(frozen=True)
class ValueCodec:
    """Static description of a compressed value state (hashable, like codec.Codec)."""

    bits: int = 4
    channel_group: int = 64
    group_size: int = 128

    def __post_init__(self) -> None:
        error = value_options_error(self.bits, self.channel_group, dense_ok=False)
        if error:
            raise ValueError(f"ValueCodec: {error}")
        G = self.group_size
        if not isinstance(G, int) or isinstance(G, bool) or G < 1:
            raise ValueError(f"ValueCodec: group_size={G!r} is invalid; allowed: an int >= 1")

    @classmethod
    def from_config(cls, cfg: PolarQuantConfig) -> ValueCodec | None:
        """The codec of cfg's values, None when they stay dense (value_bits None)."""
        if cfg.value_bits is None:
            return None
        return cls(cfg.value_bits, cfg.value_group, cfg.group_size)

    def __str__(self) -> str:
        return f"v{self.bits} c{self.channel_group} g{self.group_size}"

    def fit_error(self, head_dim: int) -> str | None:
        """Why values of this head_dim cannot be encoded, or None when they can."""
        if head_dim < 1 or head_dim % self.channel_group:
            return f"head_dim={head_dim} is not divisible by value_group={self.channel_group}"
        return None

    def num_groups(self, head_dim: int) -> int:
        return head_dim // self.channel_group

    def code_bytes(self, head_dim: int) -> int:
        """NB: bytes of packed codes per token (exact: a channel group's codes fill whole bytes)."""
        error = self.fit_error(head_dim)
        if error:
            raise ValueError(f"ValueCodec {self}: {error}")
        return head_dim * self.bits // 8


class ValueData(NamedTuple):
    codes: torch.Tensor  # uint8 [B, H, (T//G)*G, NB]
    params: torch.Tensor  # bf16 [B, H, (T//G)*G, Dv/cg, 2]: (min, scale)
    tail: torch.Tensor  # value dtype [B, H, T%G + TAIL_PAD, Dv]


def check_fits(cfg: PolarQuantConfig, head_dim: int) -> str | None:
    """None when cfg's values can be kept at an attention site of this head_dim (or cfg keeps them dense);
    else the reason a pass declines the site with (head_dim is known only at compile time)."""
    codec = ValueCodec.from_config(cfg)
    return None if codec is None else codec.fit_error(head_dim)


# --------------------------------------------------------------------------- checks


def check_values(name: str, v: torch.Tensor, codec: ValueCodec, *, finite: bool = True) -> None:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dtype not in VALUE_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {v.dtype} (shape {tuple(v.shape)})")
    if v.dim() != 4:
        raise ValueError(f"{name} must be [B, H, T, Dv], got shape {tuple(v.shape)}")
    error = codec.fit_error(v.shape[-1])
    if error:
        raise ValueError(f"{name} shape {tuple(v.shape)}: {error}")
    if finite and v.numel() and not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} contains inf or NaN (shape {tuple(v.shape)}); the value codec cannot encode it")


def _check_state(data: ValueData, seq_len: int, codec: ValueCodec) -> None:
    """The state's shapes are those of seq_len tokens (module docstring); a tail of G rows is a cache's ring,
    read up to its first seq_len % G rows."""
    B, H, L, Dv = data.tail.shape
    G, Tc = codec.group_size, seq_len // codec.group_size * codec.group_size
    if (data.codes.shape != (B, H, Tc, codec.code_bytes(Dv)) or L not in (seq_len - Tc + C.TAIL_PAD, G)
            or data.params.shape != (B, H, Tc, Dv // codec.channel_group, 2)):
        raise ValueError(f"value state codes {tuple(data.codes.shape)}, params {tuple(data.params.shape)}, "
                         f"tail {tuple(data.tail.shape)} is not a state of seq_len={seq_len} tokens "
                         f"under ValueCodec {codec} (G={G})")


# --------------------------------------------------------------------------- encode / decode


def empty(codec: ValueCodec, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
          device: torch.device | str = "cpu") -> ValueData:
    if dtype not in VALUE_DTYPES:
        raise TypeError(f"values must be float16, bfloat16 or float32, got {dtype}")
    nb = codec.code_bytes(head_dim)
    return ValueData(
        torch.empty(batch, heads, 0, nb, dtype=torch.uint8, device=device),
        torch.empty(batch, heads, 0, codec.num_groups(head_dim), 2, dtype=C.PARAM_DTYPE, device=device),
        torch.zeros(batch, heads, C.TAIL_PAD, head_dim, dtype=dtype, device=device),
    )


def encode_groups(values: torch.Tensor, codec: ValueCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """values [B, H, N, Dv] (N = n*G: complete groups; the quantizer itself is per token) ->
    codes uint8 [B, H, N, NB], params bf16 [B, H, N, Dv/cg, 2]."""
    Dv = values.shape[-1]
    codec.code_bytes(Dv)
    v = values.float().unflatten(-1, (codec.num_groups(Dv), codec.channel_group))  # [B, H, N, Dv/cg, cg]
    vmin, scale = C.group_params(v.transpose(-1, -2), codec.bits)  # reduce over the cg channels: [B, H, N, Dv/cg]
    params = torch.stack([vmin, scale], dim=-1)  # [B, H, N, Dv/cg, 2]
    p = params.float().unsqueeze(-2)  # [B, H, N, Dv/cg, 1, 2]
    code = C.bin_index(v, p[..., 0], p[..., 1], codec.bits).flatten(-2)  # [B, H, N, Dv]
    return C.pack_codes(code, codec.bits), params


def append(data: ValueData, seq_len: int, new_values: torch.Tensor, codec: ValueCodec) -> ValueData:
    """State of seq_len tokens + new_values [B, H, S, Dv] -> state of seq_len + S tokens (group flush: the
    same semantics as codec.append, so keys and values flush on the same step)."""
    check_values("new_values", new_values, codec)
    B, H, _, Dv = new_values.shape
    G = codec.group_size
    filled = seq_len % G
    if data.tail.shape != (B, H, filled + C.TAIL_PAD, Dv):
        raise ValueError(f"new_values shape {tuple(new_values.shape)} does not fit a state of {seq_len} tokens "
                         f"with tail {tuple(data.tail.shape)}")
    pending = torch.cat([data.tail[:, :, :filled], new_values.to(data.tail.dtype)], dim=2)
    done = (pending.shape[2] // G) * G
    codes, params = data.codes, data.params
    if done:
        c, p = encode_groups(pending[:, :, :done], codec)
        codes, params = torch.cat([codes, c], dim=2), torch.cat([params, p], dim=2)
    tail = torch.cat([pending[:, :, done:], data.tail.new_zeros(B, H, C.TAIL_PAD, Dv)], dim=2)
    return ValueData(codes, params, tail)


def encode(values: torch.Tensor, codec: ValueCodec) -> ValueData:
    """values [B, H, T, Dv] -> compressed state (floor(T/G)*G tokens encoded, T % G in the tail)."""
    check_values("values", values, codec)
    B, H, _, Dv = values.shape
    return append(empty(codec, B, H, Dv, values.dtype, values.device), 0, values, codec)


def dequantize(data: ValueData, codec: ValueCodec) -> torch.Tensor:
    """Encoded tokens -> reconstructed values [B, H, (T//G)*G, Dv] in fp32 (bin midpoints)."""
    Dv = data.tail.shape[-1]
    ng = codec.num_groups(Dv)
    code = C.unpack_codes(data.codes, codec.bits, Dv).unflatten(-1, (ng, codec.channel_group))
    p = data.params.float().unsqueeze(-2)  # [B, H, Tc, Dv/cg, 1, 2]
    return C.bin_center(code, p[..., 0], p[..., 1]).flatten(-2)


def decode(data: ValueData, seq_len: int, codec: ValueCodec, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Compressed state -> dense values [B, H, seq_len, Dv] in `dtype` (default: the tail's dtype).

    The reconstruction is clamped to dtype's finite range: a bin midpoint may lie up to half a bin beyond the
    largest fp16 number (8-bit values near +-65504); clamping onto a range that holds v only brings v_hat closer.
    """
    _check_state(data, seq_len, codec)
    dtype = data.tail.dtype if dtype is None else dtype
    Tc = data.codes.shape[2]
    fi = torch.finfo(dtype)
    dense = dequantize(data, codec).clamp_(fi.min, fi.max).to(dtype)
    return torch.cat([dense, data.tail[:, :, : seq_len - Tc].to(dtype)], dim=2)


# --------------------------------------------------------------------------- attention


def attention(q: torch.Tensor, key_data: C.PolarData, seq_len: int, value_data: ValueData, key_codec: C.Codec,
              value_codec: ValueCodec, *, mask: torch.Tensor | None = None, scale: float | None = None,
              softcap: float | None = None, is_causal: bool = False) -> torch.Tensor:
    """codec.attention of q [B, Hq, S, D] over compressed keys and compressed values [B, Hkv, T, Dv]: the
    values dequantized in fp32 (the exact numbers their codes stand for). Returns [B, Hq, S, Dv] in q's dtype."""
    v = decode(value_data, seq_len, value_codec, dtype=torch.float32)
    return C.attention(q, key_data, seq_len, v, key_codec, mask=mask, scale=scale, softcap=softcap,
                       is_causal=is_causal)


# --------------------------------------------------------------------------- accounting


def state_bits(codec: ValueCodec, seq_len: int, head_dim: int, tail_bits: int = 16, capacity: int | None = None
               ) -> int:
    """Exact bits held per (batch, kv-head) for seq_len tokens: codes + per-token params + tail buffer. With
    `capacity`, a cache's layout instead: codes and params with room for `capacity` tokens and a ring of G rows."""
    Tc = seq_len // codec.group_size * codec.group_size
    param_bits = codec.num_groups(head_dim) * 2 * torch.finfo(C.PARAM_DTYPE).bits
    rows, tail_rows = (Tc, seq_len - Tc + C.TAIL_PAD) if capacity is None else (capacity, codec.group_size)
    return rows * (codec.code_bytes(head_dim) * 8 + param_bits) + tail_rows * head_dim * tail_bits


def bits_per_element(codec: ValueCodec, seq_len: int, head_dim: int, tail_bits: int = 16) -> float:
    return state_bits(codec, seq_len, head_dim, tail_bits) / (seq_len * head_dim)


def steady_bits_per_element(codec: ValueCodec, head_dim: int) -> float:
    """Bits per value element as seq_len grows (the tail amortized away): bits + 32 / channel_group."""
    param_bits = codec.num_groups(head_dim) * 2 * torch.finfo(C.PARAM_DTYPE).bits
    return (codec.code_bytes(head_dim) * 8 + param_bits) / head_dim


def nbytes(data: ValueData) -> int:
    return sum(t.numel() * t.element_size() for t in data)
