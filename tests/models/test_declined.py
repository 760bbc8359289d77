"""Sites the compiler must decline: the site stays exactly as it was (dense), the reason is reported in
pqcompile.counters, and the model still runs and matches eager.

The inner backend is "eager" (the rewritten GraphModule runs in Python), so a declined graph runs the very
ops eager HF runs: outputs match to fp32 rounding (rtol/atol 1e-5 leaves room for dynamo reordering
nothing but views). Every case runs generate (prefill + 8 steps) or a forward, as the case requires.
"""

import pytest
import torch
import transformers as T

from pqcompile import counters, coverage
from pqcompile.cache import polar_keys_in
from pqcompile.hf_compat import cache_of

STEPS = 8
OPTIONS = {"group_size": 16, "backend": "eager"}


def _statuses() -> list[tuple[str, str, str]]:
    return [(module, status, reason) for g in counters.graphs for module, _, status, reason, _ in g["sites"]]


@torch.no_grad()
def _generate_both(model, ids, **kw):
    kw = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
              output_logits=True, **kw)
    eager = model.generate(ids, **kw)
    counters.clear()
    model.compile(backend="polarquant", options=OPTIONS)
    compiled = model.generate(ids, **kw)
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), rtol=1e-5, atol=1e-5)
    return compiled


def _ids(n=37):
    return torch.randint(3, coverage.VOCAB, (1, n), generator=torch.Generator().manual_seed(1))


def test_sliding_window_cache_is_declined():
    # Mistral v0.1: sliding_window 4096 on every layer. HF's DynamicSlidingWindowLayer caches
    # cat(...)[:, :, -4095:], which drops the oldest tokens once full; a group-compressed cache cannot.
    model = coverage.BY_NAME["mistral"].build(sliding_window=4096)
    out = _generate_both(model, _ids())
    statuses = _statuses()
    assert statuses and all(s == "declined" and "sliding-window layer" in r and "4095" in r for _, s, r in statuses)
    assert not polar_keys_in(cache_of(out))


def test_softcapping_outside_sdpa_is_declined():
    # Gemma2, eager attention: scores / 50 -> tanh -> * 50 between q @ k^T and the softmax. SDPA has no
    # softcap argument, so match_eager_attention does not turn it into an SDPA site.
    fam = coverage.Family("gemma2", lambda: (T.Gemma2Config(**coverage._common(
        num_key_value_heads=2, head_dim=16, attn_logit_softcapping=50.0, layer_types=["full_attention"] * 2)),
        T.Gemma2ForCausalLM), "half", "")
    model = fam.build(attn="eager")
    out = _generate_both(model, _ids())
    statuses = _statuses()
    assert len(statuses) == 2 * 3  # 2 layers x (prefill + 2 decode graphs)
    assert all(s == "declined" and "logit softcapping" in r for _, s, r in statuses), statuses
    assert not polar_keys_in(cache_of(out))


def test_encoder_decoder_cross_attention_is_declined():
    # BART: decoder self-attention appends to a DynamicCache (rewritten); cross-attention reads keys the
    # encoder output produced once (no KV-append: declined); the encoder's self-attention has no cache.
    cfg = T.BartConfig(vocab_size=coverage.VOCAB, d_model=64, encoder_layers=1, decoder_layers=2,
                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                       decoder_ffn_dim=128, max_position_embeddings=512, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = T.BartForConditionalGeneration(cfg).eval()
    kw = {"max_new_tokens": STEPS, "min_new_tokens": STEPS, "do_sample": False, "return_dict_in_generate": True,
              "output_logits": True}
    with torch.no_grad():
        eager = model.generate(_ids(20), **kw)
        counters.clear()
        model.compile(backend="polarquant", options=OPTIONS)
        compiled = model.generate(_ids(20), **kw)
    statuses = _statuses()
    cross = [(s, r) for m, s, r in statuses if "encoder_attn" in m]
    own = [(s, r) for m, s, r in statuses if m.endswith("self_attn") and ".decoder." in f".{m}"]
    # prefill: the cross-attention cache is filled by a cat onto an empty cache, from the encoder output;
    # decode: the cached encoder keys are read back as they are (no KV-append)
    assert cross and all(s == "declined" and ("cross-attention" in r or "not a KV-append" in r)
                         for s, r in cross), cross
    assert sum(r.startswith("cross-attention:") for _, r in cross) == 2  # the prefill graph's two decoder layers
    assert own and all(s == "rewritten" for s, _ in own), own
    # the decoder's self-attention keys are compressed (lossy): compare like the families do
    polar, dense = torch.stack(compiled.logits)[:, 0], torch.stack(eager.logits)[:, 0]
    assert coverage.top1(polar, dense) == 1.0
    assert coverage.rel_err(polar, dense) < 1e-2


@torch.no_grad()
def test_training_mode_dropout_is_declined():
    # attention_dropout 0.5 in train(): SDPA dropout_p=0.5. The same seed draws the same masks, eager vs compiled.
    model = coverage.BY_NAME["llama"].build(attention_dropout=0.5).train()
    ids = _ids(20)
    torch.manual_seed(3)
    eager = model(ids, use_cache=True).logits
    counters.clear()
    model.compile(backend="polarquant", options=OPTIONS)
    torch.manual_seed(3)
    compiled = model(ids, use_cache=True).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    statuses = _statuses()
    assert len(statuses) == 2 and all(s == "declined" and "dropout" in r for _, s, r in statuses), statuses


@torch.no_grad()
@pytest.mark.parametrize("name,attn", [("gpt2", "sdpa"), ("gptj", "eager"), ("falcon", "sdpa")])
def test_no_cache_is_declined(name, attn):
    model = coverage.BY_NAME[name].build(attn=attn)
    ids = _ids(20)
    eager = model(ids, use_cache=False).logits
    counters.clear()
    model.compile(backend="polarquant", options=OPTIONS)
    compiled = model(ids, use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    statuses = _statuses()
    assert len(statuses) == 2 and all(s == "declined" and "not a KV-append" in r for _, s, r in statuses), statuses
