"""PolarQuantConfig: every knob of the backend, validated once."""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping
from typing import Any


class PairingMode(str, enum.Enum):
    """How post-RoPE key dims are paired into (x, y). AUTO infers it from the graph."""

    AUTO = "auto"
    HALF = "half"  # x_j = k[j], y_j = k[j + D/2] (HF rotate_half: Llama, Qwen, Mistral, ...)
    INTERLEAVED = "interleaved"  # x_j = k[2j], y_j = k[2j + 1] (GPT-J, Cohere, GLM)


class VerifyMode(str, enum.Enum):
    """Which calls of a compiled graph pqcompile.verify checks; written "off", "first", "every:N" or "shadow:N"."""

    OFF = "off"
    FIRST = "first"  # kernel check on the first call of each compiled graph
    EVERY = "every"  # kernel check on calls 1, N+1, 2N+1, ... ("every:N")
    SHADOW = "shadow"  # drift check against a full-precision shadow cache for N decode steps ("shadow:N")


_VERIFY_ALLOWED = "'off', 'first', 'every:N', 'shadow:N' (N an int >= 1)"


def _parse_verify(value: Any, n: int) -> tuple[VerifyMode, int]:
    """"every:4" -> (EVERY, 4); a VerifyMode keeps `n` (dataclasses.replace passes the parsed pair back)."""
    if isinstance(value, VerifyMode):
        mode = value
    elif isinstance(value, str):
        name, sep, count = value.partition(":")
        try:
            mode = VerifyMode(name)
            if sep:
                n = int(count)
        except ValueError:
            mode = None
        if mode is None or (sep and mode in (VerifyMode.OFF, VerifyMode.FIRST)) or (
                not sep and mode in (VerifyMode.EVERY, VerifyMode.SHADOW)):
            raise ValueError(f"PolarQuantConfig.verify={value!r} is invalid; allowed: {_VERIFY_ALLOWED}") from None
    else:
        raise ValueError(f"PolarQuantConfig.verify={value!r} is invalid; allowed: {_VERIFY_ALLOWED}")
    if mode in (VerifyMode.EVERY, VerifyMode.SHADOW) and not (isinstance(n, int) and n >= 1):
        raise ValueError(f"PolarQuantConfig.verify={value!r} is invalid; allowed: {_VERIFY_ALLOWED}")
    return mode, n


class OnMismatch(str, enum.Enum):
    RAISE = "raise"
    WARN = "warn"
    FALLBACK = "fallback"  # use the original dense graph from then on


class InnerBackend(str, enum.Enum):
    INDUCTOR = "inductor"
    AOT_EAGER = "aot_eager"
    EAGER = "eager"  # run the rewritten GraphModule in Python (debugging)


VALUE_BITS = (2, 4, 8)
KEY_CODECS = ("polar", "polar-circ", "polar-hybrid", "channel")  # key_cells.KINDS (config imports nothing)


def value_options_error(value_bits: Any, value_group: Any, *, dense_ok: bool = True) -> str | None:
    """Why (value_bits, value_group) are invalid, or None when they are valid (value_bits None = values dense,
    allowed when dense_ok).

    The one rule PolarQuantConfig and value_codec.ValueCodec share: value_bits in {2, 4, 8} and value_group a
    power of two >= 2 whose codes fill whole bytes (value_group * value_bits % 8 == 0), so a packed token row
    splits into byte-aligned channel groups. Whether head_dim divides into value_group is known only at compile
    time (value_codec.check_fits).
    """
    if (value_bits is not None or not dense_ok) and (
            not isinstance(value_bits, int) or isinstance(value_bits, bool) or value_bits not in VALUE_BITS):
        allowed = ("None, " if dense_ok else "") + ", ".join(map(str, VALUE_BITS))
        return f"value_bits={value_bits!r} is invalid; allowed: {allowed}"
    if not isinstance(value_group, int) or isinstance(value_group, bool) or value_group < 2 or (
            value_group & (value_group - 1)):
        return f"value_group={value_group!r} is invalid; allowed: a power of two >= 2"
    if value_bits is not None and value_group * value_bits % 8:
        return (f"value_group={value_group} is invalid with value_bits={value_bits}; allowed: a power of two "
                f">= {8 // value_bits} (each group's {value_bits}-bit codes fill whole bytes)")
    return None


def _enum_field(enum_cls: type[enum.Enum], name: str, value: Any) -> enum.Enum:
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"PolarQuantConfig.{name}={value!r} is invalid; allowed: {allowed}") from None


