"""Every kernel launch the host wrappers make compiles for an H200 (sm_90), checked on any machine: the
interpreter runs code that a GPU compile rejects. bench/compile_kernels.py records the wrappers' launches on
CPU tensors, specializes them as Triton's JIT would and compiles them with Triton's bundled ptxas."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import triton

ROOT = pathlib.Path(__file__).resolve().parents[2]
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton has no bundled ptxas to compile for sm_90")
@pytest.mark.parametrize("group", ["attention", "encode", "write"])
def test_every_launch_compiles_for_sm90(group):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_kernels.py"), "--group", group], check=False,
                         capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert rows, run.stderr[-2000:]
    assert [r for r in rows if not r["ok"]] == [] and run.returncode == 0
    kernels = {r["kernel"] for r in rows}
    expected = {"attention": {"polar_attn_fwd_kernel", "polar_attn_reduce_kernel"},
                "encode": {"polar_encode_kernel", "value_encode_kernel"},
                "write": {"polar_static_write_kernel", "value_static_write_kernel"}}[group]
    assert kernels == expected
    capped = [r for r in rows if r["maxnreg"]]  # register-capped tuned configs: the cap reaches ptxas
    assert all(r["registers"] <= r["maxnreg"] for r in capped)
    assert bool(capped) == (group == "attention")
