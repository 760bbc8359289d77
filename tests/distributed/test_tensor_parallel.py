"""Tensor parallel on CPU: HF `tp_plan="auto"` over 2 gloo ranks, each rank compiled with backend="polarquant".

Runs examples/tensor_parallel.py under torchrun (2 processes on 127.0.0.1) on a saved tiny GQA Llama
(8 query heads, 4 kv heads, head_dim 32), and meanwhile the same script in this process without TP on the
same weights. HF shards q/k/v_proj by heads and o_proj by rows, so each rank's graph attends over 4 query
heads and 2 kv heads, with an all-reduce after o_proj. Checked on every rank: every attention site of every
graph was rewritten over the local heads, the 32 greedy tokens equal the single-process run's, and the
compressed cache holds exactly the rank's half of the kv heads (shape, bytes, and the values of those heads).
The inner compiler is aot_eager (the subclass is flattened as under inductor); inductor takes ~3x longer here.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pqcompile import codec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tensor_parallel.py"
WORLD, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 2, 2, 8, 4, 32
PROMPT, NEW = 240, 32  # 271 cached tokens: 2 complete groups of 128 (the second flushed while decoding) + tail
TIMEOUT_S = 240  # the whole torchrun; a collective that hangs fails after the process-group timeout (60 s)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this build")


def _example():
    spec = importlib.util.spec_from_file_location("tensor_parallel_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(model_dir: Path, out: Path, report: Path) -> list[str]:
    return ["--model", str(model_dir), "--inner", "aot_eager", "--prompt-len", str(PROMPT),
            "--new-tokens", str(NEW), "--out", str(out), "--report", str(report), "--timeout", "60"]


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo would otherwise pick the interface the hostname resolves to
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", str(EXAMPLE), *args]
    with open(log, "w") as f:  # a file, not a pipe: nobody reads a pipe while the reference runs here
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, log: Path) -> None:
    try:
        proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks: the session started for them
        proc.wait()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
    assert proc.returncode == 0, log.read_text()[-6000:]


def _reports(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*/report.json"))]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_tp_plan_auto_two_ranks_compress_their_own_kv_heads(tmp_path):
    example = _example()
    model_dir = Path(example.save_tiny_llama(tmp_path / "model"))
    proc = _launch(_args(model_dir, tmp_path / "tp", tmp_path / "tp-report"), tmp_path / "torchrun.log")
    try:  # the single-process reference runs here while the ranks run
        assert example.main(_args(model_dir, tmp_path / "ref", tmp_path / "ref-report")) == 0
    finally:
        _wait(proc, tmp_path / "torchrun.log")

    ref = json.loads((tmp_path / "ref" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "tp" / f"rank{r}.json").read_text()) for r in range(WORLD)]
    ref_keys = torch.load(tmp_path / "ref" / "rank0.pt")
    T = PROMPT + NEW - 1
    def held(k):  # bytes per (batch row, kv head): codes and params with room for the capacity, an fp32 ring
        return codec.state_bits(codec.Codec(), T, HEAD_DIM, tail_bits=32, capacity=k["codes"][2]) // 8

    assert ref["world"] == 1 and len(ref["tokens"]) == NEW
    assert [k["shape"] for k in ref["keys"]] == [[1, KV_HEADS, T, HEAD_DIM]] * LAYERS
    for site in (s for rep in _reports(tmp_path / "ref-report") for s in rep["sites"]):
        assert (site["kv_heads"], site["kv_heads"] * site["gqa"]) == (KV_HEADS, HEADS)

    for rank, got in enumerate(ranks):
        assert got["world"] == WORLD
        assert got["tokens"] == ref["tokens"], (rank, got["tokens"], ref["tokens"])
        # every rank rewrote its local attention sites: prefill + decode graphs, nothing declined
        c = got["counters"]
        assert c.get("sites_declined", 0) == 0 and c["graphs"] == ref["counters"]["graphs"] <= 4, c
        assert c["rewritten_prefill"] == LAYERS and c["rewritten_decode"] == LAYERS * (c["graphs"] - 1), c
        reports = _reports(tmp_path / "tp-report" / f"rank{rank}")
        assert len(reports) == c["graphs"] and {r["graph"]["kind"] for r in reports} == {"prefill", "decode"}
        for site in (s for rep in reports for s in rep["sites"]):
            assert site["status"] == "rewritten", site
            # the graph each rank compiled holds its local heads: Hkv/2 kv heads, Hq/2 query heads
            assert (site["kv_heads"], site["kv_heads"] * site["gqa"], site["head_dim"]) == \
                (KV_HEADS // WORLD, HEADS // WORLD, HEAD_DIM), site
        # the compressed state holds this rank's shard only: half the heads, half the bytes, no DTensor
        local = KV_HEADS // WORLD
        for k, k_ref in zip(got["keys"], ref["keys"], strict=True):
            assert k["shape"] == [1, local, T, HEAD_DIM] and k["codes"][:2] == k["tail"][:2] == [1, local], k
            assert k["inner_types"] == ["Tensor"], k
            assert k["nbytes_held"] == local * held(k) and 2 * k["nbytes_held"] == k_ref["nbytes_held"], k
            assert 2 * k["dense_bytes"] == k_ref["dense_bytes"]
        # ... and those are the heads [rank*local, (rank+1)*local) of the single-process cache
        keys = torch.load(tmp_path / "tp" / f"rank{rank}.pt")
        for layer, (mine, full) in enumerate(zip(keys, ref_keys, strict=True)):
            own = full[:, rank * local:(rank + 1) * local]
            other = full[:, (1 - rank) * local:(2 - rank) * local]
            # the all-reduce sums in another order (1e-6); a code on a bin edge may take the next bin
            assert _rel(mine, own) < 1e-3, (rank, layer, _rel(mine, own))
            assert _rel(mine, other) > 0.5, (rank, layer, _rel(mine, other))
