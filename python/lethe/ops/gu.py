"""gu family: the multi-tensor arithmetic of a retain subspace (Geometric-Disentanglement
Unlearning): the inner products of a list of tensors with a basis of up to 16 directions per
tensor, optionally in the Adam metric, and the in-place linear combinations that orthonormalise a
new direction (CGS2, CholeskyQR2) and project an update. lethe.RetainSubspace
(lethe/nn/retain_subspace.py) composes them; its tiny solves run in fp64 on the host.

Definitions: python/lethe/ops/gu_reference.py. Each op is one streaming pass over the list (one
launch for all its tensors, not one per tensor or per direction): fp32 accumulation within a block
of elements (fp64 when the basis is fp64), fp64 across blocks and tensors, in a fixed order.
Kernels: csrc/cpu/gu.cpp, csrc/cuda/gu.cu, triton_kernels/gu.py.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from lethe.ops import _backend
from lethe.ops import checks as C
from lethe.ops import gu_reference as ref
from lethe.ops._op import define_op

__all__ = ["subspace_dots", "subspace_axpy", "subspace_transform", "MAX_ROWS"]

MAX_ROWS = 16  # rows per basis tensor: the kernels keep K + 1 accumulators (or (K + 1)^2) per lane
BASIS_DTYPES = (torch.float32, torch.float64)
DATA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ------------------------------------------------------------------------------------------------
# The ops' argument checks (csrc/include/lethe/gu_checks.h words them the same way, in the same
# order). No value checks: the ops read no value that could be out of range.
# ------------------------------------------------------------------------------------------------

def _list(ts, name: str):
    if not isinstance(ts, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(ts).__name__}")
    for i, t in enumerate(ts):
        C.tensor(t, f"{name}[{i}]")


def _contiguous(t, name: str):
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_basis(basis):
    _list(basis, "basis")
    if len(basis) == 0:
        raise ValueError("basis must hold at least one tensor")
    for i, b in enumerate(basis):
        name = f"basis[{i}]"
        if b.dtype not in BASIS_DTYPES:
            raise TypeError(f"{name} must be float32 or float64, got {b.dtype}")
        C.same_device(b, name, basis[0], "basis[0]")
        if b.dim() < 1:
            raise ValueError(f"{name} must be [K, *shape] (K basis rows), got shape {C.shape(b)}")
        if b.shape[0] > MAX_ROWS:
            raise ValueError(f"{name} must have at most {MAX_ROWS} rows, got {b.shape[0]}")
        _contiguous(b, name)
    return max(b.shape[0] for b in basis)


def _check_like(ts, name: str, basis):
    """A list of data tensors, one per basis tensor, each shaped like a row of it."""
    if ts is None:
        return
    _list(ts, name)
    if len(ts) != len(basis):
        raise ValueError(f"{name} must hold one tensor per basis tensor ({len(basis)}), got {len(ts)}")
    for i, (t, b) in enumerate(zip(ts, basis)):
        tn = f"{name}[{i}]"
        if t.dtype not in DATA_DTYPES:
            raise TypeError(f"{tn} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        C.same_device(t, tn, basis[0], "basis[0]")
        if list(t.shape) != list(b.shape[1:]):
            raise ValueError(f"{tn} must have the shape of a row of basis[{i}] ({list(b.shape[1:])}), "
                             f"got {C.shape(t)}")
        _contiguous(t, tn)


def _check_scope(scope, num_scopes, basis):
    if not isinstance(scope, (list, tuple)):
        raise TypeError(f"scope must be a list of ints, got {type(scope).__name__}")
    if len(scope) != len(basis):
        raise ValueError(f"scope must hold one int per basis tensor ({len(basis)}), got {len(scope)}")
    if not isinstance(num_scopes, torch.SymInt):  # (a symbolic int under torch.compile / opcheck)
        num_scopes = C.integer(num_scopes, "num_scopes")
    if num_scopes < 1:
        raise ValueError(f"num_scopes must be >= 1, got {num_scopes}")
    first = {}
    for i, s in enumerate(scope):
        if isinstance(s, torch.SymInt):
            continue
        s = C.integer(s, f"scope[{i}]")
        if not 0 <= s < num_scopes:
            raise ValueError(f"scope[{i}] must be in [0, num_scopes) = [0, {num_scopes}), got {s}")
        j = first.setdefault(s, i)
        if basis[i].shape[0] != basis[j].shape[0]:
            raise ValueError(f"basis[{i}] must have as many rows as basis[{j}] of the same scope "
                             f"({basis[j].shape[0]}), got {basis[i].shape[0]}")


def _check_eps(eps, exp_avg_sq):
    eps = C.number(eps, "eps")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps:g}")
    if exp_avg_sq is not None and eps == 0:
        raise ValueError("eps must be > 0 when exp_avg_sq is given, got 0")


def _check_coeff(t, name: str, shape: list, ref_t):
    C.dtype_tensor(t, name, torch.float64)
    C.same_device(t, name, ref_t, "basis[0]")
    if list(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {C.shape(t)}")


def check_subspace_dots(basis, x, exp_avg_sq, eps, scope, num_scopes, gram, values=False):
    _check_basis(basis)
    _check_like(x, "x", basis)
    _check_like(exp_avg_sq, "exp_avg_sq", basis)
    _check_eps(eps, exp_avg_sq)
    _check_scope(scope, num_scopes, basis)
    if x is None and not gram:
        raise ValueError("x must be given when gram is False (the inner products are with x)")


def check_subspace_axpy(out, x, basis, coeff, scale, scope, dots, values=False):
    k = _check_basis(basis)
    _check_like(out, "out", basis)
    _check_like(x, "x", basis)
    num_scopes = coeff.shape[0] if isinstance(coeff, torch.Tensor) and coeff.dim() >= 1 else 1
    _check_coeff(coeff, "coeff", [num_scopes, k], basis[0])
    _check_coeff(scale, "scale", [num_scopes], basis[0])
    _check_scope(scope, num_scopes, basis)
    for i in range(len(basis)):
        if C.overlap(out[i], basis[i]):
            raise ValueError(f"out[{i}] must not overlap basis[{i}]")
        if x is not None and C.overlap(out[i], x[i]):
            raise ValueError(f"out[{i}] must not overlap x[{i}] (pass x=None to update out in place)")
    C.no_overlap(out, "out", [("basis", basis)] + ([("x", x)] if x is not None else []))


def check_subspace_transform(basis, coeff, scope, values=False):
    k = _check_basis(basis)
    num_scopes = coeff.shape[0] if isinstance(coeff, torch.Tensor) and coeff.dim() >= 1 else 1
    _check_coeff(coeff, "coeff", [num_scopes, k, k], basis[0])
    _check_scope(scope, num_scopes, basis)
    C.no_overlap(basis, "basis", [])


def _fake_dots(basis, x, exp_avg_sq, eps, scope, num_scopes, gram):
    k = max(b.shape[0] for b in basis)
    shape = (num_scopes, k + 1, k + 1) if gram else (num_scopes, k + 1)
    return basis[0].new_empty(shape, dtype=torch.float64)


def _fake_axpy(out, x, basis, coeff, scale, scope, dots):
    return basis[0].new_empty((coeff.shape[0], coeff.shape[1] + 1), dtype=torch.float64)


def _fake_transform(basis, coeff, scope):
    return None


# Inner products of each scope's basis rows and x (optionally in the Adam metric), or their whole
# Gram matrix: [S, K + 1] or [S, K + 1, K + 1] fp64.
SUBSPACE_DOTS = define_op(
    "subspace_dots(Tensor[] basis, Tensor[]? x, Tensor[]? exp_avg_sq, float eps, int[] scope, int num_scopes, "
    "bool gram) -> Tensor",
    check=check_subspace_dots, fake=_fake_dots, triton="gu.subspace_dots")

# out <- scale * (x - coeff . basis) per tensor, with the new values' norms (and inner products).
SUBSPACE_AXPY = define_op(
    "subspace_axpy(Tensor(a!)[] out, Tensor[]? x, Tensor[] basis, Tensor coeff, Tensor scale, int[] scope, "
    "bool dots) -> Tensor",
    check=check_subspace_axpy, fake=_fake_axpy, triton="gu.subspace_axpy")

# basis rows <- coeff @ basis rows, in place.
SUBSPACE_TRANSFORM = define_op(
    "subspace_transform(Tensor(a!)[] basis, Tensor coeff, int[] scope) -> ()",
    check=check_subspace_transform, fake=_fake_transform, triton="gu.subspace_transform")


# ------------------------------------------------------------------------------------------------
# The public functions
# ------------------------------------------------------------------------------------------------

def _scopes(scope, n: int):
    if scope is None:
        return list(range(n)), n
    scope = [C.integer(s, f"scope[{i}]") for i, s in enumerate(scope)] if isinstance(scope, (list, tuple)) else scope
    return scope, (max(scope) + 1 if isinstance(scope, list) and scope else 1)


def subspace_dots(basis: Sequence[torch.Tensor], x: Optional[Sequence[torch.Tensor]] = None, *,
                  exp_avg_sq: Optional[Sequence[torch.Tensor]] = None, eps: float = 1e-8,
                  scope: Optional[Sequence[int]] = None, num_scopes: Optional[int] = None, gram: bool = False,
                  backend: Optional[str] = None) -> torch.Tensor:
    """Inner products of basis rows with x, per scope, in one pass over the list.

    basis[t]: [K_t, *shape_t] float32 (float64 for float64 data); x[t]: shape_t, any float dtype;
    exp_avg_sq[t] (optional, shape_t): the metric weight u = 1 / (sqrt(v) + eps). scope[t]: the
    scope of tensor t (default: each tensor its own); a scope's tensors are one vector and share K.
    gram=False: [S, K + 1] fp64 with <q_i, u x> and <x, u x>; gram=True: the [S, K + 1, K + 1]
    Gram matrix of the rows (q_0..q_{K-1}, x). See gu_reference.py."""
    scope, s = _scopes(scope, len(basis) if isinstance(basis, (list, tuple)) else 0)
    num_scopes = s if num_scopes is None else num_scopes
    args = (list(basis), None if x is None else list(x), None if exp_avg_sq is None else list(exp_avg_sq),
            eps, list(scope), num_scopes, bool(gram))
    check_subspace_dots(*args)
    which = _backend.resolve(SUBSPACE_DOTS, basis[0], backend)
    if which == "reference":
        return ref.subspace_dots_reference(*args)
    return SUBSPACE_DOTS.kernel(which)(*args)


def subspace_axpy(out: Sequence[torch.Tensor], basis: Sequence[torch.Tensor], coeff: torch.Tensor, *,
                  x: Optional[Sequence[torch.Tensor]] = None, scale: Optional[torch.Tensor] = None,
                  scope: Optional[Sequence[int]] = None, dots: bool = False,
                  backend: Optional[str] = None) -> torch.Tensor:
    """out[t] <- scale[s] * (x[t] - sum_i coeff[s, i] basis[t][i]) in place (x defaults to out).

    coeff: [S, K] float64; scale: [S] float64 (default 1). Returns [S, K + 1] fp64: the new values'
    squared norms in column K and, with dots=True, their inner products with the basis rows."""
    scope, _ = _scopes(scope, len(basis) if isinstance(basis, (list, tuple)) else 0)
    if scale is None and isinstance(coeff, torch.Tensor) and coeff.dim() >= 1:
        scale = torch.ones(coeff.shape[0], dtype=torch.float64, device=coeff.device)
    args = (list(out), None if x is None else list(x), list(basis), coeff, scale, list(scope), bool(dots))
    check_subspace_axpy(*args)
    which = _backend.resolve(SUBSPACE_AXPY, basis[0], backend)
    if which == "reference":
        new, stats = ref.subspace_axpy_reference(*args)
        with torch.no_grad():
            for o, n in zip(out, new):
                o.copy_(n)
        return stats
    return SUBSPACE_AXPY.kernel(which)(*args)


def subspace_transform(basis: Sequence[torch.Tensor], coeff: torch.Tensor, *,
                       scope: Optional[Sequence[int]] = None, backend: Optional[str] = None) -> None:
    """basis[t] rows <- coeff[s] @ basis[t] rows, in place (coeff [S, K, K] float64)."""
    scope, _ = _scopes(scope, len(basis) if isinstance(basis, (list, tuple)) else 0)
    args = (list(basis), coeff, list(scope))
    check_subspace_transform(*args)
    which = _backend.resolve(SUBSPACE_TRANSFORM, basis[0], backend)
    if which == "reference":
        new = ref.subspace_transform_reference(*args)
        with torch.no_grad():
            for b, n in zip(basis, new):
                b.copy_(n)
        return None
    SUBSPACE_TRANSFORM.kernel(which)(*args)
