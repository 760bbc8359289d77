"""Every decoder family of pqcompile.coverage through `model.compile(backend="polarquant")` + `generate`.

Per family (tiny random-weight model, DynamicCache, prompt of coverage.PROMPT tokens, greedy decode):
  - sites: every attention layer is found; the expected ones are rewritten in the prefill graph and in
    every decode graph, the others declined with their true reason; at most 4 graphs per generate.
  - pairing: the inferred pairing is the model's RoPE layout (coverage.Family.rope).
  - numerics, teacher-forced on the compiled run's own tokens (coverage's docstring says why):
      err_ref <= 1e-5: the compiled logits equal eager HF whose decode attention reads the reference codec's
        quantized keys (true pairing, same group flushes). What remains is fp32 reassociation, ~1e-7
        relative on these sizes (measured 1.5e-7..5e-7 on every family): 1e-5 leaves 20x for keys that land
        on a bin edge in one path and not the other.
      err_ref <= err_ref_eager / 100: the same check is meaningful: the codec's own effect on the logits
        (eager + quantized keys vs eager) is >= 9e-5 on every family (measured), so a compiled run that kept
        dense keys, used another pairing or flushed groups at other lengths would miss the reference by
        about that much.
      top-1 vs the reference: identical at every step (a 1e-7 perturbation flips no argmax that is not an
        exact tie); top-1 vs eager: the reference's own agreement with eager (the codec's effect) minus at
        most one step.
  - bytes: every PolarKeys holds exactly B*Hkv*codec.state_bits bits (tail in the model's dtype).
CI runs STEPS=16 decode steps (the first group flush happens at 48 tokens, step 11); the slow test runs 64.
"""

import pytest
import torch

from pqcompile import counters, coverage
from pqcompile.hf_compat import cache_kw

STEPS = 16


def _check(family: coverage.Family, m: coverage.Measurement) -> None:
    layers = coverage.LAYERS
    assert m.graphs <= 4, f"{m.graphs} graphs for one generate"
    assert m.rewritten == layers - family.declined and m.declined == family.declined, m
    assert all(family.decline_reason in r for r in m.reasons), m.reasons
    for graph in counters.graphs[1:]:  # decode graphs: the same layers rewritten, now as polar attention
        statuses = [(module, kind, status) for module, kind, status, _, _ in graph["sites"]]
        assert sum(s[1:] == ("decode", "rewritten") for s in statuses) == layers - family.declined, statuses
    assert m.pairings == [family.rope], f"inferred {m.pairings}, the model's RoPE pairs {family.rope}"
    assert m.err_ref <= 1e-5, m
    assert m.err_ref <= m.err_ref_eager / 100, m
    assert m.top1_ref == 1.0, m
    assert m.top1_eager >= m.top1_ref_eager - 1 / m.steps, m
    assert m.bytes_accounted


@torch.no_grad()
@pytest.mark.parametrize("name", [f.name for f in coverage.FAMILIES])
def test_family(name):
    family = coverage.BY_NAME[name]
    m = coverage.measure(family, steps=STEPS, inner="inductor" if family.inductor else "aot_eager")
    _check(family, m)


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("name", ["llama", "gptj", "gpt_neox", "gemma3"])
def test_family_64_steps(name):
    family = coverage.BY_NAME[name]
    m = coverage.measure(family, steps=64, inner="eager")  # 4 more group flushes, 101 tokens in all
    _check(family, m)


@torch.no_grad()
@pytest.mark.parametrize("name", ["llama", "gpt2", "gptj", "falcon", "opt"])
def test_eager_attention_is_matched(name):
    # attn_implementation="eager": match_eager_attention turns matmul-softmax-matmul into an SDPA site
    # (Llama: transpose(2, 3), mask add; GPT-2: .type() cast; GPT-J: fp32 casts of q and k; Falcon:
    # `scores /= sqrt(d)` in place; OPT: scale 1.0 on a pre-scaled q). The reference codec runs in an
    # SDPA build of the same weights; the thresholds are the families'.
    family = coverage.BY_NAME[name]
    m = coverage.measure(family, steps=STEPS, inner="eager", attn="eager")
    _check(family, m)
    assert counters.graphs[0]["passes"][0].rewritten == coverage.LAYERS  # match_eager_attention


@torch.no_grad()
@pytest.mark.parametrize("name", ["gpt_neox", "falcon", "gemma3"])  # partial rotary + fused qkv, MQA, sliding layers
def test_static_cache_left_padded_batch(name):
    """PolarStaticCache + compiled generate on a left-padded batch of 2: the logits equal the same compressed cache
    run eagerly (all 18 families measured at <= 5e-7 on 2026-11-29); sliding-window layers stay dense static."""
    from pqcompile.static_cache import PolarStaticCache

    family = coverage.BY_NAME[name]
    model, compiled = family.build(), family.build()
    compiled.compile(backend="polarquant")
    ids = torch.randint(3, coverage.VOCAB, (2, 40))
    att = torch.ones_like(ids)
    att[1, :5] = 0
    kw = {"attention_mask": att, "max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "pad_token_id": 0,
          "output_logits": True, "return_dict_in_generate": True}
    outs = [m.generate(ids, **cache_kw(PolarStaticCache(config=m.config, max_cache_len=96, group_size=16)), **kw)
            for m in (compiled, model)]
    got, want = (torch.stack(o.logits, 1) for o in outs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counters.totals["rewritten_static"] == 2 * (coverage.LAYERS - family.declined)
    assert counters.totals["sites_declined"] == 2 * family.declined
