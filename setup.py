"""Build of lethe's compiled library, lethe._C.

Always builds the C++ CPU kernels. Also compiles and links the CUDA kernels when torch is a
CUDA build and nvcc is found, or when forced. Environment switches:

  LETHE_BUILD_CUDA       auto (default) | 0 (skip CUDA while iterating) | 1 (force; fail if impossible)
  TORCH_CUDA_ARCH_LIST   CUDA archs, default "8.0;9.0a"
  CUDA_HOME              toolkit root; found from nvcc when unset
  MAX_JOBS               parallel compile jobs for ninja
  LETHE_DEBUG            1 = -O0 -g
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def _find_cuda_home():
    """Toolkit root whose bin/ holds the real nvcc and lib64/ holds cudart.

    /usr/local/bin/nvcc is often a wrapper script, so torch's own guess (its parent's parent)
    can be wrong; follow the wrapper to the real toolkit instead."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for tok in head.decode(errors="ignore").split():
                    if tok.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if os.path.isfile(os.path.join(c, "bin", "nvcc")) and glob.glob(
            os.path.join(c, "lib*", "libcudart.so*")
        ):
            return c
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # must precede the import of torch's extension builder
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _find_cublas():
    """(include dir, library file) of cuBLAS: the pip wheel's (nvidia/*) that torch itself loads, or
    the toolkit's. The fused LM-head kernels call cublasGemmEx for fp16/bf16 inputs with fp32 output,
    which ATen does not expose with an fp32 accumulator."""
    roots = []
    for p in sys.path:  # the wheel's first: that is the library torch loads
        roots += sorted(glob.glob(os.path.join(p, "nvidia", "*")))
    roots += [_cuda_home] if _cuda_home else []
    inc = lib = None
    for r in roots:
        if inc is None and os.path.isfile(os.path.join(r, "include", "cublas_v2.h")):
            inc = os.path.join(r, "include")
        if lib is None:
            libs = sorted(glob.glob(os.path.join(r, "lib*", "libcublas.so*")))
            if libs:
                lib = libs[0]
    return inc, lib


def _want_cuda():
    mode = os.environ.get("LETHE_BUILD_CUDA", "auto").lower()
    if mode in ("0", "off", "no", "false"):
        return False
    possible = torch.version.cuda is not None and _cuda_home is not None and all(_find_cublas())
    if mode in ("1", "on", "yes", "true", "force"):
        if not possible:
            sys.exit(
                "LETHE_BUILD_CUDA=1 but CUDA cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={_cuda_home!r}, "
                f"cuBLAS (include, library)={_find_cublas()!r}"
            )
        return True
    return possible


WITH_CUDA = _want_cuda()
DEBUG = os.environ.get("LETHE_DEBUG", "0") == "1"
ARCHS = os.environ["TORCH_CUDA_ARCH_LIST"]

cxx_flags = ["-O0", "-g"] if DEBUG else ["-O3"]
cxx_flags += ["-fvisibility=hidden", "-ffp-contract=off"]  # torch adds its own -std (C++20 for torch >= 2.10)
link_flags = []
if sys.platform.startswith("linux"):
    # at::parallel_for's OpenMP backend is inline in ATen's headers: without -fopenmp here it
    # silently runs on one thread.
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
# No contraction of a*b+c into an FMA anywhere (host: -ffp-contract=off, Triton:
# enable_fp_fusion=False): the kernels then compute the plain fp32 formulas of the shared headers,
# which the CPU tests check. The kernels are memory-bound; the GEMMs are cuBLAS's.
nvcc_flags = (["-O0", "-g", "-G"] if DEBUG else ["-O3", "-lineinfo"])
nvcc_flags += ["--expt-relaxed-constexpr", "--fmad=false", "-Xptxas=-v"]


def _ptx_flags(archs):
    """PTX of the highest arch in the list, so that a newer GPU (Blackwell) JIT-compiles the kernels
    instead of finding no kernel image, as flash-attention and xformers ship. An arch-specific one
    (9.0a) is not forward compatible: its generic form (compute_90) is embedded. Nothing to add when
    the list already asks for PTX (+PTX)."""
    if "+PTX" in archs.upper():
        return []
    nums = [a.strip().lower().rstrip("af") for a in archs.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    best = max(nums, key=lambda a: tuple(int(x) for x in a.split(".")))
    code = best.replace(".", "")
    return [f"-gencode=arch=compute_{code},code=compute_{code}"]
define_macros = [("LETHE_CUDA_ARCHS", '"%s"' % ARCHS if WITH_CUDA else '""')]

sources = ["csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
ext_kwargs = dict(
    name="lethe._C",
    include_dirs=[os.path.join(ROOT, "csrc", "include")],
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    extra_link_args=link_flags,
)
if WITH_CUDA:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("LETHE_WITH_CUDA", "1"))
    # naming any -gencode makes torch add none of its own: the archs' ones first, then the PTX
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    nvcc_flags += _get_cuda_arch_flags() + _ptx_flags(ARCHS)
    cublas_inc, cublas_lib = _find_cublas()
    # -isystem: searched after every -I, so the toolkit's own CUDA headers keep precedence over the
    # copies in the wheel's include folder; only what the toolkit lacks (cuBLAS) comes from there
    cxx_flags += ["-isystem", cublas_inc]
    nvcc_flags += ["-isystem", cublas_inc]
    # by path: the wheel has only libcublas.so.N; the soname is what is recorded, and torch has
    # loaded that library before lethe._C is imported
    ext_kwargs["extra_link_args"] = link_flags + [cublas_lib]
    ext = CUDAExtension(sources=sources, define_macros=define_macros, **ext_kwargs)
else:
    ext = CppExtension(sources=sources, define_macros=define_macros, **ext_kwargs)



class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """Objects go to build/temp, not pip's throw-away folder, so that ninja rebuilds only what
    changed on the next `pip install --no-build-isolation -e .`."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp")


print(f"lethe build: CUDA={'yes (' + ARCHS + ')' if WITH_CUDA else 'no'}, CUDA_HOME={_cuda_home}")

setup(
    packages=find_packages("python") + ["lethe.triton_kernels"],
    package_dir={"": "python", "lethe.triton_kernels": "triton_kernels"},
    package_data={"lethe.eval": ["templates.json"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
