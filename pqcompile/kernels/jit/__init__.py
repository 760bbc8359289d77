"""@triton.jit code only (no host code): the wrappers in pqcompile.kernels launch these kernels."""
