"""Fused polar decode attention kernel vs pqcompile.codec.attention (the ground truth), fresh random inputs.

On CPU the kernel runs in the Triton interpreter (fp32 dots); on a GPU the dots use q's dtype (bf16/fp16
operands, tf32 for fp32), hence the per-device tolerances. Outputs and split partials start poisoned.
"""

import importlib.util
import pathlib

import pytest
import torch

from pqcompile import codec as ref
from pqcompile import kernels
from pqcompile.kernels import LaunchConfig, settings, tuner

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the kernels run in the Triton interpreter
TOL = {torch.float32: 1e-4 if DEVICE == "cpu" else 3e-3, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def bench_pair_chunk_space() -> tuple:
    """The tuned configs bench/attention.py tries beyond the product space (--pair-chunks): tested here too."""
    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PAIR_CHUNK_SPACE


def run_case(B, Hq, H, T, D, S, *, bits=(4, 4), pairing="half", G=16, v_heads=None, mask=None, causal=False,
             softcap=None, dtype=torch.float32, splits=None, scale=None, seed=0):
    torch.manual_seed(seed)
    c = ref.Codec(bits[0], bits[1], G, ref.Pairing.parse(pairing))
    keys = (torch.randn(B, H, T, D, device=DEVICE) * 2).to(dtype)
    data = ref.encode(keys, c)
    q = torch.randn(B, Hq, S, D, device=DEVICE).to(dtype)
    v = torch.randn(B, v_heads or H, T, D, device=DEVICE).to(dtype)
    m = None
    if mask == "bool":  # per (batch, query) with some keys hidden; the newest key always visible
        m = torch.rand(B, 1, S, T, device=DEVICE) > 0.3
        m[..., -1] = True
    elif mask == "pad":  # 2D padding mask broadcast over heads and queries: left padding per sequence
        m = torch.ones(B, 1, 1, T, dtype=torch.bool, device=DEVICE)
        for b in range(B):
            m[b, ..., : b * (T // 3)] = False
    elif mask == "float":
        m = torch.randn(B, Hq, S, T, device=DEVICE)
    kw = {"mask": m, "is_causal": causal, "softcap": softcap, "scale": scale}
    out = kernels.attention(q, data, T, v, c, num_splits=splits, **kw)
    want = ref.attention(q, data, T, v, c, **kw)
    assert out.shape == want.shape == (B, Hq, S, D) and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("Hq, H", [(4, 4), (6, 2), (8, 2), (8, 1)])  # GQA ratios 1, 3, 4, 8
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("S, T", [(1, 37), (1, 11), (4, 32), (4, 53)])  # odd T, T < G, T = k*G
def test_gqa_head_dims_lengths(Hq, H, D, S, T, poisoned):
    run_case(2, Hq, H, T, D, S, causal=S > 1, splits=2, seed=Hq * D + S + T)


@pytest.mark.parametrize("splits", [None, 1, 3, 64])  # heuristic, direct store, reduce, more than blocks
def test_splits(splits, poisoned):
    run_case(1, 4, 2, 75, 64, 1, splits=splits)


@pytest.mark.parametrize("bits, pairing", [((4, 4), "interleaved"), ((3, 3), "half"), ((2, 2), "half"),
                                           ((2, 2), "interleaved"), ((4, 3), "half@32"), ((1, 7), "half"),
                                           ((5, 2), "interleaved@32")])
def test_bits_and_pairings(bits, pairing, poisoned):
    run_case(1, 4, 2, 45, 64, 2, bits=bits, pairing=pairing, causal=True, splits=2)


@pytest.mark.parametrize("bits", [(3, 3), (2, 3), (4, 3), (1, 2), (3, 4), (2, 2), (1, 1), (1, 3)])  # W 6 5 7 3 7 4 2 4
@pytest.mark.parametrize("D", [64, 96])  # 96: the last word of a row is cut by the row's end
def test_alternative_code_loads(bits, D, poisoned):
    """The tuned variant's code loads: byte planes joined into words (codes that straddle bytes), or each
    pair's own byte (sub-byte codes). Same results as the reference."""
    with settings.override(attention=settings.attention._replace(alt_code_load=True)):
        run_case(1, 4, 2, 45, D, 1, bits=bits, splits=2, seed=sum(bits) + D)


@pytest.mark.parametrize("config", settings.tuned_space + bench_pair_chunk_space(), ids=lambda c: str(tuple(c)))
def test_every_tuned_config(config, poisoned):
    """Each launch config the tuner may pick, fixed: block sizes, split heuristic, register caps (maxnreg), and the
    bench's pair-chunk configs. 16-bit inputs: the space is for them (fp32 V at BLOCK_N 128 needs more shared
    memory than an H200 has; the tuner skips a config that fails to compile)."""
    with settings.override(attention=config):
        run_case(1, 8, 2, 2 * config.block_n + 77, 128, 1, G=128, dtype=torch.bfloat16,
                 seed=config.block_n + config.programs_per_sm)


@pytest.mark.parametrize("D, S, mask, causal", [(96, 1, None, False), (64, 4, "bool", True), (128, 2, "float", False)])
def test_pair_chunks(D, S, mask, causal, poisoned):
    """Encoded blocks scored in two chunks of pairs: a chunk cut by the row's end (D 96: 48 pairs in chunks of
    32), q_len > 1 with a causal offset, masks. Codes of other widths refuse the setting."""
    with settings.override(attention=settings.attention._replace(pair_chunks=2)):
        run_case(2, 8, 2, 301, D, S, mask=mask, causal=causal, splits=3, G=32, seed=D + S)
        with pytest.raises(ValueError, match="pair_chunks=2 needs 8-bit codes"):
            run_case(1, 4, 2, 45, 64, 1, bits=(3, 3), splits=2)


@pytest.mark.parametrize("mask", ["bool", "pad", "float"])
@pytest.mark.parametrize("S", [1, 4])
def test_masks(mask, S, poisoned):
    run_case(3, 4, 2, 40, 64, S, mask=mask, causal=S > 1, splits=2, seed=S)


@pytest.mark.parametrize("splits", [1, 3])  # the direct store and the split reduction
def test_fully_masked_query_gets_zeros(splits, poisoned):
    """A padding query that sees no key: 0 like torch SDPA (and the reference), not NaN."""
    torch.manual_seed(11)
    c = ref.Codec(4, 4, 16, ref.Pairing())
    data = ref.encode(torch.randn(2, 2, 45, 64, device=DEVICE), c)
    q, v = torch.randn(2, 8, 2, 64, device=DEVICE), torch.randn(2, 2, 45, 64, device=DEVICE)
    mask = torch.ones(2, 1, 2, 45, dtype=torch.bool, device=DEVICE)
    mask[1, :, 0] = False
    out = kernels.attention(q, data, 45, v, c, mask=mask, num_splits=splits)
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))
    torch.testing.assert_close(out, ref.attention(q, data, 45, v, c, mask=mask), rtol=1e-4, atol=1e-4)


def test_values_repeated_to_query_heads(poisoned):
    run_case(2, 6, 2, 29, 64, 3, v_heads=6, causal=True, splits=2)


def test_softcap_and_scale(poisoned):
    run_case(1, 4, 1, 33, 64, 1, softcap=3.0, scale=0.3, splits=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype, poisoned):
    run_case(2, 8, 2, 50, 128, 1, dtype=dtype, splits=2)


def test_long_query_block_splits_rows(poisoned):
    """Rows = heads x queries beyond one row block (64): several row blocks per kv head."""
    run_case(1, 16, 1, 20, 64, 16, causal=True, splits=1)


def test_group_size_32_and_head_dim_96(poisoned):
    run_case(1, 4, 2, 70, 96, 1, G=32, splits=2)


@pytest.mark.parametrize("D, pairing", [(16, "half"), (16, "interleaved@8"), (8, "interleaved")])
def test_head_dims_under_32(D, pairing, poisoned):
    """Fewer than 16 pairs: tl.dot needs K >= 16 on the GPU, so the pairs are padded (zero, masked) to 16."""
    run_case(2, 4, 2, 37, D, 2, pairing=pairing, causal=True)
    run_case(1, 4, 1, 21, D, 1, pairing=pairing, mask="bool", dtype=torch.bfloat16)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA: a 2.2 GB mask (the interpreter would take hours)")
def test_mask_row_offsets_past_2_31(poisoned):
    """A long prefill's mask: query row x row stride > 2^31 elements (found at a 126k-token prompt on the H200:
    an illegal address). The rows past 2^31 equal the reference's on the same rows."""
    torch.manual_seed(0)
    c = ref.Codec(4, 4, 16, ref.Pairing.parse("half"))
    S, T, W = 16448, 48, 131072  # S * W = 2.16e9 > 2^31
    data = ref.encode(torch.randn(1, 2, T, 64, device=DEVICE) * 2, c)
    q, v = torch.randn(1, 4, S, 64, device=DEVICE), torch.randn(1, 2, T, 64, device=DEVICE)
    mask = torch.ones(1, 1, S, W, dtype=torch.bool, device=DEVICE)[..., :T]  # row stride W
    mask.copy_(torch.rand(1, 1, S, T, device=DEVICE) > 0.3)
    mask[..., -1] = True
    out = kernels.attention(q, data, T, v, c, mask=mask)
    rows = slice(S - 64, S)
    want = ref.attention(q[:, :, rows], data, T, v, c, mask=mask[:, :, rows].contiguous())
    err = ((out[:, :, rows] - want).norm() / want.norm()).item()
    assert err < TOL[torch.float32], f"relative error {err:.2e}"


def test_rejects_bad_input():
    c = ref.Codec(4, 4, 16, ref.Pairing())
    data = ref.encode(torch.randn(1, 2, 20, 64, device=DEVICE), c)
    q, v = torch.randn(1, 4, 1, 64, device=DEVICE), torch.randn(1, 2, 20, 64, device=DEVICE)
    with pytest.raises(TypeError):
        kernels.attention(q.to(torch.int32), data, 20, v, c)
    with pytest.raises(ValueError, match=r"\(1, 3, 20, 64\)") as e:
        kernels.attention(q, data, 20, v[:, :1].expand(1, 3, 20, 64), c)
    assert "tensor(" not in str(e.value)
    with pytest.raises(ValueError, match="broadcastable"):
        kernels.attention(q, data, 20, v, c, mask=torch.ones(1, 1, 1, 7, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="does not hold"):
        kernels.attention(q, data, 36, torch.randn(1, 2, 36, 64, device=DEVICE), c)
    with pytest.raises(TypeError, match="mask"):
        kernels.attention(q, data, 20, v, c, mask=torch.ones(1, 1, 1, 20, dtype=torch.int64, device=DEVICE))


@pytest.mark.skipif(DEVICE != "cuda", reason="real shapes need a CUDA GPU (bench/attention.py runs them too)")
@pytest.mark.parametrize("bits", [(4, 4), (3, 3), (2, 2)])
def test_gpu_real_shapes(bits, poisoned):
    run_case(2, 32, 8, 4096 + 77, 128, 1, bits=bits, G=128, dtype=torch.bfloat16)
    run_case(2, 8, 1, 1000, 256, 4, bits=bits, G=128, dtype=torch.bfloat16, causal=True)


def test_tuner_candidates_fit_the_codes():
    """What the tuner tries per code width: the product space has no pair chunks and no alternative loads; codes
    that straddle bytes try byte planes too; sub-byte codes try per-pair bytes only where a space lists them;
    pair chunks only for 8-bit codes in chunks of >= 16 pairs; a block never spans a group."""
    space = settings.tuned_space
    base = len(tuner.candidates(space, 128, 64, 8))
    assert base == len(space) and not any(c.pair_chunks > 1 or c.alt_code_load for c in space)
    assert len(tuner.candidates(space, 128, 64, 6)) == 2 * base  # byte planes
    assert tuner.candidates(space, 128, 64, 4) == list(space)
    with_alt = (*space, *(c._replace(alt_code_load=True) for c in space))  # bench/attention.py --alt-sub-byte
    assert len(tuner.candidates(with_alt, 128, 64, 4)) == 2 * base
    assert tuner.candidates(with_alt, 128, 64, 8) == list(space)  # 8-bit codes have one load path
    assert len(tuner.candidates(with_alt, 128, 64, 6)) == 2 * base  # no duplicates
    chunked = (*space, *(c._replace(pair_chunks=2) for c in space))
    assert len(tuner.candidates(chunked, 128, 64, 8)) == base + sum(c.split_dot for c in space)
    assert not any(c.pair_chunks > 1 for w in (6, 4) for c in tuner.candidates(chunked, 128, 64, w))
    assert not any(c.pair_chunks > 1 for c in tuner.candidates(chunked, 128, 16, 8))  # chunks of >= 16 pairs
    assert all(c.block_n <= 32 for c in tuner.candidates(space, 32, 64, 8))


def test_tuner_times_each_config_once_per_shape_class(monkeypatch):
    configs = [LaunchConfig(32, True, 2, 4, 3), LaunchConfig(64, True, 2, 4, 3), LaunchConfig(128, True, 2, 4, 3)]
    timed = []
    times = dict(zip(configs, (3.0, 1.0, 2.0)))
    monkeypatch.setattr(tuner, "_gpu_time", lambda fn: (fn(), times[timed[-1]])[1])
    monkeypatch.setattr(tuner, "_TUNED", {})
    assert tuner.pick("k", timed.append, configs) == configs[1] == tuner.last_config()
    assert tuner.pick("k", timed.append, configs) == configs[1]
    assert timed == configs
