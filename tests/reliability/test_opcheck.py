"""torch.library.opcheck over every custom op in the pqcompile namespace: schema (mutates_args honoured, fresh
outputs), autograd registration, fake tensors against the real outputs, and AOT dispatch with dynamic shapes.
The CPU reference always; CUDA (the Triton kernels) where a GPU is present. Samples: op_samples.py."""

import op_samples as S
import pytest
import torch

OPS = S.registered_ops()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.fixture(autouse=True)
def default_dispatch(monkeypatch):
    """The ops pick kernels or reference by device (PQCOMPILE_KERNELS unset): CPU runs the reference."""
    monkeypatch.delenv("PQCOMPILE_KERNELS", raising=False)


def test_every_op_has_samples():
    assert len(OPS) >= 12, OPS  # the registry lookup itself works
    missing = [name for name in OPS if name not in S.SAMPLES]
    assert not missing, "; ".join(f"add samples for op {name} in tests/reliability/op_samples.py" for name in missing)
    stale = sorted(set(S.SAMPLES) - set(OPS))
    assert not stale, f"samples for ops that no longer exist: {stale}"


def _samples():
    for name in OPS:
        if name in S.SAMPLES:
            for case in S.cases():
                yield pytest.param(name, case, id=f"{name.split('::')[1]}-{case}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, case", list(_samples()))
def test_opcheck(name, case, device):
    op = S.op(name)
    for args, kwargs in S.SAMPLES[name](case):
        torch.library.opcheck(op, S.to(args, device), kwargs)


@pytest.mark.parametrize("name", [n for n in OPS if n.endswith("_")])
def test_mutating_ops_write_what_they_declare(name):
    """opcheck's schema test accepts an op that declares a mutation and does not make it: here a write of new
    tokens changes the ring (the open group; DenseValues: its buffer), a static write advances the length, and
    nothing else changes."""
    op = S.op(name)
    names = [a.name for a in op._schema.arguments]
    declared = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert declared, f"{name} ends in '_' but declares no mutated argument"
    case = S.cases()[1]  # T = G: a full group encoded, the ring empty
    args, _ = S.SAMPLES[name](case)[0]
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    op(*args)
    new = names.index(next(n for n in names if n.startswith("new")))
    ring = names.index(next(n for n in ("ring", "tail", *declared) if n in names))  # where the new tokens go
    assert not torch.equal(args[ring], before[ring]), f"{name}: the new tokens did not reach {names[ring]}"
    if "length" in names:
        i = names.index("length")
        assert int(args[i]) == int(before[i]) + args[new].shape[2]
    for i, (a, b) in enumerate(zip(args, before)):
        if isinstance(a, torch.Tensor) and names[i] not in declared:
            assert torch.equal(a, b), f"{name} wrote its input {names[i]}, which it does not declare"
