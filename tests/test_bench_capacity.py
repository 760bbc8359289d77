"""CPU smoke test of bench/capacity.py (--tiny: SIMULATED budgets, a byte counter instead of the CUDA allocator)."""

import importlib.util
import json
import pathlib
import sys

import pytest

PATH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "capacity.py"


@pytest.fixture(scope="module")
def capacity():
    spec = importlib.util.spec_from_file_location("bench_capacity", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_predict_boundary(capacity):
    # allocated = 1000 + 10 * size, 50 B of allocator slack: 1000 + 50 + 10 * x = 2050 -> x = 100
    fits = [(10, 1100, 1150), (20, 1200, 1250)]
    assert capacity.predict(fits, 2050) == pytest.approx(100)
    assert capacity.predict(fits[:1], 2050) is None  # one size: no slope


def test_tiny_context_search(capacity, tmp_path, monkeypatch):
    """Dense DynamicCache vs PolarStaticCache, one simulated budget: both searches converge on an OOM boundary,
    polar fits >= 1.4x the context (K 4+4 + dense V, fp32 tiny model), the JSON is written with its probe log."""
    monkeypatch.delenv("OUT", raising=False)
    out = capacity.main(["--tiny", "--contenders", "dense-dynamic", "polar-static", "--search", "context",
                         "--budgets", "0.00626", "--steps", "1", "--warmup", "1", "--resolution", "128",
                         "--out", str(tmp_path)])
    data = json.loads(pathlib.Path(out["path"]).read_text())
    rows = {r["contender"]: r for r in data["rows"]}
    assert data["meta"]["simulated"] and set(rows) == {"dense-dynamic", "polar-static"}
    for row in rows.values():
        assert row["status"] == "converged", row
        assert row["oom_at"] - row["max"] <= 128  # the resolution
        assert any(p["fit"] for p in row["probes"]) and any("oom" in p for p in row["probes"])
        assert row["at_max"]["tokens_per_s"] > 0 and row["at_max"]["cache_bytes_held"] > 0
    assert rows["polar-static"]["ratio_vs_dense_dynamic"] >= 1.4
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is skipped without it
        assert pathlib.Path(out["path"]).with_suffix(".png").exists()


@pytest.mark.parametrize("contender", ["dense-dynamic", "polar-dynamic"])
def test_reserved_fill_allocates_once(capacity, contender):
    """--fill reserved: the cache reaches the context with every layer's buffers allocated once (dense: one tensor
    of ctx rows per layer for K and V; polar: the keys' codes and the dense values' buffer sized for the prompt,
    then grown once by the policy, as the first group flush after a prompt grows them), and decoding goes on."""
    import torch

    from pqcompile.dynamic import capacity_for

    args = capacity.parse(["--tiny", "--contenders", contender, "--write-chunk", "128"])  # 6 chunks
    args.device, args.dtype, args.layers = "cpu", torch.float32, 2
    model = capacity.build(args)
    spec = capacity.SPECS[contender]
    fwd = capacity.compiled(model, spec, args)
    ctx, meter = 700, capacity.SimMeter(1e12, 0)
    cache = capacity.cache_for(model, spec, 1, ctx, args)
    updates = []
    real_update = cache.update
    cache.update = lambda k, *a, **kw: (updates.append(k.shape[2]), real_update(k, *a, **kw))[1]
    with torch.no_grad():
        capacity.fill(model, fwd, cache, spec, 1, ctx, args, meter, {})
        assert cache.get_seq_length() == ctx
        if not spec.polar:  # only the model's own tokens went through update (cat): the chunks were written in place
            assert updates == [args.model_tokens] * args.layers
        for layer in cache.layers:
            if spec.polar:
                G = args.group_size
                grown = capacity_for(ctx + G, capacity_for(ctx, 0, G), G)  # 768 for the prompt, then 896
                assert layer.keys.capacity == layer.values.capacity == grown > capacity_for(ctx, 0, G)
            else:
                assert layer.keys.shape[2] == ctx and layer.keys.untyped_storage().nbytes() == layer.keys.nbytes
        tok = torch.zeros(1, 1, dtype=torch.long)
        out = fwd(tok, **{capacity.CACHE_KW: cache, "use_cache": True})
    assert cache.get_seq_length() == ctx + 1 and torch.isfinite(out.logits).all()


def test_growth_in_decode_grows_between_compiled_steps(capacity):
    """--growth-in-decode: the fill leaves the prompt's allocation, the warm-up runs a group more, and the first
    flush grows every polar tensor between compiled steps; the probe records it and still fits."""
    import torch

    args = capacity.parse(["--tiny", "--contenders", "polar-dynamic", "--growth-in-decode", "--steps", "1",
                           "--warmup", "1", "--write-chunk", "128", "--group-size", "32"])
    args.device, args.dtype, args.layers = "cpu", torch.float32, 2
    model = capacity.build(args)
    spec = capacity.SPECS["polar-dynamic"]
    fwd = capacity.compiled(model, spec, args)
    rec = capacity.probe(model, fwd, spec, 1, 256, args, capacity.SimMeter(1e12, 0))
    assert rec["fit"], rec
    assert rec["decode_growths"] == 2 * args.layers  # keys and values of every layer, once
