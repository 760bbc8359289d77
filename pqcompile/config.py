"""PolarQuantConfig: every knob of the backend, validated once."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping


class PairingMode(str, enum.Enum):
    """How post-RoPE key dims are paired into (x, y). AUTO infers it from the graph."""

    AUTO = "auto"
    HALF = "half"  # x_j = k[j], y_j = k[j + D/2] (HF rotate_half: Llama, Qwen, Mistral, ...)
    INTERLEAVED = "interleaved"  # x_j = k[2j], y_j = k[2j + 1] (GPT-J, Cohere, GLM)


class VerifyMode(str, enum.Enum):
    OFF = "off"
    FIRST = "first"  # check the first call of each compiled graph


class OnMismatch(str, enum.Enum):
    RAISE = "raise"
    WARN = "warn"
    FALLBACK = "fallback"  # use the original dense graph from then on


class InnerBackend(str, enum.Enum):
    INDUCTOR = "inductor"
    AOT_EAGER = "aot_eager"
    EAGER = "eager"  # run the rewritten GraphModule in Python (debugging)


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
    stay in full precision until their group is complete.
    """

    radius_bits: int = 4
    angle_bits: int = 4
    group_size: int = 128
    pairing: PairingMode = PairingMode.AUTO
    value_bits: int | None = None  # reserved: per-token quantized values
    verify: VerifyMode = VerifyMode.OFF
    on_mismatch: OnMismatch = OnMismatch.RAISE
    atol: float = 2e-2  # kernel check: max-abs error allowed between polar op and dense SDPA on decoded keys
    report: str | None = None  # folder for graph-diff reports (or env PQCOMPILE_REPORT)
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
        if self.value_bits not in (None, 2, 4):
            raise ValueError(f"PolarQuantConfig.value_bits={self.value_bits!r} is invalid; allowed: None, 2, 4")
        if self.value_bits is not None:
            raise ValueError("PolarQuantConfig.value_bits is reserved; quantized values are not implemented yet")
        if not (isinstance(self.atol, (int, float)) and self.atol > 0):
            raise ValueError(f"PolarQuantConfig.atol={self.atol!r} is invalid; allowed: a float > 0")
        for name, cls in (("pairing", PairingMode), ("verify", VerifyMode), ("on_mismatch", OnMismatch),
                          ("backend", InnerBackend)):
            object.__setattr__(self, name, _enum_field(cls, name, getattr(self, name)))

    @property
    def code_bits(self) -> int:
        return self.radius_bits + self.angle_bits

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "PolarQuantConfig":
        """Build from torch.compile's `options=` dict; unknown names raise listing the valid ones."""
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown polarquant option(s) {unknown}; valid options: {', '.join(valid)}")
        return cls(**options)
