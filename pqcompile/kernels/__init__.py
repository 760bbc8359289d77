"""Triton kernels for the PolarQuant key cache: host wrappers with input checks, and their launch settings.

`append` and `attention` have the semantics and shapes of pqcompile.codec.append / codec.attention (the
ground truth); pqcompile.ops calls them for CUDA tensors. Compressed values (pqcompile.value_codec):
`append_values` (value_codec.append, codes bit for bit), `static_write_values`, and `attention` /
`static_attention` with `vcodec=` and a ValueData (value_codec.attention: the packed values dequantized in
registers). They also run on CPU tensors under TRITON_INTERPRET=1 (tests). Differences from the reference, by design:
  - atan2/sqrt/cos/sin may differ from torch by an ulp (cos/sin use the GPU's fast approximations), so a
    code can land one bin off at a bin edge, and q.k uses the tensor cores in q's dtype.
  - append does not scan new keys for inf/NaN (that would sync the GPU every decode step); a non-finite
    key instead poisons its pair's group params with NaN, so attention over it returns NaN, never a
    plausible wrong number.
Fallbacks to the reference (logged at debug level): head_dim or value dim > 256, seq_len == 0, q_len == 0.
Errors: wrong dtypes (TypeError), wrong shapes/devices/layouts (ValueError); messages show shapes only.

Layout: jit/ holds the @triton.jit code only (encode, static_write, attention); the host wrapper of each is
the module of the same name here (attention's launch itself: attention_launch.py); tuner.py picks attention
launch configs; settings.py holds what is launched (`settings.override(...)` changes it for a block);
common.py: shared checks and helpers. The name `attention` here is the function: reach the module through
importlib.import_module("pqcompile.kernels.attention").
"""

from .attention import attention, static_attention
from .encode import (
    append,
    append_values,
    encode_groups,
    encode_groups_into,
    encode_value_groups,
    encode_value_groups_into,
)
from .settings import KernelSettings, LaunchConfig, RowTile, Tile, settings
from .static_write import static_write, static_write_values

__all__ = [
    "KernelSettings",
    "LaunchConfig",
    "RowTile",
    "Tile",
    "append",
    "append_values",
    "attention",
    "encode_groups",
    "encode_groups_into",
    "encode_value_groups",
    "encode_value_groups_into",
    "settings",
    "static_attention",
    "static_write",
    "static_write_values",
]
