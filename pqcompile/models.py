"""Tiny random-weight Hugging Face models built from configs (no downloads): demos and tests."""

from __future__ import annotations

import torch
import transformers


def tiny_llama(*, layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int = 2, vocab: int = 256,
               qk_gain: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A Llama with GQA. qk_gain > 1 scales the q/k projections so attention is peaked, not near-uniform
    (random init gives near-uniform attention, which hides wrong keys)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    if qk_gain != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(qk_gain)
                layer.self_attn.k_proj.weight.mul_(qk_gain)
    return model
