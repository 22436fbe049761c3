"""shred family: SHRED's teacher pass, forget-position selection, logit demotion, and the demoted
top-K KL loss, on given logits or fused with the LM head (never materialising [N, V]).

Definitions: python/lethe/ops/shred_reference.py. Backends: the compiled CPU and CUDA kernels
(csrc/cpu/shred_*.cpp, csrc/cuda/shred_*.cu), the Triton kernels (triton_kernels/shred_*.py) and
the reference; lethe.info says which one each op uses.
"""
from __future__ import annotations

from typing import Optional

import torch

from lethe import _lib
from lethe.ops import _backend
from lethe.ops import shred_reference as ref

__all__ = [
    "teacher_topk", "select_forget_positions", "demote_targets", "topk_kl", "fused_linear_topk_kl",
    "default_chunk",
]

IGNORE_INDEX = ref.IGNORE_INDEX
CHUNK_BYTES = 64 << 20  # default LM-head chunk: a [chunk, V] fp32 block of at most 64 MiB
MIN_CHUNK, MAX_CHUNK = 512, 2048  # below 512 rows the per-chunk read-modify-write of the fp32
# grad_weight (2 V H 4 bytes) outweighs the memory saved: 116 vs 145 GFLOP/s at V = 128k (128 vs 512)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")
NORMALIZE = ("full", "topk")
VARIANTS = {"A": 0, "B": 1}


# ---------------------------------------------------------------- argument checks (cheap: no sync)

def _tensor(t, name, dims=None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in ((dims,) if isinstance(dims, int) else dims):
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {names}, got {t.dtype}")


def _same_device(*named):
    devs = {t.device for _, t in named if t is not None}
    if len(devs) > 1:
        raise ValueError("tensors must be on one device, got " +
                         ", ".join(f"{n} on {t.device}" for n, t in named if t is not None))


def _check_head(hidden, weight, bias):
    _tensor(hidden, "hidden", dtypes=FLOATS)
    _tensor(weight, "weight", 2, FLOATS)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden's last dimension must equal weight.shape[1] = {weight.shape[1]}, "
                         f"got hidden of shape {tuple(hidden.shape)}")
    if bias is not None:
        _tensor(bias, "bias", 1, FLOATS)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")


def default_chunk(vocab: int) -> int:
    """Tokens per chunk when chunk_size is None: the largest power of two whose [chunk, V] fp32
    block fits CHUNK_BYTES, within [MIN_CHUNK, MAX_CHUNK] (512 at V = 32k and at V = 128k)."""
    rows = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    return max(MIN_CHUNK, min(MAX_CHUNK, 1 << (rows.bit_length() - 1)))


def _check_chunk(chunk_size, vocab):
    if chunk_size is None:
        return default_chunk(vocab)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def _check_targets(target_ids, target_probs, n, v):
    _tensor(target_ids, "target_ids", 2, (torch.int64,))
    _tensor(target_probs, "target_probs", 2, FLOATS)
    if target_ids.shape != target_probs.shape or target_ids.shape[0] != n:
        raise ValueError(f"target_ids and target_probs must both have shape [{n}, K], got "
                         f"{tuple(target_ids.shape)} and {tuple(target_probs.shape)}")
    if target_ids.shape[1] > v:
        raise ValueError(f"K = {target_ids.shape[1]} target ids exceed the vocabulary size V = {v}")


def _row_weight(mask, weights, n, device):
    """mask * weights as one float [N] vector (None when both are None)."""
    if mask is None and weights is None:
        return None
    w = torch.ones(n, dtype=torch.float32, device=device)
    if mask is not None:
        _tensor(mask, "mask", dtypes=(torch.bool,))
        if mask.numel() != n:
            raise ValueError(f"mask must have {n} elements, got shape {tuple(mask.shape)}")
        w = w * mask.reshape(n)
    if weights is not None:
        _tensor(weights, "weights", dtypes=FLOATS)
        if weights.numel() != n:
            raise ValueError(f"weights must have {n} elements, got shape {tuple(weights.shape)}")
        w = w * weights.reshape(n).float()
    return w


def _valid_count(mask, n, device):
    if mask is None:
        return torch.tensor(float(n), device=device)
    return mask.sum().float().clamp(min=1.0)


# ------------------------------------------------------------------------------------ public ops

