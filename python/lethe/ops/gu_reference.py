"""Pure-PyTorch reference of the gu family (the retain subspace of Geometric-Disentanglement
Unlearning): the definitions every kernel is tested against. Everything is computed in fp64.

The ops work on a list of T tensors at once. Tensor t belongs to scope scope[t] (one of S); the
inner products of a scope are summed over its tensors, so a scope is one vector made of its
tensors. basis[t] is [K_t, *shape_t]: K_t rows, each shaped like the tensor (all tensors of a scope
have the same K_t); K = max_t K_t. Rows past a tensor's K_t are absent: they read as 0 in every
output and are never written.

subspace_dots(basis, x, exp_avg_sq, eps, scope, num_scopes, gram)
  u = 1 / (sqrt(exp_avg_sq) + eps) elementwise where exp_avg_sq is given (the Adam metric's
  inverse diag(sqrt(v) + eps)^-1), else 1. The rows of a scope are z_0..z_{K-1} = the basis rows
  and z_K = x (absent when x is None).
  gram=False: [S, K + 1] fp64, out[s, i] = sum_e q_i u x (i < K), out[s, K] = sum_e u x^2.
  gram=True:  [S, K + 1, K + 1] fp64, out[s, i, j] = sum_e u z_i z_j.

subspace_axpy(out, x, basis, coeff, scale, scope, dots)
  out_t <- scale[s] * (x_t - sum_{i<K_t} coeff[s, i] q_t,i), x_t = out_t where x is None. Returns
  [S, K + 1] fp64: column K holds sum_e y^2 of the new values y (before rounding to out's dtype);
  with dots=True, column i < K holds sum_e q_i y (else 0).

subspace_transform(basis, coeff, scope)
  In place, per tensor: rows_i <- sum_{j<K_t} coeff[s, i, j] rows_j for i < K_t (coeff [S, K, K]).
"""
from __future__ import annotations

import torch


def _k(basis):
    return max((b.shape[0] for b in basis), default=0)


def _rows(b):
    n = 1
    for d in b.shape[1:]:
        n *= d
    return b.double().reshape(b.shape[0], n)


def _weight(v, eps):
    return None if v is None else 1.0 / (v.double().sqrt() + eps)


def subspace_dots_reference(basis, x, exp_avg_sq, eps, scope, num_scopes, gram):
    k = _k(basis)
    dev = basis[0].device if basis else torch.device("cpu")
    out = torch.zeros((num_scopes, k + 1, k + 1) if gram else (num_scopes, k + 1), dtype=torch.float64,
                      device=dev)
    for t, b in enumerate(basis):
        s = scope[t]
        kt = b.shape[0]
        rows = _rows(b)
        u = _weight(None if exp_avg_sq is None else exp_avg_sq[t], eps)
        u = torch.ones(rows.shape[1], dtype=torch.float64, device=dev) if u is None else u.reshape(rows.shape[1])
        z = torch.zeros((k + 1, rows.shape[1]), dtype=torch.float64, device=dev)
        z[:kt] = rows
        if x is not None:
            z[k] = x[t].double().reshape(rows.shape[1])
        if gram:
            out[s] += (z * u) @ z.t()
        else:
            out[s] += (z * u) @ z[k]
    return out


def subspace_axpy_reference(out, x, basis, coeff, scale, scope, dots):
    """Returns (new values per tensor, in out's dtypes; the [S, K + 1] statistics)."""
    k = _k(basis)
    dev = basis[0].device if basis else torch.device("cpu")
    stats = torch.zeros((coeff.shape[0], k + 1), dtype=torch.float64, device=dev)
    new = []
    for t, b in enumerate(basis):
        s = scope[t]
        kt = b.shape[0]
        rows = _rows(b)
        src = (out[t] if x is None else x[t]).double().reshape(rows.shape[1])
        y = scale[s].double() * (src - coeff[s, :kt].double() @ rows)
        stats[s, k] += (y * y).sum()
        if dots:
            stats[s, :kt] += rows @ y
        new.append(y.reshape(out[t].shape).to(out[t].dtype))
    return new, stats


def subspace_transform_reference(basis, coeff, scope):
    """The new basis tensors (in their dtypes)."""
    new = []
    for t, b in enumerate(basis):
        kt = b.shape[0]
        rows = _rows(b)
        new.append((coeff[scope[t], :kt, :kt].double() @ rows).reshape(b.shape).to(b.dtype))
    return new
