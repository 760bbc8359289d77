"""Reference key codec in pure PyTorch: the ground truth for kernels, ops and passes.

Layout of a compressed key state of logical shape [B, H, T, D] (P = D/2 pairs, G = group size,
w = radius_bits + angle_bits, NB = ceil(P*w/8) bytes per token):
  codes  uint8 [B, H, (T//G)*G, NB]   pair j of a token at bits [j*w, (j+1)*w) of its NB bytes,
                                      little-endian; a code is c_r | (c_phi << radius_bits)
  params bf16  [B, H, T//G, 4, P]     per group and pair: r_min, r_scale, phi_min, phi_scale (the polar cell;
                                      other codec kinds store their own cell's four: key_cells.py)
  tail   dtype [B, H, T%G + 2, D]     the newest T % G tokens in full precision, then TAIL_PAD zero slots
Every shape is a function of T alone, so a growing cache changes no shape in a data-dependent way, and
the tail's length is never 0 or 1 (sizes dynamo would specialize on, costing two recompiles per group).
Reconstruction: v_hat = v_min + (c + 0.5) * scale (bin midpoint); phi = atan2(y, x) in [-pi, pi].
The scalar quantizer and the packing are quantizer.py's; the kinds of cell (polar, polar-circ, polar-hybrid,
channel) are key_cells.py's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from .config import PairingMode, PolarQuantConfig
from .key_cells import KINDS, POLAR_KINDS, check_kind, decode_cells, encode_cells  # noqa: F401 (KINDS re-exported)
from .quantizer import PARAM_DTYPE, bin_center, bin_index, group_params, pack_codes, round_bf16, unpack_codes  # noqa: F401 (re-exported)

KEY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TAIL_PAD = 2


@dataclasses.dataclass(frozen=True)
class Pairing:
    """Which key dims form each (x, y) pair.

    layout pairs the first `rotary_dim` dims (all of them when None); the remaining pass-through dims
    of a partial-rotary model are paired half-split among themselves. Pairs are ordered rotated first.
    """

    layout: PairingMode = PairingMode.HALF
    rotary_dim: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", PairingMode(self.layout))
        if self.layout is PairingMode.AUTO:
            raise ValueError("Pairing.layout must be concrete ('half' or 'interleaved'), not 'auto'")

    def __str__(self) -> str:
        return self.layout.value + ("" if self.rotary_dim is None else f"@{self.rotary_dim}")

    @classmethod
    def parse(cls, spec: str) -> Pairing:
        layout, _, rot = spec.partition("@")
        return cls(PairingMode(layout), int(rot) if rot else None)

    def indices(self, head_dim: int) -> tuple[list[int], list[int]]:
        """(x_dims, y_dims), each of length head_dim/2."""
        r = head_dim if self.rotary_dim is None else self.rotary_dim
        if head_dim % 2 or r % 2 or not 0 < r <= head_dim or (head_dim - r) % 2:
            raise ValueError(f"pairing {self} does not fit head_dim={head_dim}: dims must split into pairs")
        if self.layout is PairingMode.HALF:
            xs, ys = list(range(r // 2)), list(range(r // 2, r))
        else:
            xs, ys = list(range(0, r, 2)), list(range(1, r, 2))
        rest = head_dim - r
        xs += list(range(r, r + rest // 2))
        ys += list(range(r + rest // 2, head_dim))
        return xs, ys


@dataclasses.dataclass(frozen=True)
class Codec:
    """Static description of a compressed key state (hashable: it is the metadata of PolarKeys)."""

    radius_bits: int = 4  # bits of the first coordinate of a cell (r; x for channel cells)
    angle_bits: int = 4  # bits of the second (phi; y)
    group_size: int = 128
    pairing: Pairing = Pairing()
    kind: str = "polar"  # key_cells.KINDS

    def __post_init__(self) -> None:
        check_kind(self.kind)

    @classmethod
    def from_config(cls, cfg: PolarQuantConfig, pairing: Pairing) -> Codec:
        return cls(cfg.radius_bits, cfg.angle_bits, cfg.group_size, pairing, cfg.codec)

    def __str__(self) -> str:
        kind = "" if self.kind == "polar" else f"{self.kind} "
        return f"{kind}{self.radius_bits}+{self.angle_bits} g{self.group_size} {self.pairing}"

    @property
    def spec(self) -> str:
        """Kind and pairing as one string (the custom ops' `layout` argument): "half@32", "channel:half"."""
        return str(self.pairing) if self.kind == "polar" else f"{self.kind}:{self.pairing}"

    @property
    def code_bits(self) -> int:
        return self.radius_bits + self.angle_bits

    def code_bytes(self, head_dim: int) -> int:
        return math.ceil(head_dim // 2 * self.code_bits / 8)


class PolarData(NamedTuple):
    codes: torch.Tensor  # uint8 [B, H, (T//G)*G, NB]
    params: torch.Tensor  # bf16 [B, H, T//G, 4, P]
    tail: torch.Tensor  # key dtype [B, H, T%G + TAIL_PAD, D]


# --------------------------------------------------------------------------- checks


def check_keys(name: str, k: torch.Tensor, *, finite: bool = True) -> None:
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(k).__name__}")
    if k.dtype not in KEY_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {k.dtype}")
    if k.dim() != 4:
        raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(k.shape)}")
    if k.shape[-1] % 2:
        raise ValueError(f"{name} head_dim must be even to form pairs, got shape {tuple(k.shape)}")
    if finite and k.numel() and not bool(torch.isfinite(k).all()):
        raise ValueError(f"{name} contains inf or NaN (shape {tuple(k.shape)}); PolarQuant cannot encode it")


