"""Loading of the compiled library lethe._C. Import never fails: without it, lethe warns once and
the ops run their pure-PyTorch reference."""
from __future__ import annotations

import os
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


_cache_mb = os.environ.get("LETHE_CPU_CACHE_MB", "").strip()
if _cache_mb and not (_cache_mb.isdigit()):
    warnings.warn(f"lethe: LETHE_CPU_CACHE_MB must be a whole number of MiB (0 disables the cache), got "
                  f"{_cache_mb!r}; the default 1024 is used", RuntimeWarning, stacklevel=2)


def available() -> bool:
    return _C is not None


def build_info() -> dict:
    if _C is None:
        return {"cpu": False, "cuda": False, "cuda_archs": "", "error": load_error}
    info = dict(_C.build_info())
    info["cpu"] = True
    return info


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the compiled library registered a kernel of lethe::<op> for a dispatch key ("CPU",
    "CUDA")."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"lethe::{op}", dispatch_key)


def cpu_cache_info() -> dict:
    """The cache of large CPU output buffers: cached bytes and buffers, hits, misses, limit."""
    return dict(_C.cpu_cache_stats()) if _C is not None else {}


def empty_cpu_cache() -> None:
    """Free the CPU output buffers the cache holds (those of live tensors are untouched)."""
    if _C is not None:
        _C.cpu_cache_release()


def check_errors(device=None) -> None:
    """Raise the first bad input that a CUDA kernel of lethe found on `device` (default: the
    current one) since the last check, after waiting for the device. The CUDA kernels check the
    values in tensors (target ids and probabilities, labels) without a host sync, so such an
    error is raised here or at the next lethe call on that device; with LETHE_SYNC_CHECKS=1 every
    CUDA op waits for its kernels and raises at the call itself. A no-op without CUDA."""
    if _C is None or not build_info()["cuda"] or not torch.cuda.is_available():
        return
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type == "cuda":
        _C.check_errors(torch.cuda.current_device() if dev.index is None else dev.index, True)
