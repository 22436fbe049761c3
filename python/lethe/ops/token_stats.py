"""token_stats family: the evaluation's fused per-token statistics of the next-token distribution
(the label's log-probability, the log-sum-exp, the mean and variance of log p under p, the argmax),
fused with the LM head: never an [N, V] tensor, one fp32 [chunk, V] block of logits at a time.

Definitions: python/lethe/ops/token_stats_reference.py. The op is declared once below (define_op):
its schema, argument checks, fake kernel and Triton twin. Kernels: csrc/cpu/token_stats.cpp,
csrc/cuda/token_stats.cu, triton_kernels/token_stats.py; lethe.info says which one it uses.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from lethe.ops import _backend
from lethe.ops import checks as C
from lethe.ops import token_stats_reference as ref
from lethe.ops._op import define_op
from lethe.ops.shred import check_chunk_size, check_head_labels, check_label_values, head_rows

__all__ = ["token_stats", "TokenStats"]

IGNORE_INDEX = ref.IGNORE_INDEX


class TokenStats(NamedTuple):
    """Per-token statistics of p = softmax(z), z = hidden @ weight.T + bias (fp32), each shaped like
    the labels.

    label_logprob  fp32, log p_y = z_y - lse; exactly 0.0 where labels == ignore_index
    lse            fp32, log sum_v exp z_v
    mean_logprob   fp32, mu = sum_v p_v log p_v = E_p[log p] (Min-K%++'s mu)
    var_logprob    fp32, sigma^2 = sum_v p_v (log p_v - mu)^2 (Min-K%++'s sigma^2), computed as a
                   centred second pass over the row (a near-uniform row gives ~0, no cancellation)
    argmax         int64, the first maximal id (as torch.argmax)

    `entropy` is -mean_logprob (the same quantity, in nats); `second_moment` is
    E_p[(log p)^2] = var_logprob + mean_logprob^2."""

    label_logprob: torch.Tensor
    lse: torch.Tensor
    mean_logprob: torch.Tensor
    var_logprob: torch.Tensor
    argmax: torch.Tensor

    @property
    def entropy(self) -> torch.Tensor:
        """The entropy of p in nats, -sum_v p_v log p_v: the same quantity as -mean_logprob."""
        return -self.mean_logprob

    @property
    def second_moment(self) -> torch.Tensor:
        """E_p[(log p)^2] = var_logprob + mean_logprob^2."""
        return self.var_logprob + self.mean_logprob * self.mean_logprob


# ------------------------------------------------------------------------------------------------
# The op's argument check (csrc/include/lethe/token_stats_checks.h words it the same way, in the
# same order). values=True also checks the labels' values (one host sync); the compiled kernels
# check them themselves.
# ------------------------------------------------------------------------------------------------

def check_token_stats(hidden, weight, bias, labels, ignore_index, chunk_size, values=False):
    _, v = check_head_labels(hidden, weight, bias, labels)
    check_chunk_size(chunk_size)
    if values:
        check_label_values(labels, v, ignore_index)


def _fake_token_stats(hidden, weight, bias, labels, ignore_index, chunk_size):
    n = hidden.shape[0]
    f = [hidden.new_empty((n,), dtype=torch.float32) for _ in range(4)]
    return (*f, hidden.new_empty((n,), dtype=torch.int64))


# The statistics fused with the LM head, chunk_size tokens at a time: (label_logprob, lse,
# mean_logprob, var_logprob, argmax), each [N] (see TokenStats). No autograd: not differentiable.
TOKEN_STATS = define_op(
    "token_stats(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, int chunk_size) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    check=check_token_stats, fake=_fake_token_stats, triton="token_stats.token_stats")


# ------------------------------------------------------------------------------------------------
# The public function: its own arguments checked here, the op's by the op (see above)
# ------------------------------------------------------------------------------------------------

def token_stats(hidden, weight, labels, bias=None, *, ignore_index: int = IGNORE_INDEX,
                chunk_size: Optional[int] = None, backend: Optional[str] = None) -> TokenStats:
    """Per-token statistics of the next-token distribution, fused with the LM head.

    hidden [..., H] (fp32, fp16 or bf16), weight [V, H] (tied embeddings are fine), labels [...]
    int64 (hidden's leading shape; ignore_index = ignored), bias [V] or None. The logits
    z = hidden @ weight.T + bias are computed in fp32, chunk_size tokens at a time (default: as the
    shred ops choose, lethe.ops.shred.default_chunk): no [N, V] tensor is ever held, only one fp32
    [chunk_size, V] block. Returns a TokenStats of tensors shaped like labels. Labels outside
    [0, V) other than ignore_index raise ValueError.

    Not differentiable: with grad mode on, hidden, weight and bias must not require grad (call it
    under torch.no_grad(), which is fine for parameters that require grad)."""
    if torch.is_grad_enabled():
        for t, name in ((hidden, "hidden"), (weight, "weight"), (bias, "bias")):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeError(f"lethe.ops.token_stats is not differentiable: call it under torch.no_grad() "
                                   f"(or pass {name}.detach()); {name} requires grad")
    lead, h, w, b, lab, chunk = head_rows(hidden, weight, bias, labels, chunk_size)
    ignore_index = C.integer(ignore_index, "ignore_index")
    args = (h, w, b, lab, ignore_index, chunk)
    which = _backend.resolve(TOKEN_STATS, h, backend)
    if which == "reference":
        check_token_stats(*args, values=True)
        out = ref.token_stats_reference(*args)
    else:
        out = TOKEN_STATS.kernel(which)(*args)
    return TokenStats(*(t.reshape(lead) for t in out))
