"""shred family: SHRED's teacher pass, forget-position selection, logit demotion, and the demoted
top-K KL loss, on given logits or fused with the LM head (never materialising [N, V]).

Definitions: python/lethe/ops/shred_reference.py. Each op is declared once below (define_op): its
schema, its argument checks, fake kernel, autograd and Triton twin. Kernels: csrc/cpu/shred_*.cpp,
csrc/cuda/shred_*.cu, triton_kernels/shred_*.py; lethe.info says which one each op uses.
"""
from __future__ import annotations

from typing import Optional

import torch

from lethe.ops import _backend
from lethe.ops import checks as C
from lethe.ops import shred_reference as ref
from lethe.ops._op import define_op, gradients

__all__ = [
    "teacher_topk", "select_forget_positions", "demote_targets", "topk_kl", "fused_linear_topk_kl",
    "default_chunk",
]

IGNORE_INDEX = ref.IGNORE_INDEX
CHUNK_BYTES = 64 << 20  # default LM-head chunk: a [chunk, V] fp32 block of at most 64 MiB
MIN_CHUNK, MAX_CHUNK = 512, 2048  # below 512 rows the per-chunk read-modify-write of the fp32
# grad_weight (2 V H 4 bytes) outweighs the memory saved: 116 vs 145 GFLOP/s at V = 128k (128 vs 512)
REDUCTIONS = ("mean", "sum", "none")
NORMALIZE = ("full", "topk")
VARIANTS = {"A": 0, "B": 1}


def default_chunk(vocab: int) -> int:
    """Tokens per chunk when chunk_size is None: the largest power of two whose [chunk, V] fp32
    block fits CHUNK_BYTES, within [MIN_CHUNK, MAX_CHUNK] (512 at V = 32k and at V = 128k)."""
    rows = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    return max(MIN_CHUNK, min(MAX_CHUNK, 1 << (rows.bit_length() - 1)))


# ------------------------------------------------------------------------------------------------
# The ops' argument checks (csrc/include/lethe/shred_checks.h words them the same way, in the same
# order). values=True also checks the values held in tensors (labels, target ids and
# probabilities): one host sync. The compiled kernels check those themselves.
# ------------------------------------------------------------------------------------------------

def check_linear_head(hidden, weight, bias):
    """hidden float [N, H], weight float [V, H] with V >= 1, bias float [V] or None, all on
    hidden's device."""
    C.float_tensor(hidden, "hidden")
    C.float_tensor(weight, "weight")
    C.same_device(weight, "weight", hidden, "hidden")
    C.dims(hidden, "hidden", 2, "[N, H]")
    C.dims(weight, "weight", 2, "[V, H]")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape [V, H] with H = {hidden.shape[1]} (hidden's last "
                         f"dimension), got {C.shape(weight)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one row (V >= 1), got shape {C.shape(weight)}")
    if bias is not None:
        C.float_tensor(bias, "bias")
        C.same_device(bias, "bias", hidden, "hidden")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {C.shape(bias)}")


