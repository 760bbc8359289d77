import pytest
import torch

from pqcompile import kernels


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernel wrappers allocate starts as NaN (floats) or 0xFF (bytes): unwritten shows."""

    def alloc(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0xFF)

    monkeypatch.setattr(kernels, "_alloc", alloc)
    yield


@pytest.fixture(autouse=True)
def fixed_config(monkeypatch):
    """No timing-based tuning inside tests (GPU): the fixed launch config, restored afterwards."""
    monkeypatch.setitem(kernels.ATTN_CONFIG, "autotune", False)
    yield
