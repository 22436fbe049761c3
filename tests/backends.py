"""The backends every op test runs on, as one parameter (the `backend` fixture of conftest.py):

  cpu     the compiled CPU kernels (torch.ops.lethe.<op>)
  triton  the Triton twins (torch.ops.lethe.<op>_triton): compiled, on CUDA tensors, where a GPU
          exists; else interpreted on CPU tensors (TRITON_INTERPRET=1, set by conftest.py before
          Triton is imported)
  cuda    the compiled CUDA kernels, where a GPU exists (skipped without one)

A test takes CPU inputs, runs the op on the backend's device (`backend("op", *args)`, or a public
function with `backend.public(fn, *args)`), and compares what comes back (on the CPU) with the
pure-PyTorch reference. Parameters that run on a GPU carry the `gpu` mark: `make gpu-check` runs
those. The interpreter truncates fp32 -> bf16 stores where a GPU rounds to nearest even:
`backend.stored` models it.
"""
import functools
import os

import pytest
import torch

import lethe  # noqa: F401  (declares the ops and loads the compiled library)

GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")


def _move(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_move(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x


class Backend:
    def __init__(self, name: str, kernel: str, device: str):
        self.name, self.kernel, self.device = name, kernel, device

    def __repr__(self):
        return self.name

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def interpreted(self) -> bool:
        return self.kernel == "triton" and not self.on_gpu

    def op(self, name: str):
        return getattr(torch.ops.lethe, name if self.kernel == "native" else f"{name}_triton")

    def to(self, x):
        """Inputs on the backend's device (tensors, also inside lists, tuples and dicts)."""
        return _move(x, self.device)

    def __call__(self, name: str, *args, **kwargs):
        """The op on the backend's device; outputs back on the CPU."""
        return _move(self.op(name)(*self.to(args), **self.to(kwargs)), "cpu")

    def public(self, fn, *args, **kwargs):
        """A public function of lethe.ops run by this backend (backend= "native" or "triton"), with
        its tensor arguments on the backend's device; the output stays there (for autograd)."""
        return fn(*self.to(args), **self.to(kwargs), backend=self.kernel)

    def stored(self, t32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """fp32 values as this backend stores them in dtype: torch's rounding, except for bf16
        under a Triton that truncates (the interpreter)."""
        if self.kernel != "triton" or dtype != torch.bfloat16 or not _bf16_store_truncates():
            return t32.to(dtype)
        bits = t32.float().contiguous().view(torch.int32) & ~0xFFFF
        out = bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
        return torch.where(torch.isnan(t32), t32.to(torch.bfloat16), out)


CPU = Backend("cpu", "native", "cpu")
TRITON = Backend("triton", "triton", "cuda" if GPU else "cpu")
CUDA = Backend("cuda", "native", "cuda")
ALL = (CPU, TRITON, CUDA)


def marks(b: Backend):
    if b is CUDA:
        return [needs_gpu, pytest.mark.gpu]
    return [pytest.mark.gpu] if b.on_gpu else []


def params(backends=ALL):
    return [pytest.param(b, id=b.name, marks=marks(b)) for b in backends]


def grid(cases, backends=ALL, where=None, ids=None):
    """(backend, case) parameters for every pair where(backend, case) allows: a case too large for
    the interpreter is not generated for it, instead of skipped."""
    out = []
    for b in backends:
        for i, c in enumerate(cases):
            if where is None or where(b, c):
                out.append(pytest.param(b, c, id=f"{b.name}-{ids(c) if ids else i}", marks=marks(b)))
    return out


def not_interpreted(b, _case=None) -> bool:
    return not b.interpreted


@functools.lru_cache(maxsize=None)
def _bf16_store_truncates() -> bool:
    """Whether this Triton truncates on an fp32 -> bf16 store (the interpreter does): probed on a
    value that rounds up, so a fixed interpreter is noticed."""
    import triton
    import triton.language as tl

    @triton.jit
    def _store_bf16(x_ptr, y_ptr):
        tl.store(y_ptr, tl.load(x_ptr).to(tl.bfloat16))

    x = torch.tensor([1.0 + 2.0**-8 + 2.0**-9], device=TRITON.device)  # above half a bf16 ulp: RNE rounds up
    y = torch.empty(1, dtype=torch.bfloat16, device=TRITON.device)
    _store_bf16[(1,)](x, y)
    return bool(y.item() < x.bfloat16().item())


def assert_same_error(calls, exc, match):
    """Every call raises exc with one and the same message, which matches `match`: the same bad
    input gets the same words from every backend and from the op's Python check."""
    import re

    messages = []
    for call in calls:
        with pytest.raises(exc) as info:
            call()
        messages.append(str(info.value))
    assert re.search(match, messages[0]), (match, messages[0])
    assert len(set(messages)) == 1, messages
