"""The cache keyword of the installed transformers: forward and generate take it without a deprecation warning."""

import inspect
import warnings

import torch
import transformers

from pqcompile.hf_compat import CACHE_KW, cache_kw, cache_of
from pqcompile.models import tiny_llama


def test_the_keyword_names_the_forward_argument_and_the_output_field():
    assert CACHE_KW in inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    assert CACHE_KW in transformers.modeling_outputs.CausalLMOutputWithPast.__dataclass_fields__


@torch.no_grad()
def test_forward_and_generate_use_the_cache_without_deprecation_warnings():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (1, 9))
    cache = transformers.DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model(ids, **cache_kw(cache), use_cache=True)
        assert cache_of(out) is cache and cache.get_seq_length() == 9
        gen = transformers.DynamicCache(config=model.config)
        model.generate(ids, **cache_kw(gen), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.get_seq_length() == 9 + 2  # the last new token is not run through the model