def teacher_topk(hidden, weight, labels, k: int, *, bias=None, chunk_size: Optional[int] = None,
                 backend: Optional[str] = None):
    """The frozen teacher's pass, fused with the LM head.

    hidden [..., H], weight [V, H] (tied embeddings are fine), bias [V] or None, labels [...] int64
    (-100 = ignored). Returns (ids [..., K] int64, logprobs [..., K] fp32, label_logprob [...] fp32):
    the teacher's top-K tokens by logit (ties by id), their log-probabilities over the full
    vocabulary, and the label's log-probability (0 where ignored). Works chunk_size tokens at a
    time: no [N, V] tensor is ever held. No gradient flows (the teacher is frozen)."""
    _check_head(hidden, weight, bias)
    _tensor(labels, "labels", dtypes=(torch.int64,))
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden without its last "
                         f"dimension), got {tuple(labels.shape)}")
    V = weight.shape[0]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= V:
        raise ValueError(f"k must be an int in [1, V = {V}], got {k!r}")
    chunk_size = _check_chunk(chunk_size, V)
    _same_device(("hidden", hidden), ("weight", weight), ("bias", bias), ("labels", labels))
    lead = labels.shape
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1)
    w, b = weight.detach(), None if bias is None else bias.detach()
    which = _backend.resolve("teacher_topk", h, backend)
    if which != "reference":
        ids, lp, llp = _backend.kernel_op("teacher_topk", which)(h, w, b, lab, k, chunk_size)
    else:
        _check_label_range(lab, V)
        ids, lp, llp = ref.teacher_topk_reference(h, w, b, lab, k, chunk_size)
    return ids.reshape(*lead, k), lp.reshape(*lead, k), llp.reshape(lead)


def _check_target_values(target_ids, target_probs, V):
    """Value checks of the reference path (the kernels make the same ones); skipped while
    torch.compile traces, since they read tensor values."""
    if not torch.compiler.is_compiling():
        ref.check_target_values(target_ids, target_probs, V)


def _check_label_range(labels, V):
    if torch.compiler.is_compiling():
        return
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {V}) or -100, got {labels[bad][0].item()}")


def select_forget_positions(label_logprob, labels, fraction: float = 0.5, skip: int = 0, *,
                            backend: Optional[str] = None):
    """Forget positions [B, T] bool: per sequence, the ceil(fraction * n) lowest label
    log-probabilities among the valid positions (labels != -100) that follow the first `skip`
    valid ones (ties: the earlier position). The rest are anchors."""
    _tensor(label_logprob, "label_logprob", 2, FLOATS)
    _tensor(labels, "labels", 2, (torch.int64,))
    if labels.shape != label_logprob.shape:
        raise ValueError(f"labels must have the shape of label_logprob {tuple(label_logprob.shape)}, "
                         f"got {tuple(labels.shape)}")
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    if not isinstance(skip, int) or isinstance(skip, bool) or skip < 0:
        raise ValueError(f"skip must be a non-negative int, got {skip!r}")
    which = _backend.resolve("select_forget_positions", labels, backend)
    if which != "reference":
        return _backend.kernel_op("select_forget_positions", which)(label_logprob, labels, float(fraction), skip)
    return ref.select_forget_positions_reference(label_logprob, labels, float(fraction), skip)


