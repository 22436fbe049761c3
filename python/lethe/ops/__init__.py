"""Public functional API of lethe's ops. Each op: a compiled CPU/CUDA kernel, a Triton kernel and
a pure-PyTorch reference, chosen per call (backend=) or by LETHE_BACKEND."""
from lethe._lib import cpu_cache_info, empty_cpu_cache
from lethe.ops._backend import BACKENDS, get_backend, set_backend
from lethe.ops.quant import PRESETS, QuantSpec, fake_quantize, quant_spec
from lethe.ops.shred import (demote_targets, fused_linear_topk_kl, select_forget_positions,
                             teacher_topk, topk_kl)

__all__ = ["BACKENDS", "get_backend", "set_backend", "cpu_cache_info", "empty_cpu_cache", "PRESETS", "QuantSpec", "fake_quantize", "quant_spec",
           "teacher_topk", "select_forget_positions", "demote_targets", "topk_kl", "fused_linear_topk_kl"]

# Every op and the kernels it has besides its pure-PyTorch reference ("cpu" and "cuda": compiled,
# "triton"). lethe.info and the build tests read this.
OPS = {
    "fake_quantize": ("cpu", "cuda", "triton"),
    "fake_quantize_backward": ("cpu", "cuda", "triton"),
    "teacher_topk": ("cpu", "cuda", "triton"),
    "select_forget_positions": ("cpu", "cuda", "triton"),
    "demote_targets": ("cpu", "cuda", "triton"),
    "topk_kl": ("cpu", "cuda", "triton"),
    "topk_kl_backward": ("cpu", "cuda", "triton"),
    "fused_linear_topk_kl": ("cpu", "cuda", "triton"),
}
