"""Setup shared by the Triton test files: where the kernels run here. Without a CUDA GPU they run
on CPU tensors under TRITON_INTERPRET=1, which tests/conftest.py sets before Triton is imported
(pytest loads it before any test module); the interpreter mishandles bfloat16."""
import os

import torch

import triton  # noqa: F401  (a dependency: its absence is a failure, not a skip)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"


def assert_kernels_run_where_they_can(*kernels):
    """On CPU the kernels only run interpreted, which must be on before they are defined."""
    from triton.runtime.interpreter import InterpretedFunction

    assert DEVICE == "cuda" or (INTERPRETED and all(isinstance(k, InterpretedFunction) for k in kernels))
