"""Public functional API of lethe's ops. Each op: compiled CPU/CUDA kernels, a Triton kernel and
a pure-PyTorch reference, chosen per call (backend=) or by LETHE_BACKEND. Every op is declared once
(lethe.ops._op.define_op) in its family's module; OPS lists them."""
from lethe._lib import check_errors, cpu_cache_info, empty_cpu_cache
from lethe.ops import gu, kfac, quant, shred, ssd
from lethe.ops import token_stats as _token_stats  # the module (its function of that name is exported below)
from lethe.ops._backend import BACKENDS, get_backend, set_backend
from lethe.ops._op import OPS
from lethe.ops.gu import *  # noqa: F401,F403
from lethe.ops.kfac import *  # noqa: F401,F403
from lethe.ops.quant import *  # noqa: F401,F403
from lethe.ops.shred import *  # noqa: F401,F403
from lethe.ops.ssd import *  # noqa: F401,F403
from lethe.ops.token_stats import *  # noqa: F401,F403

__all__ = ["BACKENDS", "OPS", "get_backend", "set_backend", "check_errors", "cpu_cache_info",
           "empty_cpu_cache", *gu.__all__, *kfac.__all__, *quant.__all__, *shred.__all__, *ssd.__all__, *_token_stats.__all__]
