"""Setup shared by the Triton test files: where the kernels run here. Without a CUDA GPU they run
on CPU tensors under TRITON_INTERPRET=1, which tests/conftest.py sets before Triton is imported
(pytest loads it before any test module). The interpreter mishandles bfloat16: it truncates
fp32 -> bf16 conversions instead of rounding to nearest even (`as_stored` models that)."""
import functools
import os

import torch

import triton  # noqa: F401  (a dependency: its absence is a failure, not a skip)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"


def assert_kernels_run_where_they_can(*kernels):
    """On CPU the kernels only run interpreted, which must be on before they are defined."""
    from triton.runtime.interpreter import InterpretedFunction

    assert DEVICE == "cuda" or (INTERPRETED and all(isinstance(k, InterpretedFunction) for k in kernels))


@functools.lru_cache(maxsize=None)
def _bf16_store_truncates() -> bool:
    """Whether this Triton (the interpreter, here) truncates on an fp32 -> bf16 store: probed on
    a value that rounds up, so a fixed interpreter is noticed."""
    import triton.language as tl

    @triton.jit
    def _store_bf16(x_ptr, y_ptr):
        tl.store(y_ptr, tl.load(x_ptr).to(tl.bfloat16))

    x = torch.tensor([1.0 + 2.0**-8 + 2.0**-9], device=DEVICE)  # above half a bf16 ulp: RNE rounds up
    y = torch.empty(1, dtype=torch.bfloat16, device=DEVICE)
    _store_bf16[(1,)](x, y)
    return bool(y.item() < x.bfloat16().item())


def as_stored(t32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values as a Triton kernel here stores them in dtype: torch's rounding, except for
    bf16 under a Triton that truncates (the interpreter); the GPU rounds to nearest even."""
    if dtype != torch.bfloat16 or not _bf16_store_truncates():
        return t32.to(dtype)
    bits = t32.float().contiguous().view(torch.int32) & ~0xFFFF
    out = bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
    return torch.where(torch.isnan(t32), t32.to(torch.bfloat16), out)
