"""Coverage of Hugging Face decoder families: tiny random-weight models built from configs (no downloads),
run through `model.compile(backend="polarquant")` + `generate`, measured against eager and against the
reference codec. tests/models/ asserts on these measurements; `pqcompile coverage --markdown` writes the
support table of docs/models.md from them.

How a family is judged (one prompt of PROMPT tokens, then `steps` greedy decode steps with DynamicCache):
  sites       pqcompile.counters: attention sites rewritten / declined (with the reason), graphs compiled.
  pairing     the pairing the compiler inferred vs the family's RoPE layout (Family.rope).
  reference   eager HF, teacher-forced on the compiled run's tokens, whose decode attention reads keys
              passed through codec.decode(codec.encode(k)) with the *true* pairing: the same quantized keys
              the compiled run holds (groups flushed at the same lengths, the same exact tail). Compiled vs
              reference differs only by fp32 reassociation (LUT scores vs dense dequantized keys) and by keys
              that sit on a bin edge in one graph but not the other: err_ref (relative L2 error of the
              logits, max over steps) is ~1e-7, far below err_ref_eager (what the codec itself changes).
  eager       plain eager HF teacher-forced on the same tokens: err_eager and top-1 agreement show what the
              4+4 codec itself costs on this model (random models: attention is near uniform, so small).
              Teacher forcing compares every step on the same prefix; free-running tokens would compare
              different prefixes after the first near-tie flip.
  tokens      free-running greedy tokens of the compiled run vs eager generate: the common prefix length
              (reported only: on a random model one near-tie flips every later token).
  bytes       key-cache bytes per token over all layers, as held by PolarKeys (== codec.state_bits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers as T

from . import codec, counters
from .cache import PolarKeys
from .codec import Codec, Pairing
from .config import PolarQuantConfig
from .hf_compat import cache_kw, cache_of

PROMPT = 37  # 2 complete groups of 16 + a 5-token tail: decode steps flush groups at 48, 64, 80, 96
OPTIONS = {"group_size": 16}  # radius 4 + angle 4 bits, the reference configuration but for the group size
VOCAB, HIDDEN, HEADS, LAYERS = 256, 64, 4, 2  # head_dim 16


def _common(**kw) -> dict:
    d = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": LAYERS,
             "num_attention_heads": HEADS, "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2,
             "pad_token_id": 0}
    d.update(kw)
    return d


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[], tuple]  # -> (config, model class)
    rope: str  # the pairing that matches the model's RoPE (codec.Pairing spec)
    rope_note: str  # the RoPE layout in words
    declined: int = 0  # attention layers expected to be declined (per graph)
    decline_reason: str = ""  # a substring of their reason
    inductor: bool = False  # run through the default inductor path in the tests (others use aot_eager)

    def build(self, attn: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
        cfg, cls = self.make()
        for k, v in overrides.items():
            setattr(cfg, k, v)
        cfg._attn_implementation = attn
        torch.manual_seed(seed)
        return cls(cfg).eval()


FAMILIES = [
    Family("llama", lambda: (T.LlamaConfig(**_common(num_key_value_heads=2)), T.LlamaForCausalLM),
           "half", "rotate_half, GQA 4/2"),
    # Mistral v0.2+ (sliding_window null); v0.1's 4096 window is a declined case (tests/models/test_declined.py)
    Family("mistral", lambda: (T.MistralConfig(**_common(num_key_value_heads=2, sliding_window=None)),
                               T.MistralForCausalLM), "half", "rotate_half, GQA"),
    Family("mixtral", lambda: (T.MixtralConfig(**_common(num_key_value_heads=2, num_local_experts=4,
                                                         num_experts_per_tok=2, sliding_window=None)),
                               T.MixtralForCausalLM), "half", "rotate_half, MoE"),
    Family("qwen2", lambda: (T.Qwen2Config(**_common(num_key_value_heads=2)), T.Qwen2ForCausalLM),
           "half", "rotate_half, qkv bias"),
    Family("qwen3", lambda: (T.Qwen3Config(**_common(num_key_value_heads=2, head_dim=16)), T.Qwen3ForCausalLM),
           "half", "rotate_half after q/k RMSNorm"),
    Family("gemma", lambda: (T.GemmaConfig(**_common(num_key_value_heads=1, head_dim=16)), T.GemmaForCausalLM),
           "half", "rotate_half, MQA"),
    Family("gemma3", lambda: (T.Gemma3TextConfig(**_common(num_key_value_heads=2, head_dim=16, sliding_window=8,
                                                           layer_types=["sliding_attention", "full_attention"])),
                              T.Gemma3ForCausalLM), "half", "rotate_half, q/k norms, sliding + full layers",
           declined=1, decline_reason="sliding-window layer"),
    Family("phi3", lambda: (T.Phi3Config(**_common(num_key_value_heads=2)), T.Phi3ForCausalLM),
           "half", "rotate_half, fused qkv (slices)"),
    Family("phi", lambda: (T.PhiConfig(**_common(partial_rotary_factor=0.5)), T.PhiForCausalLM),
           "half@8", "partial rotary 50%, rotate_half"),
    Family("gpt_neox", lambda: (T.GPTNeoXConfig(**_common(rotary_pct=0.25)), T.GPTNeoXForCausalLM),
           "half@4", "partial rotary 25%, fused qkv (chunk)"),
    Family("stablelm", lambda: (T.StableLmConfig(**_common(num_key_value_heads=2, partial_rotary_factor=0.25)),
                                T.StableLmForCausalLM), "half@4", "partial rotary 25%"),
    Family("falcon", lambda: (T.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                             num_attention_heads=HEADS, multi_query=True,
                                             new_decoder_architecture=False, bos_token_id=1, eos_token_id=2),
                              T.FalconForCausalLM), "half", "rotate_half, MQA, fused qkv, default scale"),
    Family("gpt2", lambda: (T.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                         n_positions=512, bos_token_id=1, eos_token_id=2), T.GPT2LMHeadModel),
           "half", "no RoPE (learned positions), fused c_attn"),
    Family("opt", lambda: (T.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=2 * HIDDEN,
                                       num_hidden_layers=LAYERS, num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN,
                                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0),
                           T.OPTForCausalLM), "half", "no RoPE, pre-scaled q (scale=1.0)"),
    Family("gptj", lambda: (T.GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, rotary_dim=8,
                                         n_positions=512, bos_token_id=1, eos_token_id=2), T.GPTJForCausalLM),
           "interleaved@8", "interleaved (rotate_every_two), partial 8 of 16", inductor=True),
    Family("olmo", lambda: (T.OlmoConfig(**_common(num_key_value_heads=2)), T.OlmoForCausalLM),
           "half", "rotate_half, non-parametric norm"),
    Family("olmo2", lambda: (T.Olmo2Config(**_common(num_key_value_heads=2)), T.Olmo2ForCausalLM),
           "half", "rotate_half, q/k norms before RoPE"),
    Family("granite", lambda: (T.GraniteConfig(**_common(num_key_value_heads=2, attention_multiplier=0.2)),
                               T.GraniteForCausalLM), "half", "rotate_half, attention_multiplier scale"),
]
BY_NAME = {f.name: f for f in FAMILIES}


# --------------------------------------------------------------------------- the reference: eager + codec


@contextlib.contextmanager
def reference_keys(model: torch.nn.Module, modules: dict[str, str], cfg: Codec):
    """Eager SDPA calls with one query (decode) in `modules` ({module path: pairing spec}) attend over
    codec.decode(codec.encode(keys)): the quantized keys the compiled run holds, with the given pairing."""
    # (module path, query tokens) of the attention module running now. The token count comes from the module's
    # hidden states, not from SDPA's query: transformers >= 5.25 packs a decode step's GQA query heads into the
    # query-length dimension ([B, Hkv, n_rep, D]) when it cannot pass enable_gqa (a mask, MQA Falcon).
    current: list = [None, None]

    def entering(path):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            current[:] = [path, hidden.shape[-2] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else None]
        return hook

    hooks = [model.get_submodule(path).register_forward_pre_hook(entering(path), with_kwargs=True) for path in modules]
    sdpa = F.scaled_dot_product_attention

    def quantized_sdpa(q, k, v, *args, **kwargs):
        tokens = current[1] if current[1] is not None else q.shape[-2]
        if current[0] in modules and tokens == 1:
            c = dataclasses.replace(cfg, pairing=Pairing.parse(modules[current[0]]))
            k = codec.decode(codec.encode(k, c), k.shape[2], c)
        return sdpa(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = quantized_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()


@torch.no_grad()
def teacher_forced(model: torch.nn.Module, seq: torch.Tensor, prompt: int) -> torch.Tensor:
    """Eager (uncompiled) prefill of seq[:, :prompt], then one token at a time: logits [steps, V]."""
    cache = T.DynamicCache(config=model.config)
    out = model.forward(seq[:, :prompt], **cache_kw(cache), use_cache=True)
    logits = [out.logits[0, -1]]
    for t in range(prompt, seq.shape[1] - 1):
        out = model.forward(seq[:, t:t + 1], **cache_kw(cache), use_cache=True)
        logits.append(out.logits[0, -1])
    return torch.stack(logits)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over steps of ||a - b|| / ||b|| (logits [steps, V])."""
    a, b = a.double(), b.double()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def top1(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


# --------------------------------------------------------------------------- one family, measured


@dataclasses.dataclass
class Measurement:
    family: str
    steps: int
    graphs: int
    rewritten: int  # attention layers rewritten (prefill graph)
    declined: int  # attention layers declined (prefill graph)
    reasons: list[str]
    pairings: list[str]  # inferred, per rewritten prefill site
    err_ref: float  # logits rel. error (max over steps), compiled vs eager + reference codec (true pairing)
    err_eager: float  # compiled vs plain eager
    err_ref_eager: float  # eager + reference codec vs plain eager: what the codec itself costs
    top1_eager: float  # teacher-forced argmax agreement, compiled vs eager
    top1_ref: float  # compiled vs eager + reference codec
    top1_ref_eager: float  # eager + reference codec vs plain eager
    common_prefix: int  # free-running: tokens equal to eager generate before the first difference
    key_bytes_per_token: float  # all layers, as held
    dense_fp16_bytes_per_token: float
    bytes_accounted: bool  # every PolarKeys holds exactly B*H*codec.state_bits bits
    compile_s: float  # wall time of the compiled generate (compiles + run)


@torch.no_grad()
def measure(family: Family, steps: int = 64, inner: str = "aot_eager", options: dict | None = None,
            model: torch.nn.Module | None = None, seed: int = 1, attn: str = "sdpa") -> Measurement:
    """Run one family eager and compiled; see the module docstring for what each number means.
    attn="eager": the model uses HF's eager attention; the reference codec then runs in an SDPA build of
    the same weights (reference_keys intercepts SDPA calls)."""
    torch._dynamo.reset()  # the recompile limit is per code object, shared by every instance of a class
    counters.clear()
    model = model or family.build(attn=attn)
    sdpa_model = model if attn == "sdpa" else family.build(attn="sdpa")
    opts = {**OPTIONS, **(options or {}), "backend": inner}
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, PROMPT), generator=gen)
    kw = {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False, "return_dict_in_generate": True}
    eager_seq = model.generate(ids, **kw).sequences

    model.compile(backend="polarquant", options=opts)
    t0 = time.perf_counter()
    out = model.generate(ids, output_logits=True, **kw)
    compile_s = time.perf_counter() - t0
    model._compiled_call_impl = None  # back to eager for the references
    seq, polar = out.sequences, torch.stack(out.logits)[:, 0]  # [steps, V]

    prefill = counters.graphs[0]["sites"]
    rewritten = {m: p for m, kind, status, _, p in prefill if status == "rewritten"}
    c = Codec.from_config(PolarQuantConfig.from_options(opts), Pairing())  # (reference_keys pairs per family)
    eager = teacher_forced(model, seq, PROMPT)
    with reference_keys(sdpa_model, {m: family.rope for m in rewritten}, c):
        ref = teacher_forced(sdpa_model, seq, PROMPT)

    held, accounted = 0, True
    keys = [layer.keys for layer in cache_of(out).layers]
    for k in keys:
        B, H, n, D = k.shape
        if isinstance(k, PolarKeys):
            held += k.nbytes_held()
            accounted &= k.nbytes_held() * 8 == B * H * codec.state_bits(k.codec, n, D, k.tail.element_size() * 8,
                                                                           capacity=k.capacity)
        else:
            held += k.numel() * k.element_size()
    n_tok = cache_of(out).get_seq_length()
    dense16 = sum(k.shape[0] * k.shape[1] * k.shape[3] * 2 for k in keys)
    differ = (seq[0, PROMPT:] != eager_seq[0, PROMPT:]).nonzero()
    return Measurement(
        family=family.name, steps=steps, graphs=counters.totals["graphs"],
        rewritten=len(rewritten), declined=sum(s[2] == "declined" for s in prefill),
        reasons=sorted({s[3] for s in prefill if s[2] == "declined"}), pairings=sorted(set(rewritten.values())),
        err_ref=rel_err(polar, ref), err_eager=rel_err(polar, eager), err_ref_eager=rel_err(ref, eager),
        top1_eager=top1(polar, eager), top1_ref=top1(polar, ref), top1_ref_eager=top1(ref, eager),
        common_prefix=int(differ[0, 0]) if len(differ) else steps,
        key_bytes_per_token=held / n_tok, dense_fp16_bytes_per_token=dense16, bytes_accounted=accounted,
        compile_s=compile_s,
    )


