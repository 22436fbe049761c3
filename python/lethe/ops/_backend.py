"""Choice of backend per op call: "native" (the C++ CPU or CUDA kernel), "triton", "reference"
(pure PyTorch) or "auto". The default comes from the environment variable LETHE_BACKEND, read once
at import, or from set_backend(); a call's backend= argument overrides it."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from lethe import _lib

BACKENDS = ("auto", "native", "triton", "reference")


def _check_name(name: str, argument: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {name!r}")
    return name


_default = _check_name(os.environ.get("LETHE_BACKEND", "auto").strip().lower() or "auto", "LETHE_BACKEND")


def set_backend(name: str) -> None:
    """Set the default backend for every op (overridden by a call's backend= argument)."""
    global _default
    _default = _check_name(name, "backend")


def get_backend() -> str:
    return _default


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return module_exists("triton")


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is missing
        return False


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(op, x: torch.Tensor, backend: str | None = None) -> str:
    """The backend that runs op (an Op of lethe.ops._op, or its name) for tensors on x's device."""
    name = _check_name(backend if backend is not None else _default, "backend")
    return _resolve(op if isinstance(op, str) else op.name, x.device.type, name)


_resolved: dict = {}


# Called, not traced, by torch.compile (so no graph break), and evaluated once per key.
@torch.compiler.assume_constant_result
def _resolve(op: str, dev: str, name: str) -> str:
    key = (op, dev, name)
    if key not in _resolved:
        _resolved[key] = _choose(op, dev, name)
    return _resolved[key]


def _choose(op: str, dev: str, name: str) -> str:
    from lethe.ops._op import OPS

    decl = OPS[op]
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(dev)
    native = decl.defined and (dev == "meta" or key is not None and _lib.has_kernel(op, key))
    triton_ok = (decl.triton is not None and triton_available()
                 and (dev in ("cuda", "xpu") or (dev == "cpu" and triton_interpreted())))
    if name == "native":
        if not native:
            raise RuntimeError(
                f"backend='native' has no compiled {op} kernel for device {dev!r} "
                f"(compiled library: {_lib.build_info()})"
            )
        return "native"
    if name == "triton":
        if not triton_ok:
            raise RuntimeError(
                f"backend='triton' cannot run {op} on device {dev!r}: "
                + ("it has no Triton kernel" if decl.triton is None else
                   "Triton is not installed" if not triton_available() else
                   "Triton runs on GPUs, or on CPU tensors only under TRITON_INTERPRET=1")
            )
        return "triton"
    if name == "reference":
        return "reference"
    # auto
    if native:
        return "native"
    if dev != "cpu" and triton_ok:
        return "triton"
    if dev in ("cpu", "cuda", "meta"):
        return "reference"
    raise RuntimeError(
        f"{op}: x is on device {dev!r}, which has neither a compiled kernel nor Triton; "
        "expected a CPU or CUDA tensor"
    )
