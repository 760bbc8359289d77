"""Launch configs and the product settings of the kernel wrappers.

One module-level `settings` instance; tests and bench change it for a block with `settings.override(...)`,
which restores the previous values on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator
from typing import NamedTuple


class LaunchConfig(NamedTuple):
    """One launch of the attention kernel: its tuned meta-parameters and launch options."""

    block_n: int  # tokens per block; a block never spans two groups
    split_dot: bool  # q.k as two dots (x and y halves) instead of one over x/y interleaved
    programs_per_sm: int  # sizes the split-K grid: about this many programs per SM
    num_warps: int
    num_stages: int
    alt_code_load: bool = False  # byte planes (codes that straddle bytes) or each pair's own byte (sub-byte codes)
    maxnreg: int | None = None  # register cap per thread, so that more programs fit an SM
    pair_chunks: int = 1  # > 1: score an encoded block in chunks of pairs (8-bit codes, split dots)


class Tile(NamedTuple):
    """Encode and static-write launches: a program owns one group's tokens x a tile of block_p pairs."""

    block_p: int
    num_warps: int


class RowTile(NamedTuple):
    """Value encode and value static-write launches: a program owns block_t tokens' whole rows (capped so that a
    program holds at most 4096 elements)."""

    block_t: int
    num_warps: int


# Left alone, ptxas gives the 4+4 kernel ~240 registers a thread: two 4-warp programs fit an SM. maxnreg 168 fits
# three, 128 fits four (or two of 8 warps); programs_per_sm sizes the grid to match. The tuner keeps the fastest
# per shape class (bench/NOTES.md has what won where).
TUNED_SPACE = (
    LaunchConfig(64, True, 2, 4, 3), LaunchConfig(64, False, 2, 4, 3), LaunchConfig(64, True, 4, 4, 3),
    LaunchConfig(128, True, 2, 4, 3), LaunchConfig(32, True, 4, 4, 3), LaunchConfig(32, True, 8, 2, 4),
    LaunchConfig(64, True, 8, 4, 3),
    LaunchConfig(64, True, 3, 4, 3, maxnreg=168), LaunchConfig(64, True, 6, 4, 3, maxnreg=168),
    LaunchConfig(64, True, 4, 4, 3, maxnreg=128), LaunchConfig(32, True, 3, 4, 3, maxnreg=168),
    LaunchConfig(32, True, 6, 4, 3, maxnreg=168), LaunchConfig(32, True, 4, 4, 3, maxnreg=128),
    LaunchConfig(32, True, 8, 4, 3, maxnreg=128), LaunchConfig(64, True, 2, 8, 3, maxnreg=128),
    # packed values (V4) at 8x32k on the H200: 504.8 us against 542.4 for the best config above
    # (bench/value_config_sweep.py)
    LaunchConfig(32, True, 12, 2, 4, maxnreg=128),
)
ATTENTION = LaunchConfig(64, True, 2, 4, 3)  # the fixed launch: no tuning (interpreter, autotune off)
ENCODE_TILE = Tile(block_p=8, num_warps=2)
WRITE_TILE = Tile(block_p=16, num_warps=4)
VALUE_TILE = RowTile(block_t=16, num_warps=4)  # not yet timed on a GPU
# How the attention kernel reads packed values (channel groups of >= 16; smaller ones always "dequant"):
# "dot": dequantized after the P @ V dot (raw codes as exact bf16 numbers against P * scale per channel group,
# the mins by one fp32 row sum), each token's code bytes loaded contiguously; "dot-bytes": the same, each
# channel's own byte loaded; "dequant": every value dequantized in registers before the dot (the first form).
VALUE_FORMS = ("dot", "dot-bytes", "dequant")
_GENERATIONS = itertools.count()


@dataclasses.dataclass
class KernelSettings:
    """What the host wrappers launch.

    autotune: time every fitting config of tuned_space once per shape class on the GPU and keep the fastest;
    otherwise (and in the interpreter, with num_splits given, or when nothing fits) launch `attention`, its
    block_n capped by the group size; launches of more than tune_max_rows query rows per KV head are not timed
    either. encode_tile / write_tile: the encode and static-write launches (picked on
    the H200 by `bench/attention.py --sweep-encode`; smaller tiles mean more, shorter programs). value_tile: the
    value encode and value static-write launches (tokens per program).
    """

    autotune: bool = True
    attention: LaunchConfig = ATTENTION
    tuned_space: tuple[LaunchConfig, ...] = TUNED_SPACE
    encode_tile: Tile = ENCODE_TILE
    write_tile: Tile = WRITE_TILE
    value_tile: RowTile = VALUE_TILE
    # launches with more query rows per KV head (query heads a KV head serves x positions) run `attention` untimed:
    # the tuned space is picked for decode, and timing it on a long prefill's launch (seconds each, ~15 replays
    # per config) would take minutes
    tune_max_rows: int = 64
    value_form: str = "dot"  # packed values dequantized after the P @ U dot (1.8x "dequant" at 8x32k on the H200)

    def __setattr__(self, name, value):
        # every change (construction, override, a plain assignment) starts a new generation: the attention
        # wrapper's launch plans are keyed on it
        super().__setattr__(name, value)
        object.__setattr__(self, "generation", next(_GENERATIONS))

    def __post_init__(self):
        self.attention = LaunchConfig(*self.attention)
        self.tuned_space = tuple(LaunchConfig(*c) for c in self.tuned_space)
        self.encode_tile, self.write_tile = Tile(*self.encode_tile), Tile(*self.write_tile)
        self.value_tile = RowTile(*self.value_tile)
        for c in (self.attention, *self.tuned_space):
            if c.block_n < 16 or c.block_n & (c.block_n - 1) or c.pair_chunks < 1:
                raise ValueError(f"{c}: block_n must be a power of two >= 16 and pair_chunks >= 1")
        for t in (self.encode_tile, self.write_tile):
            if t.block_p < 1 or t.num_warps < 1:
                raise ValueError(f"{t}: block_p and num_warps must be positive")
        if self.value_form not in VALUE_FORMS:
            raise ValueError(f"value_form={self.value_form!r} is invalid; allowed: {', '.join(VALUE_FORMS)}")
        t = self.value_tile
        if t.block_t < 1 or t.block_t & (t.block_t - 1) or t.num_warps < 1:
            raise ValueError(f"{t}: block_t must be a power of two and num_warps positive")

    @contextlib.contextmanager
    def override(self, **changes) -> Iterator[KernelSettings]:
        """Change some fields for the duration of a with-block (checked as the constructor checks them)."""
        checked = dataclasses.replace(self, **changes)
        saved = {name: getattr(self, name) for name in changes}
        for name in changes:
            setattr(self, name, getattr(checked, name))
        try:
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)


settings = KernelSettings()
