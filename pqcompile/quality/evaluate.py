"""Perplexity under each key-cache method, scored exactly as decode would see the cache, and per-layer errors.

Chunked decode schedule (equal to token-by-token decode, tested in tests/quality/test_quality.py): when the token at
position t is decoded the cache holds t + 1 tokens, so groups 0 .. floor((t+1)/G) - 1 are encoded and the rest
is the full-precision tail. Prefill positions [0, G-2] (no group complete: attention is exact, as in decode),
then feed chunks of G tokens at positions [cG-1, (c+1)G-2]: after such a chunk is appended the cache holds
(c+1)G - 1 tokens, so exactly groups 0 .. c-1 are encoded, which is what every query of the chunk sees in
token-by-token decode (a shorter last chunk keeps the same property). Inside a chunk HF's causal mask keeps
each query from the keys after it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicLayer

from ..hf_compat import cache_kw
from .methods import Method

log = logging.getLogger(__name__)


def chunk_bounds(length: int, G: int) -> list[tuple[int, int]]:
    """[start, end) of the prefill and decode chunks covering positions [0, length)."""
    bounds, start = [(0, min(G - 1, length))], G - 1
    while start < length:
        bounds.append((start, min(start + G, length)))
        start += G
    return [b for b in bounds if b[1] > b[0]]


def flush(x: torch.Tensor, done: int, full: int, quantize) -> torch.Tensor:
    """x [B, H, T, D] with positions [done, full) (newly completed groups) quantized-dequantized by `quantize`;
    the encoded groups before them and the tail after them unchanged."""
    return torch.cat([x[:, :, :done], quantize(x[:, :, done:full]).to(x.dtype), x[:, :, full:]], dim=-2)


class FakeQuantLayer(DynamicLayer):
    """A DynamicCache layer whose keys (and values, when the method quantizes them) of each group are
    quantized-dequantized once, when the group completes (reference methods only: this keeps the dense
    tensors and saves no memory). Keys and values flush on the same step, as in the product's cache."""

    def __init__(self, quantize, group_size: int, quantize_values=None):
        super().__init__()
        self.quantize, self.quantize_values, self.G, self.done = quantize, quantize_values, group_size, 0

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        full = keys.shape[-2] // self.G * self.G
        if full > self.done:
            self.keys = flush(keys, self.done, full, self.quantize)
            if self.quantize_values is not None:
                self.values = flush(values, self.done, full, self.quantize_values)
            self.done = full
        return self.keys, self.values


def make_cache(model, method: Method) -> transformers.DynamicCache:
    cache = transformers.DynamicCache(config=model.config)
    if method.kind == "reference":
        cache.layers = [FakeQuantLayer(method.quantize, method.group_size, method.quantize_values)
                        for _ in cache.layers]
    return cache


def compile_for(model, method: Method, inner: str = "inductor"):
    """The forward to evaluate: the eager model for fp / reference methods, the polarquant-compiled one for
    product methods (a fresh dynamo state per method: compiled graphs are specialized to its options)."""
    if method.kind != "product":
        return model
    torch._dynamo.reset()
    return torch.compile(model, backend="polarquant", options={**method.options, "backend": inner})


@torch.no_grad()
def window_logits(forward, model, ids: torch.Tensor, method: Method, cache=None) -> torch.Tensor:
    """Logits [B, T, V] of windows ids [B, T] under the chunked decode schedule of `method` (a fresh cache
    unless one is given)."""
    cache = make_cache(model, method) if cache is None else cache
    out = []
    for s, e in chunk_bounds(ids.shape[1], method.group_size):
        out.append(forward(ids[:, s:e], **cache_kw(cache), use_cache=True).logits.float())
    return torch.cat(out, dim=1)


@torch.no_grad()
def token_by_token_logits(forward, model, ids: torch.Tensor, method: Method) -> torch.Tensor:
    """Logits [B, T, V]: the first token alone, then one decode step per token (the ground truth)."""
    cache = make_cache(model, method)
    return torch.cat([forward(ids[:, t:t + 1], **cache_kw(cache), use_cache=True).logits.float()
                      for t in range(ids.shape[1])], dim=1)


