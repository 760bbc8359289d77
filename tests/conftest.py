import os

# Two pytest-xdist workers share the machine's 2 cores: one intra-op thread each, and inductor compiles in
# process (its subprocess pool costs more than it saves here). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. It must be set before
# any @triton.jit decorator runs, so here, before test modules import pqcompile.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gc
import pathlib
from importlib.metadata import entry_points

import pytest

from pqcompile import counters

try:  # a dev dependency; the GPU machine runs the kernel tests without it
    from hypothesis import HealthCheck, settings
except ImportError:
    settings = None
if settings is not None:
    # Hypothesis profiles (tests/reliability): "ci", the default, is short; "long" is the run docs/reliability.md
    # reports (>= 10,000 examples per codec/cache property; interpreter-kernel properties take 1/20 of it).
    # Choose with HYPOTHESIS_PROFILE=long. Tests that pass max_examples to @settings keep their own count.
    settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("long", max_examples=10_000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A source checkout run without `pip install` (the GPU machine: PYTHONPATH only) has no entry point for the
# backend's name; register the same callable the entry point names, so tests can say backend="polarquant".
if "polarquant" not in {ep.name for ep in entry_points(group="torch_dynamo_backends")}:
    from pqcompile.backend import polarquant

    torch._dynamo.register_backend(polarquant, name="polarquant")

_COMPILING_DIRS = ("compiler", "models", "distributed", "passes", "verify")


@pytest.fixture
def fresh_dynamo():
    """Dynamo's recompile limit is per code object (LlamaForCausalLM.forward is shared by every instance):
    start each test from an empty cache so earlier tests cannot push a later one into the eager fallback. The
    collection frees what an earlier test's graphs kept in reference cycles (their verify states, which
    pqcompile.verify.states() lists while they live)."""
    torch._dynamo.reset()
    gc.collect()
    counters.clear()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    """Every test under tests/{compiler,models,distributed,passes,verify} starts from a fresh dynamo."""
    for item in items:
        if pathlib.Path(str(item.fspath)).parent.name in _COMPILING_DIRS:
            item.fixturenames.insert(0, "fresh_dynamo")


@pytest.fixture(autouse=True)
def _private_tuner_cache(monkeypatch, tmp_path):
    """The attention tuner keeps its picks on disk: each test gets its own folder, so none reads another's picks."""
    monkeypatch.setenv("PQCOMPILE_CACHE_DIR", str(tmp_path / "pqcompile-cache"))
