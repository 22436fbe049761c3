"""Pure-PyTorch reference of the ssd family (Selective Synaptic Dampening, Foster et al. 2023):
the definitions every kernel is tested against, written as the torch operations of the authors'
rule (if-loops/selective-synaptic-dampening, ParameterPerturber.calc_importance and
modify_weight), in fp32, in that order.

fisher_accumulate(importance, grad, scale, seed)
  Per tensor t: I_t <- I_t + (g_t * g_t) * scale, in fp32 (g converted to fp32 first; scale
  rounded to fp32 once; with scale = 1 this is the authors' `imp += grad.pow(2)` bit for bit).
  A bf16 importance is widened to fp32, updated, and stored back by stochastic rounding: the fp32
  bits plus 16 random bits, truncated to the upper 16 (NaN -> 0x7FC0). The random bits of element
  e of tensor t are a counter-based hash of (seed, t, e) (random_bits below), so every backend
  draws the same ones and a call is reproducible from its seed.

ssd_dampen(param, importance, forget_importance, alpha, lambd, exponent, bound)
  Per tensor, with d = I_D (importance) and f = I_f (forget_importance) in fp32 and alpha,
  lambd, bound rounded to fp32:
    selected = f > d * alpha                      (strict; f = 0 or NaN is never selected)
    w        = ((d * lambd) / f) ** exponent      (at selected elements f > 0: no division by 0)
    w        = bound where w > bound              (the clamp; d = 0 gives w = 0 for e > 0: the weight
                                                   zeroed; 1 for e = 0; Inf, so bound, for e < 0)
    param    = param * w where selected, else unchanged (computed in fp32, stored in param's dtype)
  Returns (the number of selected elements per tensor [T] int64, the sum of their w [T] fp64).
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32: xor-shift / multiply), on int64 tensors holding uint32s."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def tensor_key(seed: int, t: int) -> int:
    """The per-tensor key of the random bits (csrc/include/lethe/ssd.h's tensor_key)."""
    h = lambda v: int(_hash32(torch.tensor([v & _M32], dtype=torch.int64))[0])  # noqa: E731
    k = h(t ^ 0x9E3779B9)
    k = h((seed & _M32) ^ k)
    return h(((seed >> 32) & _M32) ^ k)


def random_bits(seed: int, t: int, n: int, device=None) -> torch.Tensor:
    """The 32 random bits of elements 0..n-1 of tensor t [n] (int64 holding uint32)."""
    e = torch.arange(n, dtype=torch.int64, device=device)
    key = tensor_key(seed, t)
    return _hash32((e & _M32) ^ _hash32(((e >> 32) & _M32) ^ key))


def round_bf16_stochastic(v: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """fp32 v rounded to bf16 with the low 16 of `bits` as the random offset."""
    u = v.contiguous().view(torch.int32).to(torch.int64) & _M32
    r = ((u + (bits & 0xFFFF)) >> 16) & 0xFFFF
    r = torch.where(torch.isnan(v), torch.full_like(r, 0x7FC0), r)
    r = torch.where(r >= 0x8000, r - 0x10000, r).to(torch.int16)  # the same 16 bits, signed
    return r.view(torch.bfloat16).reshape(v.shape)


def fisher_accumulate_reference(importance, grad, scale, seed):
    """The new importance tensors, in their dtypes."""
    s = torch.tensor(scale, dtype=torch.float32).item()  # scale rounded to fp32
    out = []
    for t, (imp, g) in enumerate(zip(importance, grad)):
        g32 = g.float()
        v = imp.float() + (g32 * g32) * s
        if imp.dtype == torch.bfloat16:
            out.append(round_bf16_stochastic(v.reshape(-1), random_bits(seed, t, v.numel(), v.device)).reshape(v.shape))
        else:
            out.append(v)
    return out


def ssd_dampen_reference(param, importance, forget_importance, alpha, lambd, exponent, bound):
    """(the new parameter tensors, selected counts [T] int64, sums of the factors [T] fp64)."""
    new, counts, sums = [], [], []
    dev = param[0].device if param else torch.device("cpu")
    for p, d, f in zip(param, importance, forget_importance):
        d, f = d.float(), f.float()
        locations = f > d.mul(alpha)
        weight = d.mul(lambd).div(f).pow(exponent)
        update = weight[locations]
        update[update > bound] = bound
        q = p.detach().clone()
        q[locations] = p.detach()[locations].mul(update).to(p.dtype)
        new.append(q)
        counts.append(int(locations.sum()))
        sums.append(float(update.double().sum()))
    return (new, torch.tensor(counts, dtype=torch.int64, device=dev),
            torch.tensor(sums, dtype=torch.float64, device=dev))