def check_chunk_size(chunk_size):
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def check_label_values(labels, V, ignore_index=IGNORE_INDEX):
    """labels in [0, V) or ignore_index (-100 for the shred ops; one host sync; traced by
    torch.compile: a device-side assert)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"labels must be in [0, V) = [0, {V}) or {ignore_index}")
        return
    if labels.numel() and bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(f"labels must be in [0, V) = [0, {V}) or {ignore_index}, got {int(labels.reshape(-1)[i])} "
                         f"at index {i}")


def check_targets(target_ids, target_probs, n, v, ref_t, ref_name):
    """target_ids int64 [N, K] with K <= V, target_probs float of the same shape."""
    C.dtype_tensor(target_ids, "target_ids", torch.int64)
    C.same_device(target_ids, "target_ids", ref_t, ref_name)
    if target_ids.dim() != 2 or target_ids.shape[0] != n:
        raise ValueError(f"target_ids must have shape [N, K] with N = {n}, got {C.shape(target_ids)}")
    if target_ids.shape[1] > v:
        raise ValueError(f"target_ids has K = {target_ids.shape[1]} columns, more than the vocabulary "
                         f"size V = {v}")
    C.float_tensor(target_probs, "target_probs")
    C.same_device(target_probs, "target_probs", ref_t, ref_name)
    if target_probs.shape != target_ids.shape:
        raise ValueError(f"target_probs must have the shape of target_ids {C.shape(target_ids)}, got "
                         f"{C.shape(target_probs)}")


def target_sum_tol(dtype) -> float:
    """How far a row of target probabilities may sum from 1: 1e-3, or bfloat16's epsilon (as fp32
    numbers: the kernels' own tolerance, lethe/shred_checks.h)."""
    return 7.8125e-3 if dtype == torch.bfloat16 else 0.0010000000474974513  # float32(1e-3)


def check_target_values(target_ids, target_probs, v):
    """ids in [0, V), probabilities >= 0 (not NaN), rows summing to 1 within target_sum_tol or
    all zero. One host sync; the details of a failure are only gathered then."""
    if target_ids.numel() == 0:
        return
    bad_id = ((target_ids < 0) | (target_ids >= v)).any(1)
    q = target_probs.float()
    neg = ~(q >= 0)  # NaN included
    bad_neg = neg.any(1)
    tol = target_sum_tol(target_probs.dtype)
    s = q.sum(1, dtype=torch.float64)
    bad_sum = ~bad_neg & (s != 0) & ~((s - 1).abs() <= tol)
    if torch.compiler.is_compiling():  # traced: no host sync, a device-side assert
        torch._assert_async(~(bad_id.any() | bad_neg.any() | bad_sum.any()),
                            f"target_ids must be in [0, {v}) and target_probs non-negative rows summing to 1 or 0")
        return
    any_id, any_neg, any_sum = torch.stack([bad_id.any(), bad_neg.any(), bad_sum.any()]).tolist()
    if any_id:
        r = int(bad_id.nonzero()[0, 0])
        row = target_ids[r]
        raise ValueError(f"target_ids must be in [0, V) = [0, {v}), got {int(row[(row < 0) | (row >= v)][0])} "
                         f"in row {r}")
    if any_neg:
        r = int(bad_neg.nonzero()[0, 0])
        raise ValueError(f"target_probs must be non-negative, got {float(q[r][neg[r]][0]):g} in row {r}")
    if any_sum:
        r = int(bad_sum.nonzero()[0, 0])
        raise ValueError(f"target_probs rows must sum to 1 (within {tol:g}) or be all zero, row {r} sums "
                         f"to {float(s[r]):g}")


def check_logits(logits):
    C.float_tensor(logits, "logits")
    C.dims(logits, "logits", 2, "[N, V]")
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one column (V >= 1)")


def check_head_labels(hidden, weight, bias, labels):
    """The LM head and one int64 label per row; returns (N, V)."""
    check_linear_head(hidden, weight, bias)
    n, v = hidden.shape[0], weight.shape[0]
    C.dtype_tensor(labels, "labels", torch.int64)
    C.same_device(labels, "labels", hidden, "hidden")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape [N] = [{n}], got {C.shape(labels)}")
    return n, v


def check_teacher_topk(hidden, weight, bias, labels, k, chunk_size, values=False):
    _, v = check_head_labels(hidden, weight, bias, labels)
    if not 1 <= k <= v:
        raise ValueError(f"k must be in [1, V] = [1, {v}], got {k}")
    check_chunk_size(chunk_size)
    if values:
        check_label_values(labels, v)


