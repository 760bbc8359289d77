"""The static-cache kernels (positions and length read on the device, for CUDA graphs) against the reference
static ops: in-place writes into preallocated buffers that start as garbage, then attention over them."""

import pytest
import torch

from pqcompile import codec as ref
from pqcompile import kernels, ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
G, CAP = 16, 64


def state(c: ref.Codec, B: int, H: int, D: int, dtype=torch.float32):
    """Preallocated buffers full of garbage (a kernel that skips an element shows)."""
    g = torch.Generator(device="cpu").manual_seed(99)
    return (torch.randint(0, 256, (B, H, CAP, c.code_bytes(D)), dtype=torch.uint8, generator=g).to(DEVICE),
            torch.randn(B, H, CAP // G * 4, D // 2, generator=g).to(torch.bfloat16).to(DEVICE),
            torch.randn(B, H, G, D, generator=g).to(dtype).to(DEVICE),
            torch.zeros(1, dtype=torch.int64, device=DEVICE))


def write_all(choice: str, monkeypatch, c, writes, B=2, H=2, D=64, dtype=torch.float32):
    monkeypatch.setenv("PQCOMPILE_KERNELS", choice)
    st = state(c, B, H, D, dtype)
    for start, k in writes:
        torch.ops.pqcompile.static_write_(*st, k, torch.arange(start, start + k.shape[2], device=DEVICE),
                                          *ops.codec_args(c))
    return st


def assert_same_state(a, b, c, assert_codes_close):
    L = int(b[3])
    assert int(a[3]) == L
    n = L // c.group_size
    assert_codes_close(c, a[0][:, :, : n * G], ops.unflat(a[1][:, :, : n * 4]), b[0][:, :, : n * G],
                       ops.unflat(b[1][:, :, : n * 4]), a[2].shape[-1])
    torch.testing.assert_close(a[2][:, :, : L % G], b[2][:, :, : L % G], rtol=1e-6, atol=1e-6)


KEYS = torch.randn(2, 2, 80, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
SCHEDULES = {
    "prefill-then-decode": [(0, KEYS[:, :, :37]), (37, KEYS[:, :, 37:38]), (38, KEYS[:, :, 38:40])],
    "decode-completes-a-group": [(0, KEYS[:, :, :15]), (15, KEYS[:, :, 15:16]), (16, KEYS[:, :, 16:17])],
    "chunk-spans-groups": [(0, KEYS[:, :, :5]), (5, KEYS[:, :, 5:50]), (50, KEYS[:, :, 50:51])],
    "rewind-into-encoded-group": [(0, KEYS[:, :, :40]), (20, KEYS[:, :, 40:47])],
    "rewind-inside-open-group": [(0, KEYS[:, :, :40]), (35, KEYS[:, :, 40:42])],
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("bits,pairing", [((4, 4), "half"), ((3, 3), "interleaved"), ((2, 3), "half@32")])
def test_write_matches_reference(monkeypatch, assert_codes_close, schedule, bits, pairing):
    c = ref.Codec(*bits, G, ref.Pairing.parse(pairing))
    a = write_all("triton", monkeypatch, c, SCHEDULES[schedule])
    b = write_all("reference", monkeypatch, c, SCHEDULES[schedule])
    assert_same_state(a, b, c, assert_codes_close)


@pytest.mark.parametrize("schedule", ["chunk-spans-groups", "rewind-into-encoded-group"])
def test_write_with_small_pair_tiles(monkeypatch, assert_codes_close, schedule):
    """A tile of 8 pairs: 4 programs per group share the group's tokens (32 pairs, 3+3 words)."""
    c = ref.Codec(3, 3, G, ref.Pairing.parse("half"))
    with kernels.settings.override(write_tile=kernels.Tile(block_p=8, num_warps=2)):
        a = write_all("triton", monkeypatch, c, SCHEDULES[schedule])
    b = write_all("reference", monkeypatch, c, SCHEDULES[schedule])
    assert_same_state(a, b, c, assert_codes_close)


def test_write_bf16_ring_from_fp32_keys(monkeypatch, assert_codes_close):
    c = ref.Codec(4, 4, G, ref.Pairing())
    writes = SCHEDULES["chunk-spans-groups"]
    a = write_all("triton", monkeypatch, c, writes, dtype=torch.bfloat16)
    b = write_all("reference", monkeypatch, c, writes, dtype=torch.bfloat16)
    assert_same_state(a, b, c, assert_codes_close)


@pytest.mark.parametrize("S,causal,use_mask,Hv,bits", [
    (1, False, True, 2, (4, 4)),  # decode, HF's static bool mask
    (4, True, False, 2, (3, 3)),  # chunked prefill, causal over the last 4 written tokens
    (3, False, True, 8, (2, 2)),  # v already repeated to Hq heads
    (1, False, False, 2, (4, 4)),
])
def test_attention_matches_reference(monkeypatch, poisoned, S, causal, use_mask, Hv, bits):
    c = ref.Codec(*bits, G, ref.Pairing())
    writes = [(0, KEYS[:, :, :37]), (37, KEYS[:, :, 37:41])]
    q = torch.randn(2, 8, S, 64, device=DEVICE)
    v = torch.randn(2, Hv, 60, 64, device=DEVICE)
    mask = None
    if use_mask:
        mask = torch.rand(2, 1, S, 60, device=DEVICE) > 0.3
        mask[..., 40] = True
    outs = []
    for choice in ("triton", "reference"):
        st = write_all(choice, monkeypatch, c, writes)
        outs.append(torch.ops.pqcompile.static_attention(q, *st, v, mask, 0.125, causal, *ops.codec_args(c)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_capacity_and_contiguity_errors(monkeypatch):
    c = ref.Codec(4, 4, G, ref.Pairing())
    st = write_all("triton", monkeypatch, c, [(0, KEYS[:, :, :60])])
    with pytest.raises(IndexError, match="out of bounds"):
        kernels.static_write(st[0], ops.unflat(st[1]), st[2], st[3], KEYS[:, :, :5],
                             torch.arange(60, 65, device=DEVICE), c)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.static_write(st[0], ops.unflat(st[1]), st[2], st[3], KEYS[:, :, :2],
                             torch.tensor([10, 12], device=DEVICE), c)
    assert int(st[3]) == 60  # nothing was written


def test_unchecked_write_past_capacity_gives_nan_not_numbers(monkeypatch, poisoned):
    """Under CUDA-graph capture the host cannot check: the length the write leaves poisons attention."""
    c = ref.Codec(4, 4, G, ref.Pairing())
    st = write_all("triton", monkeypatch, c, [(0, KEYS[:, :, :60])])
    kernels.static_write(st[0], ops.unflat(st[1]), st[2], st[3], KEYS[:, :, :8],
                         torch.arange(60, 68, device=DEVICE), c, check=False)
    assert int(st[3]) == 68
    out = kernels.static_attention(torch.randn(2, 8, 1, 64, device=DEVICE), st[0], ops.unflat(st[1]), st[2],
                                   st[3], torch.randn(2, 2, CAP, 64, device=DEVICE), c)
    assert out.isnan().all()