def demote_targets(topk_ids, topk_logprobs, labels, forget_mask, variant: str = "A",
                   top_p: float = 0.5, *, backend: Optional[str] = None):
    """SHRED's targets over the teacher's top-K, [..., K] fp32.

    Every row is the teacher's top-K probabilities renormalised over the K. At forget positions,
    first the label's entry is zeroed (variant "A"), or the label's and those of the teacher's
    top-p nucleus: the leading entries whose preceding cumulative full-vocabulary probability is
    below top_p (variant "B"). A label outside the top-K demotes nothing. A row whose every entry
    is demoted becomes all zeros: it then contributes no loss and no gradient."""
    _tensor(topk_ids, "topk_ids", dtypes=(torch.int64,))
    _tensor(topk_logprobs, "topk_logprobs", dtypes=FLOATS)
    _tensor(labels, "labels", dtypes=(torch.int64,))
    _tensor(forget_mask, "forget_mask", dtypes=(torch.bool,))
    if topk_ids.shape != topk_logprobs.shape or topk_ids.dim() < 1:
        raise ValueError(f"topk_ids and topk_logprobs must have one shape [..., K], got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_logprobs.shape)}")
    lead = topk_ids.shape[:-1]
    if labels.shape != lead or forget_mask.shape != lead:
        raise ValueError(f"labels and forget_mask must have shape {tuple(lead)}, got "
                         f"{tuple(labels.shape)} and {tuple(forget_mask.shape)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be 'A' or 'B', got {variant!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    K = topk_ids.shape[-1]
    args = (topk_ids.reshape(-1, K), topk_logprobs.reshape(-1, K), labels.reshape(-1), forget_mask.reshape(-1))
    which = _backend.resolve("demote_targets", topk_ids, backend)
    if which != "reference":
        q = _backend.kernel_op("demote_targets", which)(*args, VARIANTS[variant], float(top_p))
    else:
        q = ref.demote_targets_reference(*args, variant, float(top_p))
    return q.reshape(*lead, K)


def topk_kl(logits, target_ids, target_probs, *, mask=None, weights=None, reduction: str = "mean",
            normalize: str = "full", backend: Optional[str] = None):
    """sum_t w_t KL(q_t || softmax(z_t)) over given logits [N, V], q sparse on target_ids [N, K].

    normalize="full": the student's log-softmax over the whole vocabulary (SHRED); "topk": over the
    K target ids only. mask [N] bool marks valid positions; weights [N] scales them; reduction
    "mean" divides the sum by the number of valid positions, "sum" or "none" (per position)."""
    _tensor(logits, "logits", 2, FLOATS)
    N, V = logits.shape
    _check_targets(target_ids, target_probs, N, V)
    _check_reduce(reduction, normalize)
    row_w = _row_weight(mask, weights, N, logits.device)
    full = normalize == "full"
    which = _backend.resolve("topk_kl", logits, backend)
    if which != "reference":
        loss, _ = _backend.kernel_op("topk_kl", which)(logits, target_ids, target_probs, row_w, full)
    else:
        _check_target_values(target_ids, target_probs, V)
        loss = ref.topk_kl_reference(logits, target_ids, target_probs, None, row_w, "none", normalize)
    return _reduce(loss, reduction, mask, N)


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


class _FusedLinearTopkKL(torch.autograd.Function):
    """Scalar (mean / sum) loss whose gradients the op computes in its forward pass, chunk by
    chunk; backward only scales them by the incoming scalar gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, target_probs, row_w, scale, full, chunk, which):
        # only the gradients autograd will ask for: a frozen head (LoRA) skips the grad_weight
        # GEMM and its [V, H] fp32 buffer
        want = [bool(x) for x in ctx.needs_input_grad[:3]]
        grad_scale = None
        if any(want):
            grad_scale = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device) * scale
        op = _backend.kernel_op("fused_linear_topk_kl", which)
        loss, gh, gw, gb = op(hidden, weight, bias, target_ids, target_probs, row_w, grad_scale, full, chunk,
                              *want)
        ctx.save_for_backward(gh, gw, gb)
        ctx.has_bias = bias is not None
        return (loss.sum() * scale).to(torch.float32)

    @staticmethod
    def backward(ctx, g):
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
        return (scale(gh) if ctx.needs_input_grad[0] else None,
                scale(gw) if ctx.needs_input_grad[1] else None,
                scale(gb) if ctx.has_bias and ctx.needs_input_grad[2] else None,
                None, None, None, None, None, None, None)


def fused_linear_topk_kl(hidden, weight, target_ids, target_probs, *, bias=None, mask=None,
                         weights=None, reduction: str = "mean", normalize: str = "full",
                         chunk_size: Optional[int] = None, backend: Optional[str] = None):
    """topk_kl on the logits hidden @ weight.T + bias, fused with the LM head: chunk_size tokens at a
    time, gradients for hidden, weight and bias computed in the same pass (the way Liger-Kernel's
    fused linear cross-entropy does), so the peak extra memory is one [chunk_size, V] fp32 block.
    Only the gradients of inputs that require grad are computed: a frozen head (LoRA) costs no
    grad_weight GEMM and no [V, H] buffer.

    hidden [N, H] (or [..., H] with targets [..., K]); arguments otherwise as topk_kl."""
    _check_head(hidden, weight, bias)
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    N, V = h.shape[0], weight.shape[0]
    _tensor(target_ids, "target_ids", dtypes=(torch.int64,))
    _tensor(target_probs, "target_probs", dtypes=FLOATS)
    if target_ids.shape[:-1] != hidden.shape[:-1] or target_probs.shape != target_ids.shape:
        raise ValueError(f"target_ids and target_probs must both have shape {tuple(hidden.shape[:-1])} + (K,), "
                         f"got {tuple(target_ids.shape)} and {tuple(target_probs.shape)}")
    tid, tpr = target_ids.reshape(N, -1), target_probs.reshape(N, -1)
    _check_targets(tid, tpr, N, V)
    _check_reduce(reduction, normalize)
    chunk = _check_chunk(chunk_size, V)
    _same_device(("hidden", hidden), ("weight", weight), ("bias", bias), ("target_ids", target_ids),
                 ("target_probs", target_probs))
    row_w = _row_weight(mask, weights, N, h.device)
    full = normalize == "full"
    which = _backend.resolve("fused_linear_topk_kl", h, backend)
    if which == "reference":
        _check_target_values(tid, tpr, V)
        loss = ref.fused_linear_topk_kl_reference(h, weight, bias, tid, tpr, None, row_w, "none", normalize)
        return _reduce(loss, reduction, mask, N)
    if reduction == "none" or not torch.is_grad_enabled():
        # "none": per-position gradients are only known in backward, which recomputes them.
        # Grad mode off (evaluation): no gradients to precompute, whatever requires grad.
        loss, _, _, _ = _backend.kernel_op("fused_linear_topk_kl", which)(h, weight, bias, tid, tpr, row_w,
                                                                         None, full, chunk)
        if reduction == "none":
            return loss.reshape(hidden.shape[:-1])
        return _reduce(loss, reduction, mask, N)
    scale = 1.0 / _valid_count(mask, N, h.device) if reduction == "mean" else torch.tensor(1.0, device=h.device)
    return _FusedLinearTopkKL.apply(h, weight, bias, tid, tpr, row_w, scale, full, chunk, which)


# ---- registration: fake kernels and autograd of the compiled ops ----

def _fake_teacher_topk(hidden, weight, bias, labels, k, chunk_size):
    n = hidden.shape[0]
    return (hidden.new_empty((n, k), dtype=torch.int64), hidden.new_empty((n, k), dtype=torch.float32),
            hidden.new_empty((n,), dtype=torch.float32))


def _fake_select(label_logprob, labels, fraction, skip):
    return labels.new_empty(labels.shape, dtype=torch.bool)


def _fake_demote(topk_ids, topk_logprobs, labels, forget_mask, variant, top_p):
    return topk_logprobs.new_empty(topk_ids.shape, dtype=torch.float32)


def _fake_topk_kl(logits, target_ids, target_probs, row_weight, full_normalize):
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=torch.float32), logits.new_empty((n,), dtype=torch.float32)


def _fake_topk_kl_backward(grad_loss, logits, target_ids, target_probs, lse, row_weight, full_normalize,
                           check_values=True):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_fused(hidden, weight, bias, target_ids, target_probs, row_weight, grad_row_scale,
                full_normalize, chunk_size, grad_hidden=True, grad_weight=True, grad_bias=True,
                check_values=True):
    loss = hidden.new_empty((hidden.shape[0],), dtype=torch.float32)
    scaled = grad_row_scale is not None

    def grad(want, t):
        return torch.empty_like(t) if scaled and want and t is not None else hidden.new_empty((0,))
    return loss, grad(grad_hidden, hidden), grad(grad_weight, weight), grad(grad_bias, bias)


def _topk_kl_setup(ctx, inputs, output):
    logits, ids, probs, row_w, full = inputs
    ctx.full = full
    ctx.save_for_backward(logits, ids, probs, output[1], row_w)


def _topk_kl_bwd_with(which):
    def backward(ctx, grad_loss, grad_lse):
        logits, ids, probs, lse, row_w = ctx.saved_tensors
        # the forward checked the targets (and autograd would reject them changed since)
        g = _backend.kernel_op("topk_kl_backward", which)(grad_loss.contiguous(), logits, ids, probs, lse,
                                                          row_w, ctx.full, False)
        return g, None, None, None, None
    return backward


def _fused_setup(ctx, inputs, output):
    hidden, weight, bias, ids, probs, row_w, _, full, chunk = inputs[:9]
    ctx.args = (full, chunk)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, ids, probs, row_w)


def _fused_bwd_with(which):
    def backward(ctx, grad_loss, *_unused):
        hidden, weight, bias, ids, probs, row_w = ctx.saved_tensors
        want = [bool(x) for x in ctx.needs_input_grad[:3]]
        _, gh, gw, gb = _backend.kernel_op("fused_linear_topk_kl", which)(
            hidden, weight, bias, ids, probs, row_w, grad_loss.float().contiguous(), *ctx.args, *want, False)
        return (gh if want[0] else None, gw if want[1] else None, gb if ctx.has_bias and want[2] else None,
                None, None, None, None, None, None, None, None, None, None)
    return backward


_lib.register("teacher_topk", _fake_teacher_topk)
_lib.register("select_forget_positions", _fake_select)
_lib.register("demote_targets", _fake_demote)
_lib.register("topk_kl", _fake_topk_kl, _topk_kl_bwd_with("native"),
              _topk_kl_setup)
_lib.register("topk_kl_backward", _fake_topk_kl_backward)
_lib.register("fused_linear_topk_kl", _fake_fused, _fused_bwd_with("native"),
              _fused_setup)

# Triton implementations of the loss ops, as Python custom ops with the same schemas.
if _backend.triton_available() and _backend.module_exists("lethe.triton_kernels.shred_kl"):
    from torch import Tensor

    @torch.library.custom_op("lethe::topk_kl_triton", mutates_args=())
    def _topk_kl_triton(logits: Tensor, target_ids: Tensor, target_probs: Tensor,
                        row_weight: Optional[Tensor], full_normalize: bool) -> tuple[Tensor, Tensor]:
        from lethe.triton_kernels.shred_kl import topk_kl as kernel

        return kernel(logits, target_ids, target_probs, row_weight, full_normalize)

    @torch.library.custom_op("lethe::topk_kl_backward_triton", mutates_args=())
    def _topk_kl_backward_triton(grad_loss: Tensor, logits: Tensor, target_ids: Tensor, target_probs: Tensor,
                                 lse: Tensor, row_weight: Optional[Tensor], full_normalize: bool,
                                 check_values: bool = True) -> Tensor:
        from lethe.triton_kernels.shred_kl import topk_kl_backward as kernel

        return kernel(grad_loss, logits, target_ids, target_probs, lse, row_weight, full_normalize, check_values)

    @torch.library.custom_op("lethe::fused_linear_topk_kl_triton", mutates_args=())
    def _fused_linear_topk_kl_triton(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target_ids: Tensor,
                                     target_probs: Tensor, row_weight: Optional[Tensor],
                                     grad_row_scale: Optional[Tensor], full_normalize: bool,
                                     chunk_size: int, grad_hidden: bool = True, grad_weight: bool = True,
                                     grad_bias: bool = True,
                                     check_values: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from lethe.triton_kernels.shred_kl import fused_linear_topk_kl as kernel

        return kernel(hidden, weight, bias, target_ids, target_probs, row_weight, grad_row_scale,
                      full_normalize, chunk_size, grad_hidden, grad_weight, grad_bias, check_values)

    _topk_kl_triton.register_fake(_fake_topk_kl)
    _topk_kl_backward_triton.register_fake(_fake_topk_kl_backward)
    _fused_linear_topk_kl_triton.register_fake(_fake_fused)
    _topk_kl_triton.register_autograd(_topk_kl_bwd_with("triton"),
                                      setup_context=_topk_kl_setup)
    _fused_linear_topk_kl_triton.register_autograd(
        _fused_bwd_with("triton"), setup_context=_fused_setup)
    _backend.TRITON_OPS.update({"topk_kl", "topk_kl_backward", "fused_linear_topk_kl"})

if _backend.triton_available() and _backend.module_exists("lethe.triton_kernels.shred_teacher"):
    from torch import Tensor

    @torch.library.custom_op("lethe::teacher_topk_triton", mutates_args=())
    def _teacher_topk_triton(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, k: int,
                             chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
        from lethe.triton_kernels.shred_teacher import teacher_topk as kernel

        return kernel(hidden, weight, bias, labels, k, chunk_size)

    @torch.library.custom_op("lethe::select_forget_positions_triton", mutates_args=())
    def _select_forget_positions_triton(label_logprob: Tensor, labels: Tensor, fraction: float,
                                        skip: int) -> Tensor:
        from lethe.triton_kernels.shred_teacher import select_forget_positions as kernel

        return kernel(label_logprob, labels, fraction, skip)

    @torch.library.custom_op("lethe::demote_targets_triton", mutates_args=())
    def _demote_targets_triton(topk_ids: Tensor, topk_logprobs: Tensor, labels: Tensor, forget_mask: Tensor,
                               variant: int, top_p: float) -> Tensor:
        from lethe.triton_kernels.shred_teacher import demote_targets as kernel

        return kernel(topk_ids, topk_logprobs, labels, forget_mask, variant, top_p)

    _teacher_topk_triton.register_fake(_fake_teacher_topk)
    _select_forget_positions_triton.register_fake(_fake_select)
    _demote_targets_triton.register_fake(_fake_demote)
    _backend.TRITON_OPS.update({"teacher_topk", "select_forget_positions", "demote_targets"})
