"""The cache's keyword in Hugging Face forward/generate calls and outputs.

transformers renamed `past_key_values` to `cache` in the 5.2x releases (the old name still works, with a
deprecation warning, until 5.40 for forward and 6.0 for generate); 5.17 and 4.57 only know the old name.
"""

from __future__ import annotations

import inspect

import transformers

CACHE_KW = "cache" if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters else "past_key_values"


def cache_kw(cache) -> dict:
    """`{name: cache}` for the installed transformers: `model(ids, **cache_kw(cache), use_cache=True)`."""
    return {CACHE_KW: cache}


def cache_of(out):
    """The cache a forward or generate output carries (`out.cache`, `out.past_key_values` before the rename)."""
    return getattr(out, CACHE_KW)
