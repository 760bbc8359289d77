"""Polar-family key codecs vs per-channel quantization at equal bits (issue #18): fake-quant perplexity study.

Every codec works per (128-token group, RoPE pair (x, y)) with the repo codec's scalar quantizer (bf16 min rounded
down, scale rounded up, code = floor((v - min) / scale) clamped, bin midpoint). A codec is a *mode family*: per
(group, pair) the encoder tries each mode of the family and keeps the one with the smallest (optionally
query-energy-weighted) squared error over the group's tokens. Modes, for a pair of code width w bits per token:
  c(a,b)  Cartesian (per-channel): x with a bits, y with b bits (a + b = w)   decode: 2 FMAs
  p(a,b)  polar, circular angle arc: radius a bits, angle b bits              decode: 2 FMAs + cos/sin + 2 mul
  q(a,b)  polar, linear angle range (the product's codec)                     decode: same as p
  l(a,b)  polar with log radius, circular arc                                 decode: p + exp
  d(a,b)  Cartesian before RoPE: (u, v) = pair rotated back by theta_j * pos  decode: 2 FMAs + cos/sin + 4 mul/FMA
Method names: FAMILY-wW[-qw][-clip][-log][-A], e.g. prec4-w6-qw-aH.
  FAMILY  cart | polar | circ | pre (one mode at w/2 + w/2) | hyb (c and p at w/2 + w/2) | hybs, hyb4, pre4,
          prec4, hybc, hybd (4 modes, see family_modes) | all, allpre (every split; costs mode bits)
  wW      mean code bits per pair and token (8 = 4 bits/element)
  qw      mode choice weighted by the calibrated query energy E[q_x^2], E[q_y^2] of the pair (summed over the
          query heads of the kv head); otherwise plain squared error
  clip    the encoder also tries each linear range shrunk about its centre (CLIP factors); decode unchanged
  log     polar modes quantize log radius
  A       static bit allocation by greedy marginal gains on calibrated distortion curves (expected squared
          logit error per token; unweighted MSE with a `u`): aP one width table per pair index for the whole
          model, aH one per (layer, kv head) with W * P bits per token each, aG one budget for the whole model;
          a trailing number (aH4) is a floor on every pair's width
Baselines are the repo's own quantizers (pqcompile.quality.methods): polar-R+A, polar-circ-R+A, channel-intB.
Bits per element = code bits + 4 bf16 per (group, pair) (0.25) + mode bits beyond the 2 free sign bits of the
two scales (see mode_bits).

Run from the repo root (1 thread; the converted model is cached under $PQCOMPILE_CACHE, default /tmp/smollm2):
  .venv/bin/python bench/codec_study/codec_study.py --text lee --tokens 8192 --methods A,B --out NAME
  .venv/bin/python bench/codec_study/codec_study.py --table            # markdown table of results/*.json
  .venv/bin/python bench/codec_study/codec_study.py --paired A:B C:D   # paired per-window differences
Selection text: lee windows 0..7; calibration (query energies, allocation): lee windows 8..9, never scored;
report: wiki windows 0..15. Results: bench/codec_study/results/NAME.json (written after every method).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import time
from pathlib import Path

os.environ.setdefault("PQCOMPILE_CACHE", "/tmp/smollm2")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from pqcompile import codec as pqc  # noqa: E402
from pqcompile.quality import data, evaluate  # noqa: E402
from pqcompile.quality import methods as qm  # noqa: E402

G = 128
HERE = Path(__file__).resolve().parent
TWO_PI = 2 * math.pi

# --------------------------------------------------------------------------- scalar quantizers (the codec's)


def uq(v: torch.Tensor, bits: int) -> torch.Tensor:
    """v [..., G, P] -> reconstruction, one (min, scale) per slice along the tokens (dim -2)."""
    vmin, s = pqc.group_params(v, bits)
    vmin, s = vmin.float().unsqueeze(-2), s.float().unsqueeze(-2)
    return pqc.bin_center(pqc.bin_index(v, vmin, s, bits), vmin, s)


CLIP = (1.0, 0.9, 0.8, 0.7, 0.6)


def uq_clip(v: torch.Tensor, bits: int) -> torch.Tensor:
    """uq with the range shrunk about its centre by the factor (of CLIP) with the least squared error, chosen
    per (group, channel) by the encoder; the decoder is unchanged (it only sees min and scale)."""
    lo, hi = v.amin(-2, keepdim=True), v.amax(-2, keepdim=True)
    c, h = (lo + hi) / 2, (hi - lo) / 2
    best, best_err = None, None
    for f in CLIP:
        vmin = pqc.round_bf16(c - f * h, up=False).float()
        s = pqc.round_bf16((c + f * h - vmin) / (1 << bits), up=True).float()
        r = pqc.bin_center(pqc.bin_index(v, vmin, s, bits), vmin, s)
        err = (r - v).pow(2).sum(-2, keepdim=True)
        if best is None:
            best, best_err = r, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, r, best), torch.where(better, err, best_err)
    return best


def arc(phi: torch.Tensor):
    """Shortest arc holding the angles of each (group, pair): (a_min [..., 1, P] bf16-exact, span [..., 1, P])."""
    start, width = qm.circular_arc(phi)
    a_min = pqc.round_bf16(start, up=False).float()
    return a_min.unsqueeze(-2), (width + (start - a_min)).unsqueeze(-2)


def cq(phi: torch.Tensor, bits: int, a_min: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Circular angle quantizer (as methods.polar_circular): codes span the arc from a_min."""
    a_s = pqc.round_bf16(span / (1 << bits), up=True).float()
    rel = torch.remainder(phi - a_min, TWO_PI)
    rel = torch.where(rel > (a_s * (1 << bits) + TWO_PI) / 2, rel - TWO_PI, rel)
    return pqc.bin_center(pqc.bin_index(rel, torch.zeros_like(a_min), a_s, bits), a_min, a_s)


