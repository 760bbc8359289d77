"""Turn eager attention (matmul-softmax-matmul, HF attn_implementation="eager") into an SDPA node, so that
trace_kv_append / infer_pairing / rewrite_attention treat it like any other attention site.

Shape matched (written once; the variants are the optional steps and their spellings):
  s = matmul(q', k.transpose(-2, -1))    q' = q or a no-op cast of q (GPT-J: query.to(float32))
                                          transpose(2, 3) (Llama family) | transpose(-1, -2) (GPT-2, GPT-J)
  s = s * c | s / c                      any number of scalar factors: the scale (OPT: 1.0, q pre-scaled)
  s = s + mask                           additive float mask, optional
  p = softmax(s, dim=-1[, dtype])        F.softmax | torch.softmax | Tensor.softmax
  p = p.to(dtype) | p.type(dtype)        casts (HF: back to the query's / value's dtype), optional
  p = dropout(p, p=0.0 | training=False) optional
  o = matmul(p, v)
becomes  o = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=c). The softmax then runs in the
SDPA kernel's precision: identical for fp32 models; for bf16/fp16 models eager's probabilities rounded to
the model dtype before p @ v, SDPA's are not (the SDPA path of the same model does the same).

Declined (the graph stays exactly as it was; a Site records the reason):
  - logit softcapping between the scores and the softmax (Gemma2 eager: s / c -> tanh -> * c): SDPA has
    no softcap argument,
  - active dropout, a scale that is a tensor, scores or probabilities used elsewhere (output_attentions),
    or any other op in the chain,
  - a site trace_kv_append would decline (no cache, cross-attention, sliding window, ...): converting it
    would change a site that then stays dense; the reason is trace_kv_append's.
"""

from __future__ import annotations

import operator
from numbers import Number

import torch
from torch import fx

from ..config import PolarQuantConfig
from . import trace_kv_append
from .common import (
    PassResult,
    Site,
    SiteStatus,
    arg,
    eliminate_dead_code,
    graph_outputs,
    is_call,
    module_path,
    sites,
    val,
)

REQUIRES: frozenset[str] = frozenset()
PROVIDES = frozenset({"sdpa"})  # the facts are listed in common.FACTS

_MATMUL = (torch.matmul, operator.matmul, "matmul")
_SOFTMAX = (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax, "softmax")
_CAST = ("to", "type", "float")
_DROPOUT = (torch.nn.functional.dropout,)
_MUL = (operator.mul, operator.imul, torch.mul, "mul")
_DIV = (operator.truediv, operator.itruediv, torch.div, "div")  # itruediv: Falcon's `scores /= sqrt(d)`
_ADD = (operator.add, torch.add, "add")
_TANH = (torch.tanh, "tanh")


class _Decline(Exception):
    pass


def _only_user(node: fx.Node) -> fx.Node:
    if len(node.users) != 1:
        raise _Decline(f"{node.name} is also used elsewhere (output_attentions?)")
    return next(iter(node.users))


def _scalar_operand(node: fx.Node, x: fx.Node):
    a, b = node.args[0], node.args[1]
    other = b if a is x else a
    if isinstance(other, Number) and not isinstance(other, bool):
        return float(other)
    raise _Decline(f"{node.name}: the scale is a tensor, not a number")


def _strip_noop_cast(node, chain: list):
    """x.to(dtype) that keeps x's dtype -> x (GPT-J casts q and k to fp32: a no-op on fp32 models)."""
    while is_call(node, *_CAST) and val(node) is not None and val(node.args[0]) is not None \
            and val(node).dtype == val(node.args[0]).dtype:
        chain.append(node)
        node = node.args[0]
    return node


def _key_of(transposed, chain: list) -> fx.Node:
    if not is_call(transposed, "transpose", torch.transpose):
        raise _Decline("the key operand of q @ k^T is not a transpose")
    ndim = val(transposed.args[0]).dim()
    dims = {d % ndim for d in transposed.args[1:3]}
    if dims != {ndim - 2, ndim - 1}:
        raise _Decline("the key is transposed on other dims than the last two")
    return _strip_noop_cast(transposed.args[0], chain)


