"""SimNPO (Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for
LLM Unlearning", eq. 4): NPO without a reference model, length-normalised, with a margin.

L_SimNPO = -(2 / beta) * E_f[log sigmoid(-(beta / |y|) * log pi_theta(y|x) - delta)],
|y| the answer's length in tokens and delta the paper's reward margin (its gamma; 0 in its TOFU
runs). L = gamma * L_SimNPO + alpha * L_r, the paper's L_SimNPO + lambda * L_retain with
gamma = 1 and lambda = alpha = 1. beta = 4.5 as open-unlearning's SimNPO for TOFU; that config also
weights the forget term by 0.125, with which the bounded loss barely moves the built-in
benchmark's model (forget probability 0.99 -> 0.85 in the default run): lethe keeps the paper's
unweighted form (see benchmarks/RESULTS.md, methods)."""
from __future__ import annotations

import dataclasses

import torch.nn.functional as F

from lethe.methods.base import RetainWeights, WithRetain, check_number, register, sequence_nll


@dataclasses.dataclass(frozen=True)
class SimNPOConfig(RetainWeights):
    beta: float = 4.5
    delta: float = 0.0  # the margin

    def __post_init__(self):
        super().__post_init__()
        check_number(self, "beta", positive=True)
        check_number(self, "delta")


@register
class SimNPO(WithRetain):
    name = "simnpo"
    Config = SimNPOConfig
    benchmark = {"lr": 1e-3, "steps": 42, "batch_fraction": 0.29}

    def loss(self, model, inputs, step, total_steps):
        c = self.config
        nll, count = sequence_nll(model, inputs["forget"])
        # -(beta/|y|) log pi = beta * nll / |y|
        sim = -(2.0 / c.beta) * F.logsigmoid(c.beta * nll / count - c.delta).mean()
        return self.with_retain(sim, model, inputs, {"simnpo": sim.item(), "forget_nll": (nll / count).mean().item()})
