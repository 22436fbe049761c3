"""Pure-PyTorch reference of the token_stats family: the definitions every kernel is tested against.

token_stats: per token, from the logits z = hidden @ weight^T + bias (computed in fp32, as the
LM-head driver computes them: (h @ w^T) + b, rounded separately), the evaluation's statistics of the
next-token distribution p = softmax(z), without an [N, V] tensor in the kernels:

  label_logprob  log p_y = z_y - lse (exactly 0 where labels == ignore_index)
  lse            log sum_v exp z_v (torch.logsumexp: NaN if a logit is NaN, +inf if one is +inf)
  mean_logprob   mu = sum_v p_v log p_v = E_p[log p] (Min-K%++'s mu; minus the entropy)
  var_logprob    sigma^2 = sum_v p_v (log p_v - mu)^2 (Min-K%++'s sigma^2), a centred second pass
  argmax         the first maximal id, as torch.argmax (a NaN counts as the maximum)

Entries with z_v = -inf (a masked logit) have p_v = 0 exactly and add 0 to both sums (0 log 0 = 0).
Where lse is not finite (a NaN or +inf logit, or every logit -inf), mu and sigma^2 are NaN.

The statistics are computed here in fp64 from the fp32 logits and rounded to fp32 once: the exact
values the fp32 kernels approximate.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _logits(hidden, weight, bias):
    z = hidden.float() @ weight.float().t()
    return z + bias.float() if bias is not None else z


def row_stats(z: torch.Tensor):
    """(lse, mean_logprob, var_logprob, argmax) of fp32 logits z [N, V], each [N]."""
    zd = z.double()
    lse = torch.logsumexp(zd, dim=-1)
    logp = zd - lse[:, None]
    p = torch.exp(logp)
    live = z != float("-inf")
    zero = torch.zeros((), dtype=torch.float64, device=z.device)
    mu = torch.where(live, p * logp, zero).sum(-1)
    var = torch.where(live, p * (logp - mu[:, None]) ** 2, zero).sum(-1)
    finite = torch.isfinite(lse)
    nan = torch.full((), float("nan"), dtype=torch.float64, device=z.device)
    mu = torch.where(finite, mu, nan)
    var = torch.where(finite, var, nan)
    return lse, mu, var, torch.argmax(z, dim=-1)


def token_stats_reference(hidden, weight, bias, labels, ignore_index=IGNORE_INDEX, chunk_size=None):
    """(label_logprob, lse, mean_logprob, var_logprob, argmax), each [N]: fp32, fp32, fp32, fp32,
    int64, for hidden [N, H], weight [V, H], bias [V] or None, labels [N]. With chunk_size, rows are
    processed that many at a time (the same results, memory bounded by [chunk_size, V])."""
    n = hidden.shape[0]
    if chunk_size is not None and n > chunk_size:
        parts = [token_stats_reference(hidden[s:s + chunk_size], weight, bias, labels[s:s + chunk_size],
                                       ignore_index)
                 for s in range(0, n, chunk_size)]
        return tuple(torch.cat(p) for p in zip(*parts))
    z = _logits(hidden, weight, bias)
    lse, mu, var, argmax = row_stats(z)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    label_lp = torch.gather(z, 1, safe[:, None]).squeeze(1).double() - lse
    label_lp = torch.where(valid, label_lp, torch.zeros_like(label_lp))
    return label_lp.float(), lse.float(), mu.float(), var.float(), argmax