def check_select_forget_positions(label_logprob, labels, fraction, skip, values=False):
    C.float_tensor(label_logprob, "label_logprob")
    C.dims(label_logprob, "label_logprob", 2, "[B, T]")
    C.dtype_tensor(labels, "labels", torch.int64)
    C.same_device(labels, "labels", label_logprob, "label_logprob")
    if labels.shape != label_logprob.shape:
        raise ValueError(f"labels must have the shape of label_logprob {C.shape(label_logprob)}, got "
                         f"{C.shape(labels)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction:g}")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")


def check_demote_targets(topk_ids, topk_logprobs, labels, forget_mask, variant, top_p, values=False):
    """labels and forget_mask: [N], or any shape of N elements."""
    C.dtype_tensor(topk_ids, "topk_ids", torch.int64)
    C.dims(topk_ids, "topk_ids", 2, "[N, K]")
    n = topk_ids.shape[0]
    C.float_tensor(topk_logprobs, "topk_logprobs")
    C.same_device(topk_logprobs, "topk_logprobs", topk_ids, "topk_ids")
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"topk_logprobs must have the shape of topk_ids {C.shape(topk_ids)}, got "
                         f"{C.shape(topk_logprobs)}")
    for t, name, dtype in ((labels, "labels", torch.int64), (forget_mask, "forget_mask", torch.bool)):
        C.dtype_tensor(t, name, dtype)
        C.same_device(t, name, topk_ids, "topk_ids")
        if t.numel() != n:
            raise ValueError(f"{name} must have N = {n} elements (shape [N]), got shape {C.shape(t)}")
    if variant not in (0, 1):
        raise ValueError(f"variant must be 0 (A) or 1 (B), got {variant}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p:g}")


def check_topk_kl(logits, target_ids, target_probs, row_weight, full_normalize, values=False):
    check_logits(logits)
    n, v = logits.shape
    check_targets(target_ids, target_probs, n, v, logits, "logits")
    C.row_vector(row_weight, "row_weight", n, logits, "logits")
    if values:
        check_target_values(target_ids, target_probs, v)


def check_topk_kl_backward(grad_loss, logits, target_ids, target_probs, lse, row_weight, full_normalize,
                           check_values=True, values=False):
    check_logits(logits)
    n, v = logits.shape
    C.row_vector(grad_loss, "grad_loss", n, logits, "logits")
    C.row_vector(lse, "lse", n, logits, "logits")
    check_targets(target_ids, target_probs, n, v, logits, "logits")
    C.row_vector(row_weight, "row_weight", n, logits, "logits")
    if values and check_values:
        check_target_values(target_ids, target_probs, v)


def check_fused_linear_topk_kl(hidden, weight, bias, target_ids, target_probs, row_weight, grad_row_scale,
                               full_normalize, chunk_size, grad_hidden=True, grad_weight=True,
                               grad_bias=True, check_values=True, values=False):
    check_linear_head(hidden, weight, bias)
    n, v = hidden.shape[0], weight.shape[0]
    check_targets(target_ids, target_probs, n, v, hidden, "hidden")
    C.row_vector(row_weight, "row_weight", n, hidden, "hidden")
    C.row_vector(grad_row_scale, "grad_row_scale", n, hidden, "hidden")
    check_chunk_size(chunk_size)
    if values and check_values:
        check_target_values(target_ids, target_probs, v)


# ------------------------------------------------------------------------------------------------
# The ops
# ------------------------------------------------------------------------------------------------

def _fake_teacher_topk(hidden, weight, bias, labels, k, chunk_size):
    n = hidden.shape[0]
    return (hidden.new_empty((n, k), dtype=torch.int64), hidden.new_empty((n, k), dtype=torch.float32),
            hidden.new_empty((n,), dtype=torch.float32))


def _fake_topk_kl(logits, target_ids, target_probs, row_weight, full_normalize):
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=torch.float32), logits.new_empty((n,), dtype=torch.float32)


