"""Hugging Face causal LMs: losses computed from the base model's hidden states and the LM head's
weight, so that the model never materialises [batch, seq, vocab] logits.

A model is first unwrapped (DDP / FSDP / torch.compile wrappers, PEFT's PeftModel). Its logits must
then be the LM head applied to the last hidden states, up to a scale that lethe folds into the
hidden states: Cohere's `logit_scale`, Granite's `1 / logits_scaling`, Falcon-H1's
`lm_head_multiplier`. Models whose logits are transformed otherwise (Gemma 2's final-logit
softcapping, and any other transform) are refused with an error naming it: a fused loss would
train another model. The first use of each model checks this on a few tokens against the model's
own logits.

UnlearnTrainer (a transformers.Trainer running lethe's unlearning methods), its dataset and
collator helpers and training_arguments are defined in lethe.integrations.hf_trainer and
re-exported here lazily: importing this module does not import transformers."""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from lethe.nn.shred import ShredLoss, ShredTargets
from lethe.ops.shred import IGNORE_INDEX
from lethe.ops.token_stats import TokenStats
from lethe.ops.token_stats import token_stats as _token_stats

__all__ = ["unwrap", "check_causal_lm", "last_hidden_and_head", "shifted_labels", "shred_targets", "shred_loss", "token_stats"]

# config attributes that scale the logits (name, how): the transforms lethe applies
SCALES = (("logit_scale", "multiply"), ("logits_scaling", "divide"), ("lm_head_multiplier", "multiply"))
# config attributes of transforms the fused kernels do not implement
REFUSED = ("final_logit_softcapping", "logits_soft_cap", "logit_softcap")

_verified: "weakref.WeakKeyDictionary[nn.Module, float]" = weakref.WeakKeyDictionary()

# lethe.integrations.hf_trainer's names, imported on first use (it imports transformers)
_TRAINER_NAMES = ("UnlearnTrainer", "UnlearnStepDataset", "ForgetRetainCollator", "step_collator",
                  "training_arguments", "METHOD_STATE")