class Pairs:
    """Lazily computed views of one batch of key groups: x, y [B, H, n, G, P] and derived quantities."""

    def __init__(self, x, y, pos=None, theta=None):
        self.x, self.y, self.pos, self.theta = x, y, pos, theta
        self._c = {}

    def get(self, name):
        if name not in self._c:
            x, y = self.x, self.y
            if name == "r":
                v = torch.hypot(x, y)
            elif name == "phi":
                v = torch.atan2(y, x)
            elif name == "arc":
                v = arc(self.get("phi"))
            elif name == "logr":
                v = torch.log(self.get("r").clamp_min(1e-6))
            elif name == "rot":  # cos, sin of theta_j * pos: [1, 1, n, G, P]
                ang = self.pos * self.theta
                v = (torch.cos(ang), torch.sin(ang))
            elif name == "uv":  # pre-RoPE pair: rotate back by -theta * pos
                c, s = self.get("rot")
                v = (x * c + y * s, y * c - x * s)
            self._c[name] = v
        return self._c[name]


def reconstruct(mode, pr: Pairs, clip: bool = False):
    kind, a, b = mode
    uq = uq_clip if clip else globals()["uq"]
    if kind == "c":
        return uq(pr.x, a), uq(pr.y, b)
    if kind == "d":
        u, v = pr.get("uv")
        uh, vh = uq(u, a), uq(v, b)
        c, s = pr.get("rot")
        return uh * c - vh * s, vh * c + uh * s
    if kind == "q":
        r, ph = uq(pr.get("r"), a), uq(pr.get("phi"), b)
    elif kind in ("p", "l"):
        r = uq(pr.get("r"), a) if kind == "p" else torch.exp(globals()["uq"](pr.get("logr"), a))
        ph = cq(pr.get("phi"), b, *pr.get("arc"))
    return r * torch.cos(ph), r * torch.sin(ph)


# --------------------------------------------------------------------------- mode families