@dataclasses.dataclass(frozen=True)
class PolarQuantConfig:
    """Configuration of the polarquant backend (the `options=` of torch.compile map onto it).

    radius_bits + angle_bits <= 8 bits are stored per key pair; the group parameters (min and scale of
    radius and angle, bf16) are kept per `group_size` tokens; the newest `seq_len % group_size` tokens
    stay in full precision until their group is complete. `value_bits` / `value_group` describe quantized values
    (each value vector quantized per token in groups of `value_group` channels, bf16 min and scale per group,
    the same full-precision tail: value_codec.py); None keeps the values dense (the default until the quality
    eval says otherwise). A site whose values cannot be compressed keeps them dense and says why in its report.
    """

    radius_bits: int = 4
    angle_bits: int = 4
    group_size: int = 128
    pairing: PairingMode = PairingMode.AUTO
    codec: str = "polar-hybrid"  # the key cell: "polar" | "polar-circ" | "polar-hybrid" | "channel" (key_cells.py)
    value_bits: int | None = None  # None: values dense; 2, 4 or 8: per-token quantized values (not used yet)
    value_group: int = 64  # channels of a value vector sharing one (min, scale); must divide head_dim
    verify: VerifyMode = VerifyMode.OFF  # "off" | "first" | "every:N" | "shadow:N" (see verify/)
    verify_n: int = 0  # the N of "every:N" / "shadow:N" (parsed from `verify`)
    on_mismatch: OnMismatch = OnMismatch.RAISE
    # kernel check: a compared tensor passes when max|a - b| <= atol + rtol * max|b| and SQNR >= min_sqnr_db
    atol: float = 2e-2
    rtol: float = 2e-2
    min_sqnr_db: float = 30.0
    report: str | None = None  # folder for graph-diff reports (or env PQCOMPILE_REPORT); see report.py
    backend: InnerBackend = InnerBackend.INDUCTOR

    def __post_init__(self) -> None:
        for name in ("radius_bits", "angle_bits", "group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"PolarQuantConfig.{name}={value!r} must be an int")
        for name in ("radius_bits", "angle_bits"):
            value = getattr(self, name)
            if not 1 <= value <= 7:
                raise ValueError(f"PolarQuantConfig.{name}={value} is out of range; allowed: 1..7")
        if self.radius_bits + self.angle_bits > 8:
            raise ValueError(
                f"PolarQuantConfig.radius_bits + angle_bits = {self.radius_bits + self.angle_bits} "
                "is out of range; allowed: <= 8 (one byte per pair at most)"
            )
        g = self.group_size
        if g < 16 or g & (g - 1):
            raise ValueError(f"PolarQuantConfig.group_size={g} is invalid; allowed: a power of two >= 16")
        if self.codec not in KEY_CODECS:
            raise ValueError(f"PolarQuantConfig.codec={self.codec!r} is invalid; allowed: "
                             f"{', '.join(map(repr, KEY_CODECS))}")
        error = value_options_error(self.value_bits, self.value_group)  # value_group checked even while dense
        if error:
            raise ValueError(f"PolarQuantConfig.{error}")
        if not (isinstance(self.atol, (int, float)) and self.atol > 0):
            raise ValueError(f"PolarQuantConfig.atol={self.atol!r} is invalid; allowed: a float > 0")
        if not (isinstance(self.rtol, (int, float)) and self.rtol >= 0):
            raise ValueError(f"PolarQuantConfig.rtol={self.rtol!r} is invalid; allowed: a float >= 0")
        if not isinstance(self.min_sqnr_db, (int, float)) or isinstance(self.min_sqnr_db, bool):
            raise ValueError(f"PolarQuantConfig.min_sqnr_db={self.min_sqnr_db!r} is invalid; allowed: a float (dB)")
        if self.report is not None and not isinstance(self.report, (str, os.PathLike)):
            raise ValueError(f"PolarQuantConfig.report={self.report!r} is invalid; allowed: None or a folder path")
        mode, n = _parse_verify(self.verify, self.verify_n)
        object.__setattr__(self, "verify", mode)
        object.__setattr__(self, "verify_n", n if mode in (VerifyMode.EVERY, VerifyMode.SHADOW) else 0)
        for name, cls in (("pairing", PairingMode), ("on_mismatch", OnMismatch),
                          ("backend", InnerBackend)):
            object.__setattr__(self, name, _enum_field(cls, name, getattr(self, name)))

    @property
    def code_bits(self) -> int:
        return self.radius_bits + self.angle_bits

    @property
    def verify_spec(self) -> str:
        """`verify` as the user writes it: "off", "first", "every:4", "shadow:8"."""
        return self.verify.value + (f":{self.verify_n}" if self.verify_n else "")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> PolarQuantConfig:
        """Build from torch.compile's `options=` dict; unknown names raise listing the valid ones."""
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown polarquant option(s) {unknown}; valid options: {', '.join(valid)}")
        return cls(**options)