def _fake_fused(hidden, weight, bias, target_ids, target_probs, row_weight, grad_row_scale, full_normalize,
                chunk_size, grad_hidden, grad_weight, grad_bias, check_values):
    loss = hidden.new_empty((hidden.shape[0],), dtype=torch.float32)
    scaled = grad_row_scale is not None

    def grad(want, t):  # contiguous, as every kernel returns them
        return t.new_empty(t.shape) if scaled and want and t is not None else hidden.new_empty((0,))
    return loss, grad(grad_hidden, hidden), grad(grad_weight, weight), grad(grad_bias, bias)


def _topk_kl_setup(ctx, args, output):
    ctx.mark_non_differentiable(output[1])  # the log-normaliser is an output for the backward only
    ctx.full = args["full_normalize"]
    ctx.save_for_backward(args["logits"], args["target_ids"], args["target_probs"], output[1],
                          args["row_weight"])


def _topk_kl_backward(ctx, which, grad_loss, grad_lse):
    C.no_double_backward("lethe.ops.topk_kl")
    logits, ids, probs, lse, row_w = ctx.saved_tensors
    # the forward checked the targets (and autograd would reject them changed since)
    g = TOPK_KL_BACKWARD.kernel(which)(grad_loss.contiguous(), logits, ids, probs, lse, row_w, ctx.full, False)
    return {"logits": g}


def _fused_setup(ctx, args, output):
    ctx.args = (args["full_normalize"], args["chunk_size"])
    ctx.has_bias = args["bias"] is not None
    ctx.save_for_backward(*(args[n] for n in ("hidden", "weight", "bias", "target_ids", "target_probs",
                                              "row_weight")))


def _fused_backward(ctx, which, grad_loss, *_unused):
    C.no_double_backward("lethe.ops.fused_linear_topk_kl")
    hidden, weight, bias, ids, probs, row_w = ctx.saved_tensors
    want = [bool(x) for x in ctx.needs_input_grad[:3]]
    _, gh, gw, gb = FUSED_LINEAR_TOPK_KL.kernel(which)(
        hidden, weight, bias, ids, probs, row_w, grad_loss.float().contiguous(), *ctx.args, *want, False)
    return {"hidden": gh if want[0] else None, "weight": gw if want[1] else None,
            "bias": gb if ctx.has_bias and want[2] else None}


# Teacher pass fused with the LM head, chunk_size tokens at a time: top-K ids (int64, by logit
# descending, ties by id), their log-probs and the label's log-prob (0 where label == -100).
TEACHER_TOPK = define_op(
    "teacher_topk(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int k, int chunk_size) "
    "-> (Tensor, Tensor, Tensor)",
    check=check_teacher_topk, fake=_fake_teacher_topk, triton="shred_teacher.teacher_topk")

# Per row of [B,T]: the ceil(fraction * n) lowest label log-probs among valid positions after the
# first `skip` valid ones (ties: earlier position first). Returns a bool mask.
SELECT_FORGET_POSITIONS = define_op(
    "select_forget_positions(Tensor label_logprob, Tensor labels, float fraction, int skip) -> Tensor",
    check=check_select_forget_positions,
    fake=lambda label_logprob, labels, fraction, skip: labels.new_empty(labels.shape, dtype=torch.bool),
    triton="shred_teacher.select_forget_positions")

# Target probs over the top-K: renormalised teacher probs, with the label (variant 0 = A) or also
# the teacher's top-p nucleus (variant 1 = B) zeroed at forget positions.
DEMOTE_TARGETS = define_op(
    "demote_targets(Tensor topk_ids, Tensor topk_logprobs, Tensor labels, Tensor forget_mask, int variant, "
    "float top_p) -> Tensor",
    check=check_demote_targets,
    fake=lambda ids, lp, labels, forget, variant, top_p: lp.new_empty(ids.shape, dtype=torch.float32),
    triton="shred_teacher.demote_targets")

