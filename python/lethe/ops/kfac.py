"""kfac family: the Kronecker-factored curvature passes of K-FADE (and of any K-FAC / EK-FAC user):
factor accumulation, batched damped inversion, preconditioning, and EK-FAC's eigenbasis diagonal.

Conventions (curvlinops' KFACLinearOperator with a mean reduction, Fisher type "mc" / "empirical",
weight sharing "expand": every token is an example): for a linear layer s = W a (+ b) seen by N
valid tokens,
  A = (1/N) sum_t a_t a_t^T  (a_t with a ones entry last when the layer has a bias),
  G = (1/N) sum_t g_t g_t^T  (g_t = d l_t / d s_t, the output gradient of token t's own loss),
and F = A (x) G approximates (1/N) sum_t vec(g_t a_t^T) vec(g_t a_t^T)^T, the Fisher of the
token-mean loss (curvlinops' KFAC of a loss with reduction="mean" gives the same A and G: it
backpropagates the mean loss and scales G by N). For a summed loss multiply the Fisher by N: G by N.

The ops work on the rows that count (`mask`), accumulate in the factor's dtype (fp32, or fp64),
and are GEMM / LAPACK bound, so their compiled kernels are ATen calls (MKL on the CPU, cuBLAS and
cuSOLVER on CUDA: csrc/include/lethe/kfac.h, registered by csrc/cpu/kfac.cpp and csrc/cuda/kfac.cu);
there is no Triton twin (a Triton GEMM or Cholesky would only be slower than those libraries).
Definitions: python/lethe/ops/kfac_reference.py.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

from lethe.ops import _backend
from lethe.ops import checks as C
from lethe.ops import kfac_reference as ref
from lethe.ops._op import define_op

__all__ = ["kfac_factor_update", "kfac_damped_inverse", "kfac_precondition", "kfac_eigen_precondition",
           "kfac_eigen_update", "DampedInverse", "Preconditioned"]

FACTOR_DTYPES = (torch.float32, torch.float64)
DATA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FACTOR_WORDS = "float32 or float64"
_DATA_WORDS = "float32, float16, bfloat16 or float64"


# ------------------------------------------------------------------------------------------------
# Checks (csrc/include/lethe/kfac_checks.h words them the same way, in the same order)
# ------------------------------------------------------------------------------------------------

def _dtype(t, name, allowed, words):
    C.tensor(t, name)
    if t.dtype not in allowed:
        raise TypeError(f"{name} must be {words}, got {t.dtype}")


def _square(t, name, n=None, what=""):
    if t.dim() != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"{name} must be a square 2-D matrix, got shape {C.shape(t)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} must be {n} x {n} ({what}), got shape {C.shape(t)}")


def _finite(x, name, positive=False) -> float:
    v = C.number(x, name)
    if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {v:g}")
    return v


def _rows_of(x, name, mask, D, factor_name, bias):
    _dtype(x, name, DATA_DTYPES, _DATA_WORDS)
    if x.dim() < 1 or x.shape[-1] != D:
        extra = " (its size less the bias column)" if bias else ""
        raise ValueError(f"{name} must have {factor_name}'s size{extra}, {D}, as its last dimension, got shape "
                         f"{C.shape(x)}")
    if mask is not None:
        C.tensor(mask, "mask")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool, got {mask.dtype}")
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"mask must have {name}'s leading shape ({list(x.shape[:-1])}), got {C.shape(mask)}")


def check_kfac_factor_update(factor, x, mask, bias, scale, decay, values=False):
    _dtype(factor, "factor", FACTOR_DTYPES, _FACTOR_WORDS)
    _square(factor, "factor")
    if not factor.is_contiguous():
        raise ValueError("factor must be contiguous")
    if bias and factor.shape[0] < 1:
        raise ValueError("factor must be at least 1 x 1 with bias=True (the ones column)")
    _rows_of(x, "x", mask, factor.shape[0] - int(bool(bias)), "factor", bias)
    C.same_device(x, "x", factor, "factor")
    C.same_device(mask, "mask", factor, "factor")
    _finite(scale, "scale")
    _finite(decay, "decay")
    if C.overlap(factor, x) or (mask is not None and C.overlap(factor, mask)):
        raise ValueError("factor must not overlap x or mask")


def _symmetric(f, name):
    if not f.numel():
        return
    lo, hi = torch.aminmax(f)
    dlo, dhi = torch.aminmax(f.T.clone(memory_format=torch.contiguous_format).sub_(f))  # blocked copy
    v = torch.stack([lo, hi, dlo, dhi]).double().tolist()
    tol, asym = 64 * torch.finfo(f.dtype).eps * max(-v[0], v[1]), max(-v[2], v[3])
    if not (math.isfinite(asym) and asym <= tol):
        raise ValueError(f"{name} must be symmetric with finite values (max |F - F^T| = {asym:g}, at most {tol:g} "
                         "allowed)")


def check_kfac_damped_inverse(factors, damping, values=False):
    if not isinstance(factors, (list, tuple)):
        raise TypeError(f"factors must be a list of tensors, got {type(factors).__name__}")
    if not isinstance(damping, (list, tuple)):
        raise TypeError(f"damping must be a list of numbers, got {type(damping).__name__}")
    if len(damping) != len(factors):
        raise ValueError(f"damping must hold one number per factor ({len(factors)}), got {len(damping)}")
    for i, f in enumerate(factors):
        n = f"factors[{i}]"
        _dtype(f, n, FACTOR_DTYPES, _FACTOR_WORDS)
        _square(f, n)
        C.same_device(f, n, factors[0], "factors[0]")
        _finite(damping[i], f"damping[{i}]")
    if values:
        for i, f in enumerate(factors):
            _symmetric(f, f"factors[{i}]")


def _layers(grad):
    if not isinstance(grad, (list, tuple)):
        raise TypeError(f"grad must be a list of tensors, got {type(grad).__name__}")


def _matching(ts, name, grad):
    if not isinstance(ts, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(ts).__name__}")
    if len(ts) != len(grad):
        raise ValueError(f"{name} must hold one tensor per grad tensor ({len(grad)}), got {len(ts)}")


def _grad_item(g, i, first):
    n = f"grad[{i}]"
    _dtype(g, n, FACTOR_DTYPES, _FACTOR_WORDS)
    if g.dim() != 2:
        raise ValueError(f"{n} must be 2-D [out, in] (a bias as the last input column), got shape {C.shape(g)}")
    C.same_device(g, n, first, "grad[0]")


def _like(t, name, g, i):
    C.tensor(t, name)
    if t.dtype != g.dtype:
        raise TypeError(f"{name} must have grad[{i}]'s dtype ({g.dtype}), got {t.dtype}")
    C.same_device(t, name, g, f"grad[{i}]")


def check_kfac_precondition(grad, a_inv, g_inv, values=False):
    _layers(grad)
    _matching(a_inv, "a_inv", grad)
    _matching(g_inv, "g_inv", grad)
    for i, g in enumerate(grad):
        _grad_item(g, i, grad[0])
        _like(a_inv[i], f"a_inv[{i}]", g, i)
        _square(a_inv[i], f"a_inv[{i}]", g.shape[1], f"grad[{i}]'s input size")
        _like(g_inv[i], f"g_inv[{i}]", g, i)
        _square(g_inv[i], f"g_inv[{i}]", g.shape[0], f"grad[{i}]'s output size")


def check_kfac_eigen_precondition(grad, q_a, q_g, lam, damping, values=False):
    _layers(grad)
    for nm, ts in (("q_a", q_a), ("q_g", q_g), ("lam", lam)):
        _matching(ts, nm, grad)
    for i, g in enumerate(grad):
        _grad_item(g, i, grad[0])
        _like(q_a[i], f"q_a[{i}]", g, i)
        _square(q_a[i], f"q_a[{i}]", g.shape[1], f"grad[{i}]'s input size")
        _like(q_g[i], f"q_g[{i}]", g, i)
        _square(q_g[i], f"q_g[{i}]", g.shape[0], f"grad[{i}]'s output size")
        _like(lam[i], f"lam[{i}]", g, i)
        if lam[i].shape != g.shape:
            raise ValueError(f"lam[{i}] must have grad[{i}]'s shape ({C.shape(g)}), got {C.shape(lam[i])}")
    _finite(damping, "damping", positive=True)
    if values:
        for i, lm in enumerate(lam):
            if lm.numel() and not bool((lm >= 0).all()):
                raise ValueError(f"lam[{i}] must be >= 0 everywhere (eigenvalues clamped at 0), got a minimum of "
                                 f"{float(lm.min()):g}")


def check_kfac_eigen_update(lam, a, g, q_a, q_g, mask, bias, scale, decay, values=False):
    _dtype(lam, "lam", FACTOR_DTYPES, _FACTOR_WORDS)
    if lam.dim() != 2:
        raise ValueError(f"lam must be 2-D [out, in], got shape {C.shape(lam)}")
    if not lam.is_contiguous():
        raise ValueError("lam must be contiguous")
    out, inp = lam.shape
    for nm, q, n in (("q_a", q_a, inp), ("q_g", q_g, out)):
        C.tensor(q, nm)
        if q.dtype != lam.dtype:
            raise TypeError(f"{nm} must have lam's dtype ({lam.dtype}), got {q.dtype}")
        _square(q, nm, n, f"lam's {'input' if nm == 'q_a' else 'output'} size")
        C.same_device(q, nm, lam, "lam")
    if bias and inp < 1:
        raise ValueError("lam must have at least one input column with bias=True (the ones column)")
    _rows_of(a, "a", mask, inp - int(bool(bias)), "lam's input", bias)
    _rows_of(g, "g", None, out, "lam's output", False)
    if g.shape[:-1] != a.shape[:-1]:
        raise ValueError(f"g must have a's leading shape ({list(a.shape[:-1])}), got shape {C.shape(g)}")
    for nm, t in (("a", a), ("g", g), ("mask", mask)):
        C.same_device(t, nm, lam, "lam")
    _finite(scale, "scale")
    _finite(decay, "decay")
    if any(C.overlap(lam, t) for t in (a, g, q_a, q_g) + ((mask,) if mask is not None else ())):
        raise ValueError("lam must not overlap a, g, q_a, q_g or mask")


# ------------------------------------------------------------------------------------------------
# Declarations
# ------------------------------------------------------------------------------------------------

def _none(*args):
    return None


def _fake_inverse(factors, damping):
    return [f.new_empty(f.shape) for f in factors], torch.empty((len(factors),), dtype=torch.bool,
                                                                 device=factors[0].device if factors else "cpu")


def _fake_precondition(grad, *rest):
    dev = grad[0].device if grad else "cpu"
    return [g.new_empty(g.shape) for g in grad], torch.empty((len(grad),), dtype=torch.float64, device=dev)


# factor <- decay * factor + scale * X^T X over the rows that count (a ones column last with bias)
KFAC_FACTOR_UPDATE = define_op(
    "kfac_factor_update(Tensor(a!) factor, Tensor x, Tensor? mask, bool bias, float scale, float decay) -> ()",
    check=check_kfac_factor_update, fake=_none)

# (F_i + damping_i I)^-1 for every factor (Cholesky; an fp64 retry where fp32 fails), and which
# factors needed the retry [T] bool
KFAC_DAMPED_INVERSE = define_op(
    "kfac_damped_inverse(Tensor[] factors, float[] damping) -> (Tensor[], Tensor)",
    check=check_kfac_damped_inverse, fake=_fake_inverse)

# G^-1 grad A^-1 per layer and <grad, G^-1 grad A^-1> per layer [T] fp64
KFAC_PRECONDITION = define_op(
    "kfac_precondition(Tensor[] grad, Tensor[] a_inv, Tensor[] g_inv) -> (Tensor[], Tensor)",
    check=check_kfac_precondition, fake=_fake_precondition)

# Q_G [(Q_G^T grad Q_A) / (lam + damping)] Q_A^T per layer, and the quadratic forms [T] fp64
KFAC_EIGEN_PRECONDITION = define_op(
    "kfac_eigen_precondition(Tensor[] grad, Tensor[] q_a, Tensor[] q_g, Tensor[] lam, float damping) "
    "-> (Tensor[], Tensor)",
    check=check_kfac_eigen_precondition, fake=_fake_precondition)

# lam <- decay * lam + scale * ((g Q_G)^2)^T (a Q_A)^2 over the rows that count
KFAC_EIGEN_UPDATE = define_op(
    "kfac_eigen_update(Tensor(a!) lam, Tensor a, Tensor g, Tensor q_a, Tensor q_g, Tensor? mask, bool bias, "
    "float scale, float decay) -> ()",
    check=check_kfac_eigen_update, fake=_none)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------

class DampedInverse(NamedTuple):
    """inverses: (F_i + lambda_i I)^-1 in F_i's dtype; retried: [T] bool, the factors whose fp32
    Cholesky failed and were factorised again in fp64."""
    inverses: list
    retried: torch.Tensor


class Preconditioned(NamedTuple):
    """grads: the preconditioned gradients; quad: per layer <g, F^-1 g> [T] fp64."""
    grads: list
    quad: torch.Tensor


def _list(ts):
    return list(ts) if isinstance(ts, (list, tuple)) else ts


def _run(op, first, backend):
    which = _backend.resolve(op, first, backend)
    return which, (op.kernel(which) if which != "reference" else None)


def kfac_factor_update(factor: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                       bias: bool = False, scale: float = 1.0, decay: float = 1.0,
                       backend: Optional[str] = None) -> None:
    """factor <- decay * factor + scale * X^T X, in place, X = x's rows [..., D] where mask is True
    (all without a mask), converted to the factor's dtype, with a ones column last when `bias`
    (the factor is then (D+1) x (D+1)). A running mean over tokens: decay = n / (n + m),
    scale = 1 / (n + m) after n tokens, for a batch of m; an EMA: decay = beta, scale = (1 - beta) / m.
    The result is exactly symmetric (the upper triangle mirrored). decay = 0 ignores the old values."""
    args = (factor, x, mask, bool(bias), scale, decay)
    check_kfac_factor_update(*args)
    which, k = _run(KFAC_FACTOR_UPDATE, factor, backend)
    with torch.no_grad():
        if k is None:
            new = ref.kfac_factor_update_reference(*args)
            factor.copy_(torch.triu(new) + torch.triu(new, 1).T)
        else:
            k(*args)


def kfac_damped_inverse(factors: Sequence[torch.Tensor], damping, *, backend: Optional[str] = None) -> DampedInverse:
    """(F_i + damping_i I)^-1 for every factor of the list (damping: one number, or one per factor),
    read from each factor's lower triangle. Factors of equal size and dtype are inverted together:
    a recursive block Cholesky (the Schur complements' Cholesky at 64 x 64 leaves, GEMMs above),
    in the factor's dtype; a factor whose fp32 factorisation fails (not positive definite in fp32)
    is factorised again in fp64 (`retried`). A factor not positive definite in fp64 either is an error."""
    factors = _list(factors)
    if isinstance(damping, (int, float)) and not isinstance(damping, bool) and isinstance(factors, list):
        damping = [float(damping)] * len(factors)
    args = (factors, _list(damping))
    check_kfac_damped_inverse(*args)
    if not factors:
        return DampedInverse([], torch.zeros(0, dtype=torch.bool))
    which, k = _run(KFAC_DAMPED_INVERSE, factors[0], backend)
    with torch.no_grad():
        if k is None:  # (the compiled kernels check the values themselves)
            check_kfac_damped_inverse(*args, values=True)
            return DampedInverse(ref.kfac_damped_inverse_reference(*args), torch.zeros(len(factors), dtype=torch.bool))
        inv, retried = k(*args)
    return DampedInverse(list(inv), retried)


def kfac_precondition(grad: Sequence[torch.Tensor], a_inv: Sequence[torch.Tensor], g_inv: Sequence[torch.Tensor], *,
                      backend: Optional[str] = None) -> Preconditioned:
    """For every layer of the list: G^-1 dW A^-1 (dW [out, in], a bias as the last column), and the
    quadratic form <dW, G^-1 dW A^-1> in fp64 (its sum over the layers is g^T F^-1 g)."""
    args = (_list(grad), _list(a_inv), _list(g_inv))
    check_kfac_precondition(*args)
    if not args[0]:
        return Preconditioned([], torch.zeros(0, dtype=torch.float64))
    which, k = _run(KFAC_PRECONDITION, args[0][0], backend)
    with torch.no_grad():
        out, quad = ref.kfac_precondition_reference(*args) if k is None else k(*args)
    return Preconditioned(list(out), quad)


def kfac_eigen_precondition(grad, q_a, q_g, lam, *, damping: float, backend: Optional[str] = None) -> Preconditioned:
    """For every layer: Q_G [(Q_G^T dW Q_A) / (Lambda + damping)] Q_A^T and the quadratic form
    sum (Q_G^T dW Q_A)^2 / (Lambda + damping) in fp64. Lambda [out, in] >= 0: EK-FAC's re-estimated
    diagonal, or K-FAC's outer(eig(G), eig(A)); damping > 0."""
    args = (_list(grad), _list(q_a), _list(q_g), _list(lam), damping)
    check_kfac_eigen_precondition(*args)
    if not args[0]:
        return Preconditioned([], torch.zeros(0, dtype=torch.float64))
    which, k = _run(KFAC_EIGEN_PRECONDITION, args[0][0], backend)
    if k is None:
        check_kfac_eigen_precondition(*args, values=True)
    with torch.no_grad():
        out, quad = ref.kfac_eigen_precondition_reference(*args) if k is None else k(*args)
    return Preconditioned(list(out), quad)


def kfac_eigen_update(lam: torch.Tensor, a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor,
                      mask: Optional[torch.Tensor] = None, *, bias: bool = False, scale: float = 1.0,
                      decay: float = 1.0, backend: Optional[str] = None) -> None:
    """lam <- decay * lam + scale * ((G Q_G)^2)^T (A Q_A)^2, in place: EK-FAC's diagonal in the
    Kronecker eigenbasis, from the rows of a [..., in] and g [..., out] where mask is True (a ones
    column last in a when `bias`): per token, the square of its gradient g_t a_t^T in the eigenbasis."""
    args = (lam, a, g, q_a, q_g, mask, bool(bias), scale, decay)
    check_kfac_eigen_update(*args)
    which, k = _run(KFAC_EIGEN_UPDATE, lam, backend)
    with torch.no_grad():
        if k is None:
            lam.copy_(ref.kfac_eigen_update_reference(*args))
        else:
            k(*args)