def perplexity(model, windows: torch.Tensor, method: Method, inner: str = "inductor", batch: int = 4,
               progress: bool = True) -> dict:
    """Next-token NLL over every position but the last of each window [N, T], `batch` windows per forward.

    The last token is only a target: the model reads positions [0, T-1), so a 1024-token window is a prefill of
    G-1 and 7 full chunks (no 1-token chunk, which would cost the compiled model one more graph).
    Returns dict(ppl, nll, tokens, seconds, window_nll). Product methods fail loudly instead of falling back to
    eager if dynamo's recompile limit is hit.
    """
    forward = compile_for(model, method, inner)
    per_window, t0 = [], time.perf_counter()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for ids in tqdm(windows.split(batch), desc=method.name, disable=not progress, leave=False):
            logits = window_logits(forward, model, ids[:, :-1], method)  # [b, T-1, V]
            nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
            per_window += nll.view(ids.shape[0], -1).mean(-1).tolist()
    nll = sum(per_window) / len(per_window)
    return {"ppl": math.exp(nll), "nll": nll, "tokens": windows.shape[0] * (windows.shape[1] - 1),
            "seconds": time.perf_counter() - t0, "window_nll": per_window}


# --------------------------------------------------------------------------- per-layer errors


_CAPTURED: list | None = None


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _CAPTURED is not None:
        _CAPTURED.append((query.detach(), key.detach(), value.detach(), kwargs.get("scaling")))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def _capturing(model):
    global _CAPTURED
    transformers.AttentionInterface.register("pq_capture", _capture_attention)
    old, _CAPTURED = model.config._attn_implementation, []
    model.config._attn_implementation = "pq_capture"
    try:
        yield _CAPTURED
    finally:
        model.config._attn_implementation, _CAPTURED = old, None


def scheduled_attention(q, k, k_hat, v, G: int, scale: float | None, v_hat=None) -> torch.Tensor:
    """Causal attention where the query at position t sees k_hat (and v_hat, when given) for the tokens of its
    encoded groups (positions < floor((t+1)/G)*G) and exact k, v for the rest. q [B, Hq, T, D], the others
    [B, Hkv, T, D]."""
    T, R = q.shape[2], q.shape[1] // k.shape[1]
    k, k_hat, v = (x.float().repeat_interleave(R, dim=1) for x in (k, k_hat, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    pos = torch.arange(T, device=q.device)
    encoded = pos[None, :] < ((pos[:, None] + 1) // G * G)  # [T(query), T(key)]
    s = torch.where(encoded, q.float() @ k_hat.transpose(-1, -2), q.float() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    if v_hat is None:
        return p @ v
    v_hat = v_hat.float().repeat_interleave(R, dim=1)
    return (p * encoded) @ v_hat + (p * ~encoded) @ v


@torch.no_grad()
def layer_errors(model, windows: torch.Tensor, methods: list[Method], progress: bool = True) -> dict:
    """Per layer and method, with the fp model's own q/k/v of each window (teacher forced, so errors do not
    compound): attention-output relative error ||o_m - o|| / ||o|| under the decode schedule, and key
    reconstruction error ||k_hat - k|| / ||k|| over the encoded groups (methods that quantize values also
    read v_hat for the encoded groups). Product methods use the codec decoded
    densely (the LUT attention reads the same reconstruction)."""
    from .methods import polar

    quantizers = {m.name: (m.quantize or polar(m.options["radius_bits"], m.options["angle_bits"], m.group_size,
                                                 kind=m.options.get("codec", "polar")))
                  for m in methods if m.kind != "fp"}
    value_quantizers = {m.name: m.quantize_values for m in methods if m.kind != "fp"}
    L = model.config.num_hidden_layers
    acc = {n: {"attn_num": [0.0] * L, "attn_den": [0.0] * L, "key_num": [0.0] * L, "key_den": [0.0] * L}
           for n in quantizers}
    for ids in tqdm(windows, desc="layer errors", disable=not progress, leave=False):
        with _capturing(model) as captured:
            model(ids[None], use_cache=False)
        for layer, (q, k, v, scale) in enumerate(captured):
            G = methods[0].group_size
            full = k.shape[2] // G * G
            exact = scheduled_attention(q, k, k, v, G, scale)
            for name, quantize in quantizers.items():
                k_hat = flush(k, 0, full, quantize)
                qv = value_quantizers[name]
                v_hat = flush(v, 0, full, qv) if qv is not None else None
                out = scheduled_attention(q, k, k_hat, v, G, scale, v_hat)
                a = acc[name]
                a["attn_num"][layer] += (out - exact).pow(2).sum().item()
                a["attn_den"][layer] += exact.pow(2).sum().item()
                a["key_num"][layer] += (k_hat - k)[:, :, :full].float().pow(2).sum().item()
                a["key_den"][layer] += k[:, :, :full].float().pow(2).sum().item()
    return {n: {"attn_rel_err": [math.sqrt(x / max(y, 1e-30)) for x, y in zip(a["attn_num"], a["attn_den"])],
                "key_rel_err": [math.sqrt(x / max(y, 1e-30)) for x, y in zip(a["key_num"], a["key_den"])]}
            for n, a in acc.items()}
