import pytest
import torch

from pqcompile import codec as ref
from pqcompile import kernels
from pqcompile.kernels import common


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernel wrappers allocate starts as NaN (floats) or 0xFF (bytes): unwritten shows."""

    def alloc(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0xFF)

    monkeypatch.setattr(common, "alloc", alloc)
    yield


@pytest.fixture(autouse=True)
def fixed_config():
    """No timing-based tuning inside tests (GPU): the fixed launch config, restored afterwards."""
    with kernels.settings.override(autotune=False):
        yield


def _assert_codes_close(c, codes_k, params_k, codes_r, params_r, D):
    """Params equal up to a bf16 ulp (rarely), codes equal except rare one-bin edge cases."""
    P = D // 2
    pk, pr = params_k.float(), params_r.float()
    assert torch.isfinite(pk).all()
    assert (pk == pr).float().mean() > 0.99
    torch.testing.assert_close(pk, pr, rtol=2**-7, atol=1e-30)
    ck = ref.unpack_codes(codes_k, c.code_bits, P).int()
    cr = ref.unpack_codes(codes_r, c.code_bits, P).int()
    mism = (ck != cr).float().mean().item()
    assert mism < 2e-3, f"code mismatch fraction {mism}"
    rmask = (1 << c.radius_bits) - 1
    assert ((ck & rmask) - (cr & rmask)).abs().max() <= 1
    assert ((ck >> c.radius_bits) - (cr >> c.radius_bits)).abs().max() <= 1


@pytest.fixture
def assert_codes_close():
    """The kernels' atan2/sqrt may differ from torch by an ulp: a code may land one bin off at a bin edge."""
    return _assert_codes_close
