#!/usr/bin/env bash
# One GPU-machine call that validates everything CUDA-only before any timing: the kernel tests at small shapes,
# the GPU-only tests (CUDA graphs vs no graphs, real shapes), then the static smoke run. pqcompile is not
# installed there: run from the repo root; results and logs go to $OUT (or /tmp/pq-gpu).
#     bash bench/gpu_check.sh            # ~3 min on an H200
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/pq-gpu}"
mkdir -p "$out"
python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__,
      torch.cuda.get_device_name())'
timeout 300 python3 -m pytest -q -n 8 -p no:logging -p no:cacheprovider tests/kernels \
    "tests/compiler/test_static_cache.py::test_cuda_graphs_give_the_same_tokens_as_no_graphs" 2>&1 \
    | grep -v "^DEBUG" | tee "$out/gpu_tests.log" | tail -15
timeout 240 python3 bench/gpu_smoke_static.py 2>&1 | grep -v "Warning\|warn\|tree_map" | tee "$out/gpu_smoke.log" | tail -12