# Per-position row_weight * KL(q || softmax(z)) [N] fp32 and the log-normaliser used [N] fp32 (full
# vocabulary, or the K target ids when full_normalize is false).
TOPK_KL = define_op(
    "topk_kl(Tensor logits, Tensor target_ids, Tensor target_probs, Tensor? row_weight, bool full_normalize) "
    "-> (Tensor, Tensor)",
    check=check_topk_kl, fake=_fake_topk_kl, triton="shred_kl.topk_kl",
    backward=_topk_kl_backward, setup_context=_topk_kl_setup)

# Gradient wrt logits of sum_t grad_loss[t] * loss[t]. check_values=False skips the value checks of
# the targets (a host sync on GPUs): for autograd, whose forward made them. (The kernels still never
# read out of bounds.)
TOPK_KL_BACKWARD = define_op(
    "topk_kl_backward(Tensor grad_loss, Tensor logits, Tensor target_ids, Tensor target_probs, Tensor lse, "
    "Tensor? row_weight, bool full_normalize, bool check_values=True) -> Tensor",
    check=check_topk_kl_backward,
    fake=lambda grad_loss, logits, *_: torch.empty_like(logits, memory_format=torch.contiguous_format),
    triton="shred_kl.topk_kl_backward")

# topk_kl on logits = hidden @ weight^T + bias, chunk_size tokens at a time, never holding [N,V].
# With grad_row_scale given, also the gradients of sum_t grad_row_scale[t] * loss[t] wrt hidden,
# weight and bias (computed in the same pass) for which grad_hidden, grad_weight and grad_bias are
# set (a frozen head skips its GEMM and [V, H] buffer); every gradient not computed is an empty [0]
# tensor of hidden's dtype. check_values as in topk_kl_backward.
FUSED_LINEAR_TOPK_KL = define_op(
    "fused_linear_topk_kl(Tensor hidden, Tensor weight, Tensor? bias, Tensor target_ids, Tensor target_probs, "
    "Tensor? row_weight, Tensor? grad_row_scale, bool full_normalize, int chunk_size, bool grad_hidden=True, "
    "bool grad_weight=True, bool grad_bias=True, bool check_values=True) -> (Tensor, Tensor, Tensor, Tensor)",
    check=check_fused_linear_topk_kl, fake=_fake_fused, triton="shred_kl.fused_linear_topk_kl",
    backward=_fused_backward, setup_context=_fused_setup)


# ------------------------------------------------------------------------------------------------
# Public functions: their own arguments checked here, the op's by the op (see above)
# ------------------------------------------------------------------------------------------------

def _chunk(chunk_size, vocab):
    if chunk_size is None:
        return default_chunk(vocab)
    return C.integer(chunk_size, "chunk_size")


def _row_weight(mask, weights, n, device):
    """mask * weights as one float [N] vector (None when both are None)."""
    if mask is None and weights is None:
        return None
    w = torch.ones(n, dtype=torch.float32, device=device)
    if mask is not None:
        C.dtype_tensor(mask, "mask", torch.bool)
        if mask.numel() != n:
            raise ValueError(f"mask must have {n} elements, got shape {C.shape(mask)}")
        w = w * mask.reshape(n)
    if weights is not None:
        C.float_tensor(weights, "weights")
        if weights.numel() != n:
            raise ValueError(f"weights must have {n} elements, got shape {C.shape(weights)}")
        w = w * weights.reshape(n).float()
    return w


def _valid_count(mask, n, device):
    if mask is None:
        return torch.tensor(float(n), device=device)
    return mask.sum().float().clamp(min=1.0)


def _leading(t, name, what):
    C.tensor(t, name)
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension ({what}), got a 0-D tensor")


