"""What was built: the compiled library loads, registers its CPU kernels, and its CUDA kernels
whenever this machine can build them (torch with CUDA and nvcc, unless LETHE_BUILD_CUDA=0)."""
import os
import shutil
import subprocess
import sys

import torch

import lethe
from lethe import _lib
from lethe.ops import OPS


def _cuda_expected() -> bool:
    if os.environ.get("LETHE_BUILD_CUDA", "auto").lower() in ("0", "off", "no", "false"):
        return False
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def test_library_loads_and_registers_cpu_kernels():
    assert _lib.available(), _lib.load_error
    for name, op in OPS.items():
        assert ("cpu" in op.kernels) == _lib.has_kernel(name, "CPU"), name


def test_cuda_kernels_registered_when_buildable():
    info = _lib.build_info()
    if _cuda_expected():
        assert info["cuda"], "nvcc and a CUDA torch are here, but lethe._C was built without CUDA"
    if info["cuda"]:
        assert "8.0" in info["cuda_archs"] or "9.0" in info["cuda_archs"], info
        for name, op in OPS.items():
            assert ("cuda" in op.kernels) == _lib.has_kernel(name, "CUDA"), f"lethe::{name}: declared {op.kernels}"
    else:
        for op in OPS:
            assert not _lib.has_kernel(op, "CUDA")


def test_info_reports_build_and_backends():
    out = subprocess.run([sys.executable, "-m", "lethe.info"], capture_output=True, text=True, check=True).stdout
    assert f"lethe {lethe.__version__}" in out and f"torch {torch.__version__}" in out
    assert "compiled library: CPU yes" in out
    for name in OPS:
        assert f"op {name}:" in out and "cpu -> native" in out


def test_import_without_compiled_library_warns_once_and_uses_reference(tmp_path):
    # A copy of the Python package without the .so: import must succeed with one warning.
    pkg = os.path.dirname(lethe.__file__)
    shutil.copytree(pkg, tmp_path / "lethe", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = (
        "import sys, warnings\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import lethe, torch\n"
        "    import lethe.ops\n"
        "msgs = [str(x.message) for x in w if 'compiled library' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "x = torch.randn(4, 128, requires_grad=True)\n"
        "y = lethe.fake_quantize(x, 'int4-g128')\n"
        "y.sum().backward()\n"
        "assert torch.equal(x.grad, torch.ones_like(x))\n"
        "from lethe.ops.quant_reference import fake_quantize_codes\n"
        "assert torch.equal(y, fake_quantize_codes(x, 128, 4, 0, True, 7.5)[0])\n"
        "assert not torch._C._dispatch_has_kernel_for_dispatch_key('lethe::fake_quantize', 'CPU')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_every_op_is_declared_once_with_its_twin():
    # one declaration (lethe.ops._op.define_op) gives the schema, the fake kernel, the Triton twin
    # with the same schema, and the OPS row; the kfac family alone has no twin (GEMM / LAPACK
    # bound: its kernels are cuBLAS / cuSOLVER / MKL calls, docs/architecture.md)
    import torch

    for name, op in OPS.items():
        assert op.defined, name
        if name.startswith("kfac_"):
            assert op.triton is None and not hasattr(torch.ops.lethe, f"{name}_triton"), name
            assert op.kernels == ("cpu", "cuda") or op.kernels == ("cpu",), (name, op.kernels)
            continue
        assert op.triton, name
        schema = torch.ops.lethe.__getattr__(name).default._schema
        twin = torch.ops.lethe.__getattr__(f"{name}_triton").default._schema
        assert [(a.name, str(a.type)) for a in schema.arguments] == [(a.name, str(a.type)) for a in twin.arguments]
        assert [str(r.type) for r in schema.returns] == [str(r.type) for r in twin.returns]
        assert "backends" not in op.kernels and set(op.backends) <= {"cpu", "cuda", "triton"}


def test_triton_kernels_do_not_import_lethe_ops():
    # dependencies point one way: lethe.ops imports lethe.triton_kernels, never the reverse
    import pathlib
    import re

    for path in (pathlib.Path(lethe.__file__).parents[2] / "triton_kernels").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) lethe\.(ops|nn|integrations)", text, re.M), path


def test_cuda_build_ships_ptx_for_newer_gpus():
    # SASS for each arch of the list, and the PTX of the highest one (compute_90: arch-specific 9.0a
    # PTX would not JIT on Blackwell), so that a newer GPU finds a kernel image
    import glob
    import pathlib

    import triton

    if not _lib.build_info()["cuda"]:
        return  # a CPU-only build ships no GPU code (test_cuda_kernels_registered_when_buildable)
    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    so = glob.glob(os.path.join(os.path.dirname(lethe.__file__), "_C*.so"))[0]
    ptx = subprocess.run([str(tool), "--list-ptx", so], capture_output=True, text=True, check=True).stdout
    elf = subprocess.run([str(tool), "--list-elf", so], capture_output=True, text=True, check=True).stdout
    assert ".sm_90.ptx" in ptx and "sm_90a" not in ptx, ptx
    for arch in _lib.build_info()["cuda_archs"].split(";"):
        assert f"sm_{arch.replace('.', '')}" in elf, (arch, elf)
