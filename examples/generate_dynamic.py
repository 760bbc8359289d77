"""model.compile(backend="polarquant") + generate with HF's default DynamicCache, on a tiny embedded Llama.

    python examples/generate_dynamic.py
"""

import torch

import pqcompile
from pqcompile import counters
from pqcompile.cache import polar_keys_in
from pqcompile.hf_compat import cache_of
from pqcompile.models import tiny_llama


def main() -> None:
    model = tiny_llama(layers=2, hidden=256, heads=8, kv_heads=2, qk_gain=3.0)
    ids = torch.randint(0, model.config.vocab_size, (1, 200))
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=32, do_sample=False)
        model.compile(backend="polarquant", options={"radius_bits": 4, "angle_bits": 4})
        out = model.generate(ids, max_new_tokens=32, do_sample=False, return_dict_in_generate=True)
    keys = polar_keys_in(cache_of(out))
    print(f"pqcompile {pqcompile.__version__}: {counters.totals['sites_rewritten']} attention sites rewritten in "
          f"{counters.totals['graphs']} graphs")
    print(f"cache keys: {keys[0]!r}")
    print(f"key bytes held: {sum(k.nbytes_held() for k in keys)} (dense fp32: {sum(k.numel() * 4 for k in keys)})")
    same = (out.sequences[0, 200:] == eager[0, 200:]).float().mean().item()
    print(f"greedy tokens equal to eager: {same:.0%} (free-running; a 4+4 cache may diverge after a near-tie)")


if __name__ == "__main__":
    main()
