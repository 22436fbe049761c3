"""Public functional API of lethe's ops. Each op: a compiled CPU/CUDA kernel, a Triton kernel and
a pure-PyTorch reference, chosen per call (backend=) or by LETHE_BACKEND."""
from lethe._lib import cpu_cache_info, empty_cpu_cache
from lethe.ops._backend import BACKENDS, get_backend, set_backend
from lethe.ops.quant import PRESETS, QuantSpec, fake_quantize, quant_spec

__all__ = ["BACKENDS", "get_backend", "set_backend", "cpu_cache_info", "empty_cpu_cache", "PRESETS", "QuantSpec", "fake_quantize", "quant_spec"]

# Ops by name, for lethe.info and the tests: public name -> compiled op name.
OPS = {"fake_quantize": "fake_quantize"}
