"""DurableUn-SAF (2026, "DurableUn: Quantization-Induced Recovery Attacks in Machine Unlearning"):
unlearning that stays unlearnt when the model is quantised.

L = -L_f(theta) - alpha(t) * L_f(Q_STE(theta)) + lambda * L_r(theta),
L_f / L_r the forget / retain answers' mean cross-entropy, Q_STE the fake quantiser of `preset`
(lethe.fake_quantize) applied to the model's weight matrices with a straight-through gradient:
the quantised forward runs the same model with its weights swapped for their quantised values
(torch.func.functional_call: no copy of the model). alpha(t) = 0 for the first `warmup` fraction
of the steps, then rises linearly to `alpha` over the next `ramp` fraction (lethe's reading of
"alpha ramped after a warm-up"; alpha = lambda = 1 as in the paper's objective)."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lethe.methods.base import Method, check_weight, mean_nll, register

PRESETS = ("paper-int4", "int4-g128", "int4-g128-asym", "nf4-b64", "int8")


@dataclasses.dataclass(frozen=True)
class SAFConfig:
    alpha: float = 1.0
    lam: float = 1.0  # lambda, the retain weight
    warmup: float = 0.1
    ramp: float = 0.2
    preset: str = "paper-int4"
    ste: str = "identity"

    def __post_init__(self):
        check_weight(self, "alpha", "lam")
        for f in ("warmup", "ramp"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"SAFConfig: {f} must be a fraction of the steps in [0, 1], got {v!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"SAFConfig: preset must be one of {PRESETS}, got {self.preset!r}")
        if self.ste not in ("identity", "clipped"):
            raise ValueError(f"SAFConfig: ste must be 'identity' or 'clipped', got {self.ste!r}")

    def alpha_at(self, step: int, total: int) -> float:
        t = step / max(1, total)
        if t < self.warmup:
            return 0.0
        return self.alpha * (1.0 if self.ramp == 0 else min(1.0, (t - self.warmup) / self.ramp))


class _Forward(nn.Module):
    """The forget NLL as a module, so that functional_call can swap the model's weights."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return mean_nll(self.model, batch)


@register
class SAF(Method):
    name = "saf"
    Config = SAFConfig
    benchmark = {"lr": 5e-4, "steps": 42, "batch_fraction": 0.145}
    uses_retain = True

    def _quantised(self, model):
        """{name: Q_STE(weight)} of the weights the quantisation attack rounds (every weight of two
        or more dimensions, each once, along its input features: lethe.quantized_weights(modules="all")).
        PEFT adapters are left alone (what gets quantised is the base weight)."""
        from lethe.nn.quant import _selected_weights, stores_weight_transposed
        from lethe.ops import fake_quantize

        out = {}
        for name, m in _selected_weights(model, "all"):
            if "lora_" in name or not m.weight.is_floating_point():
                continue
            w = m.weight.t() if stores_weight_transposed(m) else m.weight
            q = fake_quantize(w, self.config.preset, ste=self.config.ste)
            out[f"model.{name}.weight" if name else "model.weight"] = q.t() if stores_weight_transposed(m) else q
        return out

    def loss(self, model, inputs, step, total_steps):
        c = self.config
        f, r = inputs["forget"], inputs["retain"]
        lf, lr = mean_nll(model, f), mean_nll(model, r)
        a = c.alpha_at(step, total_steps)
        loss = -lf + c.lam * lr
        parts = {"forget_nll": lf.item(), "retain": lr.item(), "alpha": a}
        if a > 0:
            fwd = _Forward(model)
            lq = torch.func.functional_call(fwd, self._quantised(model), (f,), strict=False)
            loss = loss - a * lq
            parts["forget_nll_quant"] = lq.item()
        return loss, parts
