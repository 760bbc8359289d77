import os

import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. It must be set before
# any @triton.jit decorator runs, so here, before test modules import pqcompile.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