def _match(softmax: fx.Node):
    """-> (q, k, v, mask, scale, chain nodes, output matmul) or raise _Decline."""
    score_dim = arg(softmax, 1, "dim")
    s = softmax.args[0]
    if val(s) is None or score_dim not in (-1, val(s).dim() - 1):
        raise _Decline("softmax is not over the last dim")
    chain, scale, mask = [softmax], 1.0, None
    while not is_call(s, *_MATMUL):  # walk the scores back to q @ k^T
        chain.append(s)
        if is_call(s, *_TANH):
            raise _Decline("logit softcapping (tanh) outside SDPA")
        if is_call(s, *_MUL):
            x = s.args[0] if isinstance(s.args[0], fx.Node) and val(s.args[0]).dim() == val(s).dim() else s.args[1]
            scale *= _scalar_operand(s, x)
        elif is_call(s, *_DIV) and isinstance(s.args[0], fx.Node):
            x = s.args[0]
            if is_call(x, *_TANH):
                raise _Decline("logit softcapping (tanh) outside SDPA")
            scale /= _scalar_operand(s, x)
        elif is_call(s, *_ADD) and mask is None and all(isinstance(a, fx.Node) for a in s.args[:2]):
            if scale != 1.0:  # walking backwards: this scale was applied after the mask, scaling it too
                raise _Decline("the scores are scaled after the mask is added")
            x, mask = (s.args[0], s.args[1]) if is_call(s.args[0], *_MATMUL, *_MUL, *_DIV) else (s.args[1], s.args[0])
        else:
            raise _Decline(f"unrecognized op {getattr(s.target, '__name__', s.target)} between the scores and "
                           "the softmax")
        if len(s.users) != 1:
            raise _Decline(f"{s.name} is also used elsewhere")
        s = x
    if len(s.users) != 1:
        raise _Decline("the scores are also used elsewhere")
    chain.append(s)
    q, k = _strip_noop_cast(s.args[0], chain), _key_of(s.args[1], chain)
    chain.append(s.args[1])
    prob = softmax
    p = _only_user(softmax)
    while is_call(p, *_CAST, *_DROPOUT):
        if is_call(p, *_DROPOUT) and arg(p, 1, "p", 0.5) not in (0, 0.0) and arg(p, 2, "training", True):
            raise _Decline("attention dropout is active (training mode)")
        chain.append(p)
        prob, p = p, _only_user(p)
    if not (is_call(p, *_MATMUL) and p.args[0] is prob):
        raise _Decline("the probabilities do not feed p @ v")
    return q, k, p.args[1], mask, scale, chain, p


def _looks_like_attention(softmax: fx.Node) -> bool:
    """softmax fed (within a few ops) by a matmul and feeding a matmul: not a MoE router's softmax."""
    p = softmax
    while len(p.users) == 1 and is_call(next(iter(p.users)), *_CAST, *_DROPOUT):
        p = next(iter(p.users))
    if not any(is_call(u, *_MATMUL) and u.args[0] is p for u in p.users):
        return False
    frontier = [softmax]
    for _ in range(6):
        frontier = [a for n in frontier for a in n.all_input_nodes]
        if any(is_call(n, *_MATMUL) for n in frontier):
            return True
    return False


def run(gm: fx.GraphModule, cfg: PolarQuantConfig) -> PassResult:
    result = PassResult("match_eager_attention")
    outputs = graph_outputs(gm)
    replaced: list[fx.Node] = []  # the eager chains' outputs, now without users
    for softmax in [n for n in gm.graph.nodes if is_call(n, *_SOFTMAX) and _looks_like_attention(n)]:
        result.matched += 1
        try:
            q, k, v, mask, scale, chain, out = _match(softmax)
        except _Decline as why:
            _record(gm, softmax, f"eager attention: {why}", result)
            continue
        with gm.graph.inserting_before(out):
            sdpa = gm.graph.call_function(torch._C._nn.scaled_dot_product_attention, (q, k, v),
                                          {"attn_mask": mask, "dropout_p": 0.0, "scale": scale, "is_causal": False})
        sdpa.meta.update({key: out.meta[key] for key in ("val", "example_value", "nn_module_stack", "stack_trace")
                          if key in out.meta})
        probe = Site(sdpa=sdpa, module=module_path(out))
        trace_kv_append.trace(probe, outputs, ignore=set(chain) | {out})
        if probe.status is SiteStatus.DECLINED:
            gm.graph.erase_node(sdpa)  # the graph stays exactly as it was
            _record(gm, out, f"eager attention: {probe.reason}", result)
            continue
        out.replace_all_uses_with(sdpa)
        replaced.append(out)
        result.rewritten += 1
    if replaced:
        eliminate_dead_code(gm, replaced)
    return result


def _record(gm: fx.GraphModule, node: fx.Node, reason: str, result: PassResult) -> None:
    site = Site(sdpa=node, module=module_path(node))
    site.decline(reason)
    sites(gm).append(site)
    result.skipped.append((node.name, reason))
