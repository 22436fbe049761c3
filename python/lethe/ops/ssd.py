"""ssd family: the multi-tensor passes of Selective Synaptic Dampening (Foster et al. 2023):
accumulating a diagonal Fisher (I <- I + s g^2, fp32 or bf16 accumulators with stochastic
rounding) and dampening the parameters that matter more to the forget set than to the training
data (theta <- theta * min((lambda I_D / I_f)^e, b) where I_f > alpha I_D). lethe.methods' "ssd"
composes them.

Definitions: python/lethe/ops/ssd_reference.py (the authors' rule, op for op, in fp32: the kernels
give its results bit for bit; for an exponent other than 0, 1, 2, 3 and -1 lethe's power is the
fp64 power 2^(e log2 |x|) rounded to fp32, while torch's fp32 pow is up to ~16 ulp off that: a
few ulp apart). Each op is one pass over the whole list (one parallel loop / one launch for all
its tensors, in place); the counts and sums of ssd_dampen are per-block partials summed in a fixed
order, so they are deterministic. Kernels: csrc/cpu/ssd.cpp, csrc/cuda/ssd.cu, triton_kernels/ssd.py.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

from lethe.ops import _backend
from lethe.ops import checks as C
from lethe.ops import ssd_reference as ref
from lethe.ops._op import define_op

__all__ = ["fisher_accumulate", "ssd_dampen", "DampenStats"]

IMPORTANCE_DTYPES = (torch.float32, torch.bfloat16)
GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# The ops' argument checks (csrc/include/lethe/ssd_checks.h words them the same way, in the same
# order). No value checks: the ops read no value that could be out of range.
# ------------------------------------------------------------------------------------------------

def _list(ts, name: str):
    if not isinstance(ts, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(ts).__name__}")
    for i, t in enumerate(ts):
        C.tensor(t, f"{name}[{i}]")


def _dtypes(t, name: str, allowed: tuple, words: str):
    if t.dtype not in allowed:
        raise TypeError(f"{name} must be {words}, got {t.dtype}")


def _pair(ts, name: str, first, first_name: str, allowed: tuple, words: str):
    """A list like `first`: as many tensors, each of its tensor's shape, on first[0]'s device."""
    _list(ts, name)
    if len(ts) != len(first):
        raise ValueError(f"{name} must hold one tensor per {first_name} tensor ({len(first)}), got {len(ts)}")
    for i, (t, r) in enumerate(zip(ts, first)):
        tn = f"{name}[{i}]"
        _dtypes(t, tn, allowed, words)
        C.same_device(t, tn, first[0], f"{first_name}[0]")
        if t.shape != r.shape:
            raise ValueError(f"{tn} must have the shape of {first_name}[{i}] ({C.shape(r)}), got {C.shape(t)}")
        if not t.is_contiguous():
            raise ValueError(f"{tn} must be contiguous")


def _first(ts, name: str, allowed: tuple, words: str):
    _list(ts, name)
    if len(ts) == 0:
        raise ValueError(f"{name} must hold at least one tensor")
    for i, t in enumerate(ts):
        tn = f"{name}[{i}]"
        _dtypes(t, tn, allowed, words)
        C.same_device(t, tn, ts[0], f"{name}[0]")
        if not t.is_contiguous():
            raise ValueError(f"{tn} must be contiguous")


def _finite(x, name: str, cond, words: str) -> float:
    v = C.number(x, name)
    if not (math.isfinite(v) and cond(v)):
        raise ValueError(f"{name} must be a finite number{' ' + words if words else ''}, got {v:g}")
    return v


def check_fisher_accumulate(importance, grad, scale, seed, values=False):
    _first(importance, "importance", IMPORTANCE_DTYPES, "float32 or bfloat16")
    _pair(grad, "grad", importance, "importance", GRAD_DTYPES, "float32, float16, bfloat16 or float64")
    _finite(scale, "scale", lambda v: v >= 0, ">= 0")
    if not isinstance(seed, torch.SymInt):
        C.integer(seed, "seed")
    for i, (a, g) in enumerate(zip(importance, grad)):
        if C.overlap(a, g):
            raise ValueError(f"importance[{i}] must not overlap grad[{i}]")
    C.no_overlap(importance, "importance", [("grad", grad)])


def check_ssd_dampen(param, importance, forget_importance, alpha, lambd, exponent, bound, values=False):
    _first(param, "param", PARAM_DTYPES, "float32, float16 or bfloat16")
    _pair(importance, "importance", param, "param", IMPORTANCE_DTYPES, "float32 or bfloat16")
    _pair(forget_importance, "forget_importance", param, "param", IMPORTANCE_DTYPES, "float32 or bfloat16")
    _finite(alpha, "alpha", lambda v: v > 0, "> 0")
    _finite(lambd, "lambd", lambda v: v >= 0, ">= 0")
    _finite(exponent, "exponent", lambda v: True, "")
    _finite(bound, "bound", lambda v: v >= 0, ">= 0")
    for i, p in enumerate(param):
        if C.overlap(p, importance[i]) or C.overlap(p, forget_importance[i]):
            raise ValueError(f"param[{i}] must not overlap importance[{i}] or forget_importance[{i}]")
    C.no_overlap(param, "param", [("importance", importance), ("forget_importance", forget_importance)])


def _fake_fisher(importance, grad, scale, seed):
    return None


def _fake_dampen(param, importance, forget_importance, alpha, lambd, exponent, bound):
    n = len(param)
    return (param[0].new_empty((n,), dtype=torch.int64), param[0].new_empty((n,), dtype=torch.float64))


# I <- I + (g * g) * scale per tensor, in place (bf16 accumulators: stochastic rounding from seed).
FISHER_ACCUMULATE = define_op(
    "fisher_accumulate(Tensor(a!)[] importance, Tensor[] grad, float scale, int seed) -> ()",
    check=check_fisher_accumulate, fake=_fake_fisher, triton="ssd.fisher_accumulate")

# param <- param * min((lambd d / f)^exponent, bound) where f > alpha d, in place; per tensor the
# number of selected elements [T] int64 and the sum of their factors [T] fp64.
SSD_DAMPEN = define_op(
    "ssd_dampen(Tensor(a!)[] param, Tensor[] importance, Tensor[] forget_importance, float alpha, float lambd, "
    "float exponent, float bound) -> (Tensor, Tensor)",
    check=check_ssd_dampen, fake=_fake_dampen, triton="ssd.ssd_dampen")


# ------------------------------------------------------------------------------------------------
# The public functions
# ------------------------------------------------------------------------------------------------

def _as_list(ts):
    return list(ts) if isinstance(ts, (list, tuple)) else ts  # (anything else: the check names it)


class DampenStats(NamedTuple):
    """What ssd_dampen changed, per tensor of its list: the number of selected (dampened) elements
    [T] int64 and the mean dampening factor over them [T] fp64 (1 where none was selected)."""
    selected: torch.Tensor
    mean_factor: torch.Tensor


def fisher_accumulate(importance: Sequence[torch.Tensor], grad: Sequence[torch.Tensor], *, scale: float = 1.0,
                      seed: int = 0, backend: Optional[str] = None) -> None:
    """importance[t] <- importance[t] + (grad[t] * grad[t]) * scale, in place, for the whole list in
    one pass. importance: float32, or bfloat16 (then stochastically rounded, the random bits a hash
    of (seed, t, element): pass a new seed per call); grad: any float dtype, of importance's shape."""
    args = (_as_list(importance), _as_list(grad), scale, seed)
    check_fisher_accumulate(*args)
    which = _backend.resolve(FISHER_ACCUMULATE, args[0][0], backend)
    with torch.no_grad():
        if which == "reference":
            for a, n in zip(args[0], ref.fisher_accumulate_reference(*args)):
                a.copy_(n)
            return None
        FISHER_ACCUMULATE.kernel(which)(*args)


