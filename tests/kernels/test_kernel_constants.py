"""The kernels' lazily created device constants (the pair index): one entry per (pairing, head dim, device) shared
by every kernel, and created by the backend at compile time for every compressed key state a graph reads. A second
entry, or a first one made at a launch, is a device allocation inside whatever runs first; inside a CUDA-graph
tree's warm-up that is an allocation from the graph's pool that no output tracks, which inductor refuses
(docs/reliability.md, finding 16: the GPU soak)."""

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from pqcompile import backend, ops
from pqcompile import codec as ref
from pqcompile.kernels import common
from pqcompile.static_cache import StaticPolarKeys

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_static_write_and_attention_share_one_pair_index(monkeypatch):
    monkeypatch.setenv("PQCOMPILE_KERNELS", "triton")
    c = ref.Codec(4, 4, 16, ref.Pairing())
    B, H, D, cap = 1, 2, 16, 32  # D 16: the attention pads its pairs to 16, the writes to next_pow2(8)
    st = (torch.zeros(B, H, cap, c.code_bytes(D), dtype=torch.uint8, device=DEVICE),
          torch.zeros(B, H, cap // 16 * 4, D // 2, dtype=torch.bfloat16, device=DEVICE),
          torch.zeros(B, H, 16, D, device=DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE))
    common.pair_index.cache_clear()
    torch.ops.pqcompile.static_write_(*st, torch.randn(B, H, 20, D, device=DEVICE),
                                      torch.arange(20, device=DEVICE), *ops.codec_args(c))
    assert common.pair_index.cache_info().currsize == 1
    xi, _ = common.pair_index(c.pairing, D, torch.device(DEVICE))
    assert xi.numel() == 16  # padded to the attention's pair block, whoever came first
    q, v = torch.randn(B, 4, 1, D, device=DEVICE), torch.randn(B, H, cap, D, device=DEVICE)
    torch.ops.pqcompile.static_attention(q, *st, v, None, 0.25, False, *ops.codec_args(c))
    assert common.pair_index.cache_info().currsize == 1  # the attention found the write's entry


def test_backend_creates_the_pair_index_of_every_cuda_key_state_at_compile_time(monkeypatch):
    made = []
    monkeypatch.setattr(common, "prepare_constants", lambda *a: made.append(a))
    c = ref.Codec(4, 4, 16, ref.Pairing.parse("interleaved"))
    with FakeTensorMode(allow_non_fake_inputs=True):  # fake CUDA tensors: no GPU needed
        on_gpu = StaticPolarKeys.zeros(1, 2, 64, 32, torch.float32, torch.device("cuda"), c)
    on_cpu = StaticPolarKeys.zeros(1, 2, 64, 32, torch.float32, torch.device("cpu"), c)
    g = fx.Graph()
    for name, val, key in (("k_gpu", on_gpu, "example_value"), ("k_cpu", on_cpu, "val"), ("x", torch.ones(2), "val")):
        g.placeholder(name).meta[key] = val
    g.output(None)
    backend._prepare_constants(fx.GraphModule(torch.nn.Module(), g))
    assert made == [(c.pairing, 32, torch.device("cuda", 0))]
