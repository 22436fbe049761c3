"""Gradient ascent (GA): maximise the forget set's cross-entropy.

As open-unlearning's GradAscent (and TOFU's baseline, Maini et al. 2024): L = -NLL_f, the mean
over the forget answers' tokens. It has no retain term and is known to collapse the model; the
benchmark's step count keeps it short."""
from __future__ import annotations

import dataclasses

from lethe.methods.base import Method, mean_nll, register


@dataclasses.dataclass(frozen=True)
class GAConfig:
    pass


@register
class GA(Method):
    name = "ga"
    Config = GAConfig
    benchmark = {"lr": 5e-4, "steps": 42, "batch_fraction": 0.145}

    def loss(self, model, inputs, step, total_steps):
        forget = mean_nll(model, inputs["forget"])
        return -forget, {"forget_nll": forget.item()}
