"""SHRED's loss as a module: teacher targets once per forget example, then the demoted top-K KL of
the student, fused with the LM head."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from lethe.ops import _backend
from lethe.ops import checks as C
from lethe.ops.shred import (IGNORE_INDEX, NORMALIZE, REDUCTIONS, VARIANTS, demote_targets, fused_linear_topk_kl,
                             select_forget_positions, teacher_topk)

__all__ = ["ShredTargets", "ShredLoss"]


@dataclasses.dataclass
class ShredTargets:
    """What the frozen teacher contributes: ids and demoted probabilities over its top-K, [B, T, K],
    the forget positions and the valid (label != -100) positions, [B, T]."""

    ids: torch.Tensor
    probs: torch.Tensor
    forget: torch.Tensor
    valid: torch.Tensor

    def to(self, device) -> "ShredTargets":
        return ShredTargets(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


class ShredLoss(nn.Module):
    """SHRED (2026): self-distillation with logit demotion, no retain set.

    k: teacher top-K (32/64/128 in the authors' grid). fraction, skip: the lowest-`fraction`
    label-probability positions of each sequence, after its first `skip` valid positions, are
    forget positions (P = 0.5, S in {0, 8, 32}). variant: "A" demotes the label, "B" also the
    teacher's top-`top_p` nucleus. normalize: the student's log-softmax over the full vocabulary
    ("full", SHRED's) or over the K ids ("topk"). Loss: mean over valid positions of
    KL(q_t || softmax(student logits_t)).

    Labels and hidden states are aligned: hidden[:, t] predicts labels[:, t] (shift them first, as
    lethe.integrations.hf does)."""

    def __init__(self, k: int = 64, fraction: float = 0.5, skip: int = 0, variant: str = "A",
                 top_p: float = 0.5, normalize: str = "full", reduction: str = "mean",
                 chunk_size: Optional[int] = None, backend: Optional[str] = None):
        super().__init__()
        # checked now, not at the first call
        self.k = C.integer(k, "k")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        self.fraction = C.number(fraction, "fraction")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction:g}")
        self.skip = C.integer(skip, "skip")
        if self.skip < 0:
            raise ValueError(f"skip must be >= 0, got {self.skip}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be 'A' or 'B', got {variant!r}")
        self.variant = variant
        self.top_p = C.number(top_p, "top_p")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p:g}")
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.normalize, self.reduction = normalize, reduction
        self.chunk_size = None if chunk_size is None else C.integer(chunk_size, "chunk_size")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if backend is not None:
            _backend._check_name(backend, "backend")
        self.backend = backend

    @torch.no_grad()
    def targets(self, teacher_hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> ShredTargets:
        """The frozen teacher's pass: hidden [B, T, H], LM-head weight [V, H], labels [B, T]."""
        if labels.dim() != 2:
            raise ValueError(f"labels must be [B, T], got shape {tuple(labels.shape)}")
        ids, lp, label_lp = teacher_topk(teacher_hidden, weight, labels, self.k, bias=bias,
                                         chunk_size=self.chunk_size, backend=self.backend)
        forget = select_forget_positions(label_lp, labels, self.fraction, self.skip, backend=self.backend)
        probs = demote_targets(ids, lp, labels, forget, self.variant, self.top_p, backend=self.backend)
        return ShredTargets(ids, probs, forget, labels != IGNORE_INDEX)

    def forward(self, student_hidden: torch.Tensor, weight: torch.Tensor, targets: ShredTargets,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fused_linear_topk_kl(student_hidden, weight, targets.ids, targets.probs, bias=bias,
                                    mask=targets.valid, reduction=self.reduction,
                                    normalize=self.normalize, chunk_size=self.chunk_size,
                                    backend=self.backend)

    def extra_repr(self) -> str:
        return (f"k={self.k}, fraction={self.fraction}, skip={self.skip}, variant={self.variant!r}, "
                f"top_p={self.top_p}, normalize={self.normalize!r}")
