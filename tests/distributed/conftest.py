import pytest
import torch

from pqcompile import counters


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo's recompile limit is per code object (LlamaForCausalLM.forward is shared by every instance):
    start each test from an empty cache so earlier tests cannot push a later one into the eager fallback."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
