"""Hugging Face causal LMs: losses computed from the base model's hidden states and the LM head's
weight, so that the model never materialises [batch, seq, vocab] logits."""
from __future__ import annotations

from typing import Optional

import torch

from lethe.nn.shred import ShredLoss, ShredTargets
from lethe.ops.shred import IGNORE_INDEX

__all__ = ["last_hidden_and_head", "shifted_labels", "shred_targets", "shred_loss"]


def last_hidden_and_head(model, input_ids, attention_mask=None, **kwargs):
    """(last hidden states [B, T, H] after the final norm, head weight [V, H], head bias or None)
    from any transformers causal LM (its base_model and get_output_embeddings())."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model ({type(model).__name__}) has no output embedding (LM head) with a weight")
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(f"model ({type(model).__name__}) has no base_model to take hidden states from")
    out = base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, head.weight, getattr(head, "bias", None)


def shifted_labels(input_ids, attention_mask=None, labels=None):
    """Next-token labels aligned with hidden[:, :-1]: labels (or input_ids)[:, 1:], with padding
    (attention_mask == 0) and -100 kept ignored."""
    lab = (labels if labels is not None else input_ids).clone()
    if attention_mask is not None:
        lab = lab.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return lab[:, 1:].contiguous()


@torch.no_grad()
def shred_targets(teacher, batch: dict, loss_fn: ShredLoss) -> ShredTargets:
    """The frozen teacher's targets for one batch (input_ids, optional attention_mask and labels)."""
    was_training = teacher.training
    teacher.eval()
    try:
        hidden, w, b = last_hidden_and_head(teacher, batch["input_ids"], batch.get("attention_mask"))
        labels = shifted_labels(batch["input_ids"], batch.get("attention_mask"), batch.get("labels"))
        return loss_fn.targets(hidden[:, :-1], w, labels, b)
    finally:
        teacher.train(was_training)


def shred_loss(model, batch: dict, targets: ShredTargets, loss_fn: Optional[ShredLoss] = None):
    """SHRED's loss of the student `model` on a batch, given the teacher's targets for it."""
    loss_fn = loss_fn or ShredLoss()
    hidden, w, b = last_hidden_and_head(model, batch["input_ids"], batch.get("attention_mask"))
    return loss_fn(hidden[:, :-1], w, targets, b)
