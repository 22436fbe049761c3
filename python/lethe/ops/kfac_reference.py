"""Pure-PyTorch definitions of the kfac family's ops (python/lethe/ops/kfac.py): what every kernel
is tested against. Written in the factors' dtype (fp32 or fp64), straight from the formulas."""
from __future__ import annotations

import torch


def _rows(x: torch.Tensor, mask, bias: bool, dtype) -> torch.Tensor:
    """x [..., D] as the [N, D (+1)] rows that count: mask's True rows, a ones column last for a bias."""
    x = x.reshape(-1, x.shape[-1]).to(dtype)
    if mask is not None:
        x = x[mask.reshape(-1)]
    if bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=dtype, device=x.device)], dim=1)
    return x


def kfac_factor_update_reference(factor, x, mask, bias, scale, decay):
    """decay * F + scale * X^T X, X the rows that count (the new factor)."""
    X = _rows(x, mask, bias, factor.dtype)
    base = factor * decay if decay != 0 else torch.zeros_like(factor)
    return base + scale * (X.T @ X)


def kfac_damped_inverse_reference(factors, damping):
    """(F_i + lambda_i I)^-1 by Cholesky, of the symmetric matrix F_i's lower triangle defines,
    in fp64 (the definition; kernels factorise in the factor's dtype), returned in F_i's dtype."""
    out = []
    for f, d in zip(factors, damping):
        a = torch.tril(f.double()) + torch.tril(f.double(), -1).T + d * torch.eye(f.shape[0], dtype=torch.float64, device=f.device)
        L, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            i = len(out)
            raise ValueError(f"factors[{i}] + damping[{i}] I must be positive definite (its Cholesky failed in float64)")
        out.append(torch.cholesky_inverse(L).to(f.dtype))
    return out


def kfac_precondition_reference(grad, a_inv, g_inv):
    """(G^-1 dW A^-1 per layer, <dW, G^-1 dW A^-1> per layer in fp64)."""
    out = [gi @ g @ ai for g, ai, gi in zip(grad, a_inv, g_inv)]
    quad = torch.stack([(g.double() * o.double()).sum() for g, o in zip(grad, out)]) if grad else torch.zeros(0)
    return out, quad


def kfac_eigen_precondition_reference(grad, q_a, q_g, lam, damping):
    """(Q_G [(Q_G^T dW Q_A) / (Lambda + lambda)] Q_A^T per layer, sum (Q_G^T dW Q_A)^2 / (Lambda + lambda))."""
    out, quad = [], []
    for g, qa, qg, lm in zip(grad, q_a, q_g, lam):
        r = qg.T @ g @ qa
        s = r / (lm + damping)
        out.append(qg @ s @ qa.T)
        quad.append((r.double() * s.double()).sum())
    return out, (torch.stack(quad) if quad else torch.zeros(0, dtype=torch.float64))


def kfac_eigen_update_reference(lam, a, g, q_a, q_g, mask, bias, scale, decay):
    """decay * Lambda + scale * (G Q_G)^2^T (A Q_A)^2 over the rows that count (EK-FAC's diagonal
    in the Kronecker eigenbasis: the mean over tokens of the squared projected per-token gradient)."""
    A = _rows(a, mask, bias, lam.dtype) @ q_a
    G = _rows(g, mask, False, lam.dtype) @ q_g
    base = lam * decay if decay != 0 else torch.zeros_like(lam)
    return base + scale * ((G * G).T @ (A * A))
