"""Negative Preference Optimisation (NPO; Zhang, Lin, Bai & Mei 2024, eq. 3).

L_NPO = (2 / beta) * E_f[log(1 + (pi_theta(y|x) / pi_ref(y|x))^beta)]
      = -(2 / beta) * E_f[log sigmoid(-beta * (log pi_theta(y|x) - log pi_ref(y|x)))],
with log pi(y|x) the answer's summed token log-likelihood and pi_ref the original model, whose
log-likelihood of each forget example is computed once (prepare) and kept in the method's state.
beta = 0.1 (the paper's). With alpha > 0 the retain term of NPO-RT / open-unlearning's NPO is
added: L = gamma * L_NPO + alpha * L_r (gamma = alpha = 1)."""
from __future__ import annotations

import dataclasses

import torch.nn.functional as F

from lethe.methods.base import RetainWeights, WithRetain, check_number, frozen_sequence_nll, register, sequence_nll


@dataclasses.dataclass(frozen=True)
class NPOConfig(RetainWeights):
    beta: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        check_number(self, "beta", positive=True)


@register
class NPO(WithRetain):
    name = "npo"
    Config = NPOConfig
    benchmark = {"lr": 3.5e-4, "steps": 42, "batch_fraction": 0.29}

    def prepare(self, model, forget, retain):
        self._state["ref_nll"] = frozen_sequence_nll(model, forget)
        super().prepare(model, forget, retain)

    def loss(self, model, inputs, step, total_steps):
        c = self.config
        f = inputs["forget"]
        nll, _ = sequence_nll(model, f)
        ref = self._state["ref_nll"][f["index"].cpu()].to(nll.device)
        # log pi_theta - log pi_ref = ref_nll - nll
        npo = -(2.0 / c.beta) * F.logsigmoid(-c.beta * (ref - nll)).mean()
        return self.with_retain(npo, model, inputs, {"npo": npo.item(), "forget_nll": nll.mean().item()})
