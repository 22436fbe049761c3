"""`python -m lethe.info`: versions found, what was built, and which backend each op uses."""
from __future__ import annotations

import importlib.util
import platform

import torch


def report() -> str:
    import lethe
    from lethe import _lib
    from lethe.ops import OPS, _backend

    lines = [f"lethe {lethe.__version__}", f"python {platform.python_version()}",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
             f"GPU available: {torch.cuda.is_available()})"]
    if importlib.util.find_spec("triton") is not None:
        import triton

        lines.append(f"triton {triton.__version__} (interpreter: {_backend.triton_interpreted()})")
    else:
        lines.append("triton not installed")
    info = _lib.build_info()
    if _lib.available():
        lines.append(f"compiled library: CPU yes, CUDA {'yes, archs ' + info['cuda_archs'] if info['cuda'] else 'no'}"
                     f" (compiler {info.get('compiler', '?')})")
    else:
        lines.append(f"compiled library: not loaded ({info['error']}); ops use the reference")
    lines.append(f"default backend: {_backend.get_backend()} (LETHE_BACKEND)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op, decl in OPS.items():
        built = "/".join(k for k in ("CPU", "CUDA") if _lib.has_kernel(op, k)) or "none"
        picks = ", ".join(f"{d} -> {_backend._resolve(op, d, _backend.get_backend())}" for d in devices)
        lines.append(f"op {op}: kernels {'/'.join(decl.backends)}; compiled here {built}; {picks}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