def head_rows(hidden, weight, bias, labels, chunk_size):
    """The shared argument prologue of the LM-head statistics (teacher_topk, token_stats): checks
    hidden [..., H] and labels [...], and returns (the leading shape, hidden as detached rows [N, H],
    the detached weight and bias, the labels as [N], the chunk size)."""
    _leading(hidden, "hidden", "[..., H]")
    C.tensor(labels, "labels")
    C.tensor(weight, "weight")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {C.shape(hidden)[:-1]} (hidden without its last "
                         f"dimension), got {C.shape(labels)}")
    return (labels.shape, C.rows(hidden.detach()), weight.detach(), None if bias is None else bias.detach(),
            labels.reshape(-1), _chunk(chunk_size, weight.shape[0] if weight.dim() else 1))


def teacher_topk(hidden, weight, labels, k: int, *, bias=None, chunk_size: Optional[int] = None,
                 backend: Optional[str] = None):
    """The frozen teacher's pass, fused with the LM head.

    hidden [..., H], weight [V, H] (tied embeddings are fine), bias [V] or None, labels [...] int64
    (-100 = ignored). Returns (ids [..., K] int64, logprobs [..., K] fp32, label_logprob [...] fp32):
    the teacher's top-K tokens by logit (ties by id), their log-probabilities over the full
    vocabulary, and the label's log-probability (0 where ignored). Works chunk_size tokens at a
    time: no [N, V] tensor is ever held. No gradient flows (the teacher is frozen)."""
    k = C.integer(k, "k")
    lead, h, w, b, lab, chunk = head_rows(hidden, weight, bias, labels, chunk_size)
    args = (h, w, b, lab, k, chunk)
    which = _backend.resolve(TEACHER_TOPK, h, backend)
    if which == "reference":
        check_teacher_topk(*args, values=True)
        ids, lp, llp = ref.teacher_topk_reference(*args)
    else:
        ids, lp, llp = TEACHER_TOPK.kernel(which)(*args)
    return ids.reshape(*lead, k), lp.reshape(*lead, k), llp.reshape(lead)


def select_forget_positions(label_logprob, labels, fraction: float = 0.5, skip: int = 0, *,
                            backend: Optional[str] = None):
    """Forget positions [B, T] bool: per sequence, the ceil(fraction * n) lowest label
    log-probabilities among the valid positions (labels != -100) that follow the first `skip`
    valid ones (ties: the earlier position). The rest are anchors."""
    C.tensor(label_logprob, "label_logprob")
    args = (label_logprob, labels, C.number(fraction, "fraction"), C.integer(skip, "skip"))
    which = _backend.resolve(SELECT_FORGET_POSITIONS, label_logprob, backend)
    if which == "reference":
        check_select_forget_positions(*args, values=True)
        return ref.select_forget_positions_reference(*args)
    return SELECT_FORGET_POSITIONS.kernel(which)(*args)


def demote_targets(topk_ids, topk_logprobs, labels, forget_mask, variant: str = "A",
                   top_p: float = 0.5, *, backend: Optional[str] = None):
    """SHRED's targets over the teacher's top-K, [..., K] fp32.

    Every row is the teacher's top-K probabilities renormalised over the K. At forget positions,
    first the label's entry is zeroed (variant "A"), or the label's and those of the teacher's
    top-p nucleus: the leading entries whose preceding cumulative full-vocabulary probability is
    below top_p (variant "B"). A label outside the top-K demotes nothing. A row whose every entry
    is demoted becomes all zeros: it then contributes no loss and no gradient."""
    _leading(topk_ids, "topk_ids", "[..., K]")
    for t, name in ((topk_logprobs, "topk_logprobs"), (labels, "labels"), (forget_mask, "forget_mask")):
        C.tensor(t, name)
    if topk_ids.shape != topk_logprobs.shape:
        raise ValueError(f"topk_ids and topk_logprobs must have one shape [..., K], got {C.shape(topk_ids)} "
                         f"and {C.shape(topk_logprobs)}")
    lead = topk_ids.shape[:-1]
    if labels.shape != lead or forget_mask.shape != lead:
        raise ValueError(f"labels and forget_mask must have shape {list(lead)}, got {C.shape(labels)} and "
                         f"{C.shape(forget_mask)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be 'A' or 'B', got {variant!r}")
    K = topk_ids.shape[-1]
    args = (C.rows(topk_ids), C.rows(topk_logprobs), labels.reshape(-1), forget_mask.reshape(-1),
            VARIANTS[variant], C.number(top_p, "top_p"))
    which = _backend.resolve(DEMOTE_TARGETS, topk_ids, backend)
    if which == "reference":
        check_demote_targets(*args, values=True)
        q = ref.demote_targets_reference(*args[:4], variant, args[5])
    else:
        q = DEMOTE_TARGETS.kernel(which)(*args)
    return q.reshape(*lead, K)