# --------------------------------------------------------------------------- the support table (docs/models.md)

START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"
COMPILE_TIMES = "bench/results/compile_time.json"  # written by bench/compile_time.py


def markdown(rows: list[Measurement], compile_times: dict | None = None) -> str:
    compile_times = compile_times or {}
    lines = [
        (f"Generated by `python -m pqcompile.cli coverage --markdown` (tiny random-weight models, fp32, "
        f"{LAYERS} layers, head_dim 16, group size 16, the default `{PolarQuantConfig().codec}` key codec at 4+4 bits, "
        f"prompt {PROMPT} + {rows[0].steps} greedy steps, "
        f"DynamicCache, torch {torch.__version__}, transformers {T.__version__}). Logits are compared "
        "teacher-forced on the compiled run's tokens: *ref* = eager with the reference codec's quantized keys "
        "(what the compiled run must equal), *eager* = plain eager (what the codec costs). Compile time: "
        "`bench/compile_time.py` (prefill + decode graphs). K bytes/token: all layers' key cache as held at the "
        "end (codes + bf16 group params with room for the next group's flush, and the full-precision ring of one "
        f"group, here fp32; {PROMPT + rows[0].steps} tokens: at this size the ring and the spare rows weigh more "
        "than the codes; 4+4 bits with group 16 is 6 bits/element once they are amortized, 4.25 with the default "
        "group 128)."),
        "",
        ("| family | RoPE | pairing inferred | layers rewritten / declined | rel. err vs ref | rel. err vs eager "
        "| top-1 vs eager | same tokens as eager generate | K bytes/token held (dense fp32 / fp16) | compile s polarquant / inductor |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in rows:
        fam = BY_NAME[m.family]
        ok = "" if m.pairings == [fam.rope] else " (expected " + fam.rope + ")"
        declined = f"{m.declined} ({'; '.join(r.split(':')[0] for r in m.reasons)})" if m.declined else "0"
        ct = compile_times.get(m.family)
        ct = f"{ct['polarquant_s']:.0f} / {ct['inductor_s']:.0f} ({ct['ratio']:.2f}x)" if ct else "not measured"
        lines.append(
            f"| {m.family} | {fam.rope_note} | {', '.join(m.pairings) or '-'}{ok} | {m.rewritten} / {declined} "
            f"| {m.err_ref:.1e} | {m.err_eager:.1e} | {m.top1_eager:.0%} | {m.common_prefix}/{m.steps} "
            f"| {m.key_bytes_per_token:.0f} ({2 * m.dense_fp16_bytes_per_token:.0f} / "
            f"{m.dense_fp16_bytes_per_token:.0f}) | {ct} |")
    lines += [
        "",
        ("Declined, left dense and reported (tests/models/test_declined.py): sliding-window layers "
        "(`cat(...)[:, :, -w:]` caches: Mistral v0.1, Gemma2/3 sliding layers), logit softcapping outside SDPA "
        "(Gemma2 eager), encoder-decoder cross-attention (BART), training-mode attention dropout, "
        "`use_cache=False`. Eager attention (`attn_implementation=\"eager\"`) is matched into an SDPA site "
        "(Llama, GPT-2, GPT-J, Falcon, OPT tested)."),
    ]
    return "\n".join(lines)


def write_table(table: str, path: str = "docs/models.md") -> None:
    """Replace the text between the coverage markers (appending a section with them if missing)."""
    import pathlib

    p = pathlib.Path(path)
    text = p.read_text()
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Supported models\n\n" + block + "\n"
    p.write_text(text)


def run(args) -> tuple[str, int]:
    """`pqcompile coverage [--markdown] [--steps N] [--families ...]`: run the families, write the table into
    docs/models.md with --markdown; returns (table, exit code: 1 if a family's pairing or parity is off)."""
    import json
    import os
    import pathlib
    import warnings

    warnings.filterwarnings("ignore")
    names = args.families or [f.name for f in FAMILIES]
    rows = []
    for name in names:
        rows.append(measure(BY_NAME[name], steps=args.steps, inner=args.inner))
    times = json.loads(pathlib.Path(COMPILE_TIMES).read_text()) if os.path.exists(COMPILE_TIMES) else {}
    table = markdown(rows, times)
    if args.markdown:
        write_table(table, args.readme)
    bad = [m.family for m in rows if m.pairings != [BY_NAME[m.family].rope] or m.err_ref > 1e-5]
    return table, 1 if bad else 0
