"""SHRED (2026): "Retain-Set-Free Unlearning via Self-Distillation with Logit Demotion".

The frozen teacher (the original model) passes once over each forget example (prepare): its
top-K ids and log-probabilities and the label's log-probability, fused with the LM head
(teacher_topk); the forget positions are each sequence's lowest-P% label probabilities after its
first S valid positions; the target is the teacher's top-K with the demoted set zeroed (variant
A: the label; B: also the top-p nucleus), renormalised, and the renormalised top-K elsewhere
(anchors). Training minimises the fused top-K KL alone, sum_t KL(q_t || softmax(z_t)) averaged
over the answer positions, with the full-vocabulary log-sum-exp. No retain set.
Defaults: K = 64, P = 0.5, S = 0, variant A (the paper's grid: K in {32, 64, 128}, S in {0, 8, 32})."""
from __future__ import annotations

import dataclasses

from lethe.methods.base import Method, frozen, register, topk_kl_rows


@dataclasses.dataclass(frozen=True)
class ShredConfig:
    k: int = 64
    fraction: float = 0.5  # P
    skip: int = 0  # S
    variant: str = "A"
    top_p: float = 0.5  # variant B's nucleus
    normalize: str = "full"

    def __post_init__(self):
        self.loss_module()  # the module checks every field

    def loss_module(self):
        from lethe.nn.shred import ShredLoss

        return ShredLoss(k=self.k, fraction=self.fraction, skip=self.skip, variant=self.variant, top_p=self.top_p,
                         normalize=self.normalize)


@register
class Shred(Method):
    name = "shred"
    Config = ShredConfig
    benchmark = {"lr": 5e-4, "steps": 42, "batch_fraction": 0.29}

    def prepare(self, model, forget, retain):
        """The teacher's targets of every forget example, kept per example (ids, probs) over its
        answer positions."""
        from lethe.integrations import hf

        loss_fn = self.config.loss_module()
        targets, demoted = [], 0
        with frozen(model) as dev:
            for batch in forget.batches(64, dev):
                hidden, w, b = hf.last_hidden_and_head(model, batch["input_ids"], batch["attention_mask"])
                labels = hf.shifted_labels(batch["input_ids"], batch["attention_mask"], batch["labels"])
                t = loss_fn.targets(hidden[:, :-1], w, labels, b)
                demoted += int(t.forget.sum())
                targets += [(t.ids[r][t.valid[r]].cpu(), t.probs[r][t.valid[r]].cpu()) for r in range(labels.shape[0])]
        self._state["targets"] = targets
        self._state["forget_positions"] = demoted

    def loss(self, model, inputs, step, total_steps):
        kl = topk_kl_rows(model, inputs["forget"], self._state["targets"], self.config.normalize)
        return kl, {"kl": kl.item()}