def _check_reduce(reduction, normalize):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")


def _reduce(loss, reduction, mask, n):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / _valid_count(mask, n, loss.device)


def topk_kl(logits, target_ids, target_probs, *, mask=None, weights=None, reduction: str = "mean",
            normalize: str = "full", backend: Optional[str] = None):
    """sum_t w_t KL(q_t || softmax(z_t)) over given logits [N, V], q sparse on target_ids [N, K].

    normalize="full": the student's log-softmax over the whole vocabulary (SHRED); "topk": over the
    K target ids only. mask [N] bool marks valid positions; weights [N] scales them; reduction
    "mean" divides the sum by the number of valid positions, "sum" or "none" (per position)."""
    _leading(logits, "logits", "[N, V]")
    _check_reduce(reduction, normalize)
    n = logits.shape[0]
    which = _backend.resolve(TOPK_KL, logits, backend)
    if which != "reference":
        C.no_grad_for(target_probs, "target_probs", "topk_kl")
        C.no_grad_for(weights, "weights", "topk_kl")
    args = (logits, target_ids, target_probs, _row_weight(mask, weights, n, logits.device), normalize == "full")
    if which == "reference":
        check_topk_kl(*args, values=True)
        loss = ref.topk_kl_reference(logits, target_ids, target_probs, None, args[3], "none", normalize)
    else:
        loss, _ = TOPK_KL.kernel(which)(*args)
    return _reduce(loss, reduction, mask, n)


_FUSED_INPUTS = ("hidden", "weight", "bias", "target_ids", "target_probs", "row_weight", "scale", "full",
                 "chunk", "which")


