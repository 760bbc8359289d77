"""kernels.attention_state: attention over a DynamicCache key state as pqcompile::attention receives it (buffers with
spare rows, flat params, the ring), without the op's views. It must return exactly what kernels.attention returns
over those views (ops._view, v[:, :, :T]: the same launch), and raise or fall back exactly as that path does."""

import importlib

import pytest
import torch

from pqcompile import codec as ref
from pqcompile import ops

A = importlib.import_module("pqcompile.kernels.attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the kernels run in the Triton interpreter


def state(T, *, B=1, H=2, D=32, G=16, spare=2, dtype=torch.float32, kind="polar", seed=0):
    """codes / flat params with `spare` groups of spare rows, the ring (the tail's rows first), v with spare rows."""
    g = torch.Generator().manual_seed(seed)
    c = ref.Codec(4, 4, G, ref.Pairing(), kind)
    keys = (torch.randn(B, H, T, D, generator=g) * 2).to(dtype)
    data = ref.encode(keys, c)
    Tc, cap = T // G * G, (T // G + spare) * G
    codes = torch.zeros(B, H, cap, c.code_bytes(D), dtype=torch.uint8)
    params = torch.zeros(B, H, cap // G * 4, D // 2, dtype=torch.bfloat16)
    codes[:, :, :Tc] = data.codes
    params[:, :, : Tc // G * 4] = ops.flat(data.params)
    ring = torch.zeros(B, H, G, D, dtype=dtype)
    ring[:, :, : T - Tc] = data.tail[:, :, : T - Tc]
    return c, codes.to(DEVICE), params.to(DEVICE), ring.to(DEVICE)


def through_views(q, codes, params, ring, v, T, c, **kw):
    """What pqcompile::attention's body did before: ops._view, v sliced to T, kernels.attention."""
    return A.attention(q, ops._view(codes, params, ring, T, c), T, v[:, :, :T] if v.shape[2] > T else v, c, **kw)


@pytest.mark.parametrize("T", [16, 37, 48, 5])
@pytest.mark.parametrize("Hq, v_heads", [(4, 2), (4, 4), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_output_as_the_op_views(T, Hq, v_heads, dtype):
    c, codes, params, ring = state(T, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, Hq, 1, 32, generator=g).to(DEVICE, dtype)
    v = torch.randn(1, v_heads, codes.shape[2], 32, generator=g).to(DEVICE, dtype)  # the whole buffer
    got = A.attention_state(q, codes, params, ring, v, T, c)
    want = through_views(q, codes, params, ring, v, T, c)
    assert torch.equal(got, want)
    data = ops._view(codes, params, ring, T, c)
    exact = ref.attention(q, data, T, v[:, :, :T], c)
    assert ((got.float() - exact.float()).norm() / exact.float().norm()).item() < 2e-2


def test_same_output_with_mask_softcap_causal_and_a_codec_kind():
    c, codes, params, ring = state(45, kind="polar-hybrid")
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 3, 32, generator=g).to(DEVICE)
    v = torch.randn(1, 2, codes.shape[2], 32, generator=g).to(DEVICE)
    mask = (torch.rand(1, 1, 3, 45, generator=g) > 0.3).to(DEVICE)
    mask[..., -1] = True
    for kw in ({"mask": mask}, {"softcap": 20.0, "scale": 0.3}, {"is_causal": True}, {"num_splits": 2}):
        assert torch.equal(A.attention_state(q, codes, params, ring, v, 45, c, **kw),
                           through_views(q, codes, params, ring, v, 45, c, **kw)), kw


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 (the outcome compared is the exception itself)
        return type(e).__name__, str(e)


@pytest.mark.parametrize("case", ["codes dtype", "few code rows", "params width", "short v", "v heads", "q dim",
                                  "ring heads", "mask dtype", "empty", "zero length", "head dim 384"])
def test_errors_and_fallbacks_as_the_op_views(case):
    T, D = 37, 384 if case == "head dim 384" else 32
    c, codes, params, ring = state(T, D=D)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 1, D, generator=g).to(DEVICE)
    v = torch.randn(1, 2, codes.shape[2], D, generator=g).to(DEVICE)
    kw = {}
    if case == "codes dtype":
        codes = codes.to(torch.int16)
    elif case == "few code rows":
        codes = codes[:, :, :16]
    elif case == "params width":
        params = params[..., :8]
    elif case == "short v":
        v = v[:, :, :20]
    elif case == "v heads":
        v = v.expand(1, 2, -1, -1)[:, :1].expand(1, 3, -1, -1)
    elif case == "q dim":
        q = q[0]
    elif case == "ring heads":
        ring = ring[:, :1]
    elif case == "mask dtype":
        kw["mask"] = torch.zeros(1, 1, 1, T, dtype=torch.int32, device=DEVICE)
    elif case == "empty":
        q = q[:, :, :0]
    elif case == "zero length":
        T = 0
    got = _outcome(lambda: A.attention_state(q, codes, params, ring, v, T, c, **kw))
    want = _outcome(lambda: through_views(q, codes, params, ring, v, T, c, **kw))
    assert got[0] == want[0]
    if got[0] == "ok":
        assert torch.equal(got[1], want[1])
    else:
        assert got[1] == want[1]
    if case in ("head dim 384", "empty"):
        assert got[0] == "ok"  # the reference fallback


def test_a_valid_state_skips_the_views(monkeypatch):
    """The equalities above would hold trivially if every call took the views: a valid state never does."""
    c, codes, params, ring = state(37)
    q = torch.randn(1, 4, 1, 32).to(DEVICE)
    v = torch.randn(1, 2, codes.shape[2], 32).to(DEVICE)
    want = through_views(q, codes, params, ring, v, 37, c)
    monkeypatch.setattr(A, "attention", lambda *a, **k: pytest.fail("took the views"))
    assert torch.equal(A.attention_state(q, codes, params, ring, v, 37, c), want)
