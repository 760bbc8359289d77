"""Encode kernel vs pqcompile.codec (the ground truth): codes, group params, the tail, group offsets.

atan2/sqrt may differ from torch by an ulp, so a code may land one bin off at a bin edge: the checks bound
that (decoded values within one bin, mismatches rare) instead of demanding bit equality.
"""

import pytest
import torch

from pqcompile import codec as ref
from pqcompile import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the kernels run in the Triton interpreter


def make_codec(bits, pairing, G=16):
    return ref.Codec(bits[0], bits[1], G, ref.Pairing.parse(pairing))


@pytest.mark.parametrize("bits", [(4, 4), (3, 3), (2, 2), (4, 3), (1, 7), (3, 2)])
@pytest.mark.parametrize("pairing", ["half", "interleaved", "half@32", "interleaved@16"])
def test_encode_groups_matches_reference(bits, pairing, poisoned, assert_codes_close):
    torch.manual_seed(hash((bits, pairing)) % 2**31)
    c = make_codec(bits, pairing)
    keys = torch.randn(2, 3, 48, 64, device=DEVICE) * 3
    codes, params = kernels.encode_groups(keys, c)
    codes_r, params_r = ref.encode_groups(keys, c)
    assert codes.shape == codes_r.shape and params.shape == params_r.shape
    assert_codes_close(c, codes, params, codes_r, params_r, 64)


@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_encode_dtypes_and_head_dims(D, dtype, poisoned, assert_codes_close):
    torch.manual_seed(D)
    c = make_codec((4, 4), "half", G=32)
    keys = torch.randn(1, 2, 64, D, device=DEVICE).to(dtype)
    codes, params = kernels.encode_groups(keys, c)
    assert_codes_close(c, codes, params, *ref.encode_groups(keys, c), D)


@pytest.mark.parametrize("bits", [(4, 4), (3, 3), (2, 2)])
def test_encode_with_small_pair_tiles(bits, poisoned, assert_codes_close):
    """A tile of 8 pairs: 8 programs per group (D 128), each packing its own bytes."""
    torch.manual_seed(sum(bits))
    c = make_codec(bits, "half")
    keys = torch.randn(1, 2, 32, 128, device=DEVICE) * 2
    with kernels.settings.override(encode_tile=kernels.Tile(block_p=8, num_warps=2)):
        codes, params = kernels.encode_groups(keys, c)
    assert_codes_close(c, codes, params, *ref.encode_groups(keys, c), 128)


def test_encode_writes_only_its_groups_at_the_offset(assert_codes_close):
    """A preallocated (static) buffer: groups land at the offset; bytes before and after stay untouched."""
    torch.manual_seed(0)
    c = make_codec((3, 3), "half")
    keys = torch.randn(2, 2, 32, 64, device=DEVICE)
    codes = torch.full((2, 2, 80, c.code_bytes(64)), 0xAB, dtype=torch.uint8, device=DEVICE)
    params = torch.full((2, 2, 5, 4, 32), 7.0, dtype=torch.bfloat16, device=DEVICE)
    kernels.encode_groups_into(keys, codes, params, 2, c)
    codes_r, params_r = ref.encode_groups(keys, c)
    assert_codes_close(c, codes[:, :, 32:64], params[:, :, 2:4], codes_r, params_r, 64)
    assert (codes[:, :, :32] == 0xAB).all() and (codes[:, :, 64:] == 0xAB).all()
    assert (params[:, :, :2] == 7).all() and (params[:, :, 4:] == 7).all()


def test_strided_keys(assert_codes_close):
    torch.manual_seed(1)
    c = make_codec((4, 4), "half")
    keys = torch.randn(2, 32, 3, 64, device=DEVICE).transpose(1, 2)  # [B, H, T, D] view of BTHD storage
    assert_codes_close(c, *kernels.encode_groups(keys, c), *ref.encode_groups(keys.contiguous(), c), 64)


@pytest.mark.parametrize("steps", [[37], [16], [5], [16, 1, 1], [3, 13, 1, 20, 7], [40, 1, 1, 1, 1, 1, 1, 1, 1]])
def test_append_sequence_matches_reference(steps, poisoned, assert_codes_close):
    """Prefill then decode steps crossing group boundaries: same state as codec.append, fresh tensors."""
    torch.manual_seed(len(steps))
    c = make_codec((4, 4), "half")
    B, H, D = 2, 2, 64
    k_state = r_state = ref.empty(c, B, H, D, torch.float32, DEVICE)
    T = 0
    for S in steps:
        new = torch.randn(B, H, S, D, device=DEVICE)
        out = kernels.append(k_state, T, new, c)
        for old, fresh in zip(k_state, out):
            assert fresh.data_ptr() != old.data_ptr() or fresh.numel() == 0
        k_state, r_state, T = out, ref.append(r_state, T, new, c), T + S
        for kt, rt in zip(k_state, r_state):
            assert kt.shape == rt.shape and kt.dtype == rt.dtype
        assert torch.equal(k_state.tail, r_state.tail)
        if k_state.codes.shape[2]:
            assert_codes_close(c, k_state.codes, k_state.params, r_state.codes, r_state.params, D)


def test_append_rejects_bad_input():
    c = make_codec((4, 4), "half")
    state = ref.empty(c, 1, 2, 64, torch.float32, DEVICE)
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 64\)"):
        kernels.append(state, 5, torch.randn(1, 2, 3, 64, device=DEVICE), c)  # tail holds 0 tokens, not 5
    with pytest.raises(TypeError):
        kernels.append(state, 0, torch.randint(0, 3, (1, 2, 3, 64), device=DEVICE), c)
    with pytest.raises(ValueError, match="group_size"):
        kernels.encode_groups(torch.randn(1, 2, 20, 64, device=DEVICE), c)


def test_non_finite_key_poisons_its_group_params():
    c = make_codec((4, 4), "half")
    keys = torch.randn(1, 1, 32, 64, device=DEVICE)
    keys[0, 0, 20, 3] = float("inf")
    _, params = kernels.encode_groups(keys, c)
    assert torch.isnan(params[0, 0, 1, 0, 3])  # the group and pair holding the inf
    assert torch.isfinite(params[0, 0, 0]).all()