def family_modes(family: str, w: int, log: bool = False) -> list[tuple[str, int, int]]:
    """The modes a pair of code width w may use (component bits 0..8)."""
    h, pk = w // 2, ("l" if log else "p")
    ok = lambda m: 0 <= m[1] <= 8 and 0 <= m[2] <= 8  # noqa: E731
    if family == "cart":
        modes = [("c", h, w - h)]
    elif family == "polar":
        modes = [("q", h, w - h)]
    elif family == "circ":
        modes = [(pk, h, w - h)]
    elif family == "pre":
        modes = [("d", h, w - h)]
    elif family == "hyb":
        modes = [("c", h, w - h), (pk, h, w - h)]
    elif family == "hybs":  # Cartesian + polar with angle-heavy splits
        modes = [("c", h, w - h), (pk, h, w - h), (pk, h - 1, w - h + 1), (pk, h - 2, w - h + 2)]
    elif family == "hyb4":  # the 4 modes chosen most often by `all` (2 free flag bits)
        if w % 2 == 0:
            modes = [("c", h, h), ("c", h + 1, h - 1), ("c", h - 1, h + 1), (pk, h - 1, h + 1)]
        else:
            modes = [("c", h, h + 1), ("c", h + 1, h), (pk, h, h + 1), (pk, h - 1, h + 2)]
    elif family == "pre4":  # pre-RoPE Cartesian splits + polar (one decode: rotate (u, v') by psi)
        if w % 2 == 0:
            modes = [("d", h, h), ("d", h + 1, h - 1), ("d", h - 1, h + 1), (pk, h - 1, h + 1)]
        else:
            modes = [("d", h, h + 1), ("d", h + 1, h), (pk, h, h + 1), (pk, h - 1, h + 2)]
    elif family == "prec4":  # pre-RoPE Cartesian splits only
        if w % 2 == 0:
            modes = [("d", h, h), ("d", h + 1, h - 1), ("d", h - 1, h + 1), ("d", h + 2, h - 2)]
        else:
            modes = [("d", h, h + 1), ("d", h + 1, h), ("d", h - 1, h + 2), ("d", h + 2, h - 1)]
    elif family == "hybc":  # Cartesian splits only
        modes = [("c", h, w - h), ("c", h + 1, w - h - 1), ("c", h - 1, w - h + 1), ("c", h + 2, w - h - 2)]
    elif family == "all":
        modes = [(k, a, w - a) for k in ("c", pk) for a in range(w + 1)]
    elif family == "allpre":
        modes = [(k, a, w - a) for k in ("c", pk, "d") for a in range(w + 1)]
    elif family == "hybd":
        modes = [("c", h, w - h), ("d", h, w - h)]
    else:
        raise ValueError(f"unknown family {family!r}")
    modes = [m for m in modes if ok(m)]
    return list(dict.fromkeys(modes)) or [("c", min(w, 8) // 2, min(w, 8) - min(w, 8) // 2)]


def mode_bits(n_modes: int) -> float:
    """Extra bits per (group, pair) for the mode: the sign bits of the two bf16 scales are free (a scale is
    never negative), so up to 4 modes cost nothing; more cost ceil(log2 n) - 2 bits."""
    return max(0, math.ceil(math.log2(n_modes)) - 2) if n_modes > 1 else 0


# --------------------------------------------------------------------------- codec


class Codec:
    """A parsed method: quantize(keys [B, H, n*G, D], layer, offset) -> dequantized keys."""

    def __init__(self, name: str, head_dim: int, theta_base: float, calib: dict | None):
        m = re.fullmatch(r"(\w+)-w(\d+)((?:-(?:qw|log|clip|a[PHG]u?\d*))*)", name)
        if m is None:
            raise ValueError(f"bad method name {name!r}")
        self.name, self.family, self.W = name, m.group(1), int(m.group(2))
        opts = m.group(3).split("-")[1:]
        self.qw, self.log, self.clip = "qw" in opts, "log" in opts, "clip" in opts
        self.alloc = next((o for o in opts if o.startswith("a")), None)
        self.D, self.P = head_dim, head_dim // 2
        self.xs, self.ys = pqc.Pairing().indices(head_dim)
        self.theta = theta_base ** (-torch.arange(self.P, dtype=torch.float32) * 2 / head_dim)
        self.calib = calib
        if (self.qw or self.alloc) and calib is None:
            raise ValueError(f"{name} needs calibration")
        self.widths = None  # [L, H, P] int
        if self.alloc:
            floor = re.search(r"\d+$", self.alloc)
            self.widths = allocate(self, calib, per_head="G" if self.alloc.startswith("aG") else
                                   self.alloc.startswith("aH"), weighted="u" not in self.alloc,
                                   wmin=int(floor.group()) if floor else 0)
        self.stats = {}

    def modes(self, w):
        return family_modes(self.family, w, self.log)

    def weights(self, layer):  # [1, H, 1, 1, P] each
        if not self.qw:
            return None
        e = self.calib["qe"][layer]  # [H, P, 2]
        return e[None, :, None, None, :, 0], e[None, :, None, None, :, 1]

    def widths_of(self, layer, H):
        if self.widths is None:
            return torch.full((H, self.P), self.W, dtype=torch.long)
        return self.widths[layer]

    def bits(self) -> float:
        """Steady-state bits per key element: codes + 4 bf16 params per (group, pair) + mode bits."""
        if self.widths is None:
            code = self.W / 2
            mb = mode_bits(len(self.modes(self.W)))
        else:
            code = self.widths.float().mean().item() / 2
            mb = sum(mode_bits(len(self.modes(int(w)))) for w in self.widths.flatten()) / self.widths.numel()
        return code + 4 * 16 / (2 * G) + mb / (2 * G)

    def encode_pairs(self, pr: Pairs, widths: torch.Tensor, wts, record=True):
        """Best mode per (group, pair) -> (x_hat, y_hat); widths [H, P]."""
        xh, yh = torch.empty_like(pr.x), torch.empty_like(pr.y)
        for w in widths.unique().tolist():
            sel = (widths == w)[None, :, None, None, :]  # [1, H, 1, 1, P]
            modes = self.modes(int(w))
            best_err, best = None, None
            for i, mode in enumerate(modes):
                rx, ry = reconstruct(mode, pr, self.clip)
                ex, ey = (rx - pr.x) ** 2, (ry - pr.y) ** 2
                if wts is not None:
                    ex, ey = ex * wts[0], ey * wts[1]
                err = (ex + ey).sum(-2, keepdim=True)  # [B, H, n, 1, P]
                if best_err is None:
                    best_err, best, bx, by = err, torch.zeros_like(err, dtype=torch.long), rx, ry
                else:
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    best = torch.where(better, i, best)
                    bx, by = torch.where(better, rx, bx), torch.where(better, ry, by)
            xh, yh = torch.where(sel, bx, xh), torch.where(sel, by, yh)
            if record:
                st = self.stats.setdefault(int(w), {})
                mask = sel.expand_as(best)
                for i, mode in enumerate(modes):
                    k = "%s%d%d" % mode
                    st[k] = st.get(k, 0) + int(((best == i) & mask).sum())
        return xh, yh

    def quantize(self, keys: torch.Tensor, layer: int, offset: int) -> torch.Tensor:
        B, H, T, D = keys.shape
        k = keys.float().reshape(B, H, T // G, G, D)
        pos = (offset + torch.arange(T, dtype=torch.float32)).view(1, 1, T // G, G, 1)
        pr = Pairs(k[..., self.xs], k[..., self.ys], pos, self.theta)
        xh, yh = self.encode_pairs(pr, self.widths_of(layer, H), self.weights(layer))
        out = torch.empty_like(k)
        out[..., self.xs], out[..., self.ys] = xh, yh
        return out.reshape(keys.shape).to(keys.dtype)


def allocate(cdc: Codec, calib: dict, per_head, weighted: bool, wmin: int = 0, wmax: int = 16):
    """Greedy bit allocation: widths [L, H, P] with mean cdc.W per (layer, head) (aH) or one [P] table for all
    (aP), minimizing the sum of calibrated distortions D[l, h, j](w) (expected squared logit error when
    weighted: per-token E[q_x^2] (x_hat - x)^2 + E[q_y^2] (y_hat - y)^2, scaled by 1/D)."""
    curves = distortion_curves(cdc, calib, weighted, 0, wmax)[..., wmin:]  # [L, H, P, wmax-wmin+1]
    L, H, P, _ = curves.shape
    if per_head == "G":  # one budget for the whole model
        return greedy(curves.reshape(L * H * P, -1), cdc.W * P * L * H, wmin).view(L, H, P)
    if per_head:
        return torch.stack([torch.stack([greedy(curves[l, h], cdc.W * P, wmin) for h in range(H)])
                            for l in range(L)])
    table = greedy(curves.sum((0, 1)), cdc.W * P, wmin)
    return table.expand(L, H, P).clone()


def greedy(curve: torch.Tensor, budget: int, wmin: int) -> torch.Tensor:
    """curve [N, nw] (distortion at width wmin + i) -> widths [N] summing to budget: repeatedly give the next
    1 or 2 bits to the item with the largest distortion drop per bit (2-bit steps see past a non-convex step)."""
    N, nw = curve.shape
    w = torch.zeros(N, dtype=torch.long)
    big = torch.tensor(float("-inf"))
    left = budget - wmin * N
    ar = torch.arange(N)
    while left > 0:
        c0 = curve[ar, w]
        g1 = torch.where(w + 1 < nw, (c0 - curve[ar, (w + 1).clamp(max=nw - 1)]), big)
        g2 = torch.where((w + 2 < nw) & (left >= 2), (c0 - curve[ar, (w + 2).clamp(max=nw - 1)]) / 2, big)
        g = torch.maximum(g1, g2)
        j = int(g.argmax())
        if g[j] == big:
            break
        step = 2 if g2[j] > g1[j] else 1
        w[j] += step
        left -= step
    return w + wmin


def distortion_curves(cdc: Codec, calib: dict, weighted: bool, wmin: int, wmax: int) -> torch.Tensor:
    key = (cdc.family, cdc.log, cdc.clip, weighted, cdc.qw, wmin, wmax)
    cache = calib.setdefault("curves", {})
    if key in cache:
        return cache[key]
    L = len(calib["k"])
    out = []
    for l in range(L):
        k = calib["k"][l]  # [B, H, n*G, D] (complete groups)
        B, H, T, D = k.shape
        kk = k.float().reshape(B, H, T // G, G, D)
        pos = torch.arange(T, dtype=torch.float32).view(1, 1, T // G, G, 1)
        pr = Pairs(kk[..., cdc.xs], kk[..., cdc.ys], pos, cdc.theta)
        e = calib["qe"][l]  # [H, P, 2] per-token mean q energy
        wx, wy = e[None, :, None, None, :, 0], e[None, :, None, None, :, 1]
        sel_w = cdc.weights(l)  # the codec's own mode-choice weights
        per_w = []
        for w in range(wmin, wmax + 1):
            xh, yh = cdc.encode_pairs(pr, torch.full((H, cdc.P), w, dtype=torch.long), sel_w, record=False)
            ex, ey = (xh - pr.x) ** 2, (yh - pr.y) ** 2
            d = (ex * wx + ey * wy) / D if weighted else ex + ey
            per_w.append(d.mean((0, 2, 3)))  # [H, P]
        out.append(torch.stack(per_w, -1))
    cache[key] = torch.stack(out)
    return cache[key]


# --------------------------------------------------------------------------- baselines (the repo's quantizers)


def baseline(name: str):
    """(quantize(keys, layer, offset), bits) for polar-R+A, polar-circ-R+A, channel-intB, fp."""
    if name == "fp":
        return None, 16.0
    m = re.fullmatch(r"polar(-circ)?-(\d)\+(\d)", name)
    if m:
        rb, ab = int(m.group(2)), int(m.group(3))
        q = (qm.polar_circular if m.group(1) else qm.polar)(rb, ab, G)
        return (lambda k, l, o: q(k)), pqc.steady_bits_per_element(pqc.Codec(rb, ab, G), 64)
    m = re.fullmatch(r"channel-int(\d)", name)
    if m:
        b = int(m.group(1))
        q = qm.per_channel(b, G)
        return (lambda k, l, o: q(k)), b + 2 * qm.PARAM_BITS / G
    return None


# --------------------------------------------------------------------------- evaluation


class QuantLayer(evaluate.FakeQuantLayer):
    """FakeQuantLayer that tells the quantizer its layer and the position of the first key it gets."""

    def __init__(self, fn, layer: int):
        super().__init__(lambda k: fn(k, layer, self.done), G)


def new_cache(model, fn):
    cache = transformers.DynamicCache(config=model.config)
    if fn is not None:
        cache.layers = [QuantLayer(fn, i) for i in range(len(cache.layers))]
    return cache


class _M:
    group_size = G


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, fn, batch: int = 4) -> dict:
    per_window, t0 = [], time.perf_counter()
    for ids in windows.split(batch):
        logits = evaluate.window_logits(model, model, ids[:, :-1], _M, cache=new_cache(model, fn))
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        per_window += nll.view(ids.shape[0], -1).mean(-1).tolist()
    nll = sum(per_window) / len(per_window)
    return {"ppl": math.exp(nll), "nll": nll, "window_nll": per_window, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def capture(model, windows: torch.Tensor):
    """fp forward of each window: per layer the post-RoPE queries [N, Hq, T, D], keys and values [N, Hkv, T, D]
    and the softmax scale."""
    qs, ks, vs, sc = {}, {}, {}, {}

    def fn(module, query, key, value, attention_mask, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        i = module.layer_idx
        qs.setdefault(i, []).append(query.detach())
        ks.setdefault(i, []).append(key.detach())
        vs.setdefault(i, []).append(value.detach())
        sc[i] = kw.get("scaling")
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    transformers.AttentionInterface.register("codec_study_capture", fn)
    old = model.config._attn_implementation
    model.config._attn_implementation = "codec_study_capture"
    try:
        for ids in windows:
            model(ids[None], use_cache=False)
    finally:
        model.config._attn_implementation = old
    L = len(ks)
    return ([torch.cat(qs[i]) for i in range(L)], [torch.cat(ks[i]) for i in range(L)],
            [torch.cat(vs[i]) for i in range(L)], [sc[i] for i in range(L)])


def calibrate(model, tok, n_windows: int = 2, skip: int = 8, window: int = 1024) -> dict:
    """Query energy per (layer, kv head, pair, x|y) and the keys of lee windows skip..skip+n-1 (never scored)."""
    ids = data.token_windows(tok, "lee", skip + n_windows, window)[skip:]
    qs, ks, _, _ = capture(model, ids)
    D = ks[0].shape[-1]
    xs, ys = pqc.Pairing().indices(D)
    qe = []
    for q, k in zip(qs, ks):
        H = k.shape[1]
        qq = q.float().pow(2).mean((0, 2))  # [Hq, D]
        qq = qq.view(H, -1, D).sum(1)  # summed over the query heads of each kv head
        qe.append(torch.stack([qq[:, xs], qq[:, ys]], -1))  # [H, P, 2]
    full = ks[0].shape[2] // G * G
    return {"qe": qe, "k": [k[:, :, :full] for k in ks], "windows": list(range(skip, skip + n_windows))}


@torch.no_grad()
def proxy(cap, fn) -> dict:
    """Teacher-forced errors on captured fp q/k/v (no compounding): per layer the RMS logit error
    scale * q.(k_hat - k) over the (query, encoded key) pairs of the decode schedule, and the relative
    attention-output error ||o_hat - o|| / ||o|| (evaluate.scheduled_attention)."""
    qs, ks, vs, scs = cap
    logit, attn, logit_att = [], [], []
    for l, (q, k, v, sc) in enumerate(zip(qs, ks, vs, scs)):
        full = k.shape[2] // G * G
        kh = torch.cat([fn(k[:, :, :full], l, 0), k[:, :, full:]], dim=2)
        R, T = q.shape[1] // k.shape[1], k.shape[2]
        sc = q.shape[-1] ** -0.5 if sc is None else sc
        dk = (kh - k).float().repeat_interleave(R, dim=1)
        pos = torch.arange(T)
        enc = pos[None, :] < ((pos[:, None] + 1) // G * G)
        e = (q.float() @ dk.transpose(-1, -2)) * sc
        logit.append(math.sqrt((e.pow(2) * enc).sum().item() / (enc.sum().item() * e.shape[0] * e.shape[1])))
        s0 = (q.float() @ k.float().repeat_interleave(R, dim=1).transpose(-1, -2)) * sc
        pa = torch.softmax(s0.masked_fill(pos[None, :] > pos[:, None], float("-inf")), -1) * enc
        logit_att.append(math.sqrt((e.pow(2) * pa).sum().item() / pa.sum().item()))
        o = evaluate.scheduled_attention(q, k, k, v, G, sc)
        oh = evaluate.scheduled_attention(q, k, kh, v, G, sc)
        attn.append(((oh - o).norm() / o.norm()).item())
    return {"logit_rms": logit, "attn_rel": attn, "logit_rms_mean": sum(logit) / len(logit),
            "logit_att_rms": logit_att, "logit_att_rms_mean": sum(logit_att) / len(logit_att),
            "attn_rel_mean": sum(attn) / len(attn)}


def table(paths) -> str:
    """Markdown table from result JSONs: per method the bits and the ppl delta vs fp (same windows) with its
    paired standard error over windows, per text (the largest run of each text wins)."""
    import statistics

    cells, bits = {}, {}
    for path in paths:
        res = json.loads(Path(path).read_text())
        if "window_nll" not in res["methods"].get("fp", {}):
            continue
        fp = res["methods"]["fp"]["window_nll"]
        for n, r in res["methods"].items():
            if n == "fp":
                continue
            d = [100 * (a - b) for a, b in zip(r["window_nll"], fp)]
            se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            key = (n, res["text"])
            if key not in cells or cells[key][2] < len(d):
                cells[key] = (r["delta_ppl_pct"], se, len(d), res["methods"]["fp"]["ppl"])
            bits[n] = r["bits"]
    rows = ["| method | bits/element | lee Δppl % (±se) | wiki Δppl % (±se) |", "|---|---|---|---|"]
    for n in sorted(bits, key=lambda n: (-round(bits[n]), n)):
        f = lambda t: ("%+.2f (±%.2f, %dk)" % (cells[(n, t)][0], cells[(n, t)][1], cells[(n, t)][2])  # noqa: E731
                       if (n, t) in cells else "–")
        rows.append(f"| {n} | {bits[n]:.4f} | {f('lee')} | {f('wiki')} |")
    return "\n".join(rows)


def paired(pairs, paths) -> str:
    """For each pair A:B and each scored window set (runs whose fp per-window NLLs are identical are merged: the
    same windows), the mean over windows of 100 * (NLL_A - NLL_B) (about the ppl difference in % when small),
    its standard error, and the windows where A is lower."""
    import statistics

    sets = {}
    for path in paths:
        res = json.loads(Path(path).read_text())
        fp = res["methods"].get("fp", {}).get("window_nll")
        if fp is None:
            continue
        name, m = sets.setdefault(tuple(fp), (f"{res['text']}{len(fp)}k", {}))
        m.update({n: r["window_nll"] for n, r in res["methods"].items()})
    lines = []
    for pair in pairs:
        a, b = pair.split(":")
        for name, m in sets.values():
            if a in m and b in m:
                d = [100 * (x - y) for x, y in zip(m[a], m[b])]
                lines.append(f"{name:7s} {a:18s} - {b:18s} {statistics.mean(d):+6.2f} "
                             f"± {statistics.stdev(d) / math.sqrt(len(d)):.2f}  lower in {sum(x < 0 for x in d)}"
                             f"/{len(d)}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", help="comma-separated (baselines and codec names)")
    p.add_argument("--table", nargs="*", help="print the markdown table of these result JSONs and exit")
    p.add_argument("--paired", nargs="+", metavar="A:B", help="paired differences of methods in results/*.json")
    p.add_argument("--text", default="lee", choices=data.TEXTS)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--calib-windows", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--proxy", action="store_true", help="teacher-forced logit / attention errors instead of ppl")
    p.add_argument("--out", help="results/NAME.json under bench/codec_study")
    a = p.parse_args()
    if a.paired:
        print(paired(a.paired, sorted((HERE / "results").glob("*.json"))))
        return
    if a.table is not None:
        print(table(a.table or sorted((HERE / "results").glob("*.json"))))
        return
    torch.set_num_threads(a.threads)
    out = HERE / "results" / f"{a.out}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok = data.load_model()
    cfg = model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    base = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 1e4))
    names = list(dict.fromkeys(["fp", *a.methods.split(",")]))
    need_calib = any(baseline(n) is None for n in names)
    calib = calibrate(model, tok, a.calib_windows) if need_calib else None
    windows = data.token_windows(tok, a.text, max(a.tokens // a.window, 1), a.window)
    cap = capture(model, windows) if a.proxy else None
    res = {"text": a.text, "windows": windows.shape[0], "window": a.window, "group_size": G,
           "calib": None if calib is None else {"text": "lee", "windows": calib["windows"]},
           "torch": torch.__version__, "threads": a.threads, "methods": {},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "bench/codec_study/codec_study.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items())}
    for n in names:
        b = baseline(n)
        cdc = None
        if b is None:
            cdc = Codec(n, D, base, calib)
            fn, bits = cdc.quantize, cdc.bits()
        else:
            fn, bits = b
        if a.proxy:
            t1 = time.perf_counter()
            r = proxy(cap, fn) if fn is not None else {"logit_rms_mean": 0.0, "attn_rel_mean": 0.0}
            r["seconds"] = time.perf_counter() - t1
        else:
            r = perplexity(model, windows, fn)
        r["bits"] = bits
        if cdc is not None:
            r["modes"] = cdc.stats
            if cdc.widths is not None:
                r["widths_pair_mean"] = cdc.widths.float().mean((0, 1)).tolist()
                r["widths_layer_mean"] = cdc.widths.float().mean((1, 2)).tolist()
                r["widths"] = cdc.widths.tolist()
                r["widths_hist"] = torch.bincount(cdc.widths.flatten()).tolist()
        res["methods"][n] = r
        if a.proxy:
            print(f"{n:28s} bits {bits:.4f}  logit rms {r['logit_rms_mean']:.5f}  attention-weighted "
                  f"{r.get('logit_att_rms_mean', 0):.5f}  attn rel "
                  f"{r['attn_rel_mean']:.5f}  ({r['seconds']:.0f} s)", flush=True)
        else:
            fp = res["methods"]["fp"]["nll"]
            r["delta_ppl_pct"] = 100 * (math.exp(r["nll"] - fp) - 1)
            print(f"{n:28s} bits {bits:.4f}  ppl {r['ppl']:.4f}  delta {r['delta_ppl_pct']:+.3f}%  "
                  f"({r['seconds']:.0f} s)", flush=True)
        res["seconds"] = time.perf_counter() - t0
        out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
