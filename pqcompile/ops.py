"""torch.library custom ops over the compressed key and value states: opaque to dynamo, AOTAutograd and inductor.

On CUDA they launch the Triton kernels (pqcompile.kernels); elsewhere they run the reference codec.
PQCOMPILE_KERNELS=reference forces the reference everywhere (debugging); =triton forces the kernels
(with TRITON_INTERPRET=1 they then run on CPU tensors, slowly).
Every op takes the codec as (radius_bits, angle_bits, group_size, layout spec) so it stays hashable.
The ops see params flattened to [B, H, (T//G)*4, P] (the same memory as codec's [B, H, T//G, 4, P]): a
group count of 1 would otherwise be a size-1 dim, which dynamo specializes on (one more recompile).

The value ops (value_codec.py's state, and attention over keys and values together) are in value_ops.py.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from . import codec as ref
from .codec import TAIL_PAD, Codec, Pairing, PolarData

_LIB = "pqcompile"


@functools.cache
def _codec(radius_bits: int, angle_bits: int, group_size: int, layout: str) -> Codec:
    kind, _, pairing = layout.rpartition(":")
    return Codec(radius_bits, angle_bits, group_size, Pairing.parse(pairing), kind or "polar")


def codec_args(c: Codec) -> tuple[int, int, int, str]:
    return c.radius_bits, c.angle_bits, c.group_size, c.spec


def _use_kernels(t: torch.Tensor) -> bool:
    choice = os.environ.get("PQCOMPILE_KERNELS", "auto")
    if choice == "reference":
        return False
    if choice == "triton":
        return True
    return t.is_cuda


def unflat(params: torch.Tensor) -> torch.Tensor:
    """[B, H, n*4, P] -> [B, H, n, 4, P] (a view)."""
    return params.view(params.shape[0], params.shape[1], -1, 4, params.shape[-1])


def flat(params: torch.Tensor) -> torch.Tensor:
    """[B, H, n, 4, P] -> [B, H, n*4, P] (a view)."""
    return params.view(params.shape[0], params.shape[1], -1, params.shape[-1])


def _view(codes, params, tail, seq_len: int, c: Codec) -> PolarData:
    """A DynamicCache state of seq_len tokens in codec.py's layout: views of the encoded rows; the ring as the tail
    (codec.py reads its first seq_len % G rows)."""
    Tc = seq_len // c.group_size * c.group_size
    return PolarData(codes[:, :, :Tc], unflat(params[:, :, : Tc // c.group_size * 4]), tail)


def _append_into(codes, params, ring, seq_len: int, new: torch.Tensor, G: int, encode_into) -> None:
    """In place, keys and values alike: new [B, H, S, D] after seq_len tokens. The tokens go to the ring (slot
    t % G); each group that completes is encoded by encode_into(x [B, H, n*G, D], first group), which writes
    its codes and params. Checked before anything is written, so a refused append leaves the state as it was."""
    B, H, S, D = new.shape
    filled = seq_len % G
    done = (filled + S) // G * G
    if ring.shape != (B, H, G, D) or codes.shape[:2] != (B, H):
        raise ValueError(f"new tokens {tuple(new.shape)} do not fit a state with ring {tuple(ring.shape)} and codes "
                         f"{tuple(codes.shape)} (group {G})")
    if seq_len - filled + done > codes.shape[2]:
        raise IndexError(f"appending {S} tokens to {seq_len} needs {seq_len - filled + done} code rows; the state "
                         f"has room for {codes.shape[2]} (grow it first: DynamicCompressed.appended does)")
    new = new.to(ring.dtype)
    if not done:  # the common decode step: one row into the ring
        ring[:, :, filled: filled + S].copy_(new)
        return
    pending = new if filled == 0 else torch.cat([ring[:, :, :filled], new], dim=2)
    encode_into(pending[:, :, :done], seq_len // G)
    rest = filled + S - done
    if rest:
        ring[:, :, :rest].copy_(pending[:, :, done:])


# --------------------------------------------------------------------------- append (encode + group flush)


@torch.library.custom_op(f"{_LIB}::append_", mutates_args=("codes", "params", "tail"))
def append_(codes: torch.Tensor, params: torch.Tensor, tail: torch.Tensor, new_keys: torch.Tensor, seq_len: int,
            radius_bits: int, angle_bits: int, group_size: int, layout: str) -> None:
    """In place: append new_keys [B, H, S, D] to a DynamicCache key state of seq_len tokens (codes [B, H, cap, NB],
    params [B, H, cap/G*4, P], tail the ring [B, H, G, D]; cap >= the encoded rows after the append)."""
    c = _codec(radius_bits, angle_bits, group_size, layout)
    if _use_kernels(new_keys):
        from . import kernels

        ref.check_keys("new_keys", new_keys, finite=False)

        def encode_into(x, g0):
            kernels.encode_groups_into(x, codes, unflat(params), g0, c)
    else:
        ref.check_keys("new_keys", new_keys)

        def encode_into(x, g0):
            new_codes, new_params = ref.encode_groups(x, c)
            codes[:, :, g0 * group_size: g0 * group_size + x.shape[2]] = new_codes
            params[:, :, g0 * 4: g0 * 4 + new_params.shape[2] * 4] = flat(new_params)

    _append_into(codes, params, tail, seq_len, new_keys, group_size, encode_into)


@append_.register_fake
def _(codes, params, tail, new_keys, seq_len, radius_bits, angle_bits, group_size, layout):
    return None


@torch.library.custom_op(f"{_LIB}::write_rows_", mutates_args=("buf",))
def write_rows_(buf: torch.Tensor, new: torch.Tensor, start: int) -> None:
    """In place: buf[:, :, start:start+S] = new [B, H, S, D] (dense_values.DenseValues: HF's value append). An op,
    not a slice assignment, so that inductor writes the rows into the cache's buffer instead of rebuilding it."""
    S = new.shape[2]
    if start + S > buf.shape[2] or buf.shape[:2] != new.shape[:2] or buf.shape[3] != new.shape[3]:
        raise ValueError(f"rows [{start}, {start + S}) of new {tuple(new.shape)} do not fit the buffer "
                         f"{tuple(buf.shape)}")
    buf[:, :, start: start + S].copy_(new)


@write_rows_.register_fake
def _(buf, new, start):
    return None


# --------------------------------------------------------------------------- decode (dense fallback, verify)


@torch.library.custom_op(f"{_LIB}::decode", mutates_args=())
def decode(codes: torch.Tensor, params: torch.Tensor, tail: torch.Tensor, seq_len: int,
           radius_bits: int, angle_bits: int, group_size: int, layout: str) -> torch.Tensor:
    """Compressed state -> dense keys [B, H, seq_len, D] (contiguous)."""
    c = _codec(radius_bits, angle_bits, group_size, layout)
    return ref.decode(_view(codes, params, tail, seq_len, c), seq_len, c).contiguous()


@decode.register_fake
def _(codes, params, tail, seq_len, radius_bits, angle_bits, group_size, layout):
    B, H, _, D = tail.shape
    return tail.new_empty(B, H, seq_len, D)


# --------------------------------------------------------------------------- attention over the codes


@torch.library.custom_op(f"{_LIB}::attention", mutates_args=())
def attention(q: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, tail: torch.Tensor, v: torch.Tensor,
              seq_len: int, mask: torch.Tensor | None, scale: float, softcap: float, is_causal: bool,
              radius_bits: int, angle_bits: int, group_size: int, layout: str) -> torch.Tensor:
    """Attention of q [B, Hq, S, D] over compressed keys and dense v [B, Hkv|Hq, >= T, Dv] (its first T rows: a
    DenseValues buffer is passed whole, so that the graph holds no view whose contiguity depends on T) -> [B, Hq,
    S, Dv]. softcap <= 0 means none. mask: bool (True = attend) or additive, broadcastable to [B, Hq, S, T].
    """
    c = _codec(radius_bits, angle_bits, group_size, layout)
    kwargs = {"mask": mask, "scale": scale, "softcap": softcap if softcap > 0 else None, "is_causal": is_causal}
    if _use_kernels(q):  # the state's buffers as they are (no views: ~10 us of host time a call)
        return _kernel_attention().attention_state(q, codes, params, tail, v, seq_len, c, **kwargs).contiguous()
    v = v[:, :, :seq_len] if v.shape[2] > seq_len else v
    return ref.attention(q, _view(codes, params, tail, seq_len, c), seq_len, v, c, **kwargs).contiguous()


@functools.cache
def _kernel_attention():
    """The module pqcompile.kernels.attention (the package exports a function of that name)."""
    return importlib.import_module("pqcompile.kernels.attention")


@attention.register_fake
def _(q, codes, params, tail, v, seq_len, mask, scale, softcap, is_causal, radius_bits, angle_bits, group_size,
      layout):
    B, Hq, S, _ = q.shape
    return q.new_empty(B, Hq, S, v.shape[-1])


# --------------------------------------------------------------------------- static (preallocated) state
# codes [B, H, Tcap, NB], params [B, H, (Tcap/G)*4, P], ring [B, H, G, D], length int64 [1] (static_cache.py)


def _static_view(codes, params, ring, L: int, c: Codec) -> PolarData:
    """The first L tokens of a static state, in codec.py's layout (views, plus a padded tail)."""
    G, n = c.group_size, L // c.group_size
    tail = torch.cat([ring[:, :, : L % G], ring.new_zeros(*ring.shape[:2], TAIL_PAD, ring.shape[3])], dim=2)
    return PolarData(codes[:, :, : n * G], unflat(params[:, :, : n * 4]), tail)


@torch.library.custom_op(f"{_LIB}::static_write_", mutates_args=("codes", "params", "ring", "length"))
def static_write_(codes: torch.Tensor, params: torch.Tensor, ring: torch.Tensor, length: torch.Tensor,
                  new_keys: torch.Tensor, positions: torch.Tensor, radius_bits: int, angle_bits: int,
                  group_size: int, layout: str) -> None:
    """In place: write new_keys [B, H, S, D] at token positions [S] (contiguous, starting at or before
    `length`), encoding each group that completes. Positions before `length` rewind (HF crop)."""
    c = _codec(radius_bits, angle_bits, group_size, layout)
    if _use_kernels(new_keys):  # positions and length stay on the device (CUDA-graph capture)
        from . import kernels

        capturing = new_keys.is_cuda and torch.cuda.is_current_stream_capturing()
        kernels.static_write(codes, unflat(params), ring, length, new_keys, positions, c, check=not capturing)
        return
    _static_write_reference(codes, params, ring, length, new_keys, positions, G=c.group_size, rows=4,
                            encode=lambda x: _flat_second(ref.encode_groups(x, c), flat),
                            decode=lambda L: ref.decode(_static_view(codes, params, ring, L, c), L, c))


def _flat_second(codes_params, flatten):
    codes, params = codes_params
    return codes, flatten(params)


def _static_write_reference(codes, params, ring, length, new, positions, *, G: int, rows: int, encode, decode
                            ) -> None:
    """The CPU static write of keys and values: `rows` params rows per group, encode(x [B, H, n*G, D]) ->
    (codes, flat params), decode(L) -> the first L tokens, dense."""
    S = new.shape[2]
    if S == 0:  # nothing to write (positions is empty)
        return
    start, L = int(positions[0]), int(length[0])
    end = start + S
    if end > codes.shape[2]:
        raise IndexError(f"index {end - 1} is out of bounds for dimension 2 with size {codes.shape[2]}: the static "
                         "cache is too small for the requested tokens")
    if start > L or not torch.equal(positions.cpu(), torch.arange(start, end)):
        raise ValueError(f"static cache writes must be contiguous from the current length {L}; got positions "
                         f"[{start}, ..] of {S}")
    if start < (L // G) * G:  # rewind into an encoded group: its kept tokens move back to the ring
        g0 = start // G
        kept = decode((g0 + 1) * G)[:, :, g0 * G: start]
        ring[:, :, : start - g0 * G] = kept.to(ring.dtype)
    pending = torch.cat([ring[:, :, : start % G], new.to(ring.dtype)], dim=2)
    first = start // G
    done = (pending.shape[2] // G) * G
    if done:
        new_codes, new_params = encode(pending[:, :, :done])
        codes[:, :, first * G: first * G + done] = new_codes
        params[:, :, first * rows: (first + done // G) * rows] = new_params
    ring[:, :, : pending.shape[2] - done] = pending[:, :, done:]
    length.fill_(end)


@static_write_.register_fake
def _(codes, params, ring, length, new_keys, positions, radius_bits, angle_bits, group_size, layout):
    return None


@torch.library.custom_op(f"{_LIB}::static_attention", mutates_args=())
def static_attention(q: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, ring: torch.Tensor,
                     length: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                     is_causal: bool, radius_bits: int, angle_bits: int, group_size: int, layout: str
                     ) -> torch.Tensor:
    """Attention of q [B, Hq, S, D] over the first `length` tokens of a static state; v [B, Hkv|Hq, Tmax, Dv],
    mask broadcastable to [B, Hq, S, Tmax] (HF's static mask)."""
    c = _codec(radius_bits, angle_bits, group_size, layout)
    if _use_kernels(q):  # the length is read on the device
        from . import kernels

        return kernels.static_attention(q, codes, unflat(params), ring, length, v, c, mask=mask, scale=scale,
                                        is_causal=is_causal)
    L = int(length[0])
    data = _static_view(codes, params, ring, L, c)
    mask = None if mask is None else mask[..., :L]
    return ref.attention(q, data, L, v[:, :, :L], c, mask=mask, scale=scale, is_causal=is_causal).contiguous()


@static_attention.register_fake
def _(q, codes, params, ring, length, v, mask, scale, is_causal, radius_bits, angle_bits, group_size, layout):
    B, Hq, S, _ = q.shape
    return q.new_empty(B, Hq, S, v.shape[-1])


@torch.library.custom_op(f"{_LIB}::static_decode", mutates_args=())
def static_decode(codes: torch.Tensor, params: torch.Tensor, ring: torch.Tensor, length: torch.Tensor,
                  radius_bits: int, angle_bits: int, group_size: int, layout: str, max_len: int) -> torch.Tensor:
    """Dense [B, H, max_len, D]: the first min(length, max_len) tokens reconstructed, zeros after."""
    c = _codec(radius_bits, angle_bits, group_size, layout)
    L = int(length[0])
    out = ring.new_zeros(*ring.shape[:2], max_len, ring.shape[3])
    n = min(L, max_len)  # a shorter view (keys[:, :, :n]) reads the first n written tokens
    out[:, :, :n] = ref.decode(_static_view(codes, params, ring, L, c), L, c)[:, :, :n]
    return out


@static_decode.register_fake
def _(codes, params, ring, length, radius_bits, angle_bits, group_size, layout, max_len):
    return ring.new_empty(*ring.shape[:2], max_len, ring.shape[3])
