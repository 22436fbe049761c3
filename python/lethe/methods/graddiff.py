"""Gradient difference (GradDiff): ascend the forget loss, descend the retain loss.

L = -gamma * NLL_f + alpha * L_r (Liu et al. 2022; open-unlearning's GradDiff, gamma = alpha = 1),
L_r the retain answers' mean cross-entropy ("nll") or the mean KL from the original model to the
model on them ("kl": the original model's top-`retain_k`, computed once per retain example)."""
from __future__ import annotations

import dataclasses

from lethe.methods.base import RetainWeights, WithRetain, mean_nll, register


@dataclasses.dataclass(frozen=True)
class GradDiffConfig(RetainWeights):
    """GradDiff's settings are the shared weights alone (gamma, alpha, retain_loss, retain_k)."""


@register
class GradDiff(WithRetain):
    name = "graddiff"
    Config = GradDiffConfig
    benchmark = {"lr": 5e-4, "steps": 42, "batch_fraction": 0.29}

    def loss(self, model, inputs, step, total_steps):
        forget = mean_nll(model, inputs["forget"])
        return self.with_retain(-forget, model, inputs, {"forget_nll": forget.item()})
