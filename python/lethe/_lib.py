"""Loading of the compiled library lethe._C. Import never fails: without it, lethe warns once and
the ops run their pure-PyTorch reference."""
from __future__ import annotations

import warnings

import torch

_C = None
load_error: str | None = None
try:
    from lethe import _C  # noqa: F811  (loading the library registers the ops)
except Exception as e:  # ImportError, or an undefined symbol from a torch mismatch
    load_error = f"{type(e).__name__}: {e}"
    warnings.warn(
        f"lethe: the compiled library could not be loaded ({load_error}); "
        "every op runs its pure-PyTorch reference. Rebuild with "
        "`pip install --no-build-isolation -e .` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )


def available() -> bool:
    return _C is not None


def build_info() -> dict:
    if _C is None:
        return {"cpu": False, "cuda": False, "cuda_archs": "", "error": load_error}
    info = dict(_C.build_info())
    info["cpu"] = True
    return info


def has_op(op: str) -> bool:
    """Whether the loaded library declares lethe::<op> (an out-of-date build may not)."""
    if _C is None:
        return False
    try:
        getattr(torch.ops.lethe, op)
        return True
    except (AttributeError, RuntimeError):
        return False


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the compiled library registered lethe::<op> for a dispatch key ("CPU", "CUDA")."""
    return has_op(op) and torch._C._dispatch_has_kernel_for_dispatch_key(f"lethe::{op}", dispatch_key)


_stale_warned = False


def register(op: str, fake, backward=None, setup_context=None) -> bool:
    """Register the fake kernel (and autograd) of a compiled op from Python. A library built from
    older sources lacks newer ops: warn once, and those ops run their reference."""
    global _stale_warned
    if not has_op(op):
        if _C is not None and not _stale_warned:
            _stale_warned = True
            warnings.warn(f"lethe: the compiled library has no lethe::{op} (built from older sources?); "
                          "such ops run their pure-PyTorch reference. Rebuild to use the kernels.",
                          RuntimeWarning, stacklevel=3)
        return False
    torch.library.register_fake(f"lethe::{op}")(fake)
    if backward is not None:
        torch.library.register_autograd(f"lethe::{op}", backward, setup_context=setup_context)
    return True


def cpu_cache_info() -> dict:
    """The cache of large CPU output buffers: cached bytes and buffers, hits, misses, limit."""
    return dict(_C.cpu_cache_stats()) if _C is not None else {}


def empty_cpu_cache() -> None:
    """Free the CPU output buffers the cache holds (those of live tensors are untouched)."""
    if _C is not None:
        _C.cpu_cache_release()
