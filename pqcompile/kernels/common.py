"""Host-side helpers shared by the kernel wrappers: input checks, buffer allocation, pair indices."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .. import codec as ref
from ..codec import KINDS, Codec
from ..value_codec import ValueCodec

MAX_HEAD_DIM = 256
TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def alloc(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the wrappers hand to a kernel comes from here (tests poison it to catch unwritten data)."""
    return torch.empty(shape, dtype=dtype, device=device)


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_gpu(t: torch.Tensor) -> bool:
    """Launches for t are compiled for the GPU (fast trig, tensor-core dtypes), not run by the interpreter."""
    return t.is_cuda and not interpret()


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (shape {tuple(t.shape)})")
    if not (t.is_cuda or interpret()):
        raise ValueError(f"{name} must be a CUDA tensor (or set TRITON_INTERPRET=1), got {t.device}")


def kind_index(codec: Codec) -> int:
    """The kernels' KIND constexpr: the codec kind's index in key_cells.KINDS."""
    return KINDS.index(codec.kind)


def check_codec(codec: Codec) -> None:
    G = codec.group_size
    if not (1 <= codec.radius_bits and 1 <= codec.angle_bits and codec.code_bits <= 8):
        raise ValueError(f"bits {codec.radius_bits}+{codec.angle_bits} unsupported: need r, a >= 1, r + a <= 8")
    if G < 16 or G & (G - 1):
        raise ValueError(f"group_size {G} unsupported: need a power of two >= 16")


@functools.cache
def pair_index(pairing: ref.Pairing, head_dim: int, device: torch.device):
    """(x dims, y dims) of the pairs, int32 on device, zero-padded to next_pow2(D/2)."""
    xs, ys = pairing.indices(head_dim)
    pad = [0] * (triton.next_power_of_2(len(xs)) - len(xs))
    return (torch.tensor(xs + pad, dtype=torch.int32, device=device),
            torch.tensor(ys + pad, dtype=torch.int32, device=device))


def pair_tile(block_p: int, G: int, P: int) -> int:
    """Pairs per encode / static-write program: the setting's tile, capped by P and by 8192 // G elements."""
    return max(8, min(triton.next_power_of_2(block_p), 8192 // G, triton.next_power_of_2(P)))


def row_tile(block_t: int, block_dv: int, limit: int) -> int:
    """Tokens per value encode / value static-write program (a power of two): the setting's tile, capped by 4096
    elements a program and by `limit` rounded up to a power of two (the group size, or the tokens to encode)."""
    return max(1, min(block_t, max(1, 4096 // block_dv), triton.next_power_of_2(max(1, limit))))


def check_value_codec(vcodec, ring: bool = False) -> None:
    """A ValueCodec (it validates its own bits and channel group); ring: a static cache's, group size as the keys'."""
    if not isinstance(vcodec, ValueCodec):
        raise TypeError(f"vcodec must be a value_codec.ValueCodec, got {type(vcodec).__name__}")
    G = vcodec.group_size
    if ring and (G < 16 or G & (G - 1)):
        raise ValueError(f"group_size {G} unsupported: need a power of two >= 16")


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
