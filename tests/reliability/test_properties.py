"""Property tests (hypothesis): the key and value codecs on adversarial inputs within the quantizer's own bound,
the DynamicCache ops on PolarKeys / PolarValues against the same ops on the dense tensors, the Triton kernels
(interpreter on CPU) against the reference, and the non-finite key policy.

Profiles (tests/conftest.py): "ci" by default, HYPOTHESIS_PROFILE=long for the run docs/reliability.md reports.
Codec and cache properties run the profile's max_examples; interpreter-kernel properties 1/20 of it.
"""

import importlib.util
import pathlib
from unittest import mock

import pytest
import test_value_codec
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codec import check_roundtrip as check_key_roundtrip
from test_codec import make_keys
from test_key_cells import check_cells_roundtrip
from test_value_codec import check_roundtrip as check_value_roundtrip
from test_value_codec import make_values

from pqcompile import codec as C
from pqcompile import kernels, ops
from pqcompile import value_codec as V
from pqcompile.cache import PolarKeys, polar_keys_in
from pqcompile.codec import Codec, Pairing
from pqcompile.hf_compat import cache_kw
from pqcompile.models import tiny_llama
from pqcompile.value_codec import ValueCodec
from pqcompile.values import PolarValues

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KERNEL_EXAMPLES = max(3, settings.default.max_examples // 20)
# the kernel fixture (env + fixed launch config) holds for every example: nothing in it is per input
kernel_settings = settings(max_examples=KERNEL_EXAMPLES, suppress_health_check=[HealthCheck.function_scoped_fixture])

_KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, _KERNELS / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the kernel tests' own reference comparisons (tests/kernels): reused, not copied
run_attention_case = _load("kernel_attention_tests", "test_kernel_attention.py").run_case


# --------------------------------------------------------------------------- adversarial inputs

ADVERSARIAL = ["zeros", "constant", "huge", "tiny", "denormal", "one_outlier", "mixed_scale"]
ORDINARY = ["normal", "outliers", "partly_constant"]


def adversarial(shape, kind: str, dtype, seed: int, G: int) -> torch.Tensor:
    """Keys or values [B, H, T, D] of one adversarial kind. zeros / constant (all-equal groups) / huge come from
    test_codec.make_keys; tiny and denormal magnitudes are scaled to the dtype (fp16 has no 1e-30)."""
    g = torch.Generator().manual_seed(seed)
    fi = torch.finfo(dtype)
    if kind == "tiny":
        return (torch.randn(shape, generator=g) * fi.smallest_normal * 64).to(dtype)
    if kind == "denormal":  # below the dtype's smallest normal: subnormal fp32 / bf16 / fp16
        return (torch.randn(shape, generator=g) * fi.smallest_normal / 8).to(dtype)
    if kind == "one_outlier":  # one element per group of G tokens 1e4 times the rest
        k = torch.randn(shape, generator=g)
        _B, _H, T, D = shape
        for start in range(0, T, G):
            t = start + int(torch.randint(0, min(G, T - start), (1,), generator=g))
            k[:, :, t, int(torch.randint(0, D, (1,), generator=g))] *= 1e4 if dtype != torch.float16 else 1e3
        return k.to(dtype)
    if kind == "mixed_scale":  # groups alternating between 1e-3 and 1e3 magnitudes
        k = torch.randn(shape, generator=g)
        scale = torch.tensor([1e-3, 1e3])[(torch.arange(shape[2]) // G) % 2]
        return (k * scale[:, None]).to(dtype)
    if kind == "huge" and dtype == torch.float16:
        return (torch.randn(shape, generator=g) * 1e4).to(dtype)
    return make_keys(shape, kind, dtype, seed)


@st.composite
def key_case(draw):
    r = draw(st.integers(1, 7))
    a = draw(st.integers(1, 8 - r))
    G = draw(st.sampled_from([16, 32]))
    D = draw(st.sampled_from([2, 4, 8, 12, 16]))
    layout = draw(st.sampled_from(["half", "interleaved"]))
    rot = draw(st.sampled_from([None, *range(2, D, 2)]))
    T = draw(st.one_of(st.integers(1, 3 * G + 1), st.sampled_from([G - 1, G, G + 1, 2 * G, 2 * G + 1])))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(ADVERSARIAL + ORDINARY))
    cell = draw(st.sampled_from(C.KINDS))
    return Codec(r, a, G, Pairing(layout, rot), cell), (B, H, T, D), dtype, kind, draw(st.integers(0, 2 ** 31 - 1))


@given(key_case())
def test_key_codec_within_half_a_bin(case):
    """Every codec kind: the paper's cell by test_codec's own check (radius and angle each within half a bin),
    the others by their cells' bounds (test_key_cells)."""
    codec, shape, dtype, kind, seed = case
    keys = adversarial(shape, kind, dtype, seed, codec.group_size)
    (check_key_roundtrip if codec.kind == "polar" else check_cells_roundtrip)(keys, codec)


@st.composite
def value_case(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    cg = draw(st.sampled_from([c for c in (4, 8, 16) if c * bits % 8 == 0]))
    Dv = cg * draw(st.integers(1, 3))
    G = draw(st.sampled_from([16, 32]))
    T = draw(st.one_of(st.integers(1, 3 * G + 1), st.sampled_from([G - 1, G, G + 1, 2 * G + 1])))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(ADVERSARIAL + ["normal", "outliers", "offset"]))
    return ValueCodec(bits, cg, G), (B, H, T, Dv), dtype, kind, draw(st.integers(0, 2 ** 31 - 1))


def _ideal_half_bin_subnormal(values, vc):
    """test_value_codec.ideal_half_bin plus half of bf16's smallest subnormal step: a scale that is subnormal in
    bf16 rounds up by up to 2^-133 absolute, not by 2^-7 relative (docs/reliability.md, finding 1)."""
    return _ideal_half_bin(values, vc) + 2.0 ** -133 / (1 << (vc.bits + 1)) * (1 << vc.bits)


_ideal_half_bin = test_value_codec.ideal_half_bin


@given(value_case())
def test_value_codec_within_half_a_bin(case):
    vc, shape, dtype, kind, seed = case
    if kind in ("normal", "outliers", "offset", "constant"):  # constant: every (token, channel group) one value
        values = make_values(shape, kind, dtype, seed, channel_group=vc.channel_group)
    else:
        values = adversarial(shape, kind, dtype, seed, vc.group_size)
    with mock.patch.object(test_value_codec, "ideal_half_bin", _ideal_half_bin_subnormal):
        check_value_roundtrip(values, vc)


# --------------------------------------------------------------------------- cache ops vs dense ops


class Reference:
    """The dense tensor whose encoding a compressed cache tensor must hold: `source`, kept in step with each op
    (a crop into an encoded group keeps the cut group's reconstruction, as the cache does)."""

    def __init__(self, kind: str, codec, source: torch.Tensor):
        self.kind, self.codec, self.source = kind, codec, source
        self.lib = C if kind == "keys" else V

    def dense(self) -> torch.Tensor:
        T = self.source.shape[2]
        return self.lib.decode(self.lib.encode(self.source, self.codec), T, self.codec)


def _compress(kind: str, dense: torch.Tensor, codec):
    return PolarKeys.from_dense(dense, codec) if kind == "keys" else PolarValues.from_dense(dense, codec)


@st.composite
def cache_program(draw):
    kind = draw(st.sampled_from(["keys", "values"]))
    G = 16
    dtype = draw(st.sampled_from(DTYPES))
    if kind == "keys":
        bits = draw(st.sampled_from([(4, 4), (3, 3), (2, 2)]))
        codec = Codec(*bits, G, Pairing.parse(draw(st.sampled_from(["half", "interleaved", "half@4"]))),
                      draw(st.sampled_from(C.KINDS)))
    else:
        codec = ValueCodec(draw(st.sampled_from([2, 4, 8])), 8, G)
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    T0 = draw(st.one_of(st.integers(0, 2 * G + 1), st.sampled_from([G - 1, G, G + 1])))
    steps = draw(st.lists(st.one_of(
        st.tuples(st.just("cat"), st.sampled_from([1, 1, 2, G - 1, G, G + 1])),
        st.tuples(st.just("crop"), st.floats(0, 1)),
        st.tuples(st.just("index_select"), st.lists(st.integers(0, 2), min_size=1, max_size=3)),
        st.tuples(st.just("index"), st.lists(st.integers(0, 2), min_size=1, max_size=3)),
        st.tuples(st.just("repeat_interleave"), st.integers(1, 2)),
        st.tuples(st.just("slice_batch"), st.integers(0, 2)),
    ), min_size=1, max_size=6))
    return kind, codec, dtype, (B, H, T0, 16), steps, draw(st.integers(0, 2 ** 31 - 1))


def _apply(x: torch.Tensor, step: tuple, B: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """One HF cache op on x (compressed or dense); returns (result, batch index used or None, description)."""
    name, arg = step
    if name == "crop":
        n = round(arg * x.shape[2])
        return x[:, :, :n], None, f"crop to {n}"
    idx = torch.tensor([i % B for i in arg]) if isinstance(arg, list) else None
    if name == "index_select":
        return x.index_select(0, idx), idx, f"index_select {idx.tolist()}"
    if name == "index":
        return x[idx], idx, f"index {idx.tolist()}"
    if name == "repeat_interleave":
        return x.repeat_interleave(arg, dim=0), None, f"repeat_interleave {arg}"
    start = min(arg, B - 1)
    return x[start:], None, f"batch slice [{start}:]"


@given(cache_program())
def test_cache_ops_equal_the_dense_ops(program):
    kind, codec, dtype, shape, steps, seed = program
    B, H, T0, D = shape
    g = torch.Generator().manual_seed(seed)
    source = (torch.randn(B, H, T0, D, generator=g) * 2).to(dtype)
    x, ref = _compress(kind, source, codec), Reference(kind, codec, source)
    G = codec.group_size
    for step in steps:
        before = x.dequantize()
        if step[0] == "cat":
            new = (torch.randn(x.shape[0], H, step[1], D, generator=g) * 2).to(dtype)
            x = torch.cat([x, new], dim=-2)
            ref.source = torch.cat([ref.source, new], dim=2)
            T_old = before.shape[2]
            kept = T_old // G * G  # the groups encoded before the append are not touched by it
            assert torch.equal(x.dequantize()[:, :, :kept], before[:, :, :kept]), f"{kind} {codec} cat"
            what = f"cat {step[1]}"
        else:
            x, _idx, what = _apply(x, step, x.shape[0])
            dense, _, _ = _apply(before, step, before.shape[0])
            assert type(x) is (PolarKeys if kind == "keys" else PolarValues), what
            assert x.shape == dense.shape, (what, tuple(x.shape), tuple(dense.shape))
            assert torch.equal(x.dequantize(), dense), f"{kind} {codec}: {what} differs from the dense op"
            if step[0] == "crop":
                n, keep = x.shape[2], x.shape[2] // G * G
                ref.source = torch.cat([ref.source[:, :, :keep], dense[:, :, keep:n]], dim=2)
            else:
                ref.source, _, _ = _apply(ref.source, step, ref.source.shape[0])
        assert x.shape == ref.source.shape, what
        assert torch.equal(x.dequantize(), ref.dense()), f"{kind} {codec} after {what}: not the reference codec's state"


# --------------------------------------------------------------------------- kernels (interpreter) vs reference


@pytest.fixture
def triton_kernels(monkeypatch):
    """The ops run the Triton kernels on CPU tensors (TRITON_INTERPRET=1, tests/conftest.py), fixed config."""
    monkeypatch.setenv("PQCOMPILE_KERNELS", "triton")
    with kernels.settings.override(autotune=False):
        yield


def _codes_within_one_bin(codec: Codec, got: torch.Tensor, want: torch.Tensor, D: int, edges: int = 1) -> None:
    """The kernels' atan2 / hypot may differ from torch's by an ulp: a code may be one bin over at an edge (at most
    `edges` of them, or 1%)."""
    P = D // 2
    a, b = C.unpack_codes(got, codec.code_bits, P).int(), C.unpack_codes(want, codec.code_bits, P).int()
    assert a.shape == b.shape
    if not a.numel():
        return
    mask = (1 << codec.radius_bits) - 1
    assert ((a & mask) - (b & mask)).abs().max() <= 1
    assert ((a >> codec.radius_bits) - (b >> codec.radius_bits)).abs().max() <= 1
    assert (a != b).sum() <= max(edges, a.numel() // 100), f"{int((a != b).sum())} of {a.numel()} codes differ"


@st.composite
def kernel_append_case(draw):
    r = draw(st.integers(1, 7))
    a = draw(st.integers(1, 8 - r))
    D = draw(st.sampled_from([16, 32, 64]))
    pairing = draw(st.sampled_from(["half", "interleaved", f"half@{D // 2}", f"interleaved@{D // 2}"]))
    T0 = draw(st.sampled_from([0, 1, 15, 16, 17, 31, 33]))
    S = draw(st.sampled_from([1, 2, 15, 16, 17, 40]))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["normal", "outliers", "constant", "one_outlier", "zeros"]))
    return Codec(r, a, 16, Pairing.parse(pairing)), draw(st.integers(1, 2)), draw(st.integers(1, 2)), T0, S, D, \
        dtype, kind, draw(st.integers(0, 2 ** 31 - 1))


@kernel_settings
@given(kernel_append_case())
def test_encode_kernel_matches_the_reference(triton_kernels, case):
    codec, B, H, T0, S, D, dtype, kind, seed = case
    keys = adversarial((B, H, T0 + S, D), kind, dtype, seed, codec.group_size)
    state = C.encode(keys[:, :, :T0], codec)
    want = C.append(state, T0, keys[:, :, T0:], codec)
    got = kernels.append(state, T0, keys[:, :, T0:], codec)
    assert got.tail.shape == want.tail.shape and torch.equal(got.tail, want.tail)
    assert got.codes.shape == want.codes.shape and got.params.shape == want.params.shape
    # one bf16 ulp relative; an absolute floor 2^-20 of the largest param: a near-zero scale of a constant group
    # came out 3e-8 apart (the interpreter's fp32 atan2 polynomial), which no code reads as a different bin
    floor = 2 ** -20 * want.params.float().abs().amax().item() + 1e-30 if want.params.numel() else 1e-30
    torch.testing.assert_close(got.params.float(), want.params.float(), rtol=2 ** -7, atol=floor)
    _codes_within_one_bin(codec, got.codes, want.codes, D)


@st.composite
def kernel_attention_case(draw):
    H = draw(st.integers(1, 2))
    Hq = H * draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([16, 32, 64]))
    S = draw(st.sampled_from([1, 1, 2, 4]))
    T = draw(st.sampled_from([S + 1, 15, 16, 17, 33, 47]))
    bits = draw(st.sampled_from([(4, 4), (3, 3), (2, 2), (4, 3), (1, 7)]))
    pairing = draw(st.sampled_from(["half", "interleaved", f"half@{D // 2}"]))
    mask = draw(st.sampled_from([None, "bool", "pad", "float"]))
    return {"B": draw(st.integers(1, 2)), "Hq": Hq, "H": H, "T": T, "D": D, "S": S, "bits": bits, "pairing": pairing, "mask": mask,
                "causal": S > 1 and draw(st.booleans()), "softcap": draw(st.sampled_from([None, 30.0])),
                "dtype": draw(st.sampled_from(DTYPES)), "splits": draw(st.sampled_from([None, 1, 3])),
                "seed": draw(st.integers(0, 2 ** 31 - 1))}


@kernel_settings
@given(kernel_attention_case())
def test_attention_kernel_matches_the_reference(triton_kernels, case):
    kw = dict(case)
    if kw["mask"] == "pad" and kw["causal"]:  # left padding hides the first keys: a query keeps its own
        kw["causal"] = False
    run_attention_case(kw.pop("B"), kw.pop("Hq"), kw.pop("H"), kw.pop("T"), kw.pop("D"), kw.pop("S"), **kw)


@st.composite
def kernel_values_case(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    cg = draw(st.sampled_from([8, 16, 32]))
    Dv = cg * draw(st.integers(1, 2))
    T0 = draw(st.sampled_from([0, 1, 15, 16, 17]))
    S = draw(st.sampled_from([1, 16, 17]))
    kind = draw(st.sampled_from(["normal", "outliers", "offset", "constant"]))
    return ValueCodec(bits, cg, 16), draw(st.integers(1, 2)), T0, S, Dv, draw(st.sampled_from(DTYPES)), kind, \
        draw(st.integers(0, 2 ** 31 - 1))


@kernel_settings
@given(kernel_values_case())
def test_value_kernels_match_the_reference(triton_kernels, case):
    """Value encode: the reference's codes bit for bit; attention over compressed keys and values: the
    reference's output to the kernel tests' tolerance."""
    vc, H, T0, S, Dv, dtype, kind, seed = case
    values = make_values((1, H, T0 + S, Dv), kind, dtype, seed, channel_group=vc.channel_group)
    state = V.encode(values[:, :, :T0], vc)
    want = V.append(state, T0, values[:, :, T0:], vc)
    got = kernels.append_values(state, T0, values[:, :, T0:], vc)
    for name, g_, w in zip(V.ValueData._fields, got, want):
        assert g_.shape == w.shape and torch.equal(g_, w), name
    T, c = T0 + S, Codec(4, 4, 16, Pairing())
    kd = C.encode((torch.randn(1, H, T, 32, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype), c)
    q = torch.randn(1, 2 * H, 1, 32, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    out = kernels.attention(q, kd, T, want, c, vcodec=vc)
    ref = V.attention(q, kd, T, want, c, vc)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}[dtype], err


@kernel_settings
@given(kernel_append_case(), st.integers(0, 2))
def test_static_write_kernel_matches_the_reference(triton_kernels, case, rewind):
    """ops.static_write_ through the kernel and through the reference, on copies of the same buffers: the same
    ring and length, the same params up to a bf16 ulp, codes up to one bin at an edge; also when rewinding."""
    codec, B, H, T0, S, D, dtype, kind, seed = case
    G, cap = codec.group_size, 5 * codec.group_size
    keys = adversarial((B, H, T0 + S, D), kind, dtype, seed, G)
    bufs = [torch.zeros(B, H, cap, codec.code_bytes(D), dtype=torch.uint8),
            torch.zeros(B, H, cap // G * 4, D // 2, dtype=torch.bfloat16),
            torch.zeros(B, H, G, D, dtype=dtype), torch.zeros(1, dtype=torch.int64)]
    args = ops.codec_args(codec)
    if T0:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PQCOMPILE_KERNELS", "reference")
            torch.ops.pqcompile.static_write_(*bufs, keys[:, :, :T0], torch.arange(T0), *args)
    start = max(0, T0 - rewind * 7)  # a rewind of up to 14 tokens: into an encoded group when T0 >= G
    want = [b.clone() for b in bufs]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PQCOMPILE_KERNELS", "reference")
        torch.ops.pqcompile.static_write_(*want, keys[:, :, T0:], torch.arange(start, start + S), *args)
    torch.ops.pqcompile.static_write_(*bufs, keys[:, :, T0:], torch.arange(start, start + S), *args)
    L = start + S
    assert int(bufs[3]) == int(want[3]) == L
    # A rewind into an encoded group brings its kept rows back decoded (the interpreter's cos/sin against torch's,
    # an ulp apart: found by the long profile), and the group re-encodes from those: there the two states are
    # compared by what they decode to, within one bin of the reference's cells; everything before it strictly.
    rewound = start < T0 // G * G
    tol = {"rtol": 2 * torch.finfo(dtype).eps, "atol": 1e-6} if rewound else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(bufs[2][:, :, : L % G], want[2][:, :, : L % G], **tol)
    n = L // G
    m = start // G if rewound else n  # groups the write did not re-encode
    pw = want[1][:, :, : m * 4].float()
    floor = 2 ** -20 * pw.abs().amax().item() + 1e-30 if pw.numel() else 1e-30  # as the encode property's
    torch.testing.assert_close(bufs[1][:, :, : m * 4].float(), pw, rtol=2 ** -7, atol=floor)
    _codes_within_one_bin(codec, bufs[0][:, :, : m * G], want[0][:, :, : m * G], D)
    if n > m:
        dec = [C.decode(C.PolarData(b[0][:, :, : n * G], ops.unflat(b[1][:, :, : n * 4]), b[2][:, :, :0].float()),
                        n * G, codec)[:, :, m * G:].float() for b in (bufs, want)]
        p = ops.unflat(want[1][:, :, m * 4: n * 4]).float().abs()  # [B, H, groups, 4, P]
        one_bin = (p[:, :, :, 1] + (p[:, :, :, 0] + (1 << codec.radius_bits) * p[:, :, :, 1]) * p[:, :, :, 3]).amax()
        assert (dec[0] - dec[1]).abs().max() <= 2 * one_bin + 1e-6


# --------------------------------------------------------------------------- non-finite keys


@pytest.fixture(scope="module")
def nan_model():
    return tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, qk_gain=3.0)


def _poisoned_step(model, layer: int, proj: str = "k_proj"):
    """Run one decode step with layer `layer`'s key (value) projection producing NaN (a weight set to NaN, restored)."""
    w = getattr(model.model.layers[layer].self_attn, proj).weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[0, 0] = float("nan")
    return saved, w


@pytest.fixture
def nan_setup(nan_model, fresh_dynamo, request):
    options = {"backend": "eager", "group_size": 16, **getattr(request, "param", {})}
    compiled = torch.compile(nan_model, backend="polarquant", options=options)
    ids = torch.randint(0, nan_model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = transformers.DynamicCache(config=nan_model.config)
    with torch.no_grad():
        compiled(ids[:, :37], **cache_kw(cache), use_cache=True)
        compiled(ids[:, 37:38], **cache_kw(cache), use_cache=True)
    return compiled, ids, cache


def _nan_decode(nan_model, compiled, ids, cache, layer: int, proj: str = "k_proj"):
    saved, w = _poisoned_step(nan_model, layer, proj)
    try:
        with torch.no_grad():
            compiled(ids[:, 38:39], **cache_kw(cache), use_cache=True)
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_nan_key_raises_naming_the_tensor(nan_model, nan_setup):
    """Policy (docs/reliability.md): a non-finite key is a ValueError naming the tensor and its shape."""
    compiled, ids, cache = nan_setup
    with pytest.raises(ValueError, match=r"new_keys contains inf or NaN \(shape \(1, 2, 1, 16\)\)"):
        _nan_decode(nan_model, compiled, ids, cache, layer=1)


def test_nan_key_leaves_the_cache_unchanged(nan_model, nan_setup):
    compiled, ids, cache = nan_setup
    keys = polar_keys_in(cache)
    assert len(keys) == 2
    before = [(k, k.dequantize(), layer.values.clone()) for k, layer in zip(keys, cache.layers)]
    length = cache.get_seq_length()
    with pytest.raises(ValueError, match="new_keys"):
        _nan_decode(nan_model, compiled, ids, cache, layer=1)  # layer 0 appends first, then layer 1 fails
    assert cache.get_seq_length() == length
    for layer, (k, dense, v) in zip(cache.layers, before):
        assert layer.keys is k and torch.equal(layer.keys.dequantize(), dense)  # not half-written
        assert torch.equal(layer.values, v)
    with torch.no_grad():  # and it still decodes
        out = compiled(ids[:, 38:39], **cache_kw(cache), use_cache=True)
    assert torch.isfinite(out.logits).all() and cache.get_seq_length() == length + 1


@pytest.mark.parametrize("layer", [0, 1])
def test_nan_key_error_names_the_layer_and_the_step(nan_model, nan_setup, layer):
    compiled, ids, cache = nan_setup
    with pytest.raises(ValueError) as err:
        _nan_decode(nan_model, compiled, ids, cache, layer=layer)
    assert f"[model.layers.{layer}.self_attn keys: appending at token position 38 (the cache holds 38 tokens, 39 " \
           "after the step) was refused" in str(err.value), str(err.value)


@pytest.mark.parametrize("nan_setup", [{"value_bits": 4, "value_group": 16}], indirect=True)
def test_nan_value_error_names_the_layer_and_leaves_the_cache_unchanged(nan_model, nan_setup):
    compiled, ids, cache = nan_setup
    before = [(layer.keys.dequantize(), layer.values.dequantize()) for layer in cache.layers]
    with pytest.raises(ValueError, match=r"new_values contains inf or NaN .*\[model\.layers\.0\.self_attn values: "
                                         r"appending at token position 38 "):
        _nan_decode(nan_model, compiled, ids, cache, layer=0, proj="v_proj")
    for layer, (k, v) in zip(cache.layers, before):
        assert torch.equal(layer.keys.dequantize(), k) and torch.equal(layer.values.dequantize(), v)
    with torch.no_grad():
        out = compiled(ids[:, 38:39], **cache_kw(cache), use_cache=True)
    assert torch.isfinite(out.logits).all() and cache.get_seq_length() == 39


def test_an_eager_append_refusal_names_the_token_position():
    keys = PolarKeys.from_dense(torch.randn(1, 2, 20, 16), Codec(4, 4, 16, Pairing("half")))
    bad = torch.full((1, 2, 1, 16), float("inf"))
    with pytest.raises(ValueError, match=r"\[PolarKeys: appending at token position 20 \(the cache holds 20 "
                                         r"tokens, 21 after the step\) was refused; the cache keeps its 20 tokens\]"):
        torch.cat([keys, bad], dim=-2)
    assert torch.cat([keys, torch.ones(1, 2, 1, 16)], dim=-2).shape[2] == 21  # and it still appends