def ssd_dampen(param: Sequence[torch.Tensor], importance: Sequence[torch.Tensor],
               forget_importance: Sequence[torch.Tensor], *, alpha: float = 10.0, lambd: float = 1.0,
               exponent: float = 1.0, bound: float = 1.0, backend: Optional[str] = None) -> DampenStats:
    """Selective synaptic dampening of every tensor of `param`, in place, in one pass: where
    forget_importance > alpha * importance (strictly), param <- param * min((lambd * importance /
    forget_importance) ** exponent, bound). The defaults are the paper's (alpha 10, lambda 1, and
    the authors' code's exponent 1 and bound 1). importance / forget_importance: float32 or
    bfloat16, of param's shapes; param: float32, float16 or bfloat16. Returns DampenStats."""
    args = (_as_list(param), _as_list(importance), _as_list(forget_importance), alpha, lambd, exponent, bound)
    check_ssd_dampen(*args)
    which = _backend.resolve(SSD_DAMPEN, args[0][0], backend)
    with torch.no_grad():
        if which == "reference":
            new, counts, sums = ref.ssd_dampen_reference(*args)
            for p, n in zip(args[0], new):
                p.copy_(n)
        else:
            counts, sums = SSD_DAMPEN.kernel(which)(*args)
    mean = torch.where(counts > 0, sums / counts.clamp(min=1).to(torch.float64), torch.ones_like(sums))
    return DampenStats(counts, mean)