def to_polar(keys: torch.Tensor, pairing: Pairing) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [..., D] -> radius, angle [..., D/2] in fp32."""
    xs, ys = pairing.indices(keys.shape[-1])
    x, y = keys[..., xs].float(), keys[..., ys].float()
    return torch.hypot(x, y), torch.atan2(y, x)


# --------------------------------------------------------------------------- encode / decode


def empty(codec: Codec, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
          device: torch.device | str = "cpu") -> PolarData:
    P = head_dim // 2
    return PolarData(
        torch.empty(batch, heads, 0, codec.code_bytes(head_dim), dtype=torch.uint8, device=device),
        torch.empty(batch, heads, 0, 4, P, dtype=PARAM_DTYPE, device=device),
        torch.zeros(batch, heads, TAIL_PAD, head_dim, dtype=dtype, device=device),
    )


def encode_groups(keys: torch.Tensor, codec: Codec) -> tuple[torch.Tensor, torch.Tensor]:
    """Complete groups only: keys [B, H, n*G, D] -> codes [B, H, n*G, NB], params [B, H, n, 4, P]."""
    B, H, T, D = keys.shape
    G = codec.group_size
    xs, ys = codec.pairing.indices(D)
    k = keys.view(B, H, T // G, G, D)
    c1, c2, params = encode_cells(k[..., xs].float(), k[..., ys].float(), codec.kind, codec.radius_bits,
                                  codec.angle_bits)  # codes [B, H, n, G, P], params [B, H, n, 4, P]
    code = c1 | (c2 << codec.radius_bits)
    return pack_codes(code, codec.code_bits).view(B, H, T, -1), params


def append(data: PolarData, seq_len: int, new_keys: torch.Tensor, codec: Codec) -> PolarData:
    """State of seq_len tokens + new_keys [B, H, S, D] -> state of seq_len + S tokens (group flush)."""
    check_keys("new_keys", new_keys)
    B, H, _, D = new_keys.shape
    G = codec.group_size
    filled = seq_len % G
    if data.tail.shape != (B, H, filled + TAIL_PAD, D):
        raise ValueError(f"new_keys shape {tuple(new_keys.shape)} does not fit a state of {seq_len} tokens "
                         f"with tail {tuple(data.tail.shape)}")
    pending = torch.cat([data.tail[:, :, :filled], new_keys.to(data.tail.dtype)], dim=2)
    done = (pending.shape[2] // G) * G
    codes, params = data.codes, data.params
    if done:
        c, p = encode_groups(pending[:, :, :done], codec)
        codes, params = torch.cat([codes, c], dim=2), torch.cat([params, p], dim=2)
    tail = torch.cat([pending[:, :, done:], data.tail.new_zeros(B, H, TAIL_PAD, D)], dim=2)
    return PolarData(codes, params, tail)


def encode(keys: torch.Tensor, codec: Codec) -> PolarData:
    """keys [B, H, T, D] -> compressed state (floor(T/G) groups encoded, T % G tokens in the tail)."""
    check_keys("keys", keys)
    B, H, _, D = keys.shape
    codec.pairing.indices(D)
    return append(empty(codec, B, H, D, keys.dtype, keys.device), 0, keys, codec)


def decode_polar(data: PolarData, codec: Codec, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded groups -> reconstructed (radius, angle) [B, H, (T//G)*G, P] in fp32 (polar and polar-circ cells)."""
    B, H, Tc, _ = data.codes.shape
    G, P = codec.group_size, head_dim // 2
    code = unpack_codes(data.codes, codec.code_bits, P).view(B, H, Tc // G, G, P)
    c_r = code & ((1 << codec.radius_bits) - 1)
    c_a = code >> codec.radius_bits
    p = data.params.float().unsqueeze(3)
    r = bin_center(c_r, p[..., 0, :], p[..., 1, :]).view(B, H, Tc, P)
    phi = bin_center(c_a, p[..., 2, :], p[..., 3, :]).view(B, H, Tc, P)
    return r, phi


def decode_xy(data: PolarData, codec: Codec, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded groups -> reconstructed pair coordinates (x, y) [B, H, (T//G)*G, P] in fp32, any codec kind."""
    B, H, Tc, _ = data.codes.shape
    G, P = codec.group_size, head_dim // 2
    code = unpack_codes(data.codes, codec.code_bits, P).view(B, H, Tc // G, G, P)
    x, y = decode_cells(code & ((1 << codec.radius_bits) - 1), code >> codec.radius_bits, data.params, codec.kind)
    return x.reshape(B, H, Tc, P), y.reshape(B, H, Tc, P)


def decode(data: PolarData, seq_len: int, codec: Codec) -> torch.Tensor:
    """Compressed state -> dense keys [B, H, seq_len, D] in the tail's dtype."""
    B, H, _, D = data.tail.shape
    x, y = decode_xy(data, codec, D)
    xs, ys = codec.pairing.indices(D)
    dense = torch.empty(B, H, x.shape[2], D, dtype=torch.float32, device=x.device)
    dense[..., xs] = x
    dense[..., ys] = y
    return torch.cat([dense.to(data.tail.dtype), data.tail[:, :, : seq_len - x.shape[2]]], dim=2)


# --------------------------------------------------------------------------- attention


def polar_scores(q: torch.Tensor, data: PolarData, codec: Codec) -> torch.Tensor:
    """q [B, Hq, S, D] -> fp32 q.k scores [B, Hq, S, (T//G)*G] over the encoded groups.

    score = sum_j r_j (q_xj cos phi_j + q_yj sin phi_j). phi takes 2^a values per (group, pair), so cos and sin
    come from a per-group angle table [P, 2^a] indexed by the angle codes (no trig per token); then one
    batched matmul over the 2P components: q_x . (r cos phi) + q_y . (r sin phi). GQA: the R query heads of
    a kv-head read the same codes. Kinds whose cells are not all polar score their decoded (x, y) instead.
    """
    B, Hq, S, D = q.shape
    H, Tc = data.codes.shape[1], data.codes.shape[2]
    G, P, A = codec.group_size, D // 2, 1 << codec.angle_bits
    n, R = Tc // G, Hq // H
    xs, ys = codec.pairing.indices(D)
    qq = torch.cat([q[..., xs], q[..., ys]], dim=-1).float().reshape(B, H, R * S, 2 * P)
    if codec.kind not in POLAR_KINDS:
        k = torch.cat(decode_xy(data, codec, D), dim=-1)
        return (qq @ k.transpose(-1, -2)).view(B, Hq, S, Tc)
    p = data.params.float()  # [B, H, n, 4, P]
    centers = torch.arange(A, device=q.device, dtype=torch.float32) + 0.5
    phi = p[:, :, :, 2, :, None] + centers * p[:, :, :, 3, :, None]  # angle table [B, H, n, P, A]
    code = unpack_codes(data.codes, codec.code_bits, P).view(B, H, n, G, P)
    c_a = (code >> codec.radius_bits).long().transpose(-1, -2)  # [B, H, n, P, G]
    r = bin_center(code & ((1 << codec.radius_bits) - 1), p[:, :, :, None, 0], p[:, :, :, None, 1])  # [B,H,n,G,P]
    cos = torch.cos(phi).gather(-1, c_a).transpose(-1, -2)  # [B, H, n, G, P]
    sin = torch.sin(phi).gather(-1, c_a).transpose(-1, -2)
    k = torch.cat([r * cos, r * sin], dim=-1).view(B, H, Tc, 2 * P)
    return (qq @ k.transpose(-1, -2)).view(B, Hq, S, Tc)


def attention(q: torch.Tensor, data: PolarData, seq_len: int, v: torch.Tensor, codec: Codec, *,
              mask: torch.Tensor | None = None, scale: float | None = None, softcap: float | None = None,
              is_causal: bool = False) -> torch.Tensor:
    """Attention of q [B, Hq, S, D] over the compressed keys and dense v [B, Hkv|Hq, T, Dv].

    mask: bool (True = attend) or additive float, broadcastable to [B, Hq, S, T]. is_causal aligns the
    S queries with the last S keys (decode / chunked prefill). Returns [B, Hq, S, Dv] in q's dtype; a query
    whose keys are all masked gets zeros (torch SDPA's behaviour), NaN inputs still give NaN.
    """
    H = data.tail.shape[1]
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hq, S, D], got shape {tuple(q.shape)}")
    B, Hq, S, D = q.shape
    if data.tail.shape[0] != B or data.tail.shape[-1] != D or Hq % H:
        raise ValueError(f"q shape {tuple(q.shape)} does not fit keys [B={data.tail.shape[0]}, H={H}, "
                         f"T={seq_len}, D={data.tail.shape[-1]}]")
    if v.dim() != 4 or v.shape[0] != B or v.shape[2] != seq_len or v.shape[1] not in (H, Hq):
        raise ValueError(f"v shape {tuple(v.shape)} does not fit keys [B={B}, H={H}, T={seq_len}]")
    L = seq_len - data.codes.shape[2]
    R = Hq // H
    tail = data.tail[:, :, :L].float().repeat_interleave(R, dim=1)
    s = torch.cat([polar_scores(q, data, codec), q.float() @ tail.transpose(-1, -2)], dim=-1)
    s = s * (D ** -0.5 if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if is_causal and S > 1:
        keep = torch.ones(S, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - S)
        s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    vv = v.float() if v.shape[1] == Hq else v.float().repeat_interleave(R, dim=1)
    # a query that may see no key (a padding row) gets 0, as SDPA's safe softmax gives, not NaN
    p = torch.softmax(s, dim=-1).masked_fill(s.amax(dim=-1, keepdim=True) == float("-inf"), 0.0)
    return (p @ vv).to(q.dtype)


# --------------------------------------------------------------------------- accounting


def state_bits(codec: Codec, seq_len: int, head_dim: int, tail_bits: int = 16, capacity: int | None = None) -> int:
    """Exact bits held per (batch, kv-head) for seq_len tokens: codes + group params + tail buffer. With
    `capacity`, a cache's layout instead: codes and params with room for `capacity` tokens and a ring of G rows."""
    G = codec.group_size
    n = seq_len // G if capacity is None else capacity // G
    tail_rows = seq_len % G + TAIL_PAD if capacity is None else G
    return (n * G * codec.code_bytes(head_dim) * 8
            + n * 4 * (head_dim // 2) * torch.finfo(PARAM_DTYPE).bits
            + tail_rows * head_dim * tail_bits)


def bits_per_element(codec: Codec, seq_len: int, head_dim: int, tail_bits: int = 16) -> float:
    return state_bits(codec, seq_len, head_dim, tail_bits) / (seq_len * head_dim)


def steady_bits_per_element(codec: Codec, head_dim: int) -> float:
    """Bits per key element as seq_len grows (the tail amortized away): 4.25 for 4+4, g128, bf16 params."""
    P = head_dim // 2
    return (codec.code_bytes(head_dim) * 8 + 4 * P * 16 / codec.group_size) / head_dim


def nbytes(data: PolarData) -> int:
    return sum(t.numel() * t.element_size() for t in data)