def __getattr__(name):
    if name in _TRAINER_NAMES:
        from lethe.integrations import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DistributedDataParallel / DataParallel / FSDP (`.module`),
    torch.compile (`._orig_mod`) and PEFT (`get_base_model()`, whose LoRA layers stay in place)."""
    for _ in range(16):
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
                type(model).__name__ == "FullyShardedDataParallel" and isinstance(getattr(model, "module", None),
                                                                                   nn.Module)):
            model = model.module
        elif type(model).__module__.startswith("peft") and callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        else:
            return model
    return model


def _head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"model ({type(model).__name__}) has no output embedding (LM head) with a weight")
    if type(head).__module__.startswith("peft"):
        if hasattr(head, "modules_to_save"):  # peft's trainable copy of the head
            active = head.active_adapter if isinstance(head.active_adapter, str) else head.active_adapter[0]
            return head.modules_to_save[active] if active in head.modules_to_save else head.original_module
        raise ValueError(f"the LM head of {type(model).__name__} carries a PEFT adapter ({type(head).__name__}): the "
                         "fused losses read the head's weight and would leave the adapter out; keep the LM head "
                         "out of the adapter's target_modules")
    return head


def logit_scale(model: nn.Module) -> float:
    """The factor the model's config applies to its logits (1.0 when none); raises for a transform
    the fused losses do not implement."""
    config = getattr(model, "config", None)
    if callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()  # (a multimodal model's language part)
    for name in REFUSED:
        if getattr(config, name, None) not in (None, 0, 0.0, 1, 1.0):
            raise ValueError(f"{type(model).__name__} transforms its logits ({name} = {getattr(config, name)}), "
                             "which lethe's fused LM-head losses do not implement: they would train another model")
    scale = 1.0
    for name, how in SCALES:
        v = getattr(config, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            scale = scale * v if how == "multiply" else scale / v
    return scale


def _base_hidden(model, input_ids, attention_mask, **kwargs):
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(f"model ({type(model).__name__}) has no base_model to take hidden states from")
    out = base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def _verify(model, head, scale, input_ids, attention_mask):
    """The model's own logits on a few tokens equal lethe's (hidden @ W^T + b) * scale."""
    ids = input_ids[:1, : min(input_ids.shape[1], 4)]
    mask = None if attention_mask is None else attention_mask[:1, : ids.shape[1]]
    was_training = model.training
    model.eval()
    try:
        want = model(input_ids=ids, attention_mask=mask).logits.float()
        hidden = _base_hidden(model, ids, mask).float()
    finally:
        model.train(was_training)
    got = hidden @ head.weight.float().t()
    if getattr(head, "bias", None) is not None:
        got = got + head.bias.float()
    got = got * scale
    tol = 1e-3 * max(1.0, want.abs().max().item()) + (2e-2 * want.abs().max().item()
                                                     if head.weight.dtype in (torch.float16, torch.bfloat16) else 0.0)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=tol):
        diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
        raise ValueError(f"{type(model).__name__}'s logits are not its LM head applied to its last hidden states "
                         f"(times {scale:g}): they differ by up to {diff:g}. It transforms them in a way lethe's fused "
                         "LM-head losses do not implement, which would train another model")


def last_hidden_and_head(model, input_ids, attention_mask=None, **kwargs):
    """(last hidden states [B, T, H] after the final norm, with the model's logit scale folded in,
    head weight [V, H], head bias or None) from any transformers causal LM (its base_model and
    get_output_embeddings()), unwrapped first (see unwrap)."""
    model = unwrap(model)
    head = _head(model)
    scale = logit_scale(model)
    if _verified.get(model) != scale:
        _verify(model, head, scale, input_ids, attention_mask)
        _verified[model] = scale
    hidden = _base_hidden(model, input_ids, attention_mask, **kwargs)
    if scale != 1.0:
        hidden = hidden * scale  # (h W^T + b) s = (s h) W^T + s b: the bias is scaled too
    bias = getattr(head, "bias", None)
    return hidden, head.weight, (bias * scale if bias is not None and scale != 1.0 else bias)


def shifted_labels(input_ids, attention_mask=None, labels=None, ignore_index=IGNORE_INDEX):
    """Next-token labels aligned with hidden[:, :-1]: labels (or input_ids)[:, 1:], with padding
    (attention_mask == 0) set to ignore_index and ignore_index kept ignored."""
    lab = (labels if labels is not None else input_ids).clone()
    if attention_mask is not None:
        lab = lab.masked_fill(attention_mask == 0, ignore_index)
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


@torch.no_grad()
def token_stats(model, input_ids, labels, attention_mask=None, *, ignore_index: int = IGNORE_INDEX,
                chunk_size: Optional[int] = None, backend: Optional[str] = None) -> TokenStats:
    """The evaluation's per-token statistics (lethe.ops.token_stats) of a causal LM on a batch, from
    its final hidden states and LM head, without [B, T, V] logits: position t predicts
    labels[:, t + 1] (labels None: input_ids), so every field has shape [B, T - 1]. Padding
    (attention_mask == 0) and ignore_index labels are ignored (label_logprob 0 there; the other
    statistics are those of the model's prediction at every position). The model is unwrapped and
    checked as for the losses (its logit scale folded in, other logit transforms refused), and run
    in eval mode under torch.no_grad()."""
    was_training = model.training
    model.eval()
    try:
        hidden, w, b = last_hidden_and_head(model, input_ids, attention_mask)
        lab = shifted_labels(input_ids, attention_mask, labels, ignore_index)
        return _token_stats(hidden[:, :-1], w, lab, b, ignore_index=ignore_index, chunk_size=chunk_size,
                            backend=backend)
    finally:
        model.train(was_training)


def check_causal_lm(model) -> None:
    """Raises ValueError unless `model` (unwrapped) is a causal LM lethe's fused losses can run on:
    a base model giving hidden states and an LM head with a weight, its logits not transformed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    m = unwrap(model)
    _head(m)
    base = getattr(m, "base_model", None)
    if base is None or base is m:
        raise ValueError(f"model ({type(m).__name__}) has no base_model to take hidden states from: lethe needs a "
                         "transformers causal LM (…ForCausalLM)")
    logit_scale(m)
