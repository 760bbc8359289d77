"""Numerics checks of a rewritten graph against the untouched original graph the backend kept.

kernel check (verify="first" | "every:N", kernel.py): on the selected calls the original graph also runs
  (eager, in Python, through an fx.Interpreter) on the same inputs. A decode graph's key-cache inputs are the
  same PolarKeys, so the original's own cat/SDPA run on them through PolarKeys' dense fallback, i.e. on the
  dense keys the codes stand for. Compared on every graph output and at every rewritten attention site (the
  polar op's output vs the original SDPA's): max-abs error, relative L2, SQNR (dB), cosine. Both sides use the
  same codes, so they must agree to kernel rounding; a check passes when max|a - b| <= atol + rtol * max|b| and
  SQNR >= min_sqnr_db. A prefill graph returns PolarKeys where the original returns dense keys: those are
  compared with the reference codec's encode+decode of the dense keys (this checks the encode kernel); with
  value_bits its PolarValues likewise with the reference value codec's (each site's value check). Compressed
  values reach the original's SDPA through their dense fallback too.
  With "every:N" a checked call also checks each DynamicCache state against digests taken when its groups
  were written (integrity.py): the kernel check cannot see a state corrupted between steps, since both graphs
  read it. A changed state is a failed check naming the layer and the tensor.
  A failed check is handled per on_mismatch: "raise" (VerifyMismatch), "warn" (the compiled result is
  returned), "fallback" (the original graph's result is returned, and the original graph runs, in eager,
  for every later call: exactly what the graph computes without the rewrite).
drift check (verify="shadow:N", drift.py): quantization-induced drift, not a bug check. For the first N decode
  steps the original graph runs again on full-precision shadow inputs, a complete full-precision run of the
  model fed the same tokens. Reported per layer (keys and attention output vs the shadow) and on the logits
  (cosine, KL(shadow || compressed), top-1 agreement). Compressed values are shadowed and compared like the
  keys. Shadows stop after step N.
Graphs that mutate an input in place (StaticCache, PolarStaticCache): the checking runs get copies of those
inputs (wrapper subclasses copied through their inner tensors, graphs.py), so the mutation is applied once;
after a fallback the original run's state is copied into them. The drift check skips such graphs (it follows
graph outputs), and graphs without a rewritten site are not checked (nothing changed); the report says why.

Modules: checked.py (Checked, the callable the backend returns: it orchestrates), sites.py (the site map:
node names in both graphs), graphs.py (running graphs), kernel.py, integrity.py (the state check), drift.py,
state.py (report.json "verify").
See docs/design.md §6.
"""

from .checked import Checked
from .graphs import mutated_inputs, snapshot
from .kernel import VerifyMismatch, reference_roundtrip
from .sites import SiteNodes
from .state import MAX_EVENTS, states

__all__ = ["MAX_EVENTS", "Checked", "SiteNodes", "VerifyMismatch", "mutated_inputs", "reference_roundtrip",
           "snapshot", "states"]
