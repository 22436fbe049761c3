"""Triton kernel of the token_stats op: the evaluation's per-token statistics fused with the LM head.

Same semantics as the CPU kernel in csrc/cpu/token_stats.cpp (definitions:
python/lethe/ops/token_stats_reference.py; the row arithmetic: csrc/include/lethe/token_stats.h);
the launcher takes arguments that lethe.ops has checked. It runs the chunked LM-head driver
(lm_head.py); per chunk, z (+ bias, added separately, as the reference rounds it), then one program
per row (_token_stats_kernel), the vocabulary in BLOCK_V tiles, two passes:
  1. per tile, its max (NaN left out, flagged, and the first NaN's id kept), the row's running max m
     (a scalar), and per lane s += exp(z - m), t += exp(z - m) (z - m), rescaled when m grows
     (s e^(m - m'), e^(m - m') (t + (m - m') s)); the argmax per lane (strictly larger only, so each
     lane keeps its first maximum), merged at the end to the lowest id of the maximum. Then
     lse = m + log s, mu = t / s - log s;
  2. sigma^2 = sum p (z - lse - mu)^2, centred.
Entries z = -inf add 0 (0 log 0 = 0); where lse is not finite, mu and sigma^2 are NaN. All fp32.
Launched with enable_fp_fusion=False; ignore_index is a runtime argument (do_not_specialize), so
that the kernel has one compiled configuration (aot_configs).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lethe.triton_kernels.lm_head import lm_head_chunks

# Tile size, read at call time (tests lower it to exercise several tiles at small sizes).
BLOCK_V_MAX = 2048  # vocabulary tile (power of two; at 4096 the sm_80 build spills)
NUM_WARPS = 8

NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
EXP_LOW = tl.constexpr(-87.33654475)  # below it, exp underflows: p = 0 there anyway
INT32_MAX = tl.constexpr(0x7FFFFFFF)


@triton.jit(do_not_specialize=["ignore"])  # no variant per ignore_index
def _token_stats_kernel(z_ptr, labels_ptr, llp_ptr, lse_ptr, mu_ptr, var_ptr, am_ptr, row0, V, ignore,
                        BLOCK_V: tl.constexpr):
    # z rows are local to the launch (the chunk); labels and the outputs use r = row0 + pid.
    pid = tl.program_id(0).to(tl.int64)
    r = row0 + pid
    zrow = z_ptr + pid * V
    lanes = tl.arange(0, BLOCK_V)

    # pass 1: running max, per-lane sum-exp and sum-exp-times-logit, argmax, NaN
    m = tl.full([], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK_V], tl.float32)
    t_vec = tl.zeros([BLOCK_V], tl.float32)
    bv = tl.full([BLOCK_V], float("-inf"), tl.float32)
    bi = lanes.to(tl.int32)
    first_nan = tl.zeros([], tl.int64) + V
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + lanes.to(tl.int64)
        cin = cols < V
        x = tl.load(zrow + cols, mask=cin, other=float("-inf"))
        isn = x != x
        first_nan = tl.minimum(first_nan, tl.min(tl.where(isn, cols, V), axis=0))
        x = tl.where(isn, NEG_INF, x)
        gt = x > bv
        bv = tl.where(gt, x, bv)
        bi = tl.where(gt, cols.to(tl.int32), bi)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        grow = (m_new > m) & (m > NEG_INF) & (m_new < POS_INF)
        d = tl.where(grow, m, 0.0) - tl.where(grow, m_new, 0.0)  # (no inf - inf where not growing)
        f = tl.exp(d)
        t_vec = tl.where(grow, (t_vec + d * s_vec) * f, t_vec)
        s_vec = tl.where(grow, s_vec * f, s_vec)
        m = m_new
        alive = (m > NEG_INF) & (m < POS_INF)
        dd = x - tl.where(alive, m, 0.0)
        e = tl.where(alive, tl.exp(dd), 0.0)
        s_vec += e
        t_vec += e * tl.maximum(dd, EXP_LOW)  # where e = 0 (z = -inf included): 0, not 0 * -inf
    nan = first_nan < V
    s = tl.sum(s_vec, axis=0)
    t = tl.sum(t_vec, axis=0)
    best = tl.max(bv, axis=0)
    am = tl.min(tl.where(bv == best, bi, INT32_MAX), axis=0).to(tl.int64)
    am = tl.where(nan, first_nan, am)
    finite = (m > NEG_INF) & (m < POS_INF) & (first_nan >= V)
    s1 = tl.where(finite, s, 1.0)
    ls = tl.log(s1)
    nan_f = tl.full([], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)  # (a NaN global breaks Triton's cache check)
    lse = tl.where(nan, nan_f, tl.where(finite, m + ls, m))
    mu = tl.where(finite, t / s1 - ls, nan_f)

    # pass 2: the centred variance
    acc = tl.zeros([BLOCK_V], tl.float32)
    if finite:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + lanes.to(tl.int64)
            x = tl.load(zrow + cols, mask=cols < V, other=float("-inf"))
            lp = x - lse
            p = tl.exp(lp)
            dv = tl.maximum(lp, EXP_LOW) - mu  # where p = 0 (z = -inf included): 0, not 0 * inf
            acc += p * dv * dv
    var = tl.where(finite, tl.sum(acc, axis=0), nan_f)

    label = tl.load(labels_ptr + r)
    ok = (label != ignore) & (label >= 0) & (label < V)  # bad labels are rejected by lethe.ops
    zl = tl.load(zrow + tl.where(ok, label, 0))
    tl.store(llp_ptr + r, tl.where(ok, zl - lse, 0.0))
    tl.store(lse_ptr + r, lse)
    tl.store(mu_ptr + r, mu)
    tl.store(var_ptr + r, var)
    tl.store(am_ptr + r, am)


def token_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                ignore_index: int, chunk_size: int):
    """(label_logprob, lse, mean_logprob, var_logprob, argmax), each [N] (fp32, int64 for the argmax),
    of the logits hidden @ weight^T + bias, chunk_size rows at a time."""
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    out = [torch.empty(n, dtype=torch.float32, device=dev) for _ in range(4)]
    am = torch.empty(n, dtype=torch.int64, device=dev)
    if n == 0:
        return (*out, am)
    lab = labels.detach().contiguous()
    b = bias.detach().to(torch.float32).contiguous() if bias is not None else None
    llp, lse, mu, var = out

    def rows(s, c, z):
        if b is not None:
            z.add_(b)  # as the reference: (h @ w^T) + b, rounded separately
        _token_stats_kernel[(c,)](z, lab, llp, lse, mu, var, am, s, v, ignore_index, BLOCK_V=BLOCK_V_MAX,
                                  num_warps=NUM_WARPS, enable_fp_fusion=False)

    lm_head_chunks(hidden, weight, chunk_size, rows)
    return llp, lse, mu, var, am


def aot_configs():
    """Every configuration the launcher above compiles (the logits are fp32 whatever the inputs)."""
    yield dict(kernel=_token_stats_kernel, num_warps=NUM_WARPS,
               signature={"z_ptr": "*fp32", "labels_ptr": "*i64", "llp_ptr": "*fp32", "lse_ptr": "*fp32",
                          "mu_ptr": "*fp32", "var_ptr": "*fp32", "am_ptr": "*i64", "row0": "i32", "V": "i32",
                          "ignore": "i32"},
               constexprs={"BLOCK_V": BLOCK_V_MAX})
