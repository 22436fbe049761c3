"""lethe: fused kernels and methods for machine unlearning of large language models."""
from lethe import _lib  # noqa: F401  (loads the compiled library, or warns once)
from lethe import nn, ops
from lethe.nn.quant import quantized_weights
from lethe.nn.retain_subspace import RetainSubspace
from lethe.ops import fake_quantize

__version__ = "0.1.0"
__all__ = ["ops", "nn", "fake_quantize", "quantized_weights", "RetainSubspace", "__version__"]
