"""PolarQuantConfig: valid values pass, every invalid value raises ValueError naming field, value and range."""

import dataclasses
import re

import pytest

from pqcompile.config import InnerBackend, OnMismatch, PairingMode, PolarQuantConfig, VerifyMode


def test_defaults_are_the_reference_configuration():
    cfg = PolarQuantConfig()
    assert (cfg.radius_bits, cfg.angle_bits, cfg.group_size) == (4, 4, 128)
    assert cfg.code_bits == 8
    assert cfg.pairing is PairingMode.AUTO
    assert cfg.value_bits is None  # values dense unless asked for
    assert cfg.value_group == 64


@pytest.mark.parametrize("r, a", [(1, 1), (2, 2), (3, 3), (4, 4), (3, 5), (5, 3), (1, 7), (7, 1), (2, 6)])
def test_valid_bit_splits(r, a):
    cfg = PolarQuantConfig(radius_bits=r, angle_bits=a)
    assert cfg.code_bits == r + a


@pytest.mark.parametrize("g", [16, 32, 64, 128, 256, 1024])
def test_valid_group_sizes(g):
    assert PolarQuantConfig(group_size=g).group_size == g


def test_strings_become_enums():
    cfg = PolarQuantConfig(pairing="interleaved", verify="first", on_mismatch="fallback", backend="eager")
    assert cfg.pairing is PairingMode.INTERLEAVED
    assert cfg.verify is VerifyMode.FIRST
    assert cfg.on_mismatch is OnMismatch.FALLBACK
    assert cfg.backend is InnerBackend.EAGER


def test_frozen():
    cfg = PolarQuantConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.radius_bits = 3


# field, bad value, text that must appear in the message besides the field name and the value
INVALID = [
    ("radius_bits", 0, "1..7"),
    ("radius_bits", 8, "1..7"),
    ("radius_bits", -1, "1..7"),
    ("angle_bits", 0, "1..7"),
    ("angle_bits", 9, "1..7"),
    ("radius_bits", 2.0, "int"),
    ("angle_bits", "4", "int"),
    ("radius_bits", True, "int"),
    ("group_size", 8, "power of two >= 16"),
    ("group_size", 0, "power of two >= 16"),
    ("group_size", 100, "power of two >= 16"),
    ("group_size", 129, "power of two >= 16"),
    ("group_size", -128, "power of two >= 16"),
    ("group_size", 128.0, "int"),
    ("value_bits", 3, "allowed: None, 2, 4, 8"),
    ("value_bits", 16, "allowed: None, 2, 4, 8"),
    ("value_bits", 0, "allowed: None, 2, 4, 8"),
    ("value_bits", 4.0, "allowed: None, 2, 4, 8"),
    ("value_bits", True, "allowed: None, 2, 4, 8"),
    ("value_bits", "4", "allowed: None, 2, 4, 8"),
    ("value_group", 48, "power of two >= 2"),
    ("value_group", 1, "power of two >= 2"),
    ("value_group", 0, "power of two >= 2"),
    ("value_group", -64, "power of two >= 2"),
    ("value_group", 64.0, "power of two >= 2"),
    ("atol", 0, "> 0"),
    ("atol", -1e-3, "> 0"),
    ("atol", "big", "> 0"),
    ("pairing", "rotary", "'auto', 'half', 'interleaved'"),
    ("verify", "always", "'off', 'first'"),
    ("on_mismatch", "ignore", "'raise', 'warn', 'fallback'"),
    ("backend", "cudagraphs", "'inductor', 'aot_eager', 'eager'"),
]


@pytest.mark.parametrize("field, value, allowed", INVALID, ids=[f"{f}={v!r}" for f, v, _ in INVALID])
def test_invalid_value_names_field_value_and_range(field, value, allowed):
    with pytest.raises(ValueError) as info:
        PolarQuantConfig(**{field: value})
    msg = str(info.value)
    assert field in msg
    assert str(value) in msg
    assert allowed in msg


@pytest.mark.parametrize("r, a", [(4, 5), (5, 4), (7, 7), (6, 3)])
def test_bit_sum_over_eight_is_rejected(r, a):
    with pytest.raises(ValueError, match=re.escape(f"= {r + a}")) as info:
        PolarQuantConfig(radius_bits=r, angle_bits=a)
    msg = str(info.value)
    assert "radius_bits" in msg and "angle_bits" in msg and "<= 8" in msg


@pytest.mark.parametrize("bits", [None, 2, 4, 8])
@pytest.mark.parametrize("group", [4, 16, 32, 64, 128])
def test_valid_value_options(bits, group):
    cfg = PolarQuantConfig(value_bits=bits, value_group=group)
    assert (cfg.value_bits, cfg.value_group) == (bits, group)


def test_value_group_must_fill_whole_bytes():
    """2 channels of 2-bit codes are half a byte: a packed row would not split into byte-aligned groups."""
    assert PolarQuantConfig(value_bits=4, value_group=2).value_group == 2
    assert PolarQuantConfig(value_bits=8, value_group=2).value_group == 2
    with pytest.raises(ValueError) as info:
        PolarQuantConfig(value_bits=2, value_group=2)
    msg = str(info.value)
    assert "PolarQuantConfig.value_group=2" in msg and "value_bits=2" in msg and "power of two >= 4" in msg


def test_from_options_maps_names():
    cfg = PolarQuantConfig.from_options({"radius_bits": 3, "angle_bits": 3, "group_size": 64, "pairing": "half"})
    assert cfg == PolarQuantConfig(radius_bits=3, angle_bits=3, group_size=64, pairing=PairingMode.HALF)
    assert PolarQuantConfig.from_options(None) == PolarQuantConfig()
    assert PolarQuantConfig.from_options({}) == PolarQuantConfig()


def test_from_options_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        PolarQuantConfig.from_options({"nope": 1, "radius_bits": 4})
    msg = str(info.value)
    assert "nope" in msg
    for f in dataclasses.fields(PolarQuantConfig):
        assert f.name in msg
    assert "radius_bits" not in msg.split("valid")[0]  # the known name is not reported as unknown


def test_from_options_validates_values():
    with pytest.raises(ValueError, match="group_size=48"):
        PolarQuantConfig.from_options({"group_size": 48})
    with pytest.raises(ValueError, match=r"PolarQuantConfig.value_bits=3 is invalid; allowed: None, 2, 4, 8"):
        PolarQuantConfig.from_options({"value_bits": 3})


def test_from_options_value_options():
    cfg = PolarQuantConfig.from_options({"value_bits": 2, "value_group": 32})
    assert (cfg.value_bits, cfg.value_group) == (2, 32)
