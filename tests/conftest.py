"""Shared pytest setup. Without a CUDA GPU, Triton kernels can only run under the interpreter,
which must be switched on before any @triton.jit kernel is defined: do it here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
