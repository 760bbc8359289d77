"""pqcompile.ops routed to the Triton kernels (PQCOMPILE_KERNELS=triton; interpreter on CPU), eager and under
torch.compile (aot_eager, inductor): the custom ops stay opaque and give the reference's results."""

import pytest
import torch

from pqcompile import codec as ref
from pqcompile import ops  # noqa: F401 (registers torch.ops.pqcompile.*)
from pqcompile.cache import PolarKeys

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CODEC = (4, 4, 16, "half")


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    monkeypatch.setenv("PQCOMPILE_KERNELS", "triton")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def decode_step(codes, params, tail, new_k, q, v, seq_len: int):
    """One decode step as the rewritten graph does it: append the new key in place, attend over the whole state."""
    torch.ops.pqcompile.append_(codes, params, tail, new_k, seq_len, *CODEC)
    out = torch.ops.pqcompile.attention(q, codes, params, tail, v, seq_len + new_k.shape[2], None, 0.125, 0.0,
                                        False, *CODEC)
    return out * 2


def inputs(T=31, S=1):
    torch.manual_seed(T)
    c = ref.Codec(4, 4, 16, ref.Pairing())
    keys = PolarKeys.from_dense(torch.randn(2, 2, T, 64, device=DEVICE), c)  # a cache's layout: spare rows, ring
    new_k = torch.randn(2, 2, S, 64, device=DEVICE)
    q = torch.randn(2, 8, S, 64, device=DEVICE)
    v = torch.randn(2, 2, T + S, 64, device=DEVICE)
    return (keys.codes, keys.params, keys.tail, new_k, q, v, T), keys, c


def reference(keys, new_k, q, v, c):
    T = keys.seq_len
    state = ref.append(keys.data_, T, new_k, c)
    return ref.attention(q, state, T + new_k.shape[2], v, c, scale=0.125) * 2, state


@pytest.mark.parametrize("backend", [None, "aot_eager", "inductor"])
@pytest.mark.parametrize("T", [31, 15])  # 15 + 1 completes a group: the append encodes it in the kernel
def test_ops_through_torch_compile(backend, T):
    args, keys, c = inputs(T)
    want, state = reference(keys.clone(), *args[3:6], c)
    fn = decode_step if backend is None else torch.compile(decode_step, backend=backend, fullgraph=True)
    out = fn(*args)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    got = keys.with_data(keys.codes, keys.params, keys.tail, T + 1).data_  # the buffers, written in place
    for name, g, w in zip(ref.PolarData._fields, got, state):
        assert torch.equal(g, w), name


def test_static_ops_on_preallocated_buffers(monkeypatch):
    """The static path hands the kernels sliced views of preallocated buffers (strided codes, params, v,
    mask): same results as the reference ops on the same writes."""
    torch.manual_seed(3)
    B, H, Hq, D, cap, G = 1, 2, 4, 64, 64, 16
    c = ref.Codec(4, 4, G, ref.Pairing())
    keys = torch.randn(B, H, 40, D, device=DEVICE)
    q = torch.randn(B, Hq, 1, D, device=DEVICE)
    v = torch.randn(B, H, cap, D, device=DEVICE)
    mask = torch.rand(B, 1, 1, cap, device=DEVICE) > 0.2
    mask[..., 39] = True
    outs = []
    for choice in ("triton", "reference"):
        monkeypatch.setenv("PQCOMPILE_KERNELS", choice)
        codes = torch.zeros(B, H, cap, c.code_bytes(D), dtype=torch.uint8, device=DEVICE)
        params = torch.zeros(B, H, cap // G * 4, D // 2, dtype=torch.bfloat16, device=DEVICE)
        ring = torch.zeros(B, H, G, D, device=DEVICE)
        length = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        for start, end in ((0, 37), (37, 38), (38, 40)):
            torch.ops.pqcompile.static_write_(codes, params, ring, length, keys[:, :, start:end],
                                              torch.arange(start, end, device=DEVICE), *CODEC)
        outs.append(torch.ops.pqcompile.static_attention(q, codes, params, ring, length, v, mask, 0.125, False,
                                                         *CODEC))
        outs.append(codes)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-4, atol=1e-4)
    assert torch.equal(outs[1], outs[3])
