"""Modules built on lethe's ops."""
from lethe.nn.quant import FakeQuantLinear, quantized_weights

__all__ = ["FakeQuantLinear", "quantized_weights"]
