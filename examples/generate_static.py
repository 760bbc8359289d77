"""PolarStaticCache: the static path (one compiled decode graph, no dense key buffer), on a tiny Llama.

    python examples/generate_static.py
"""

import torch

from pqcompile import PolarStaticCache, counters
from pqcompile.hf_compat import cache_kw
from pqcompile.models import tiny_llama


def main() -> None:
    model = tiny_llama(layers=2, hidden=256, heads=8, kv_heads=2, qk_gain=3.0)
    ids = torch.randint(0, model.config.vocab_size, (1, 200))
    model.compile(backend="polarquant")
    cache = PolarStaticCache(config=model.config, max_cache_len=512)
    with torch.no_grad():
        out = model.generate(ids, **cache_kw(cache), max_new_tokens=32, do_sample=False)
    keys = cache.layers[0].keys
    print(f"{out.shape[1] - 200} tokens generated; graphs compiled: {counters.totals['graphs']}, "
          f"static sites rewritten: {counters.totals['rewritten_static']}")
    print(f"layer 0 keys: {keys!r}: {keys.nbytes_held()} bytes held vs {keys.numel() * keys.element_size()} for "
          "the dense buffer StaticCache would allocate")


if __name__ == "__main__":
    main()
