"""Pure-PyTorch reference of the shred family: the definitions every SHRED kernel is tested against.

SHRED ("SHRED: Retain-Set-Free Unlearning via Self-Distillation with Logit Demotion", 2026):
  1. teacher_topk: one frozen teacher pass per forget example gives, per token, the teacher's top-K
     token ids and log-probabilities (normalised over the full vocabulary) and the label's
     log-probability.
  2. select_forget_positions: per sequence, the lowest-P fraction of label log-probabilities
     (skipping the first S valid positions) are forget positions; the rest are anchors.
  3. demote_targets: the target q over the top-K: at forget positions the label (variant A), or
     also the teacher's top-p nucleus (variant B), is zeroed; q is renormalised over the top-K.
  4. topk_kl: sum_t KL(q_t || softmax(z_t)), forward KL, T = 1; log-softmax over the full
     vocabulary (or, with normalize="topk", over the K target ids).

All arithmetic in fp32 (demotion: fp64, see demote_targets_reference); inputs may be fp32, fp16 or bf16.
"""
from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100


def _logits(hidden, weight, bias):
    z = hidden.float() @ weight.float().t()
    return z + bias.float() if bias is not None else z


def teacher_topk_reference(hidden, weight, bias, labels, k, chunk_size=None):
    """(topk_ids [N,K] int64, topk_logprobs [N,K] fp32, label_logprob [N] fp32).

    Ids are sorted by logit, descending; equal logits by ascending id. label_logprob is 0 where
    labels == -100. With chunk_size, rows are processed that many at a time (the same results,
    memory bounded by [chunk_size, V])."""
    n = hidden.shape[0]
    if chunk_size is not None and n > chunk_size:
        parts = [teacher_topk_reference(hidden[s:s + chunk_size], weight, bias, labels[s:s + chunk_size], k)
                 for s in range(0, n, chunk_size)]
        return tuple(torch.cat(p) for p in zip(*parts))
    z = _logits(hidden, weight, bias)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    # a stable descending sort keeps equal logits in ascending id order
    ids = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :k]
    lp = torch.gather(z, 1, ids) - lse
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    label_lp = torch.gather(z, 1, safe[:, None]).squeeze(1) - lse.squeeze(1)
    label_lp = torch.where(valid, label_lp, torch.zeros_like(label_lp))
    return ids, lp, label_lp


def select_forget_positions_reference(label_logprob, labels, fraction, skip):
    """Forget mask [B,T] bool: per row, among valid positions (labels != -100) after the first
    `skip` valid ones, the ceil(fraction * n) with the lowest label log-probability (ties: the
    earlier position first; NaN counts as the largest). Vectorised over rows (no host syncs)."""
    B, T = label_logprob.shape
    valid = labels != IGNORE_INDEX
    eligible = valid & (valid.cumsum(1) > skip)
    n = eligible.sum(1)
    m = torch.ceil(fraction * n.double() - 1e-9).long()
    # order by (not eligible, value, position): a stable sort by value, then a stable sort by the flag
    by_value = torch.sort(label_logprob.float(), dim=1, stable=True).indices
    flag = (~eligible).gather(1, by_value).to(torch.uint8)
    order = by_value.gather(1, torch.sort(flag, dim=1, stable=True).indices)
    take = torch.arange(T, device=labels.device)[None, :] < m[:, None]
    return torch.zeros(B, T, dtype=torch.bool, device=labels.device).scatter_(1, order, take)


def demote_targets_reference(topk_ids, topk_logprobs, labels, forget_mask, variant="A", top_p=0.5):
    """Target probabilities [N,K] fp32 over topk_ids. Rows where every entry was demoted are all
    zero (they then contribute no loss).

    The probabilities exp(logprob) and the nucleus decision are in double (an entry is in the
    nucleus when the probability mass before it, summed in double, is below top_p), so that no
    backend's fp32 exp can flip the decision; the kept probabilities are rounded to fp32 and
    renormalised by their double sum."""
    p = topk_logprobs.float().double().exp()
    forget = forget_mask.reshape(-1)[:, None]
    demote = topk_ids == labels.reshape(-1)[:, None]
    if variant == "B":
        before = torch.nn.functional.pad(torch.cumsum(p, dim=-1)[:, :-1], (1, 0))  # mass before each entry
        demote = demote | (before < top_p)
    q = torch.where(forget & demote, torch.zeros_like(p), p).float()
    s = q.double().sum(-1, keepdim=True)
    return torch.where(s > 0, (q.double() / torch.where(s > 0, s, torch.ones_like(s))).float(), torch.zeros_like(q))


def topk_kl_reference(logits, target_ids, target_probs, mask=None, weights=None, reduction="mean",
                      normalize="full"):
    """KL(q || softmax(z)) per position; reduction over valid positions (mask), mean = sum / #valid."""
    z = logits.float()
    q = target_probs.float()
    zk = torch.gather(z, 1, target_ids)
    if normalize == "full":
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
    else:
        lse = torch.logsumexp(zk, dim=-1, keepdim=True)
    logp = zk - lse
    qlogq = torch.where(q > 0, q * torch.log(torch.where(q > 0, q, torch.ones_like(q))), torch.zeros_like(q))
    kl = (qlogq - q * logp).sum(-1)
    if weights is not None:
        kl = kl * weights.float()
    if mask is not None:
        kl = kl * mask.float()
    if reduction == "none":
        return kl
    if reduction == "sum":
        return kl.sum()
    n = mask.sum() if mask is not None else torch.tensor(kl.numel(), device=kl.device)
    return kl.sum() / n.clamp(min=1)


def fused_linear_topk_kl_reference(hidden, weight, bias, target_ids, target_probs, mask=None,
                                   weights=None, reduction="mean", normalize="full"):
    return topk_kl_reference(_logits(hidden, weight, bias), target_ids, target_probs, mask, weights,
                             reduction, normalize)


def shred_targets_reference(hidden, weight, bias, labels, k, fraction=0.5, skip=0, variant="A",
                            top_p=0.5, seq_shape: Optional[tuple] = None):
    """Teacher pass + selection + demotion, for [B,T] labels and hidden [B*T,H]."""
    ids, lp, label_lp = teacher_topk_reference(hidden, weight, bias, labels.reshape(-1), k)
    shape = seq_shape or labels.shape
    forget = select_forget_positions_reference(label_lp.reshape(shape), labels.reshape(shape), fraction, skip)
    q = demote_targets_reference(ids, lp, labels.reshape(-1), forget.reshape(-1), variant, top_p)
    return ids, q, forget
