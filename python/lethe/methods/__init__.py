"""Unlearning methods on lethe's fused ops, by name.

    import lethe.methods as lm
    lm.available()                       # ['ga', 'graddiff', 'npo', 'simnpo', 'shred', 'saf', 'gu', 'ssd', 'kfade', 'fit']
    result = lm.unlearn(model, forget, retain, method="npo", tokenizer=tok, steps=40)

Each method is a small class with a config dataclass holding its paper's defaults
(lm.get("npo").Config); the optimiser settings (UnlearnConfig) are the built-in benchmark's."""
from lethe.methods.base import Encoded, Method, available, get, register
from lethe.methods.driver import (UnlearnConfig, UnlearnResult, benchmark_method, encode, make_method, unlearn,
                                  write_log)
# the methods register themselves on import, in this order
from lethe.methods.ga import GA, GAConfig
from lethe.methods.graddiff import GradDiff, GradDiffConfig
from lethe.methods.npo import NPO, NPOConfig
from lethe.methods.simnpo import SimNPO, SimNPOConfig
from lethe.methods.shred import Shred, ShredConfig
from lethe.methods.saf import SAF, SAFConfig
from lethe.methods.gu import GU, GUConfig
from lethe.methods.ssd import SSD, SSDConfig
from lethe.methods.kfade import KFADE, KFADEConfig
from lethe.methods.fit import FIT, FITConfig
from lethe.methods.continual import Sequential

__all__ = ["Method", "Encoded", "available", "get", "register", "unlearn", "UnlearnConfig", "UnlearnResult",
           "encode", "make_method", "benchmark_method", "write_log", "GA", "GAConfig", "GradDiff", "GradDiffConfig", "NPO", "NPOConfig",
           "SimNPO", "SimNPOConfig", "Shred", "ShredConfig", "SAF", "SAFConfig", "GU", "GUConfig", "SSD", "SSDConfig",
           "KFADE", "KFADEConfig", "FIT", "FITConfig", "Sequential"]