class _FusedLinearTopkKL(torch.autograd.Function):
    """Scalar (mean / sum) loss whose gradients the op computes in its forward pass, chunk by
    chunk; backward only scales them by the incoming scalar gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, target_probs, row_weight, scale, full, chunk, which):
        # only the gradients autograd will ask for: a frozen head (LoRA) skips the grad_weight
        # GEMM and its [V, H] fp32 buffer
        want = [bool(x) for x in ctx.needs_input_grad[:3]]
        grad_scale = None
        if any(want):
            grad_scale = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device) * scale
        loss, gh, gw, gb = FUSED_LINEAR_TOPK_KL.kernel(which)(
            hidden, weight, bias, target_ids, target_probs, row_weight, grad_scale, full, chunk, *want)
        ctx.save_for_backward(gh, gw, gb)
        ctx.has_bias = bias is not None
        return (loss.sum() * scale).to(torch.float32)

    @staticmethod
    def backward(ctx, g):
        C.no_double_backward("lethe.ops.fused_linear_topk_kl")
        if getattr(ctx, "scaled_in_place", False):
            raise RuntimeError(
                "lethe.ops.fused_linear_topk_kl: a second backward through the same loss (retain_graph=True): the "
                "first one scaled the gradients it computed in the forward pass in place (a copy of grad_weight "
                "would be the step's largest allocation); compute the loss again, or backward the loss itself "
                "(an upstream gradient of 1) both times")
        gh, gw, gb = ctx.saved_tensors
        if torch.compiler.is_compiling():
            scale = lambda t: t * g.to(t.dtype)  # noqa: E731  (traced: stays functional)
        elif g.device.type == "cpu" and g.item() == 1.0:
            # the usual case, loss.backward() on the loss itself: pass the gradients on as they are
            scale = lambda t: t  # noqa: E731
        else:
            # in place, without a sync: a scaled copy of grad_weight would be the largest
            # allocation of the step. A second backward through this node (retain_graph) then
            # fails in autograd's saved-tensor version check instead of scaling twice.
            scale = lambda t: t.mul_(g.to(t.dtype))  # noqa: E731
            ctx.scaled_in_place = True
        need = ctx.needs_input_grad
        return gradients(_FUSED_INPUTS, {"hidden": scale(gh) if need[0] else None,
                                         "weight": scale(gw) if need[1] else None,
                                         "bias": scale(gb) if ctx.has_bias and need[2] else None})


def fused_linear_topk_kl(hidden, weight, target_ids, target_probs, *, bias=None, mask=None,
                         weights=None, reduction: str = "mean", normalize: str = "full",
                         chunk_size: Optional[int] = None, backend: Optional[str] = None):
    """topk_kl on the logits hidden @ weight.T + bias, fused with the LM head: chunk_size tokens at a
    time, gradients for hidden, weight and bias computed in the same pass (the way Liger-Kernel's
    fused linear cross-entropy does), so the peak extra memory is one [chunk_size, V] fp32 block.
    Only the gradients of inputs that require grad are computed: a frozen head (LoRA) costs no
    grad_weight GEMM and no [V, H] buffer.

    hidden [N, H] (or [..., H] with targets [..., K]); arguments otherwise as topk_kl."""
    _leading(hidden, "hidden", "[..., H]")
    for t, name in ((weight, "weight"), (target_ids, "target_ids"), (target_probs, "target_probs")):
        C.tensor(t, name)
    if target_ids.shape[:-1] != hidden.shape[:-1] or target_probs.shape != target_ids.shape:
        raise ValueError(f"target_ids and target_probs must both have shape {C.shape(hidden)[:-1]} + [K], "
                         f"got {C.shape(target_ids)} and {C.shape(target_probs)}")
    _check_reduce(reduction, normalize)
    h = C.rows(hidden)
    n = h.shape[0]
    tid, tpr = C.rows(target_ids), C.rows(target_probs)
    row_w = _row_weight(mask, weights, n, h.device)
    full = normalize == "full"
    chunk = _chunk(chunk_size, weight.shape[0] if weight.dim() else 1)
    which = _backend.resolve(FUSED_LINEAR_TOPK_KL, h, backend)
    if which == "reference":
        check_fused_linear_topk_kl(h, weight, bias, tid, tpr, row_w, None, full, chunk, values=True)
        loss = ref.fused_linear_topk_kl_reference(h, weight, bias, tid, tpr, None, row_w, "none", normalize)
        return loss.reshape(hidden.shape[:-1]) if reduction == "none" else _reduce(loss, reduction, mask, n)
    C.no_grad_for(target_probs, "target_probs", "fused_linear_topk_kl")
    C.no_grad_for(weights, "weights", "fused_linear_topk_kl")
    if reduction == "none" or not torch.is_grad_enabled():
        # "none": per-position gradients are only known in backward, which recomputes them.
        # Grad mode off (evaluation): no gradients to precompute, whatever requires grad.
        loss, _, _, _ = FUSED_LINEAR_TOPK_KL.kernel(which)(h, weight, bias, tid, tpr, row_w, None, full, chunk)
        if reduction == "none":
            return loss.reshape(hidden.shape[:-1])
        return _reduce(loss, reduction, mask, n)
    scale = 1.0 / _valid_count(mask, n, h.device) if reduction == "mean" else torch.tensor(1.0, device=h.device)
    return _FusedLinearTopkKL.apply(h, weight, bias, tid, tpr, row_w, scale, full, chunk, which)
