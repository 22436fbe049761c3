"""Modules built on lethe's ops."""
from lethe.nn.fisher import FisherDiagonal
from lethe.nn.kfac import KFAC, kfac_layers
from lethe.nn.quant import FakeQuantLinear, quantized_weights
from lethe.nn.retain_subspace import RetainSubspace
from lethe.nn.shred import ShredLoss, ShredTargets

__all__ = ["FakeQuantLinear", "quantized_weights", "ShredLoss", "ShredTargets", "RetainSubspace", "FisherDiagonal", "KFAC", "kfac_layers"]
